"""The sandboxed half of a HumanEval check: run the model's program, then answer calls of its function.

Started in the sandbox as `python -I candidate_server.py REQUEST_FD REPLY_FD`.
The first request is ("load", program source, function name): the program
(prompt + completion) runs as `__main__`, and the reply is ("ready",) or
("error", "ExceptionName: message"). Each later request ("call", args, kwargs)
is answered ("return", value) or ("raise", exception name, message). Messages
are plain data (`plain_data`). What the program prints goes to stdout and
stderr, never into the replies.

Nothing here is trusted. The program can rewrite this server, write to its
descriptors or exit: all the checker ever receives is plain data, and the
verdict is the checker's (`eval/sandbox/check_runner.py`, another process).
"""

import os
import sys
import traceback
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I leaves the script's folder off the path
from plain_data import decode, encode, to_plain  # noqa: E402

MESSAGE_CHARS = 1000


def _describe(err: BaseException) -> str:
    return traceback.format_exception_only(type(err), err)[-1].strip()[:MESSAGE_CHARS]


def load(source: str, name: str):
    """Run the program as the main module; its function `name`."""
    program = types.ModuleType("__main__")
    program.__file__ = "/tmp/program.py"
    sys.modules["__main__"] = program  # so pickle, dataclasses and doctest find the program's own names
    exec(compile(source, "program.py", "exec"), program.__dict__)
    if not callable(getattr(program, name, None)):
        raise NameError(f"the program defines no function {name!r}")
    return getattr(program, name)


def call(function, args, kwargs) -> tuple:
    try:
        return ("return", to_plain(function(*args, **kwargs)))
    except Exception as err:  # noqa: BLE001 - the checker decides what an exception means
        return ("raise", type(err).__name__, _message(err))


def _message(err: Exception) -> str:
    try:
        return str(err)[:MESSAGE_CHARS]
    except Exception:  # noqa: BLE001 - a message that cannot be printed is left out
        return ""


def serve(requests, replies) -> None:
    _, source, name = decode(requests.readline())
    try:
        function = load(source, name)
    except Exception as err:  # noqa: BLE001 - SystemExit and the like end the server, as they end any program
        traceback.print_exc()
        replies.write(encode(("error", _describe(err))))
        replies.flush()
        return
    replies.write(encode(("ready",)))
    replies.flush()
    for line in requests:
        _, args, kwargs = decode(line)
        reply = call(function, args, kwargs)
        try:
            message = encode(reply)
        except Exception as err:  # noqa: BLE001 - e.g. a value too deep to repr
            message = encode(("raise", type(err).__name__, _describe(err)))
        replies.write(message)
        replies.flush()


def main() -> None:
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)  # big integers are plain data too
    request_fd, reply_fd = int(sys.argv[1]), int(sys.argv[2])
    with os.fdopen(request_fd, "rb") as requests, os.fdopen(reply_fd, "wb") as replies:
        serve(requests, replies)


if __name__ == "__main__":
    main()
