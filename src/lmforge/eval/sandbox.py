"""Sandboxed execution of generated programs for code-generation pass@k (HumanEval-style).

`run_program` starts this file as a launcher (`python -I -B sandbox.py CONFIG`) in a fresh session,
with a fresh temporary directory as cwd, a minimal environment and stdin from /dev/null. The
launcher enters new network, mount and PID namespaces (inside a user namespace when not root),
forks the program's process (PID 1 of the new PID namespace, so every process it leaves behind dies
with it), and there, before exec'ing `python -I -B program.py`, stacks what the kernel offers:
the whole mount tree read-only, nodev and nosuid except the temporary directory; uid 65534 (or, as
root with an interpreter that uid cannot run, root stripped of every capability); no_new_privs;
Landlock (writes only beneath the temporary directory and to /dev/null, reads only system and
Python directories, no TCP, no signals or abstract sockets outside the sandbox); a seccomp filter
denying sockets, io_uring and chmod/chown/utimes/xattr changes (which Landlock does not cover);
and rlimits on memory, CPU, file size, core dumps and processes.
The launcher reports the layers it set up through a pipe; without one that stops writes outside
the temporary directory the program does not run and `SandboxUnavailable` is raised. Timeouts
kill the whole process group from the parent, so neither a hang nor a forked child stalls a run.
"""
from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import platform
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lmforge.errors import UserError

NOBODY = 65534
FILE_LIMIT_MB = 64
PROCESS_LIMIT = 256
STDERR_TAIL = 2048

# unshare(2), mount(2) and mount_setattr(2)
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
SYS_MOUNT_SETATTR = 442  # syscalls numbered from 424 on are the same on every architecture
# prctl(2) and capabilities
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_SECCOMP, PR_SET_SECUREBITS = 1, 24, 22, 28
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
SECBIT_NOROOT, SECBIT_NOROOT_LOCKED, SECBIT_NO_CAP_AMBIENT_RAISE, SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1, 2, 64, 128
LINUX_CAPABILITY_VERSION_3 = 0x20080522
# Landlock
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION, LANDLOCK_RULE_PATH_BENEATH = 1, 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
FS_ON_FILES = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
SYSTEM_READ_ROOTS = ("/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/dev", "/proc", "/sys", "/nix/store")
# seccomp: syscalls denied with EPERM, per machine (AUDIT_ARCH, numbers). Landlock does not cover metadata
# (chmod, chown, utimes, xattrs) nor pathname UNIX sockets, so these go; io_uring could open sockets around it.
SECCOMP_COMMON = {"io_uring_setup": 425, "fchmodat2": 452, "setxattrat": 463, "removexattrat": 466,
                  "file_setattr": 469}
SECCOMP_DENY = {
    "x86_64": (0xC000003E, {"socket": 41, "chmod": 90, "fchmod": 91, "chown": 92, "fchown": 93, "lchown": 94,
                            "utime": 132, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197,
                            "lremovexattr": 198, "fremovexattr": 199, "utimes": 235, "fchownat": 260,
                            "futimesat": 261, "fchmodat": 268, "utimensat": 280}),
    "aarch64": (0xC00000B7, {"setxattr": 5, "lsetxattr": 6, "fsetxattr": 7, "removexattr": 14, "lremovexattr": 15,
                             "fremovexattr": 16, "fchmod": 52, "fchmodat": 53, "fchownat": 54, "fchown": 55,
                             "utimensat": 88, "socket": 198}),
}
SECCOMP_MODE_FILTER, SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 2, 0x7FFF0000, 0x00050000
EPERM = 1


class SandboxUnavailable(UserError):
    """This machine cannot isolate a program well enough (say, nothing stops writes outside its temp dir).

    A UserError: the CLI says so in one line (run the code task elsewhere), it is no bug to trace."""


@dataclass
class ExecResult:
    """How one program ended; stderr is the last STDERR_TAIL bytes it wrote there."""

    status: str  # "passed" (exit 0), "failed" (non-zero exit), "timeout", "killed" (by another signal)
    returncode: int
    stderr: str
    seconds: float


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program HumanEval's `check_correctness` runs for one completion."""
    return prompt + completion + "\n" + test + "\n" + f"check({entry_point})"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k), as the Codex paper computes it."""
    import numpy as np

    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def run_program(program: str, *, timeout_s: float = 10.0, memory_mb: int = 1024) -> ExecResult:
    """Run a Python program in the sandbox; raises SandboxUnavailable rather than run it unsandboxed."""
    result, report = _run(program, timeout_s, memory_mb)
    if report.get("error"):
        raise SandboxUnavailable(report["error"])
    return result


def run_many(programs: list[str], *, workers: int, timeout_s: float = 10.0, memory_mb: int = 1024) -> list[ExecResult]:
    """`run_program` over several programs, `workers` at a time, results in input order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_program(p, timeout_s=timeout_s, memory_mb=memory_mb), programs))


