"""The one exception type the command line turns into a one-line message (no traceback)."""


class UserError(Exception):
    """A problem the user can fix: the message names the field, file or rank and the fix."""
