"""The one exception type a user is meant to see.

Anything the user can fix (a wrong config key, a missing file, a model that
cannot be reached offline) raises `UserError` with a message that says what is
wrong and what to do. The command line prints that message as a single line
and exits with status 2, without a traceback.
"""


class UserError(Exception):
    """An error caused by input the user controls; its message says how to fix it."""