def sandbox_layers() -> list[str]:
    """The isolation layers this machine gives a program (probed once by running an empty one)."""
    return list(_probe_layers())


@functools.cache
def _probe_layers() -> tuple[str, ...]:
    return tuple(_run("", 10.0, 256)[1]["layers"])


def _environment(workdir: str) -> dict[str, str]:
    """Nothing inherited: no tokens, proxies or credentials; one thread for BLAS/OpenMP under the memory limit."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run(program: str, timeout_s: float, memory_mb: int) -> tuple[ExecResult, dict]:
    """One sandboxed run and the launcher's report of its layers (or of why it refused)."""
    workdir = tempfile.mkdtemp(prefix="lmforge-sandbox-")
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        os.chmod(os.path.join(workdir, "program.py"), 0o644)
        with tempfile.TemporaryFile() as err:
            report_r, report_w = os.pipe()
            try:
                try:
                    config = {"workdir": workdir, "parent": os.getpid(), "timeout_s": timeout_s,
                              "memory_mb": memory_mb, "report": report_w}
                    start = time.monotonic()
                    proc = subprocess.Popen(
                        [sys.executable, "-I", "-B", os.path.abspath(__file__), json.dumps(config)],
                        cwd=workdir, env=_environment(workdir), stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL, stderr=err, pass_fds=(report_w,), start_new_session=True)
                finally:
                    os.close(report_w)
                timed_out, seconds = _wait(proc, timeout_s, start)
                report = _read_report(report_r)
            finally:
                os.close(report_r)
            stderr = _tail(err)
    finally:
        _remove(workdir)
    if report is None:
        if timed_out:
            report = {"layers": [], "error": None}
        else:
            last = stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            report = {"layers": [], "error": f"sandbox launcher failed before running the program: {last[0]}"}
    rc = proc.returncode
    if timed_out or rc == -signal.SIGXCPU:
        status = "timeout"
    else:
        status = "passed" if rc == 0 else "failed" if rc > 0 else "killed"
    return ExecResult(status, rc, stderr, seconds), report


def _wait(proc: subprocess.Popen, timeout_s: float, start: float) -> tuple[bool, float]:
    """Wait for the launcher, then kill its process group before reaping it (so the group id is not reused)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            timed_out = not poller.poll(max(0.0, timeout_s - (time.monotonic() - start)) * 1000)
        finally:
            os.close(pidfd)
        return timed_out, time.monotonic() - start
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _read_report(fd: int) -> dict | None:
    """The launcher's one-line JSON report, or None when it died before writing one."""
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 1 << 16)
    except BlockingIOError:
        return None
    try:
        return json.loads(data.decode())
    except ValueError:
        return None


def _tail(f) -> str:
    """The last STDERR_TAIL bytes the program wrote to stderr."""
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - STDERR_TAIL))
    return f.read().decode("utf-8", errors="replace")


def _remove(workdir: str) -> None:
    """Delete the temporary directory, first opening up directories the program made with mode 0 if need be."""
    try:
        shutil.rmtree(workdir)
    except OSError:
        for root, dirs, _ in os.walk(workdir):
            for d in dirs:
                if not os.path.islink(os.path.join(root, d)):
                    os.chmod(os.path.join(root, d), 0o700)
        shutil.rmtree(workdir, ignore_errors=True)


# Everything below runs in the launcher process, never in the caller.

@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _ok(ret: int, what: str) -> int:
    """ret, or OSError with errno when ret is negative."""
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _syscall(nr: int, *args, what: str) -> int:
    return _ok(_libc().syscall(ctypes.c_long(nr), *args), what)


