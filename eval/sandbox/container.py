"""Run an untrusted Python script contained: the evaluator's side of the sandbox.

HumanEval executes what a model wrote. `ContainedPython` runs `python -I
SCRIPT ARGS` so that the script, and anything it starts, can do no harm and
learn nothing about the evaluator (mode "namespaces", the default):

* util-linux `unshare` puts it in new mount, pid, network, IPC and UTS
  namespaces (plus a user namespace when the evaluator is not root);
  `eval/sandbox/sandbox_init.py` then runs as process 1 inside, builds the file system
  view and starts the script (see that file for the steps);
* network: a namespace of its own with nothing but a loopback that is down, so
  no connection to anything, 127.0.0.1 and abstract Unix sockets included; and
  no Unix socket at all (a seccomp filter), since one bound to a file it can
  see would be a way out that no namespace closes;
* files: a new root holding read-only views of the system libraries and the
  Python installation only, a fresh /proc that shows only its own processes,
  and a private, size-limited, writable tmpfs at /tmp (its working directory)
  that vanishes with it. The project, home directories, the evaluator's /tmp
  and every other path do not exist there;
* identity: uid 1000 of a user namespace of its own, without capabilities or
  the means to gain any (`no_new_privs`, nosuid mounts); a root evaluator runs
  it as the real user `nobody`, so even the process limit below applies;
* environment: a fixed, minimal one; nothing of the evaluator's variables;
* limits, soft = hard so that it cannot raise them: processes (and threads)
  in this sandbox, 4, and address space per process, a quarter of the check's
  4 GiB, so that all its processes together hold at most 4 GiB; CPU seconds,
  file size (which also bounds its output), open files, no core files; the
  numeric libraries are told to start one thread;
* ending: `stop()` closes the pipe that keeps process 1 alive; when process 1
  exits the kernel kills every process of the pid namespace (double-forked
  daemons and `setsid` children included) before `stop()` returns.

Mode "none" (the explicit opt-out for machines without namespaces) runs the
script as a plain process of the evaluator's user: same limits (but no process
count, which would count the evaluator's own threads), a throw-away working
directory, a new session killed as a group. It contains accidents, not an
adversary: see eval/README.md, "Executed code".
"""

from __future__ import annotations

import functools
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MODES = ("namespaces", "none")
LAUNCHER = Path(__file__).with_name("sandbox_init.py")
NOBODY = 65534  # the user (and group) a root evaluator runs programs as
STOP_GRACE_SECONDS = 5.0

# What the program can see besides the Python installation; each only if it exists here.
SYSTEM_PATHS = (
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
    "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
    "/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom",
)
ENVIRONMENT = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}

# The evaluator's temporary folders for executed code are named after its process, so that a later
# run can tell which ones a killed evaluator left behind: `twophase-exec-<pid>-<random>` in the temp dir.
EXEC_FOLDER = re.compile(r"^twophase-exec-(\d+)-")


def exec_folder_prefix() -> str:
    return f"twophase-exec-{os.getpid()}-"


def remove_stale_exec_folders() -> list[str]:
    """Delete this user's temporary folders of executed code whose evaluator process is gone; returns their names."""
    removed = []
    for entry in Path(tempfile.gettempdir()).iterdir():
        match = EXEC_FOLDER.match(entry.name)
        if not match or not entry.is_dir() or entry.is_symlink() or entry.stat().st_uid != os.getuid():
            continue
        if _process_alive(int(match.group(1))):
            continue
        shutil.rmtree(entry, ignore_errors=True)  # a program may have made a file undeletable: never fail on that
        removed.append(entry.name)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@dataclass(frozen=True)
class Limits:
    """What one check may use. Memory is the whole check's: each process may address an equal share of it,
    and at most `processes` tasks exist, so all of them together cannot hold more (mode "namespaces")."""

    memory_bytes: int = 4 * 1024**3  # the whole check: `processes` × the address space of one
    cpu_seconds: int = 4
    file_bytes: int = 16 * 1024**2
    processes: int = 4  # tasks (processes and threads) in the whole sandbox
    open_files: int = 256
    work_bytes: int = 64 * 1024**2  # the writable /tmp

    @property
    def process_memory_bytes(self) -> int:
        return self.memory_bytes // self.processes


