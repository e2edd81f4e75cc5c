"""Run an untrusted Python program in a separate, limited process.

Code benchmarks execute what a model wrote. Whatever that code does (loop
forever, exhaust memory, kill itself, fork, exit early, print megabytes), the
evaluator must get a verdict back within the timeout and keep running. So each
program runs as its own interpreter process:

* `sys.executable -I`: isolated mode, so PYTHON* environment variables, the
  user's site-packages and the current directory cannot change what it imports;
* in a fresh temporary directory as its working directory, deleted afterwards,
  so files it writes land nowhere that matters;
* in a new session, so the wall-clock timeout can kill its whole process group,
  including any children it started;
* under resource limits set in the child before the interpreter starts: address
  space (a memory bomb becomes a MemoryError), CPU seconds (a backstop if the
  wall-clock kill were ever missed), no core files, bounded file size (which also
  bounds how much output it can write, since its stdout and stderr are files);
* with stdin at end-of-file, and only a minimal environment.

This is containment against accidents, not a security boundary against a
determined adversary: the program still runs as the evaluator's user and can
read files and open sockets, and a child that starts a session of its own
escapes the group kill. Run the evaluator in a container for that. Limits
use `resource` and therefore need Linux (or another POSIX system).
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

MEMORY_LIMIT_BYTES = 2 * 1024**3
FILE_SIZE_LIMIT_BYTES = 16 * 1024**2
KEPT_OUTPUT_CHARS = 2000  # the tail of stdout/stderr kept for the report
REASON_CHARS = 300

# The last stderr line of an uncaught exception, e.g. "AssertionError" or
# "NameError: name 'x' is not defined". A SyntaxError has no "Traceback" header.
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)\b")


@dataclass(frozen=True)
class ExecutionResult:
    """What happened to one program: how it ended, and the tail of what it printed."""

    returncode: int | None  # negative: killed by that signal
    timed_out: bool
    stdout: str
    stderr: str
    seconds: float


def _clamped(limit_id: int, value: int) -> tuple[int, int]:
    """(soft, hard) at most the current hard limit, which an unprivileged process cannot raise."""
    _, hard = resource.getrlimit(limit_id)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    return value, value


def _limit_setter(cpu_seconds: int):
    """The function the child runs between fork and exec; limits are computed here, in the parent.

    It only calls `setrlimit` (a module imported long before the fork) and takes no
    locks, which is what makes a `preexec_fn` safe to use from worker threads.
    """
    limits = [
        (resource.RLIMIT_AS, _clamped(resource.RLIMIT_AS, MEMORY_LIMIT_BYTES)),
        (resource.RLIMIT_CPU, _clamped(resource.RLIMIT_CPU, cpu_seconds)),
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_FSIZE, _clamped(resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT_BYTES)),
    ]

    def set_limits() -> None:
        for limit_id, values in limits:
            resource.setrlimit(limit_id, values)

    return set_limits


def _minimal_env() -> dict[str, str]:
    # Nothing from the evaluator's environment (tokens, CUDA settings) is passed on.
    return {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": "/nonexistent"}


def _kill_group(pgid: int) -> None:
    """Kill every process left in the program's group (it may have started children)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the whole group has already exited


def _tail(path: str) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4 * KEPT_OUTPUT_CHARS))
        text = f.read().decode("utf-8", errors="replace")
    return text[-KEPT_OUTPUT_CHARS:]


def run_python(source: str, timeout: float = 3.0) -> ExecutionResult:
    """Run `source` as a Python program under the limits above; never raises for what the program does."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="twophase-exec-") as workdir:
        program = os.path.join(workdir, "program.py")
        out_path, err_path = os.path.join(workdir, "stdout"), os.path.join(workdir, "stderr")
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-I", program],
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=_minimal_env(),
                start_new_session=True,
                preexec_fn=_limit_setter(int(timeout) + 1),
            )
            timed_out = False
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(process.pid)  # after a normal exit too: orphaned children die with it
                process.wait()
        return ExecutionResult(
            returncode=process.returncode,
            timed_out=timed_out,
            stdout=_tail(out_path),
            stderr=_tail(err_path),
            seconds=time.monotonic() - start,
        )


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
    return f"exited with status {code}"