def _prctl(option: int, arg: int = 0, arg3: int = 0) -> None:
    ulong = ctypes.c_ulong
    _ok(_libc().prctl(ctypes.c_int(option), ulong(arg), ulong(arg3), ulong(0), ulong(0)), f"prctl({option})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    source_b, fstype_b = (None if v is None else v.encode() for v in (source, fstype))
    _ok(_libc().mount(source_b, target.encode(), fstype_b, ctypes.c_ulong(flags), None), f"mount {target}")


def _mount_setattr(path: str, flags: int, attr_set: int = 0, attr_clr: int = 0) -> None:
    attr = (ctypes.c_uint64 * 4)(attr_set, attr_clr, 0, 0)
    _syscall(SYS_MOUNT_SETATTR, ctypes.c_long(AT_FDCWD), path.encode(), ctypes.c_long(flags), ctypes.byref(attr),
             ctypes.c_long(ctypes.sizeof(attr)), what=f"mount_setattr {path}")


def _enter_namespaces(missing: dict[str, str]) -> list[str]:
    """New user (when not root), network, mount and PID namespaces for the launcher's children."""
    layers = []
    if os.geteuid() != 0:
        uid, gid = os.getuid(), os.getgid()
        try:
            _ok(_libc().unshare(ctypes.c_int(CLONE_NEWUSER)), "unshare(CLONE_NEWUSER)")
        except OSError as e:
            missing["namespaces"] = str(e)
            return layers
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        layers.append("userns")
    for name, flag in (("netns", CLONE_NEWNET), ("mountns", CLONE_NEWNS), ("pidns", CLONE_NEWPID)):
        try:
            _ok(_libc().unshare(ctypes.c_int(flag)), f"unshare({name})")
            layers.append(name)
        except OSError as e:
            missing[name] = str(e)
    return layers


def _readonly_mounts(workdir: str, own_proc: bool) -> list[str]:
    """Make every mount read-only, nodev and nosuid except the workdir (writable) and /dev/null (a device)."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount(workdir, workdir, None, MS_BIND)
    _mount("/dev/null", "/dev/null", None, MS_BIND)
    layers = []
    if own_proc:
        try:
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            layers.append("private-proc")
        except OSError:
            pass
    _mount_setattr("/", AT_RECURSIVE, attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
    _mount_setattr(workdir, 0, attr_clr=MOUNT_ATTR_RDONLY)
    _mount_setattr("/dev/null", 0, attr_clr=MOUNT_ATTR_NODEV)
    os.chdir(workdir)  # the cwd inherited from the launcher is on the mount beneath the writable bind
    return ["mountns-ro"] + layers


def _usable_by_nobody(workdir: str) -> bool:
    """Whether uid 65534 can run this interpreter, import from its path and write the workdir."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            ok = (os.access(sys.executable, os.X_OK) and os.access(workdir, os.W_OK | os.X_OK)
                  and all(os.access(p, os.R_OK | os.X_OK) for p in sys.path if os.path.isdir(p)))
            os._exit(0 if ok else 1)
        finally:
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0


def _drop_root(workdir: str) -> str:
    """As root: become uid 65534 if it can run the program, else stay uid 0 with every capability gone for good."""
    program = os.path.join(workdir, "program.py")
    os.chown(workdir, NOBODY, NOBODY)
    os.chown(program, NOBODY, NOBODY)
    if _usable_by_nobody(workdir):
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        return "uid-nobody"
    os.chown(workdir, 0, 0)
    os.chown(program, 0, 0)
    _prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED
           | SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        _prctl(PR_CAPBSET_DROP, cap)
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    _ok(_libc().capset(ctypes.byref(header), ctypes.byref(data)), "capset")
    return "no-caps"


def _read_roots() -> list[str]:
    """Directories the program may read: system ones, the interpreter's, and /etc entries anyone may read."""
    paths = [*SYSTEM_READ_ROOTS, sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)), *sys.path]
    for entry in os.scandir("/etc"):
        try:
            mode = os.stat(entry.path).st_mode
        except OSError:
            continue
        if mode & stat.S_IROTH and (not stat.S_ISDIR(mode) or mode & stat.S_IXOTH):
            paths.append(entry.path)
    return [p for p in dict.fromkeys(paths) if p and os.path.exists(p)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _landlock(workdir: str, missing: dict[str, str]) -> list[str]:
    """Landlock: write only beneath workdir and to /dev/null, read only _read_roots, no TCP, no IPC outside."""
    try:
        abi = _syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_long(0),
                       ctypes.c_long(LANDLOCK_CREATE_RULESET_VERSION), what="landlock_create_ruleset")
    except OSError as e:
        missing["landlock"] = str(e)
        return []
    fs = (1 << 13) - 1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0) \
        | (FS_IOCTL_DEV if abi >= 5 else 0)
    fields = [fs] + ([NET_BIND_TCP | NET_CONNECT_TCP] if abi >= 4 else []) \
        + ([SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL] if abi >= 6 else [])
    attr = (ctypes.c_uint64 * len(fields))(*fields)
    ruleset = _syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_long(ctypes.sizeof(attr)),
                       ctypes.c_long(0), what="landlock_create_ruleset")
    try:
        rules = [(p, FS_EXECUTE | FS_READ_FILE | FS_READ_DIR) for p in _read_roots()]
        rules += [(workdir, fs), ("/dev/null", FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE | FS_IOCTL_DEV)]
        for path, access in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                mask = fs if stat.S_ISDIR(os.fstat(fd).st_mode) else fs & FS_ON_FILES
                rule = _PathBeneath(access & mask, fd)
                _syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_long(ruleset), ctypes.c_long(LANDLOCK_RULE_PATH_BENEATH),
                         ctypes.byref(rule), ctypes.c_long(0), what=f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        _syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_long(ruleset), ctypes.c_long(0), what="landlock_restrict_self")
    finally:
        os.close(ruleset)
    return ["landlock-fs"] + (["landlock-net"] if abi >= 4 else []) + (["landlock-scope"] if abi >= 6 else [])