@dataclass(frozen=True)
class Ended:
    """How a contained script ended: its exit status (negative: killed by that signal), or None if it was stopped."""

    returncode: int | None
    setup_error: str | None = None


def visible_paths() -> list[str]:
    """Everything the program may read: the system libraries and the evaluator's Python environment.

    The environment (a virtual environment and the installation it is based on)
    keeps its path, so the program imports what it could import before; the
    folders around it, such as the project holding a .venv, stay invisible.
    """
    environment = (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, os.path.dirname(sys.executable))
    paths = [p for p in SYSTEM_PATHS if os.path.lexists(p)]
    paths += [form(path) for path in environment for form in (os.path.abspath, os.path.realpath)]
    return sorted(set(paths))  # sandbox_init.py leaves out the paths inside others


def _unshare() -> str | None:
    return shutil.which("unshare", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/bin"]))


def _namespace_flags() -> list[str]:
    flags = ["--mount", "--pid", "--net", "--ipc", "--uts", "--fork", "--kill-child"]
    # An unprivileged evaluator needs a user namespace to be allowed the others.
    return flags if os.geteuid() == 0 else ["--user", "--map-root-user", *flags]


def rlimits(limits: Limits, with_processes: bool) -> list[tuple[int, int]]:
    """(resource, value) pairs, each at most the evaluator's own hard limit (no process may raise that)."""
    values = [
        (resource.RLIMIT_AS, limits.process_memory_bytes),
        (resource.RLIMIT_CPU, limits.cpu_seconds),
        (resource.RLIMIT_FSIZE, limits.file_bytes),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_CORE, 0),
    ] + ([(resource.RLIMIT_NPROC, limits.processes)] if with_processes else [])
    clamped = []
    for limit_id, value in values:
        hard = resource.getrlimit(limit_id)[1]
        clamped.append((limit_id, value if hard == resource.RLIM_INFINITY else min(value, hard)))
    return clamped


def limit_setter(limits: Limits):
    """The function a child runs between fork and exec (mode "none"); the values are computed here, in the parent.

    It only calls `setrlimit` and takes no locks, which is what makes a
    `preexec_fn` safe to use from worker threads. No process count: outside a
    sandbox it would count every process and thread of the evaluator's user.
    """
    pairs = rlimits(limits, with_processes=False)

    def set_limits() -> None:
        for limit_id, value in pairs:
            resource.setrlimit(limit_id, (value, value))

    return set_limits


