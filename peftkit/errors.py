"""The exceptions the CLI turns into a single line and exit code 2."""


class UserError(Exception):
    """Bad input: the message is one line that says what is wrong and how to fix it."""


class Diverged(UserError):
    """Training stopped on a non-finite loss or weights; `report` is the run's report, marked diverged."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a command: the message says what was kept; `code` is the exit code
    (130, or 143 for SIGTERM). A KeyboardInterrupt, so that it stops a sweep and passes through Hydra,
    which turns any Exception of a job into a traceback."""

    def __init__(self, message: str = "", code: int = 130):
        super().__init__(message)
        self.code = code


class Terminated(KeyboardInterrupt):
    """SIGTERM during training (a cluster's time limit or preemption, `timeout`, `docker stop`): the run
    stops as on Ctrl-C, keeping its checkpoint, instead of dying mid-write."""


class CtrlC:
    """Ctrl-C that cannot be lost: SIGINT raises KeyboardInterrupt as usual (SIGTERM: `Terminated`) and also sets a flag that a
    loop checks at safe points (`check`). Python drops an exception raised inside a finalizer (a
    `__del__`, a weakref callback run by the garbage collector), so a Ctrl-C that lands there would
    otherwise leave a run training on (seen once in a test: steps went on after the signal)."""

    def __init__(self):
        self.pressed = False
        self.previous = None

    def _handler(self, signum, frame):
        import signal

        self.pressed = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        raise self.pressed

    def __enter__(self) -> "CtrlC":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # signals go to the main thread only
            self.previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for s, handler in (self.previous or {}).items():
            signal.signal(s, handler)
        self.previous = None

    def check(self) -> None:
        """Raise the KeyboardInterrupt (or Terminated) a finalizer swallowed."""
        if self.pressed:
            raise self.pressed
