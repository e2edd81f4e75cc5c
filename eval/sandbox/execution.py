"""Run untrusted Python and decide whether it passed its tests, with a verdict it cannot forge.

Two processes take part in each HumanEval check (`check_function`):

* the candidate: the prompt + completion, run by `eval/sandbox/candidate_server.py`
  inside the sandbox (`eval.sandbox`), which answers calls of its function;
* the checker: `eval/sandbox/check_runner.py`, a separate, limited process outside the
  sandbox that runs the problem's `check(candidate)` with a proxy that sends
  each call's arguments to the candidate and gets plain data back.

The verdict is the checker's: "passed" only if `check` returned. Nothing the
candidate does in its own process (print a sentinel, exit early with status 0,
run again under `python -O`, patch builtins, return an object whose `__eq__`
is always true) can make `check` return, since no code of it runs where the
asserts are. `run_python` runs a whole program in the same sandbox and reports
how it ended; it serves plain execution (and the tests of the sandbox).

A run never raises for what the program does: it ends within its timeout, with
everything it started, and its temporary files go with it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from twophase.eval.sandbox.container import ENVIRONMENT, ContainedPython, Ended, Limits, exec_folder_prefix

HERE = Path(__file__).parent
CANDIDATE_SERVER = HERE / "candidate_server.py"
CHECK_RUNNER = HERE / "check_runner.py"
PLAIN_DATA = HERE / "plain_data.py"
KEPT_OUTPUT_CHARS = 2000  # the tail of stdout/stderr kept for the report
REASON_CHARS = 300
GONE_GRACE_SECONDS = 1.0  # how long a candidate that stopped answering may take to finish exiting

# The last stderr line of an uncaught exception, e.g. "AssertionError" or
# "NameError: name 'x' is not defined". A SyntaxError has no "Traceback" header.
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)\b")


class SandboxError(RuntimeError):
    """The sandbox could not be built for one run (after it worked at the start): a fault of the machine, not the program."""


@dataclass(frozen=True)
class ExecutionResult:
    """What happened to one program: how it ended, and the tail of what it printed."""

    returncode: int | None  # negative: killed by that signal; None: stopped at the timeout
    timed_out: bool
    stdout: str
    stderr: str
    seconds: float


@dataclass(frozen=True)
class CheckResult:
    """A verdict on one completion, and the tail of what the candidate printed."""

    passed: bool
    reason: str  # "passed", or why not
    stdout: str
    stderr: str
    seconds: float


def limits_for(timeout: float) -> Limits:
    return replace(Limits(), cpu_seconds=int(timeout) + 1)


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4 * KEPT_OUTPUT_CHARS))
        text = f.read().decode("utf-8", errors="replace")
    return text[-KEPT_OUTPUT_CHARS:]


def _raise_on_setup_error(ended: Ended) -> None:
    if ended.setup_error:
        raise SandboxError(f"the sandbox could not be built: {ended.setup_error}")


def run_python(source: str, timeout: float = 3.0, sandbox: str = "namespaces") -> ExecutionResult:
    """Run `source` as a contained Python program; never raises for what the program does."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=exec_folder_prefix(), ignore_cleanup_errors=True) as private:
        folder = Path(private)  # the evaluator's own files: the program never sees this folder
        (folder / "program.py").write_text(source, encoding="utf-8")
        with open(folder / "stdout", "wb") as out, open(folder / "stderr", "wb") as err:
            program = ContainedPython(folder / "program.py", mode=sandbox, limits=limits_for(timeout), stdout=out, stderr=err)
            finished = program.wait(timeout)
            ended = program.stop()
        _raise_on_setup_error(ended)
        return ExecutionResult(
            returncode=ended.returncode,
            timed_out=not finished,
            stdout=_tail(folder / "stdout"),
            stderr=_tail(folder / "stderr"),
            seconds=time.monotonic() - start,
        )