class ContainedPython:
    """`python -I script args` running contained; `stop()` ends it and everything it started.

    stdout and stderr are file objects the script writes to; `pass_fds` are
    extra descriptors it keeps (with the same numbers); `installs` are further
    files it needs beside the script (copied next to it in the sandbox).
    """

    def __init__(self, script: Path, args=(), *, mode: str, limits: Limits, stdout, stderr, pass_fds=(), installs=()):
        if mode not in MODES:
            raise ValueError(f"unknown sandbox mode {mode!r}: choose one of {', '.join(MODES)}")
        self.mode = mode
        self._status_reader = None
        self._workdir = None
        if mode == "namespaces":
            self.process = self._start_namespaces(Path(script), list(args), limits, stdout, stderr, tuple(pass_fds), installs)
        else:
            self.process = self._start_plain(Path(script), list(args), limits, stdout, stderr, tuple(pass_fds))

    def _start_namespaces(self, script, args, limits, stdout, stderr, pass_fds, installs) -> subprocess.Popen:
        unshare = _unshare()
        if unshare is None:
            raise FileNotFoundError("util-linux `unshare` is not installed")
        status_reader, status_writer = os.pipe()
        files = {path.name: str(path) for path in [script, *map(Path, installs)]}
        config = {
            "status_fd": status_writer,
            "visible": visible_paths(),
            "installs": files,
            "command": [sys.executable, "-I", f"/sandbox/{script.name}", *args],
            "limits": rlimits(limits, with_processes=True),
            "work_bytes": limits.work_bytes,
            **({"uid": NOBODY, "gid": NOBODY} if os.geteuid() == 0 else {}),
        }
        try:
            process = subprocess.Popen(
                [unshare, *_namespace_flags(), "--", sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(config)],
                stdin=subprocess.PIPE,  # process 1 lives until this pipe closes
                stdout=stdout,
                stderr=stderr,
                pass_fds=(*pass_fds, status_writer),
                env=ENVIRONMENT,
                start_new_session=True,
            )
        except BaseException:
            os.close(status_reader)
            raise
        finally:
            os.close(status_writer)
        self._status_reader = status_reader
        return process

    def _start_plain(self, script, args, limits, stdout, stderr, pass_fds) -> subprocess.Popen:
        self._workdir = tempfile.mkdtemp(prefix=exec_folder_prefix())
        return subprocess.Popen(
            [sys.executable, "-I", str(script), *args],
            cwd=self._workdir,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            pass_fds=pass_fds,
            env={**ENVIRONMENT, "HOME": self._workdir},
            start_new_session=True,
            preexec_fn=limit_setter(limits),
        )

    def wait(self, timeout: float | None) -> bool:
        """True once the script has ended by itself (within `timeout` seconds)."""
        try:
            self.process.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self) -> Ended:
        """End the script and every process it started; say how it had ended, if it had."""
        if self.mode == "namespaces":
            return self._stop_namespaces()
        ended_by_itself = self.process.poll() is not None
        self._kill_group()  # after a normal exit too: children left in its group die with it
        self.process.wait()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)  # a program may make its folder undeletable; never fail on that
        return Ended(self.process.returncode if ended_by_itself else None)

    def _stop_namespaces(self) -> Ended:
        self.process.stdin.close()  # process 1 exits, and with it every process of the sandbox
        if not self.wait(STOP_GRACE_SECONDS):
            self._kill_group()
            self.process.wait()
        status = b""
        while chunk := os.read(self._status_reader, 4096):
            status += chunk
        os.close(self._status_reader)
        return _parse_status(status.decode("utf-8", errors="replace"))

    def _kill_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the whole group has already exited


def _parse_status(text: str) -> Ended:
    lines = text.splitlines()
    for line in lines:
        if line.startswith("setup "):
            return Ended(None, line[len("setup "):])
    for line in lines:
        kind, _, number = line.partition(" ")
        if kind == "exit":
            return Ended(int(number))
        if kind == "signal":
            return Ended(-int(number))
    return Ended(None)


PROBE = "print('contained', flush=True)\n"


@functools.lru_cache(maxsize=None)
def isolation_problem() -> str | None:
    """Why this machine cannot run the namespace sandbox, or None when it can (found once per process by trying)."""
    if not sys.platform.startswith("linux"):
        return "namespaces need Linux"
    if _unshare() is None:
        return "util-linux `unshare` is not installed"
    with tempfile.TemporaryDirectory(prefix="twophase-probe-") as folder:
        script = Path(folder) / "probe.py"
        script.write_text(PROBE)
        with open(Path(folder) / "out", "w+b") as out, open(Path(folder) / "err", "w+b") as err:
            contained = ContainedPython(script, mode="namespaces", limits=Limits(), stdout=out, stderr=err)
            contained.wait(30.0)
            ended = contained.stop()
            out.seek(0)
            err.seek(0)
            printed, complaint = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if ended.setup_error:
        return ended.setup_error
    if ended.returncode != 0 or printed.strip() != "contained":
        last = [line for line in complaint.splitlines() if line.strip()]
        return f"a test program in the sandbox failed ({last[-1].strip() if last else f'status {ended.returncode}'})"
    return None
