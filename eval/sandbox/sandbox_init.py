"""Process 1 of a sandbox: build its file system view, then run the program without privileges.

`eval/sandbox/container.py` starts this script through util-linux `unshare`, already in
new mount, pid, network, IPC and UTS namespaces (and, for an evaluator that is
not root, a new user namespace in which it is root). It runs as a plain file
with `python -I` and imports only the standard library, everything before the
root is switched: afterwards the evaluator's files, its Python included, are
out of reach.

Steps, with the configuration as one JSON argument:

1. A new root on a small tmpfs holding read-only bind mounts of the listed
   paths only (system libraries, the interpreter's installation, a few device
   nodes), copies of the files the program needs under /sandbox, a fresh
   /proc of the new pid namespace, and an empty writable tmpfs at /tmp; then
   `pivot_root` and detach the old root, so nothing else is reachable at all.
2. The program runs as a child in its own session and in a further user
   namespace where it is uid 1000 with no capabilities (for a root evaluator
   it first becomes the unprivileged `nobody`), with `no_new_privs`, with a
   seccomp filter that refuses Unix sockets (see "no path sockets"), with
   stdin at /dev/null, with fixed resource limits (soft = hard, which an
   unprivileged process cannot raise), and with a fixed environment.
3. This process reaps every orphan (it is their parent now) and exits as soon
   as the program exits or its stdin reaches end-of-file (the evaluator asks
   it to stop, or died). Its exit ends the pid namespace: the kernel kills
   every process left in it, however it was detached.

How the program ended goes to the status file descriptor as one line:
"exit N", "signal N", or "setup REASON" when the sandbox could not be built.
"""

import ctypes
import json
import os
import re
import resource
import sys
import threading

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
MNT_DETACH = 0x2
CLONE_NEWUSER = 0x10000000
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 4, 38, 22, 2
PROGRAM_UID = 1000  # who the program is inside its own user namespace

# One thread for the numeric libraries: their thread pools would otherwise spend the sandbox's task limit.
ENVIRONMENT = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STAGING = "/tmp"  # where the new root is assembled, in this mount namespace only

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source, target: str, fstype, flags: int, data=None) -> None:
    encode = lambda text: text.encode() if text is not None else None  # noqa: E731
    _check(_libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)), f"mount {target}")


# --------------------------------------------------------------------------- the new root


def _open_sources(paths: list[str]) -> list[tuple[str, object]]:
    """(path, symlink target or O_PATH descriptor), taken before anything is mounted over them.

    A path inside another one listed is visible through it already; it is left
    out, so that building the root never creates anything inside a bind mount.
    """
    sources, kept = [], []
    for path in sorted(os.path.normpath(p) for p in paths):
        if any(path == outer or path.startswith(outer.rstrip("/") + "/") for outer in kept):
            continue
        kept.append(path)
        if os.path.islink(path):
            sources.append((path, os.readlink(path)))
        elif os.path.exists(path):
            sources.append((path, os.open(path, os.O_PATH)))
    return sources


def _build_root(root: str, sources, installs: dict[str, bytes], work_options: str) -> None:
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=0755")
    # The writable /tmp comes first: a visible path below /tmp (a project cloned there, its .venv)
    # is then bound inside it, read-only, instead of being hidden under it.
    os.makedirs(root + "/tmp")
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, work_options)
    for path, source in sources:
        target = root + path
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if isinstance(source, str):
            os.symlink(source, target)
            continue
        if os.path.isdir(f"/proc/self/fd/{source}"):
            os.makedirs(target, exist_ok=True)
        else:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))  # a mount point, never an existing file
        _mount(f"/proc/self/fd/{source}", target, None, MS_BIND | MS_REC)
    os.makedirs(root + "/sandbox")
    for name, content in installs.items():
        with open(f"{root}/sandbox/{name}", "wb") as f:
            f.write(content)
    os.makedirs(root + "/proc", exist_ok=True)


