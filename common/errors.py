"""The one exception type for mistakes a user can fix.

The CLI prints a `UserError` as a plain message (no traceback) and exits with status 2; every
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names what was wrong and how to fix it."""
