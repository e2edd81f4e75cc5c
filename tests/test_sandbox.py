"""Containment of executed code: each attack runs as a real program in the sandbox and must be contained.

The attacks are the ones a HumanEval completion could make: reach the network,
write or delete files outside its folder, read the evaluator's secrets, leave
processes behind, kill the evaluator, sabotage cleanup, raise its limits.
These tests need what the sandbox needs (Linux, util-linux `unshare`,
unprivileged user namespaces when not root); on a machine without them they
fail with the reason, rather than skip, so CI cannot silently stop testing.
"""

import ast
import fcntl
import inspect
import json
import os
import shutil
import socket
import struct
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from twophase.data.base.errors import UserError
from twophase.eval.sandbox import container as sandbox
from twophase.eval.benchmarks.humaneval import HumanEval, check_completions, require_isolation
from twophase.eval.sandbox.execution import run_python
from twophase.eval.runner import run_evaluation
from twophase.eval.settings import EvalSettings
from twophase.eval.sandbox.container import ContainedPython, Limits

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def isolation_works():
    problem = sandbox.isolation_problem()
    assert problem is None, f"this machine cannot run the sandbox: {problem}"


def run(program: str, timeout: float = 5.0, **values):
    """Run `program` (its {names} filled from `values` as Python literals) and return its JSON report."""
    source = textwrap.dedent(program).format(**{k: repr(v) for k, v in values.items()})
    result = run_python(source, timeout=timeout)
    assert result.returncode == 0 and not result.timed_out, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result


def attempts(body: str) -> str:
    """A program that runs each `attempt("name", callable)` and reports what each did, as JSON."""
    prelude = """\
        import json, os, socket, sys
        report = {{}}
        def attempt(name, action):
            try:
                report[name] = "did: " + repr(action())
            except BaseException as err:
                report[name] = "refused: " + type(err).__name__ + ": " + str(err)
        """
    return textwrap.dedent(prelude) + textwrap.dedent(body) + "\nprint(json.dumps(report))\n"


def test_no_network_not_even_loopback_or_abstract_sockets():
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    abstract_name = f"\0twophase-test-{uuid.uuid4().hex}"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(abstract_name)
    unix.listen()
    try:
        report, _ = run(
            attempts("""\
                attempt("tcp", lambda: socket.create_connection(("127.0.0.1", {tcp_port}), timeout=2))
                attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", {udp_port})))
                attempt("abstract", lambda: socket.socket(socket.AF_UNIX).connect({abstract_name}))
                attempt("outside", lambda: socket.create_connection(("1.1.1.1", 53), timeout=2))
                attempt("interfaces", lambda: [name for _, name in socket.if_nameindex()])
                """),
            tcp_port=tcp.getsockname()[1], udp_port=udp.getsockname()[1], abstract_name=abstract_name,
        )
        for listener in (tcp, udp, unix):
            listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            tcp.accept()
        with pytest.raises(BlockingIOError):
            unix.accept()
        with pytest.raises(BlockingIOError):
            udp.recv(16)
    finally:
        tcp.close(), udp.close(), unix.close()
    assert report["tcp"].startswith("refused: OSError: [Errno 101] Network is unreachable"), report
    assert report["udp"].startswith("refused: OSError: [Errno 101] Network is unreachable"), report
    assert report["abstract"].startswith("refused: PermissionError"), report  # no Unix socket at all (seccomp)
    assert report["outside"].startswith("refused: OSError: [Errno 101]"), report
    assert report["interfaces"] == "did: ['lo']", report


