"""Runs INSIDE the code sandbox: confine this process, run the candidate program, report test outcomes.

Started by rewards/sandbox.py as `python -I -B _harness.py JOB_FD RESULT_FD`, possibly under
`unshare --net --mount --pid --fork --kill-child --mount-proc`. It reads a JSON job from JOB_FD (the program, the
tests, the limits and a random per-run nonce), then:

1. namespaces: as PID 1 of the new PID namespace it builds a private filesystem view (tmpfs on /tmp, /var/tmp,
   /dev/shm; the work directory bound at /tmp/work; directories other users cannot enter, e.g. /root, replaced by
   an empty tmpfs with only the Python installation bound back read-only; every other mount remounted read-only),
   then forks: the child runs the candidate, PID 1 waits and exits with the child's status, which makes the kernel
   kill every process left in the namespace (fork bombs, daemons, setsid escapes).
2. the child sets rlimits (hard == soft), drops to the job's uid (root) or drops all capabilities (user
   namespace), sets no_new_privs, disables fork/exec/kill/socket in Python (best effort: a determined program can
   reach them another way; the kernel limits above are what actually hold), then runs the candidate.
3. function mode: exec the program, then the setup (e.g. HumanEval's `check`), then each test, each under a
   per-test alarm; after each test it writes `NONCE test I STATUS DETAIL` to RESULT_FD. stdio mode: exec the
   program as __main__ with stdin/stdout already redirected by the parent.

Tampering: the report path uses only objects captured in local variables before the candidate ran (os.write, the
fd, the nonce, bytes formatting), so exiting early, printing markers, redefining `check`, patching json/builtins or
this module's globals cannot produce a pass record. Test code runs with a snapshot of builtins taken before the
program ran. A program that deliberately walks interpreter frames (or uses ctypes) can read the nonce from this
process's memory and write a record: the parent fails any test with two records ("tampered"), so such a forger must
also keep the harness from writing its own (exit at once): possible, and not preventable while tests run in the
candidate's process. stdio outputs are compared by the parent and cannot be forged this way.
"""
import builtins
import json
import os
import resource
import signal
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                 "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")
WORK = "/tmp/work"


class TestTimeout(BaseException):
    """The per-test alarm (BaseException: a candidate's `except Exception` does not swallow it)."""


def _read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# ------------------------------------------------------------------------------------------ filesystem view
def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _mount(source, target, fstype, flags, data=None):
    ctypes, libc = _libc()

    def enc(text):
        return text.encode() if text is not None else None

    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _nested(path, roots):
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _keep_paths():
    """The directories the Python interpreter needs to keep importing after confinement."""
    wanted = {sys.base_prefix, sys.prefix, sys.exec_prefix, *[p for p in sys.path if p and os.path.isdir(p)]}
    out = []
    for path in sorted(os.path.realpath(p) for p in wanted):
        if not _nested(path, out):
            out.append(path)
    return out


def _closed_ancestor(path):
    """The highest ancestor of `path` that other users may not enter (e.g. /root, mode 0700), or None."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        ancestor = "/" + "/".join(parts[:i])
        if not os.stat(ancestor).st_mode & 0o001:
            return ancestor
    return None


def _mountinfo():
    """(mount point, option flags) of every mount, deepest last."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")  # mountinfo escapes spaces as \040
            flags = 0
            for opt in fields[5].split(","):
                flags |= _OPTION_FLAGS.get(opt, 0)
            out.append((point, flags))
    return out


