"""The one exception the CLI turns into a single line and exit code 2."""


class UserError(Exception):
    """Bad input: the message is one line that says what is wrong and how to fix it."""