def test_no_unix_socket_even_to_a_socket_file_it_can_see():
    """A listening socket file inside the Python environment (which the program sees, read-only): no way to it."""
    path = os.path.join(sys.prefix, f"twophase-test-{uuid.uuid4().hex[:8]}.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o777)  # anyone may connect, as to a system service's socket
    listener.listen()
    try:
        report, _ = run(
            attempts("""\
                attempt("connect", lambda: socket.socket(socket.AF_UNIX).connect({path}))
                attempt("datagram", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
                attempt("seen", lambda: os.path.exists({path}))
                attempt("pair", lambda: len(socket.socketpair()))
                """),
            path=path,
        )
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
        os.unlink(path)
    assert report["seen"] == "did: True", report  # the file is visible: only the filter stops the connection
    assert report["connect"].startswith("refused: PermissionError: [Errno 1] Operation not permitted"), report
    assert report["datagram"].startswith("refused: PermissionError"), report
    assert report["pair"] == "did: 2", report  # socketpair's ends reach only each other: still allowed


def test_the_unix_socket_filter_refuses_only_af_unix_and_foreign_abis():
    """The BPF program, run here by a small interpreter over (nr, arch, domain) cases."""
    from twophase.eval.sandbox.sandbox_init import SYSCALL_ARCH, unix_socket_filter

    def run_filter(rows, nr, arch, domain):
        data = {0: nr, 4: arch, 16: domain}
        pc, accumulator = 0, 0
        while True:
            code, jt, jf, k = rows[pc]
            if code == 0x20:
                accumulator, pc = data[k], pc + 1
            elif code == 0x15:
                pc += 1 + (jt if accumulator == k else jf)
            elif code == 0x35:
                pc += 1 + (jt if accumulator >= k else jf)
            else:
                return k

    for machine, (arch, socket_nr) in SYSCALL_ARCH.items():
        rows = unix_socket_filter(machine)
        assert run_filter(rows, socket_nr, arch, 1) == 0x00050001  # socket(AF_UNIX): EPERM
        assert run_filter(rows, socket_nr, arch, 2) == 0x7FFF0000  # socket(AF_INET): the namespace's business
        assert run_filter(rows, socket_nr + 1, arch, 1) == 0x7FFF0000  # any other call, whatever its argument
        assert run_filter(rows, socket_nr, 0x40000003, 1) == 0x80000000  # i386's ABI: the process is killed
    assert run_filter(unix_socket_filter("x86_64"), 41 | 0x40000000, 0xC000003E, 1) == 0x00050001  # x32's socket()


def test_files_outside_its_folder_are_invisible_or_read_only(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the evaluator's secret")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    # A file in a folder the sandbox does show (the Python environment): it may be read, never changed.
    shown = Path(sys.prefix) / f"twophase-sandbox-probe-{uuid.uuid4().hex}"
    shown.write_text("visible, read-only")
    try:
        report, _ = run(
            attempts("""\
                attempt("read secret", lambda: open({secret}).read())
                attempt("delete victim", lambda: os.remove({victim}))
                attempt("list project", lambda: sorted(os.listdir({repo})))
                attempt("read README", lambda: open({repo} + "/README.md").read())
                attempt("write project", lambda: open({repo} + "/tests/planted.py", "w"))
                attempt("read shown", lambda: open({shown}).read())
                attempt("append shown", lambda: open({shown}, "a").write("changed"))
                attempt("delete shown", lambda: os.remove({shown}))
                attempt("rename shown", lambda: os.rename({shown}, {shown} + ".moved"))
                for folder in ["/", "/usr", "/usr/lib", "/etc", "/sandbox", {prefix}]:
                    attempt("create in " + folder, lambda: open(os.path.join(folder, "planted"), "w"))
                attempt("write a sysctl", lambda: open("/proc/sys/vm/drop_caches", "w").write("1"))
                attempt("remount", lambda: os.system("mount -o remount,rw /usr 2>/dev/null") or "status 0")
                # /tmp is its own: even a folder with the path of the evaluator's is private.
                os.makedirs(os.path.dirname({victim}), exist_ok=True)
                attempt("write own /tmp", lambda: open({victim}, "w").write("overwritten"))
                """),
            secret=str(secret), victim=str(victim), repo=str(REPO), shown=str(shown), prefix=sys.prefix,
        )
        assert shown.read_text() == "visible, read-only"
    finally:
        shown.unlink()
    assert report["read secret"].startswith("refused: FileNotFoundError"), report
    assert report["delete victim"].startswith("refused: FileNotFoundError"), report
    # The project shows nothing but the way to the Python environment, when that lives in it (.venv).
    inside = sorted({Path(p).relative_to(REPO).parts[0] for p in sandbox.visible_paths() if Path(p).is_relative_to(REPO)})
    if inside:
        assert report["list project"] == f"did: {inside}", report
    else:
        assert report["list project"].startswith("refused: FileNotFoundError"), report
    assert report["read README"].startswith("refused: FileNotFoundError"), report
    assert report["write project"].startswith(("refused: FileNotFoundError", "refused: OSError: [Errno 30]")), report
    assert report["read shown"] == "did: 'visible, read-only'", report
    # Read-only mounts; a root evaluator's files are also out of the unprivileged user's permissions.
    refused_write = ("refused: OSError: [Errno 30] Read-only file system", "refused: PermissionError")
    for action in ("append shown", "delete shown", "rename shown"):
        assert report[action].startswith(refused_write), report
    for folder in ["/", "/usr", "/usr/lib", "/etc", "/sandbox", sys.prefix]:
        assert report["create in " + folder].startswith(refused_write), report
    assert report["write a sysctl"].startswith(refused_write), report
    assert report["remount"] != "did: 'status 0'", report
    assert report["write own /tmp"] == "did: 11", report
    assert victim.read_text() == "keep me" and secret.read_text() == "the evaluator's secret"
    assert not (REPO / "tests" / "planted.py").exists()


def test_evaluator_environment_and_processes_are_out_of_reach(monkeypatch):
    secret = f"twophase-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("TWOPHASE_TEST_API_KEY", secret)
    report, result = run(
        attempts("""\
            attempt("environ", lambda: dict(os.environ))
            pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
            attempt("pids", lambda: pids)
            for pid in sorted(set(pids + [{host_pid}, os.getppid()])):
                for name in ("environ", "cmdline"):
                    attempt(f"{{pid}} {{name}}", lambda: open(f"/proc/{{pid}}/{{name}}", "rb").read())
            attempt("kill evaluator", lambda: os.kill({host_pid}, 9))
            attempt("kill parent", lambda: os.kill(os.getppid(), 9))
            attempt("ptrace parent", lambda: open(f"/proc/{{os.getppid()}}/mem", "rb").read(1))
            """),
        host_pid=os.getpid(),
    )
    assert secret not in result.stdout + result.stderr
    assert set(ast.literal_eval(report["environ"][len("did: "):])) == {"PATH", "HOME", "TMPDIR", "LANG", "OMP_NUM_THREADS",
                                                                     "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"}, report
    assert report["pids"] == "did: [1, 2]", report  # process 1 of the sandbox, and the program
    assert report["1 environ"].startswith("refused: PermissionError"), report  # process 1 is out of reach
    assert report["ptrace parent"].startswith("refused: PermissionError"), report
    assert report["kill evaluator"].startswith("refused: ProcessLookupError"), report
    # Killing its parent, process 1, is refused or ignored: the report above was printed, so the sandbox lived on.


def test_limits_hold_and_cannot_be_raised():
    report, _ = run(
        attempts("""\
            import resource
            names = ["RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_CORE"]
            for name in names:
                limit = getattr(resource, name)
                attempt(name, lambda: resource.getrlimit(limit))
                attempt("raise " + name, lambda: resource.setrlimit(limit, (resource.RLIM_INFINITY,) * 2))
            attempt("memory", lambda: len(bytearray(3 * 1024 ** 3)))
            attempt("file size", lambda: open("/tmp/big", "wb").write(b"x" * (17 * 1024 ** 2)))
            def fill_folder():
                for i in range(8):
                    with open(f"/tmp/part{{i}}", "wb") as f:
                        f.write(b"x" * (15 * 1024 ** 2))
            attempt("fill folder", fill_folder)
            children = []
            def fork_many():
                for _ in range(40):
                    pid = os.fork()
                    if pid == 0:
                        import time
                        time.sleep(30)
                        os._exit(0)
                    children.append(pid)
            attempt("fork", fork_many)
            report["children"] = len(children)
            """),
        timeout=5.0,
    )
    expected = {"RLIMIT_AS": 1024**3, "RLIMIT_CPU": 6, "RLIMIT_FSIZE": 16 * 1024**2, "RLIMIT_NPROC": 4, "RLIMIT_NOFILE": 256, "RLIMIT_CORE": 0}
    for name, value in expected.items():
        assert report[name] == f"did: ({value}, {value})", report
        assert report["raise " + name].startswith("refused: ValueError"), report
    assert report["memory"] == "refused: MemoryError: ", report
    assert report["file size"] == "refused: OSError: [Errno 27] File too large", report
    assert report["fill folder"] == "refused: OSError: [Errno 28] No space left on device", report
    assert report["fork"].startswith("refused: BlockingIOError: [Errno 11]"), report
    assert 0 < report["children"] < 4, report


def test_a_checks_processes_together_hold_at_most_its_memory():
    """Children that each take 700 MiB: at most three exist beside the parent (4 tasks), and none can take more
    than a quarter of the check's 4 GiB, so together they never hold more than 4 GiB."""
    report, _ = run(
        attempts("""\
            import time
            def hold(mebibytes):
                read, write = os.pipe()
                pid = os.fork()
                if pid == 0:
                    try:
                        block = bytearray(mebibytes * 1024 ** 2)
                        os.write(write, b"y")
                    except MemoryError:
                        os.write(write, b"n")
                    time.sleep(30)
                    os._exit(0)
                return os.read(read, 1) == b"y"
            held = []
            def hold_many():
                for _ in range(6):
                    held.append(hold(700))
            attempt("six children of 700 MiB", hold_many)
            report["holding"] = sum(held)
            attempt("1.1 GiB in one process", lambda: len(bytearray(1100 * 1024 ** 2)))
            """),
        timeout=8.0,
    )
    assert report["six children of 700 MiB"].startswith("refused: BlockingIOError: [Errno 11]"), report
    assert report["holding"] == 3, report  # 3 x 700 MiB + the parent: within 4 GiB
    assert report["1.1 GiB in one process"] == "refused: MemoryError: ", report


TICKER = """\
import os, sys, time
def tick(label, late_after=None):
    start = time.monotonic()
    while True:
        os.write(1, f"{label}\\n".encode())
        if late_after is not None and time.monotonic() - start > late_after:
            os.write(1, b"LATE\\n")
            return
        time.sleep(0.1)
if os.fork() == 0:  # a child in a session of its own
    os.setsid()
    tick("setsid")
if os.fork() == 0:  # a classic daemon: fork, setsid, fork again, the middle one exits
    os.setsid()
    if os.fork() == 0:
        tick("daemon", late_after=6.0)
    os._exit(0)
time.sleep(0.5)
if sys.argv[1:] == []:
    sys.exit(0)  # the program ends; its descendants must end with it
time.sleep(60)
"""


def test_every_descendant_dies_with_the_program(tmp_path):
    """A setsid child and a double-forked daemon (which would write LATE after 6 s) die with the program."""
    script = tmp_path / "ticker.py"
    script.write_text(TICKER)
    runs, start = {}, time.monotonic()
    for name, args in (("ends by itself", []), ("stopped at timeout", ["stay"])):
        out = open(tmp_path / f"{name}.out", "wb")
        runs[name] = (out, ContainedPython(script, args, mode="namespaces", limits=Limits(), stdout=out, stderr=out))
    assert runs["ends by itself"][1].wait(5.0)
    assert not runs["stopped at timeout"][1].wait(0.5)
    ended = {name: contained.stop() for name, (_, contained) in runs.items()}
    assert ended["ends by itself"].returncode == 0 and ended["stopped at timeout"].returncode is None
    sizes = {name: os.path.getsize(tmp_path / f"{name}.out") for name in runs}
    time.sleep(max(0.0, start + 6.7 - time.monotonic()))  # past the daemons' late write, 6 s after they started
    for name, (out, _) in runs.items():
        out.close()
        text = (tmp_path / f"{name}.out").read_text()
        assert "setsid" in text and "daemon" in text, text  # they did run
        assert "LATE" not in text and os.path.getsize(tmp_path / f"{name}.out") == sizes[name], name


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10


def set_immutable(path, on: bool) -> str:
    """`chattr +i` / `chattr -i`; used by the attack and, to clean up after it, by the test."""
    fd = os.open(path, os.O_RDONLY)
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 4))[0]
        flags = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags))
        return "immutable" if on else "mutable"
    except OSError as err:
        return f"refused: {err}"
    finally:
        os.close(fd)