def check_function(
    program: str, entry_point: str, prompt: str, test: str, timeout: float = 3.0, sandbox: str = "namespaces"
) -> CheckResult:
    """Run the problem's `check` (in `test`) against `entry_point` of `program`; see the module docstring."""
    start = time.monotonic()
    limits = limits_for(timeout)
    job = {"program": program, "entry_point": entry_point, "prompt": prompt, "test": test}
    job = json.dumps({**job, "memory_bytes": limits.memory_bytes, "cpu_seconds": limits.cpu_seconds}).encode()
    with tempfile.TemporaryDirectory(prefix=exec_folder_prefix(), ignore_cleanup_errors=True) as private:
        folder = Path(private)  # the evaluator's own files: the program never sees this folder
        with open(folder / "stdout", "wb") as out, open(folder / "stderr", "wb") as err, open(folder / "checker", "wb") as checker_err:
            candidate, checker = _start_both(sandbox, limits, out, err, checker_err)
            verdict, timed_out = _await_verdict(checker, job, timeout)
            if verdict.get("candidate_gone"):
                candidate.wait(GONE_GRACE_SECONDS)  # let its exit status arrive
            ended = candidate.stop()
        _raise_on_setup_error(ended)
        run = ExecutionResult(ended.returncode, timed_out, _tail(folder / "stdout"), _tail(folder / "stderr"), time.monotonic() - start)
        passed = verdict.get("passed") is True and not timed_out
        return CheckResult(passed, _reason(verdict, run, timeout, folder / "checker"), run.stdout, run.stderr, run.seconds)


def _start_both(sandbox: str, limits: Limits, out, err, checker_err) -> tuple[ContainedPython, subprocess.Popen]:
    """The candidate server in the sandbox and the checker beside it, joined by two pipes."""
    requests_in, requests_out = os.pipe()
    replies_in, replies_out = os.pipe()
    candidate = None
    try:
        candidate = ContainedPython(
            CANDIDATE_SERVER, [str(requests_in), str(replies_out)], mode=sandbox, limits=limits,
            stdout=out, stderr=err, pass_fds=(requests_in, replies_out), installs=[PLAIN_DATA],
        )
        return candidate, _start_checker(requests_out, replies_in, checker_err)
    except BaseException:
        if candidate is not None:
            candidate.stop()
        raise
    finally:
        for fd in (requests_in, requests_out, replies_in, replies_out):
            os.close(fd)  # each pipe end now lives only in the one process that uses it


def _reason(verdict: dict, run: ExecutionResult, timeout: float, checker_stderr: Path) -> str:
    if run.timed_out or verdict.get("candidate_gone"):
        return describe_failure(run, timeout)  # how the candidate ended says more than "it stopped answering"
    if "passed" in verdict:
        return str(verdict["reason"])[:REASON_CHARS]
    return f"error: the checker failed: {_tail(checker_stderr).strip()[-REASON_CHARS:]}"


def _start_checker(requests_out: int, replies_in: int, stderr) -> subprocess.Popen:
    # Trusted code that limits itself: no preexec_fn, so the start stays cheap in a large evaluator process.
    return subprocess.Popen(
        [sys.executable, "-I", "-S", str(CHECK_RUNNER), str(requests_out), str(replies_in)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        pass_fds=(requests_out, replies_in),
        env=ENVIRONMENT,
        start_new_session=True,
    )


def _await_verdict(checker: subprocess.Popen, job: bytes, timeout: float) -> tuple[dict, bool]:
    """The checker's verdict ({} if it gave none) and whether the time ran out first."""
    timed_out = False
    try:
        output, _ = checker.communicate(job, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out, output = True, b""
    finally:
        try:
            os.killpg(checker.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        checker.wait()
    try:
        verdict = json.loads(output.decode("utf-8").strip().splitlines()[-1])
    except (ValueError, IndexError):
        verdict = {}
    return (verdict if isinstance(verdict, dict) else {}), timed_out


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip()[:REASON_CHARS] if lines else ""


def describe_failure(result: ExecutionResult, timeout: float) -> str:
    """A one-line reason for a run that did not finish its checks (the caller decides what 'finished' is)."""
    if result.timed_out:
        return f"timed out after {timeout:g}s"
    code = result.returncode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"killed by signal {name}"
    last = _last_line(result.stderr)
    if "Traceback (most recent call last)" in result.stderr or _EXCEPTION_LINE.match(last):
        return f"failed: {last}"
    if code == 0:
        return "exited with status 0 before the checks finished"
    if code is None:
        return "stopped answering the checks"
    return f"exited with status {code}"