def _switch_root(root: str) -> None:
    """pivot_root into `root` and detach the old root: afterwards it is not reachable by any path."""
    os.chdir(root)
    _check(_libc.pivot_root(b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")
    os.chdir("/")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def _make_read_only() -> None:
    """Remount every mount read-only and nosuid, keeping the flags a user namespace may not drop."""
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        target, options = fields[4], fields[5].split(",")
        if target in ("/proc", "/tmp"):  # /tmp is the program's writable work folder
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        flags |= (MS_NODEV if "nodev" in options else 0) | (MS_NOEXEC if "noexec" in options else 0)
        _mount(None, _unescape(target), None, flags)


def build_file_system(config: dict) -> None:
    installs = {}
    for name, path in config["installs"].items():
        with open(path, "rb") as f:
            installs[name] = f.read()
    sources = _open_sources(config["visible"])
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    owner = f"uid={config.get('uid', 0)},gid={config.get('gid', 0)}"
    _build_root(STAGING, sources, installs, f"size={config['work_bytes']},mode=0700,{owner}")
    # Before the old root goes: a user namespace may mount a proc only while it can see a complete one.
    _mount("proc", STAGING + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _switch_root(STAGING)
    _make_read_only()


# --------------------------------------------------------------------------- the program


def _enter_unprivileged_user_namespace() -> None:
    """Become uid 1000 of a fresh user namespace: no capability survives the exec that follows."""
    outer_uid, outer_gid = os.getuid(), os.getgid()
    _check(_libc.unshare(CLONE_NEWUSER), "unshare a user namespace")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{PROGRAM_UID} {outer_uid} 1"), ("gid_map", f"{PROGRAM_UID} {outer_gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    # While it still may: no namespaces of any kind below this one. A program cannot then use up the
    # machine's namespace counts (which other sandboxes need), nor reach the kernel code they expose.
    for name in os.listdir("/proc/sys/user"):
        if name.startswith("max_") and name.endswith("_namespaces"):
            with open(f"/proc/sys/user/{name}", "w") as f:
                f.write("0")


def _become_program(config: dict, status_fd: int) -> None:
    """In the forked child: drop everything, then exec the program. Never returns."""
    try:
        os.setsid()  # its own process group: kill(0, ...) reaches only the sandbox's processes
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        if "uid" in config:  # a root evaluator: become an unprivileged user of the real system first
            os.setgroups([])
            os.setresgid(config["gid"], config["gid"], config["gid"])
            os.setresuid(config["uid"], config["uid"], config["uid"])
            _check(_libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")  # to write its own uid_map
        _enter_unprivileged_user_namespace()
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        _forbid_unix_sockets()
        # Set after the user namespace exists, so that the process count is this sandbox's alone.
        for limit_id, value in config["limits"]:
            resource.setrlimit(limit_id, (value, value))
        os.chdir("/tmp")
        os.execve(config["command"][0], config["command"], ENVIRONMENT)
    except BaseException as err:  # noqa: BLE001 - report anything, then leave without running Python's cleanup
        os.write(status_fd, f"setup cannot start the program: {err}\n".encode())
        os._exit(127)


# --------------------------------------------------------------------------- no path sockets

# The network namespace stops TCP, UDP and abstract Unix sockets, but not a Unix socket bound to a
# file: a file the program can see (in the read-only system or Python folders) is a way out to
# whatever listens on it, and a read-only mount does not stop connect(). So the program may not
# create AF_UNIX sockets at all: a seccomp filter answers socket(AF_UNIX, ...) with EPERM.
# socketpair() stays allowed: its two ends are connected to each other, never to a path.
# seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6]  (args[0]'s low half at 16)
SYSCALL_ARCH = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}  # (AUDIT_ARCH_*, __NR_socket)
X32_SYSCALL_BIT = 0x40000000  # x86_64's x32 ABI numbers: another way to call socket(); refused
AF_UNIX = 1
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x06
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
EPERM = 1


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def unix_socket_filter(machine: str) -> list[tuple[int, int, int, int]]:
    """The classic-BPF program, as (code, jump if true, jump if false, k) rows."""
    arch, socket_nr = SYSCALL_ARCH[machine]
    refuse = SECCOMP_RET_ERRNO | EPERM
    return [
        (BPF_LD_W_ABS, 0, 0, 4),  # the calling ABI
        (BPF_JEQ_K, 1, 0, arch),
        (BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),  # another ABI (e.g. i386's socketcall): not for this program
        (BPF_LD_W_ABS, 0, 0, 0),  # the system call number
        (BPF_JGE_K, 0, 1, X32_SYSCALL_BIT) if machine == "x86_64" else (BPF_JEQ_K, 0, 1, 0xFFFFFFFF),
        (BPF_RET_K, 0, 0, refuse),
        (BPF_JEQ_K, 0, 3, socket_nr),
        (BPF_LD_W_ABS, 0, 0, 16),  # socket()'s domain
        (BPF_JEQ_K, 0, 1, AF_UNIX),
        (BPF_RET_K, 0, 0, refuse),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]


def _forbid_unix_sockets() -> None:
    machine = os.uname().machine
    if machine not in SYSCALL_ARCH:
        raise OSError(f"no seccomp filter for {machine}: path sockets cannot be refused here")
    rows = unix_socket_filter(machine)
    program = (_SockFilter * len(rows))(*[_SockFilter(*row) for row in rows])
    fprog = _SockFprog(len(rows), ctypes.cast(program, ctypes.POINTER(_SockFilter)))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "prctl(PR_SET_SECCOMP)")


def _report_when_done(program: int, status_fd: int) -> None:
    """Reap every child (orphans land here); when the program itself ends, report and end the sandbox."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == program:
            ended = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.waitstatus_to_exitcode(status)}"
            os.write(status_fd, f"{ended}\n".encode())
            os._exit(0)


def main() -> None:
    config = json.loads(sys.argv[1])
    status_fd = config["status_fd"]
    os.set_inheritable(status_fd, False)  # the program must not be able to write a status
    try:
        build_file_system(config)
    except Exception as err:  # noqa: BLE001 - any failure here means this machine cannot isolate
        os.write(status_fd, f"setup {err}\n".encode())
        os._exit(1)
    program = os.fork()
    if program == 0:
        _become_program(config, status_fd)
    threading.Thread(target=_report_when_done, args=(program, status_fd), daemon=True).start()
    while os.read(0, 4096):  # end-of-file: the evaluator wants the sandbox gone
        pass
    os._exit(0)


if __name__ == "__main__":
    main()