def _private_filesystem():
    """See the module docstring, step 1. Returns how many mounts could not be made read-only (diagnostic)."""
    keep = _keep_paths()
    keep_fds = {path: os.open(path, os.O_RDONLY | os.O_DIRECTORY) for path in keep}
    work_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    scratch = [d for d in SCRATCH if os.path.isdir(d)]
    closed = sorted({a for a in map(_closed_ancestor, keep) if a and not _nested(a, scratch)})
    for point in scratch:
        _mount("tmpfs", point, "tmpfs", MS_NOSUID | MS_NODEV, "size=256m,mode=1777")
    for point in closed:
        _mount("tmpfs", point, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path, fd in keep_fds.items():
        if _nested(path, scratch + closed):
            os.makedirs(path, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND)
        os.close(fd)
    os.mkdir(WORK)
    _mount(f"/proc/self/fd/{work_fd}", WORK, None, MS_BIND)
    os.close(work_fd)
    os.chdir(WORK)
    writable = set(scratch) | {WORK, "/proc", "/dev", "/dev/pts"}
    failed = 0
    for point, flags in _mountinfo():
        if point in writable or _nested(point, ["/proc"]):
            continue
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except OSError:
            failed += 1  # counted and reported in the start record; the other layers still hold
    return failed


def _supervise(child):
    """PID 1: reap everything; leave with the candidate's status (128 + signal when it was killed)."""
    while True:
        pid, status = os.wait()
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(128 - code if code < 0 else code)


# ------------------------------------------------------------------------------------------ process limits
def _drop_capabilities():
    """User-namespace mode: we are uid 0 inside; lose every capability for good (no regaining them via exec)."""
    ctypes, libc = _libc()
    secure_noroot = 0x1 | 0x2 | 0x4 | 0x8  # SECBIT_NOROOT(+LOCKED), SECBIT_NO_SETUID_FIXUP(+LOCKED)
    libc.prctl(28, secure_noroot, 0, 0, 0)  # PR_SET_SECUREBITS

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    if libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _confine(job):
    limits = job["limits"]
    caps = [(resource.RLIMIT_CPU, limits["cpu_s"], limits["cpu_s"] + 1), (resource.RLIMIT_CORE, 0, 0),
            (resource.RLIMIT_AS, limits["memory_bytes"], limits["memory_bytes"]),
            (resource.RLIMIT_FSIZE, limits["file_bytes"], limits["file_bytes"]),
            (resource.RLIMIT_NOFILE, limits["open_files"], limits["open_files"])]
    if job.get("uid") is not None:  # only a uid of its own makes the per-user process count mean "this run"
        caps.append((resource.RLIMIT_NPROC, limits["processes"], limits["processes"]))
    for which, soft, hard in caps:
        resource.setrlimit(which, (soft, hard))
    if job.get("uid") is not None:
        os.setgroups([])
        os.setgid(job["uid"])
        os.setuid(job["uid"])
    elif job.get("drop_caps"):
        _drop_capabilities()
    _, libc = _libc()
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid binaries cannot give privileges back
    os.umask(0o077)


def _blocked(name):
    def blocked(*args, **kwargs):
        raise PermissionError(f"sandbox: {name} is disabled")

    return blocked


def _disable_escape_hatches(patch_network):
    """Best effort, on top of the kernel limits: stop well-meaning code from spawning, killing or connecting."""
    import posix

    names = ["fork", "forkpty", "system", "popen", "kill", "killpg", "posix_spawn", "posix_spawnp", "setsid",
             "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve",
             "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe"]
    for module in (os, posix):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, _blocked(f"os.{name}"))
    try:
        import _posixsubprocess

        _posixsubprocess.fork_exec = _blocked("subprocess")
    except ImportError:
        pass  # not on this platform: subprocess cannot spawn through it anyway
    if patch_network:
        import socket

        socket.socket = _blocked("socket.socket")
        socket.create_connection = _blocked("socket.create_connection")


# ------------------------------------------------------------------------------------------ running tests
def _describe(exc):
    try:
        text = f"{type(exc).__name__}: {exc}"
    except BaseException:  # a candidate's __str__ may raise anything; the status is already decided
        text = "unprintable exception"
    return " ".join(text.split())[:200]