LOCK_ITS_FOLDER = f"""\
import fcntl, os, struct
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = {FS_IOC_GETFLAGS}, {FS_IOC_SETFLAGS}, {FS_IMMUTABLE_FL}
{textwrap.dedent(inspect.getsource(set_immutable))}
os.makedirs("locked/deeper", exist_ok=True)
open("locked/deeper/file", "w").write("x")
print(os.getcwd(), set_immutable("locked/deeper/file", True), set_immutable("locked", True), flush=True)
os.chmod("locked/deeper", 0)
os.chmod(".", 0o500)
"""


def test_cleanup_cannot_be_sabotaged_and_the_benchmark_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the evaluator's temporary folders land here, to count them
    monkeypatch.setattr(tempfile, "tempdir", None)
    add = {
        "task_id": "Test/0", "prompt": "def add(a, b):\n    \"\"\"a + b\"\"\"\n", "entry_point": "add",
        "canonical_solution": "    return a + b\n", "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
    }
    attack = "    return a + b\n" + LOCK_ITS_FOLDER
    verdicts = check_completions([add] * 3, [attack, add["canonical_solution"], attack], timeout=3.0, workers=3)
    assert verdicts == [(True, "passed")] * 3  # its folder is its own tmpfs, gone with it: nothing to lock
    assert list(tmp_path.iterdir()) == []  # every folder of the evaluator's was removed

    # Opted out, the program may lock its folder (if the evaluator's user may); the run returns all the same.
    result = run_python(LOCK_ITS_FOLDER, timeout=3.0, sandbox="none")
    folder = Path(result.stdout.split()[0])
    os.chmod(folder, 0o700)
    set_immutable(folder / "locked", False)
    os.chmod(folder / "locked" / "deeper", 0o700)
    set_immutable(folder / "locked" / "deeper" / "file", False)
    shutil.rmtree(folder)
    assert result.returncode == 0, result.stderr


