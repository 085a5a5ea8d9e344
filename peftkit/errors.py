"""The exceptions the CLI turns into a single line and exit code 2."""


class UserError(Exception):
    """Bad input: the message is one line that says what is wrong and how to fix it."""


class Diverged(UserError):
    """Training stopped on a non-finite loss or weights; `report` is the run's report, marked diverged."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report
