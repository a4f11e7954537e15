"""Entry point of the code sandbox: `python -I -S -B harness.py JOB_FD TESTS_FD RESULT_FD`, possibly under
`unshare --net --mount --ipc --pid --fork --kill-child --mount-proc` (see rewards/sandbox.py for what each mode
enforces).

As PID 1 of the sandbox it reads the JSON job (without the tests), imports everything it will need, builds the
filesystem view (fs.py: after it, no host path but the interpreter's exists) and forks:
- function tests: the CHECKER (checker.py; holds the tests and RESULT_FD) and the CANDIDATE server (candidate.py;
  holds neither), each confined: rlimits, its own uid (mode root: two different uids) or no capabilities (mode
  userns), no_new_privs, not dumpable (no ptrace, no /proc/PID/mem or fd of each other). They talk over two pipes in
  plain data only. The candidate is forked BEFORE the tests (setup, test code) are read from TESTS_FD, so not even
  freed memory of its process holds them. PID 1 waits for the checker, then leaves: the kernel kills whatever
  remains in the namespace.
- stdin/stdout tests: one confined child that execs the program with the parent's stdin/stdout files; PID 1 exits
  with its status (128 + signal when killed); the parent compares stdout.
"""
import builtins
import json
import os
import resource
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, _ROOT)
from rewards.jail import candidate, checker, fs, plain  # noqa: E402  (imported before the checkout disappears)

sys.path.remove(_ROOT)
PR_SET_NO_NEW_PRIVS, PR_SET_DUMPABLE, PR_SET_SECUREBITS = 38, 4, 28


def _read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _drop_capabilities():
    """User-namespace mode: we are uid 0 inside; lose every capability for good (no regaining them via exec)."""
    import ctypes

    libc = fs._libc
    libc.prctl(PR_SET_SECUREBITS, 0x1 | 0x2 | 0x4 | 0x8, 0, 0, 0)  # NOROOT(+LOCKED), NO_SETUID_FIXUP(+LOCKED)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    if libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _confine(job, limits, uid):
    """rlimits with hard == soft (RLIMIT_CPU at the hard limit is SIGKILL: no signal to ignore), then the uid."""
    caps = [(resource.RLIMIT_CPU, limits["cpu_s"]), (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_AS, limits["memory_bytes"]), (resource.RLIMIT_FSIZE, limits["file_bytes"]),
            (resource.RLIMIT_NOFILE, limits["open_files"])]
    if uid is not None:  # only a uid of its own makes the per-user process count mean "this run"
        caps.append((resource.RLIMIT_NPROC, limits["processes"]))
    for which, value in caps:
        resource.setrlimit(which, (value, value))
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    elif job.get("drop_caps"):
        _drop_capabilities()
    fs._libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    fs._libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
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


def _enter_candidate(job, work):
    """The program's process: confined, in its work dir, with nothing of ours left in reach but what it needs."""
    _confine(job, job["candidate_limits"], job.get("uid"))
    os.chdir(work)
    sys.argv[:] = [""]
    _disable_escape_hatches(patch_network=not job.get("namespaces"))


def _run_stdio(job, work):
    namespace = {"__name__": "__main__", "__builtins__": builtins, "__file__": "solution.py"}
    status, detail = candidate.run_guarded(job["program"], namespace)
    candidate._flush()
    if status == "exited":  # sys.exit(code): the code is the program's own exit status
        code = detail.split(": ", 1)[-1].strip()
        os._exit(0 if code in ("", "None", "0") else int(code) if code.lstrip("-").isdigit() else 1)
    if status != "ok":
        os.write(2, f"\nsandbox-status {status} {detail}\n".encode("utf-8", "replace"))
    os._exit(0 if status == "ok" else 1)


def _site_builtins():
    """`exit` and `quit`, which programs use and `-S` (no site module) leaves out."""
    import _sitebuiltins

    builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
    builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")


def main():
    _site_builtins()
    job_fd, tests_fd, result_fd = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    job = json.loads(_read_all(job_fd))  # everything but the tests: the candidate is forked before they are read
    os.close(job_fd)
    _write = os.write

    def emit(line):
        _write(result_fd, line.replace(b"\n", b" ")[:400] + b"\n")

    work = os.getcwd()
    if job.get("namespaces"):
        fs.enter_new_root(job["new_root"], job["binds"], job["tmp_bytes"], job.get("uid"), job.get("hidden", ()))
        work = fs.WORK
    fs._libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    emit(b"start")
    if job["mode"] == "stdio":
        os.close(tests_fd)
        child = os.fork()
        if child == 0:
            os.close(result_fd)
            _enter_candidate(job, work)
            _run_stdio(job, work)
        _, status = os.waitpid(child, 0)  # result_fd stays open until we exit: its EOF tells the parent we are done
        code = os.waitstatus_to_exitcode(status)
        os._exit(128 - code if code < 0 else code)
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    server_pid = os.fork()
    if server_pid == 0:  # this process's memory has never held the tests (not even freed): they are read below
        for fd in (result_fd, tests_fd, req_w, rep_r):
            os.close(fd)
        os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
        program = job.pop("program")
        _enter_candidate(job, work)
        candidate.serve(program, req_r, rep_w, job["test_cpu_s"], job["test_timeout_s"])
    job.pop("program")
    job.update(json.loads(_read_all(tests_fd)))
    os.close(tests_fd)
    checker_pid = os.fork()
    if checker_pid == 0:
        os.close(req_r)
        os.close(rep_w)
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        _confine(job, job["checker_limits"], job["uid"] + 1 if job.get("uid") is not None else None)
        os._exit(checker.run(job, req_w, rep_r, emit))
    for fd in (req_r, req_w, rep_r, rep_w, result_fd):
        os.close(fd)
    while True:
        pid, status = os.wait()
        if pid == checker_pid:
            code = os.waitstatus_to_exitcode(status)
            break
    try:
        os.kill(server_pid, 9)
    except ProcessLookupError:
        pass  # already gone
    os._exit(128 - code if code < 0 else code)


if __name__ == "__main__":
    main()