def _seccomp(missing: dict[str, str]) -> list[str]:
    """A seccomp filter: SECCOMP_DENY's syscalls, and any of a foreign ABI (x32, i386), fail with EPERM."""
    if platform.machine() not in SECCOMP_DENY:
        missing["seccomp"] = f"no syscall table for {platform.machine()}"
        return []
    arch, numbers = SECCOMP_DENY[platform.machine()]
    denied = sorted({**numbers, **SECCOMP_COMMON}.values())
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, ...|BPF_JGE, BPF_RET
    deny_at = 5 + len(denied)  # index of the final "return EPERM"; jumps count from the next instruction
    program = [(ld, 0, 0, 4), (jeq, 0, deny_at - 2, arch), (ld, 0, 0, 0), (jge, deny_at - 4, 0, 0x40000000)]
    program += [(jeq, deny_at - 5 - i, 0, nr) for i, nr in enumerate(denied)]
    program += [(ret, 0, 0, SECCOMP_RET_ALLOW), (ret, 0, 0, SECCOMP_RET_ERRNO | EPERM)]
    filters = (ctypes.c_uint64 * len(program))(*[code | jt << 16 | jf << 24 | k << 32 for code, jt, jf, k in program])

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program), ctypes.cast(filters, ctypes.c_void_p))
    _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))
    return ["seccomp"]


def _refusal(layers: list[str], missing: dict[str, str]) -> str | None:
    """Why the program must not run with these layers, or None when it may."""
    if not {"landlock-fs", "mountns-ro"} & set(layers):
        why = "; ".join(f"{k}: {v}" for k, v in missing.items()) or "no reason reported"
        return ("refusing to run untrusted code: neither Landlock nor a read-only mount namespace is available "
                f"to stop writes outside the temporary directory ({why})")
    if "no-caps" in layers and not {"pidns", "mountns-ro", "seccomp"} <= set(layers):
        return ("refusing to run untrusted code as root: uid 65534 cannot run this interpreter, and root without "
                "capabilities needs PID and mount namespaces and seccomp, of which only "
                f"{', '.join(layers)} are available ({'; '.join(f'{k}: {v}' for k, v in missing.items())})")
    return None


def _set_limits(timeout_s: float, memory_mb: int, limit_processes: bool) -> None:
    """rlimits; CPU time gets a second past the wall timeout (SIGXCPU, then SIGKILL a second later)."""
    cpu = math.ceil(timeout_s) + 1
    limits = {resource.RLIMIT_AS: (memory_mb << 20,) * 2, resource.RLIMIT_CPU: (cpu, cpu + 1),
              resource.RLIMIT_FSIZE: (FILE_LIMIT_MB << 20,) * 2, resource.RLIMIT_CORE: (0, 0)}
    if limit_processes:  # RLIMIT_NPROC counts all processes of the uid: only meaningful for nobody or a userns
        limits[resource.RLIMIT_NPROC] = (PROCESS_LIMIT,) * 2
    for which, (soft, hard) in limits.items():
        current = resource.getrlimit(which)[1]
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(which, (soft, hard))


def _sandbox_child(config: dict, layers: list[str], missing: dict[str, str]) -> None:
    """In the forked child: stack the remaining layers, report them and exec the program."""
    workdir = config["workdir"]
    if "mountns" in layers:
        try:
            layers += _readonly_mounts(workdir, "pidns" in layers)
        except OSError as e:
            missing["mountns-ro"] = str(e)
    if os.geteuid() == 0:
        layers.append(_drop_root(workdir))
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    layers += _landlock(workdir, missing)
    layers += _seccomp(missing)
    layers = [layer for layer in layers if layer != "mountns"]
    refusal = _refusal(layers, missing)
    os.write(config["report"], json.dumps({"layers": layers, "error": refusal}).encode())
    os.close(config["report"])
    if refusal:
        os._exit(0)
    _set_limits(config["timeout_s"], config["memory_mb"], "uid-nobody" in layers or "userns" in layers)
    os.execv(sys.executable, [sys.executable, "-I", "-B", "program.py"])


def _launch(config: dict) -> None:
    """The launcher: namespaces, then a child that becomes the program; exits as the program did."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != config["parent"]:
        os._exit(1)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    missing: dict[str, str] = {}
    layers = _enter_namespaces(missing)
    pid = os.fork()
    if pid == 0:
        try:
            _sandbox_child(config, layers, missing)
        except BaseException:
            traceback.print_exc()
        os._exit(126)
    os.close(config["report"])
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code < 0:
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    _launch(json.loads(sys.argv[1]))
