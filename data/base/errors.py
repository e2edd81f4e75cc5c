"""The one exception type a user is meant to see.

Anything the user can fix (a wrong config key, a missing file, a model that
cannot be reached offline) raises `UserError` with a message that says what is
wrong and what to do. The command line prints that message as a single line
and exits with status 2, without a traceback.
"""


class UserError(Exception):
    """An error caused by input the user controls; its message says how to fix it."""


def reason_of(err: BaseException) -> str:
    """One line saying why something failed, for a status file or a summary: a UserError's own
    message; anything else its type and the first line of its message."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, UserError):
        return text or "error"
    return f"{type(err).__name__}: {text}"[:500] if text else type(err).__name__