def _run_function(job, emit, clean_builtins):
    """Every test's status is decided by this frame's try/except and written with emit (captured earlier).

    The program runs in its own globals; setup and tests run in a copy of them whose builtins are a snapshot taken
    before the program ran, so a program that overrides builtins or rebinds names in its own globals (a thread
    racing to replace `check`) does not change what the tests check."""
    _compile, _exec, _settimer, _real, _dict = compile, exec, signal.setitimer, signal.ITIMER_REAL, dict
    _Timeout, _describe_ = TestTimeout, _describe
    # exception classes too: `except AssertionError` looks the name up at run time, in builtins the program can edit
    _SyntaxError, _AssertionError, _SystemExit = SyntaxError, AssertionError, SystemExit
    _MemoryError, _OSError, _BaseException = MemoryError, OSError, BaseException
    seconds = job["test_timeout_s"]
    namespace = {"__name__": "__candidate__", "__builtins__": builtins}
    stages = [(-2, job["program"]), (-1, job.get("setup") or "")] + list(enumerate(job["tests"]))
    failed = None  # (status, detail) of a program/setup failure: every test then fails with it
    for stage, source in stages:
        status, detail = "ok", ""
        if stage == -1:  # the program has run: from here on, test code sees a private copy
            namespace = _dict(namespace)
            namespace["__builtins__"] = clean_builtins
        if failed is not None:
            status, detail = failed
        else:
            try:
                code = _compile(source, "<program>" if stage == -2 else "<tests>", "exec")
                _settimer(_real, seconds)
                try:
                    _exec(code, namespace)
                finally:
                    _settimer(_real, 0)
            except _Timeout:
                status, detail = "timeout", f"exceeded {seconds:g}s"
            except _SyntaxError as exc:
                status, detail = "syntax_error", _describe_(exc)
            except _AssertionError as exc:
                status, detail = "wrong", _describe_(exc)
            except _SystemExit as exc:
                status, detail = "exited", _describe_(exc)
            except _MemoryError:
                status, detail = "memory", "MemoryError"
            except _OSError as exc:  # EFBIG: a write past RLIMIT_FSIZE (Python ignores SIGXFSZ, so writes fail)
                status, detail = ("output_limit" if exc.errno == 27 else "runtime_error"), _describe_(exc)
            except _BaseException as exc:
                status, detail = "runtime_error", _describe_(exc)
        if stage < 0:
            if status != "ok" and failed is None:
                failed = (status, ("program: " if stage == -2 else "test setup: ") + detail)
            continue
        emit(b"test %d %s %s" % (stage, status.encode(), detail.encode("utf-8", "replace")))


def _run_stdio(job, emit):
    """Run the program as __main__; the parent judges stdout. Exit status: 0 normal end, 1 uncaught error."""
    namespace = {"__name__": "__main__", "__builtins__": builtins, "__file__": "solution.py"}
    status, detail, code = "ok", "", 0
    try:
        _exec = exec
        _exec(compile(job["program"], "solution.py", "exec"), namespace)
    except SyntaxError as exc:
        status, detail, code = "syntax_error", _describe(exc), 1
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        status, detail = ("ok", "") if code == 0 else ("exited", f"exit code {code}")
    except MemoryError:
        status, detail, code = "memory", "MemoryError", 1
    except OSError as exc:
        status, detail, code = ("output_limit" if exc.errno == 27 else "runtime_error"), _describe(exc), 1
    except BaseException as exc:
        status, detail, code = "runtime_error", _describe(exc), 1
    emit(b"test 0 %s %s" % (status.encode(), detail.encode("utf-8", "replace")))
    _flush()
    return code


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # the program may have closed or replaced its streams; its output is its own
            continue


def main():
    job_fd, result_fd = int(sys.argv[1]), int(sys.argv[2])
    job = json.loads(_read_all(job_fd))
    os.close(job_fd)
    nonce = job.pop("nonce").encode()
    _write, _exit = os.write, os._exit

    def emit(line, _write=_write, _fd=result_fd, _nonce=nonce):
        _write(_fd, b"%s %s\n" % (_nonce, line.replace(b"\n", b" ")[:400]))

    readonly_failed = 0
    if job.get("namespaces") and os.getpid() == 1:
        readonly_failed = _private_filesystem()
        child = os.fork()
        if child:
            os.close(result_fd)
            _supervise(child)
    _confine(job)
    clean_builtins = dict(builtins.__dict__)
    signal.signal(signal.SIGALRM, _on_alarm)
    _disable_escape_hatches(patch_network=not job.get("namespaces"))
    emit(b"start %d" % readonly_failed)
    if job["mode"] == "function":
        _run_function(job, emit, clean_builtins)
        _flush()
        code = 0
    else:
        code = _run_stdio(job, emit)
    emit(b"done")
    _exit(code)


def _on_alarm(signum, frame):
    raise TestTimeout()


if __name__ == "__main__":
    main()
