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