def test_an_unavailable_sandbox_is_one_clear_error_naming_the_opt_out(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "_unshare", lambda: None)
    sandbox.isolation_problem.cache_clear()
    try:
        # Through `twophase eval`: the benchmark fails with that line before any model is loaded (there is none).
        summary = run_evaluation("no-such-org/no-such-model", tmp_path / "out", EvalSettings("humaneval", data_dir=REPO / "eval" / "samples"))
        entry = summary["benchmarks"]["humaneval"]
        assert entry["status"] == "failed" and "--option humaneval.sandbox=none" in entry["reason"], entry
        with pytest.raises(UserError) as caught:
            require_isolation("namespaces")
        message = str(caught.value)
        assert "\n" not in message and "util-linux `unshare` is not installed" in message
        assert "--option humaneval.sandbox=none" in message
        with pytest.raises(UserError, match="humaneval.sandbox=none"):
            HumanEval().check_ready({})
        require_isolation("none")  # the explicit opt-out runs without asking
        HumanEval().check_ready({"sandbox": "none"})
        with pytest.raises(UserError, match="unknown sandbox 'off'"):
            HumanEval().check_ready({"sandbox": "off"})
    finally:
        sandbox.isolation_problem.cache_clear()


def test_an_environment_under_tmp_stays_visible_below_the_writable_tmp(isolation_works, tmp_path):
    """A clone in /tmp with its .venv there: the program still runs its interpreter (bound read-only
    inside the fresh /tmp) and can write beside it, but not into the environment."""
    import subprocess

    environment = tmp_path / "clone" / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(environment)], check=True, timeout=120)
    program = (
        "import json, os, sys\n"
        "open('/tmp/work.txt', 'w').write('ok')\n"
        "try:\n    open(os.path.join(sys.prefix, 'x'), 'w'); inside = 'wrote'\nexcept OSError as err:\n    inside = type(err).__name__\n"
        "print(json.dumps({'prefix': sys.prefix, 'work': open('/tmp/work.txt').read(), 'inside': inside}))\n"
    )
    # The bare environment has no twophase installed: the runner maps the namespace onto the repository.
    runner = (f"import sys, types\ntwophase = types.ModuleType('twophase')\ntwophase.__path__ = [{str(REPO)!r}]\n"
              f"sys.modules['twophase'] = twophase\n")
    runner += f"from twophase.eval.sandbox.execution import run_python\nr = run_python({program!r}, timeout=10.0)\nprint(r.stdout, r.stderr, r.returncode)"
    result = subprocess.run([str(environment / "bin" / "python"), "-c", runner], capture_output=True, text=True,
                            timeout=120, cwd=REPO, env={"PATH": os.environ["PATH"]})  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[0])
    assert report == {"prefix": str(environment), "work": "ok", "inside": "OSError"}, result.stdout
