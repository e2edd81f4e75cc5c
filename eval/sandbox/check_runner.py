"""The trusted half of a HumanEval check: the problem's `check` calls the candidate through a proxy.

Started by `eval/sandbox/execution.py` as `python -I -S check_runner.py REQUEST_FD
REPLY_FD` with the job on stdin as JSON: {"prompt", "test", "entry_point",
"program", "memory_bytes", "cpu_seconds"} (it limits itself to those). It runs the prompt (for helpers that tests use, such as `poly` of
HumanEval/32) and the test here, in this process; sends the program to the
candidate server in the sandbox (`eval/sandbox/candidate_server.py`); then calls
`check(candidate)`, where `candidate` forwards each call to the server and
returns the plain data it answers. Its one line of output is the verdict as
JSON: {"passed": true, ...} if and only if `check` returned.

Why the candidate cannot forge a pass: no code of it runs in this process.
It can only answer a call with a literal value (read with `ast.literal_eval`,
compared here with this process's own `==`), with the name and message of an
exception, or not at all. Nothing it prints or does to its own process, this
pipe's framing or its own interpreter reaches `check`'s control flow or this
output. An answer that is not well-formed, or a candidate that stops
answering, raises a BaseException here that a test's `except Exception`
cannot swallow, so it ends the check as a failure.
"""

import builtins
import json
import os
import resource
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I leaves the script's folder off the path
from plain_data import MAX_LINE_BYTES, UnreadableData, decode, encode  # noqa: E402

REASON_CHARS = 300


class CandidateGone(BaseException):
    """The candidate's process stopped answering: it exited, or was killed."""


class CandidateBroken(BaseException):
    """The candidate sent something that is not a well-formed answer."""


class CandidateRaised(Exception):
    """An exception raised in the candidate, known here only by its name and message."""

    def __init__(self, name: str, message: str):
        Exception.__init__(self, message)
        self.name = name

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Channel:
    def __init__(self, request_fd: int, reply_fd: int):
        self.requests = os.fdopen(request_fd, "wb")
        self.replies = os.fdopen(reply_fd, "rb")

    def ask(self, message: tuple) -> tuple:
        try:
            self.requests.write(encode(message))
            self.requests.flush()
        except BrokenPipeError:
            raise CandidateGone from None
        line = self.replies.readline(MAX_LINE_BYTES + 1)
        if not line:
            raise CandidateGone
        try:
            reply = decode(line)
        except UnreadableData as err:
            raise CandidateBroken(f"sent {err}") from None
        if not (isinstance(reply, tuple) and reply and isinstance(reply[0], str)):
            raise CandidateBroken("sent an answer of the wrong shape")
        return reply


# Exceptions that steer the interpreter rather than report an error: raised from a call that
# `map` or a generator makes, a StopIteration silently ends the iteration, so `all(map(...))`
# over a wrong candidate would be True. The candidate's own is never raised as one of these.
CONTROL_FLOW = (StopIteration, StopAsyncIteration, GeneratorExit)


def _exception(name: str, message: str) -> Exception:
    """The exception the candidate named, as plain data: a CandidateRaised carrying its name and message.

    For a built-in error type the CandidateRaised is also an instance of it, so a test's
    `except ValueError` still catches it; never for the control-flow exceptions above.
    """
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception) and not issubclass(kind, CONTROL_FLOW):
        try:
            named = type(name, (CandidateRaised, kind), {"__init__": CandidateRaised.__init__, "__str__": CandidateRaised.__str__})
            return named(name, message)
        except TypeError:  # a built-in type that cannot be a base (none in CPython 3.10-3.13, but be safe)
            pass
    return CandidateRaised(name, message)


def proxy(channel: Channel, name: str):
    """A stand-in for the candidate function: each call goes to the sandbox; plain data comes back."""

    def candidate(*args, **kwargs):
        reply = channel.ask(("call", args, kwargs))
        if reply[0] == "return" and len(reply) == 2:
            return reply[1]
        if reply[0] == "raise" and len(reply) == 3 and all(isinstance(part, str) for part in reply[1:]):
            raise _exception(reply[1], reply[2])
        raise CandidateBroken("sent an answer of the wrong shape")

    candidate.__name__ = candidate.__qualname__ = name
    return candidate


def _describe(err: BaseException) -> str:
    if isinstance(err, CandidateRaised):
        return f"{err.name}: {err}" if str(err) else err.name
    return traceback.format_exception_only(type(err), err)[-1].strip()


def _define_helpers(prompt: str, namespace: dict) -> None:
    """The prompt's functions (the entry point only as its signature and docstring) and imports."""
    try:
        exec(compile(prompt, "prompt.py", "exec"), namespace)
    except SyntaxError:  # a prompt that stops right after `def f(...):`
        exec(compile(prompt + "\n    pass\n", "prompt.py", "exec"), namespace)


def _failed(reason: str, candidate_gone: bool = False) -> dict:
    return {"passed": False, "reason": reason[:REASON_CHARS], "candidate_gone": candidate_gone}


def run(job: dict, channel: Channel) -> dict:
    namespace = {"__name__": "__check__"}
    try:
        _define_helpers(job["prompt"], namespace)
        exec(compile(job["test"], "test.py", "exec"), namespace)
        check = namespace["check"]
    except Exception as err:  # noqa: BLE001 - the problem itself is broken: no candidate can pass it
        return _failed(f"error: the problem's prompt and test do not run: {_describe(err)}")
    try:
        loaded = channel.ask(("load", job["program"], job["entry_point"]))
        if loaded[0] == "error" and len(loaded) == 2 and isinstance(loaded[1], str):
            return _failed(f"failed: {loaded[1]}")
        if loaded != ("ready",):
            raise CandidateBroken("sent an answer of the wrong shape")
        candidate = proxy(channel, job["entry_point"])
        namespace[job["entry_point"]] = candidate  # a test may call it by name too (HumanEval/33 does)
        check(candidate)
    except CandidateGone:
        return _failed("the candidate stopped answering", candidate_gone=True)
    except CandidateBroken as err:
        return _failed(f"failed: the candidate {err}")
    except BaseException as err:  # noqa: BLE001 - any way out of check() but returning is a failure
        return _failed(f"failed: {_describe(err)}")
    return {"passed": True, "reason": "passed", "candidate_gone": False}


def main() -> None:
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)  # big integers are plain data too
    job = json.loads(sys.stdin.read())
    resource.setrlimit(resource.RLIMIT_AS, (job["memory_bytes"], job["memory_bytes"]))  # parsing a huge answer
    resource.setrlimit(resource.RLIMIT_CPU, (job["cpu_seconds"], job["cpu_seconds"]))
    verdict_stream, sys.stdout = sys.stdout, sys.stderr  # whatever the test prints stays off the verdict line
    verdict = run(job, Channel(int(sys.argv[1]), int(sys.argv[2])))
    verdict_stream.write(json.dumps(verdict) + "\n")
    verdict_stream.flush()


if __name__ == "__main__":
    main()
