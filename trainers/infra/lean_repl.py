"""A client for the Lean REPL (leanprover-community/repl), used to check proofs.

The REPL reads JSON requests separated by blank lines on stdin, e.g.
`{"cmd": "theorem …", "env": 0}`, and answers each with one pretty-printed
(multi-line) JSON object followed by a blank line, e.g.
`{"messages": [{"severity", "pos", "endPos", "data"}], "sorries": […], "env": 1}`.
Every answered command creates a new environment number; a later command
sent with `"env": N` runs on top of environment N.

Importing Mathlib takes seconds to minutes, so each REPL process imports a
header once and checks every proof on top of that environment:

* `split_imports(program)` separates the leading `import` lines from the rest.
* The imports are sent alone, once per process; the environment number they
  produce is cached per distinct import block (so tasks with different
  headers share one process correctly). Everything else, `open` and
  `set_option` lines included, is sent with each proof; they are cheap, and
  re-sending them does not depend on how the REPL carries scopes between
  commands.

Rules that keep training from hanging or dying:

* every read has a wall-clock deadline (a reader thread feeds a queue);
* a REPL that times out, exits or answers garbage is killed with its whole
  process group (`lake exe repl` runs the REPL as a child) and restarted, and
  the proof in flight fails with the reason;
* a REPL is also restarted after `recycle_after` proofs, because it keeps every
  environment it ever built in memory.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from twophase.data.base.errors import UserError

DEFAULT_COMMAND = ("lake", "exe", "repl")

# Both spellings: Lean changed the quotes around `sorry` in this warning.
SORRY_WARNINGS = ("declaration uses 'sorry'", "declaration uses `sorry`")


class ReplError(Exception):
    """A proof could not be checked; the message is the reason recorded for it."""


class ReplTimeout(ReplError):
    """The REPL did not answer in time; it was killed and restarted."""


class ReplCrashed(ReplError):
    """The REPL exited or answered something unreadable; it was restarted."""


class HeaderFailed(ReplError):
    """The imports themselves do not compile in this project."""


# ---------------------------------------------------------------- verdicts

def verdict(response: dict) -> tuple[bool, str]:
    """(passed, reason) for the REPL's answer to a proof.

    A proof passes iff the REPL reported no error of its own, no message has
    severity "error", `sorries` is empty or absent, and no warning says the
    declaration uses sorry. The reason is "ok", "error: <first line of the
    first error>", "uses sorry" or "repl error: <message>".
    """
    if "message" in response and "messages" not in response:
        return False, "repl error: " + first_line(str(response["message"]))
    messages = response.get("messages") or []
    for message in messages:
        if message.get("severity") == "error":
            return False, "error: " + first_line(str(message.get("data", "")))
    if response.get("sorries"):
        return False, "uses sorry"
    for message in messages:
        if message.get("severity") == "warning" and any(w in str(message.get("data", "")) for w in SORRY_WARNINGS):
            return False, "uses sorry"
    return True, "ok"


def first_line(text: str) -> str:
    stripped = text.strip()
    return stripped.splitlines()[0] if stripped else "(no message)"


def checker_version(project_dir) -> str:
    """The Lean toolchain and the Mathlib and REPL revisions of a Lake project ("unknown" where it does not say).

    A verdict holds for these versions; the reward's cache keys include them.
    """
    project = Path(project_dir).expanduser()
    toolchain = project / "lean-toolchain"
    parts = [toolchain.read_text().strip() if toolchain.is_file() else "lean unknown"]
    try:
        packages = json.loads((project / "lake-manifest.json").read_text()).get("packages", [])
    except (OSError, ValueError):
        packages = []
    checked = [p for p in packages if isinstance(p, dict) and p.get("name") in ("mathlib", "REPL", "repl")]
    parts += [f"{p['name']}@{p.get('rev')}" for p in checked]
    return " ".join(parts)


def split_imports(program: str) -> tuple[str, str]:
    """(imports, rest): the leading `import` lines (blank and `--` lines among them included) and the rest.

    Lean allows imports only at the top of a file, so this split is exact.
    """
    lines = program.splitlines(keepends=True)
    count = 0
    for line in lines:
        stripped = line.strip()
        if stripped and not stripped.startswith(("import ", "--")):
            break
        count += 1
    imports = "".join(line for line in lines[:count] if line.strip().startswith("import "))
    return imports.strip(), "".join(lines[count:])


# ---------------------------------------------------------------- one process

def check_setup(project_dir, command) -> tuple[Path, list[str]]:
    """Validate the project directory and the command; UserError with the fix if either is wrong."""
    command = list(command or DEFAULT_COMMAND)
    if not command:
        raise UserError("the Lean REPL command is empty; leave it unset for 'lake exe repl'")
    if project_dir is None or str(project_dir) == "":
        raise UserError("the lean reward needs project_dir: a Lake project with Mathlib and the REPL built in it")
    project = Path(project_dir).expanduser()
    if not project.is_dir():
        raise UserError(f"Lean project directory not found: {project}; pass a Lake project with Mathlib and repl")
    if shutil.which(command[0]) is None:
        raise UserError(
            f"'{command[0]}' is not on PATH; install Lean with elan (which provides lake) "
            f"or set the REPL command explicitly"
        )
    if Path(command[0]).name == "lake" and not any((project / f).exists() for f in ("lakefile.lean", "lakefile.toml")):
        raise UserError(f"{project} is not a Lake project (no lakefile.lean / lakefile.toml); pass the Mathlib project dir")
    return project, command


class LeanRepl:
    """One REPL process. Not thread-safe: use one per thread (LeanReplPool does)."""

    def __init__(
        self,
        project_dir,
        command=None,
        import_timeout: float = 600.0,
        recycle_after: int | None = 200,
    ):
        self.project_dir, self.command = check_setup(project_dir, command)
        self.import_timeout = import_timeout
        self.recycle_after = recycle_after
        self.restarts = 0
        self._process: subprocess.Popen | None = None
        self._closed = False  # after close(), a check still in flight (another thread's) must not start a new process
        self._start()

    # -- process lifecycle

    def _start(self) -> None:
        self._process = subprocess.Popen(
            self.command,
            cwd=self.project_dir,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            bufsize=1,
            start_new_session=True,  # its own process group, so a kill reaches lake's child too
        )
        self._lines: queue.Queue = queue.Queue()
        self._stderr_tail: collections.deque = collections.deque(maxlen=20)
        self._header_envs: dict[str, int] = {}
        self.checks_done = 0
        threading.Thread(target=self._pump_stdout, args=(self._process, self._lines), daemon=True).start()
        threading.Thread(target=self._pump_stderr, args=(self._process, self._stderr_tail), daemon=True).start()

    # The pump threads own the output pipes and close them at end of file, so a
    # kill never closes a pipe under a thread that is still reading it.

    @staticmethod
    def _pump_stdout(process: subprocess.Popen, lines: queue.Queue) -> None:
        with process.stdout:
            for line in process.stdout:
                lines.put(line)
        lines.put(None)  # end of output: the process is gone

    @staticmethod
    def _pump_stderr(process: subprocess.Popen, tail: collections.deque) -> None:
        with process.stderr:
            for line in process.stderr:
                tail.append(line.rstrip("\n"))

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            process.stdin.close()
        except OSError:  # the pipe is already broken
            pass

    def restart(self) -> None:
        self._kill()
        if self._closed:
            return
        self.restarts += 1
        self._start()

    def close(self) -> None:
        self._closed = True
        self._kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def header_envs(self) -> dict[str, int]:
        """Import block → environment number, for the running process."""
        return dict(self._header_envs)

    # -- protocol

    def send(self, request: dict, timeout: float) -> dict:
        """Send one request and return its parsed answer, waiting at most `timeout` seconds.

        On timeout, exit or an unreadable answer, the process is restarted and
        ReplTimeout / ReplCrashed is raised.
        """
        if self._closed:
            raise ReplCrashed("repl closed")
        if self._process is None:
            self._start()
        try:
            self._process.stdin.write(json.dumps(request, ensure_ascii=False) + "\n\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            raise self._crashed("it stopped reading requests") from None
        return self._read_response(time.monotonic() + timeout, timeout)

    def _read_response(self, deadline: float, timeout: float) -> dict:
        collected: list[str] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.restart()
                raise ReplTimeout(f"timeout after {timeout:g}s")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue  # the deadline check above handles it
            if line is None:
                raise self._crashed("it exited")
            if line.strip():
                # Text before the first "{" is not part of the protocol (e.g. lake's build notes).
                if collected or line.lstrip().startswith("{"):
                    collected.append(line)
            elif collected:
                return self._parse("".join(collected))

    def _parse(self, text: str) -> dict:
        try:
            response = json.loads(text)
        except json.JSONDecodeError:
            raise self._crashed(f"unreadable answer {text[:80]!r}") from None
        if not isinstance(response, dict):
            raise self._crashed(f"unexpected answer {text[:80]!r}")
        return response

    def _crashed(self, what: str) -> ReplCrashed:
        # Give the stderr reader a moment to collect the dying words.
        time.sleep(0.05)
        detail = " | ".join(list(self._stderr_tail)[-3:])
        self.restart()
        return ReplCrashed(f"repl crashed: {what}" + (f" ({detail})" if detail else ""))

    # -- proofs

    def header_env(self, imports: str) -> int:
        """The environment in which `imports` are loaded, importing them on first use."""
        if imports not in self._header_envs:
            response = self.send({"cmd": imports}, self.import_timeout)
            passed, reason = verdict(response)
            if not passed or "env" not in response:
                raise HeaderFailed(f"header does not compile: {reason}")
            self._header_envs[imports] = response["env"]
        return self._header_envs[imports]

    def check(self, program: str, timeout: float) -> dict:
        """The REPL's answer for a whole Lean file, with its imports loaded once per process."""
        if self.recycle_after is not None and self.checks_done >= self.recycle_after:
            self.restart()
        imports, body = split_imports(program)
        request = {"cmd": body}
        if imports:
            request["env"] = self.header_env(imports)
        self.checks_done += 1
        return self.send(request, timeout)


