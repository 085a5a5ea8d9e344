"""The exceptions the CLI turns into a single line and exit code 2."""


class UserError(Exception):
    """Bad input: the message is one line that says what is wrong and how to fix it."""


class Diverged(UserError):
    """Training stopped on a non-finite loss or weights; `report` is the run's report, marked diverged."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a command: the message says what was kept. A KeyboardInterrupt, so that it stops a
    sweep and passes through Hydra, which turns any Exception of a job into a traceback."""


class CtrlC:
    """Ctrl-C that cannot be lost: SIGINT raises KeyboardInterrupt as usual and also sets a flag that a
    loop checks at safe points (`check`). Python drops an exception raised inside a finalizer (a
    `__del__`, a weakref callback run by the garbage collector), so a Ctrl-C that lands there would
    otherwise leave a run training on (seen once in a test: steps went on after the signal)."""

    def __init__(self):
        self.pressed = False
        self.previous = None

    def _handler(self, signum, frame):
        self.pressed = True
        raise KeyboardInterrupt

    def __enter__(self) -> "CtrlC":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # signals go to the main thread only
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    def check(self) -> None:
        """Raise the KeyboardInterrupt a finalizer swallowed."""
        if self.pressed:
            raise KeyboardInterrupt