# ---------------------------------------------------------------- many processes

class LeanReplPool:
    """`size` REPL processes checking proofs in parallel threads.

    `check(programs)` returns one (passed, reason) per program, in order. A
    program that hangs or crashes its REPL scores False ("timeout after Xs",
    "repl crashed: …") and that REPL is restarted; other programs are unaffected.
    """

    def __init__(
        self,
        project_dir,
        size: int = 4,
        timeout: float = 60.0,
        command=None,
        import_timeout: float = 600.0,
        recycle_after: int | None = 200,
    ):
        if size < 1:
            raise UserError(f"the Lean REPL pool size must be at least 1, got {size}")
        check_setup(project_dir, command)
        self.timeout = timeout
        self.version = checker_version(project_dir)
        self._repls: list[LeanRepl] = []
        try:
            for _ in range(size):
                self._repls.append(LeanRepl(project_dir, command, import_timeout, recycle_after))
        except Exception:
            self._close_repls()  # no orphaned processes when a later one fails to start
            raise
        self._idle: queue.Queue = queue.Queue()
        for repl in self._repls:
            self._idle.put(repl)
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="lean-repl")

    def check(self, programs: list[str]) -> list[tuple[bool, str]]:
        return list(self._executor.map(self.check_one, programs))

    def check_one(self, program: str) -> tuple[bool, str]:
        """(passed, reason) for one program; thread-safe (it waits for an idle REPL)."""
        try:
            return verdict(self.answer(program))
        except ReplError as err:
            return False, str(err)
        except Exception as err:  # one proof must never stop a training run
            return False, f"repl error: {type(err).__name__}: {err}"

    def answer(self, program: str, timeout: float | None = None) -> dict:
        """The REPL's own answer for one program (what a server passes on); ReplError when there is none."""
        repl = self._idle.get()
        try:
            return repl.check(program, self.timeout if timeout is None else timeout)
        finally:
            self._idle.put(repl)

    @property
    def size(self) -> int:
        return len(self._repls)

    def warm(self, imports: str) -> None:
        """Import `imports` in every REPL now (Mathlib takes seconds to minutes), so that the first proofs do not wait.

        HeaderFailed when they do not compile in this project."""
        list(self._executor.map(lambda repl: repl.header_env(imports), self._repls))

    @property
    def restarts(self) -> int:
        return sum(repl.restarts for repl in self._repls)

    def _close_repls(self) -> None:
        for repl in self._repls:
            repl.close()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._close_repls()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
