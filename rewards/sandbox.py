"""Run an untrusted Python program against tests in a throwaway sandbox process (parent side; see _harness.py).

    run_function_tests(program, setup, tests, limits) -> Run   # HumanEval/MBPP: exec program, setup, each test
    run_stdio(program, stdin, limits, timeout_s) -> Run         # one stdin/stdout test; the caller compares stdout

What holds, and who enforces it (`detect_isolation()` picks the strongest mode this machine allows, once):

| threat | mode "root" (euid 0 + unshare) | mode "userns" (unprivileged user namespace) | mode "none" |
|---|---|---|---|
| network | OS: empty network namespace | OS: empty network namespace | best effort: socket patched |
| fork bomb | OS: own uid + RLIMIT_NPROC; PID namespace killed at the end | OS: PID namespace killed at the end; best effort: fork patched (no NPROC: the uid is shared) | best effort: fork patched, process group killed |
| killing the parent / reading its environment | OS: PID namespace + private /proc + other uid; env scrubbed | OS: PID namespace + private /proc; env scrubbed | best effort: os.kill patched; env scrubbed (same uid may read /proc/PID/environ) |
| writing outside the work dir | OS: other uid; every mount read-only; private tmpfs /tmp | OS: every mount read-only, capabilities dropped; private /tmp | not prevented: the program has our uid (as root: everything) |
| CPU, memory, file size, open files | OS: rlimits, hard limits lowered (CPU: SIGXCPU, then SIGKILL 1 s later) | OS: rlimits | OS: rlimits (a root program could raise them) |
| wall time | OS: the whole process group (and namespace) SIGKILLed at the deadline | same | same (a setsid escapee survives) |
| output flooding | OS: stdout/stderr are files capped by RLIMIT_FSIZE; parent reads at most max_output_bytes | same | same |
| forged pass | best effort (in-process): per-run nonce records written by the harness after a test passed; exit code never means pass; two records for a test fail it | same | same |

The result channel: the harness writes `NONCE test I STATUS DETAIL` lines to a pipe whose nonce the candidate never
sees in any file, argument or environment variable; the parent counts a test as passed only with that exact record.
See _harness.py for the one way around it (reading the harness's own memory), which only stdio tests avoid.
"""
from __future__ import annotations

import functools
import json
import logging
import os
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
HARNESS = str(Path(__file__).with_name("_harness.py"))
_NAMESPACES = ("--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc")
_RESULT_CAP = 256 * 1024  # bytes of result records read before the run counts as flooding its result channel


class SandboxError(RuntimeError):
    """The sandbox itself failed (the harness never started): an infrastructure problem, not a wrong program."""


@dataclass(frozen=True)
class Limits:
    test_timeout_s: float = 5.0  # per test (function mode: alarm in the harness; stdio: wall clock per process)
    total_timeout_s: float = 30.0  # wall clock for the whole submission, all tests included
    memory_mb: int = 2048  # RLIMIT_AS
    processes: int = 16  # RLIMIT_NPROC (threads count), enforced only with a uid of our own (mode root)
    file_mb: int = 16  # RLIMIT_FSIZE: any file, stdout and stderr included
    open_files: int = 64
    max_output_bytes: int = 1 << 20  # stdout beyond this is an output_limit failure

    def for_harness(self, cpu_s: float) -> dict:
        return {"cpu_s": max(1, int(cpu_s + 0.999)), "memory_bytes": self.memory_mb << 20,
                "file_bytes": self.file_mb << 20, "open_files": self.open_files, "processes": self.processes}


@dataclass(frozen=True)
class Isolation:
    mode: str  # "root" | "userns" | "none"
    prefix: tuple[str, ...]  # the unshare command, () for none
    drop_uid: bool  # run each submission under a fresh uid (root only)


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
                                    isolation=iso, python=python)
        except SandboxError as exc:
            reasons.append(f"{iso.mode}: {exc}")
            continue
        if [s for s, _ in ok.tests] == ["ok", "wrong"]:
            if iso.mode == "none":
                log.warning("code sandbox: no namespaces available (%s); programs run with this process's uid and "
                            "only rlimits and best-effort Python patches confine them", "; ".join(reasons))
            return iso
        reasons.append(f"{iso.mode}: probe gave {ok.tests}")
    raise SandboxError("no sandbox mode works here: " + "; ".join(reasons))


def _env(home: str) -> dict[str, str]:
    """Nothing from our environment (tokens, keys, Ray addresses) reaches the program."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": "/tmp", "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------------------------- one process
def _read_records(fd: int, proc: subprocess.Popen, deadline: float) -> tuple[bytes, list[str]]:
    """Everything the harness wrote until EOF, the process's exit or the deadline."""
    data, flags, exited = bytearray(), [], False
    while True:
        left = deadline - time.monotonic()
        if left <= 0 and not exited:
            flags.append("deadline")
            break
        # After the exit only what is already buffered is read (select without waiting): a stray child may still hold
        # the pipe open (mode none), and a blocking read could wait on it forever.
        ready, _, _ = select.select([fd], [], [], 0 if exited else min(left, 0.05))
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
            if len(data) > _RESULT_CAP:
                flags.append("output_limit")
                break
        elif exited:
            break
        elif proc.poll() is not None:
            # What it wrote just before exiting can land between the select above and this poll: drain once more.
            exited = True
    return bytes(data), flags


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone: the namespace or the process group died with its leader


def _launch(job: dict, limits: Limits, wall_s: float, iso: Isolation, python: str, stdin: bytes | None):
    """Run the harness once; returns (records, returncode, stdout, stderr, wall, flags)."""
    base = Path(tempfile.mkdtemp(prefix="diffrl-sbx-"))
    work, io_dir = base / "work", base / "io"
    work.mkdir(mode=0o700)
    io_dir.mkdir(mode=0o700)
    uid = 1_000_000 + secrets.randbelow(1 << 30) if iso.drop_uid else None
    if uid is not None:
        os.chown(work, uid, uid)
    nonce = secrets.token_hex(16)
    job = dict(job, nonce=nonce, uid=uid, namespaces=bool(iso.prefix), drop_caps=iso.mode == "userns")
    (io_dir / "stdin").write_bytes(stdin or b"")
    job_r, job_w = os.pipe()
    res_r, res_w = os.pipe()
    start = time.monotonic()
    try:
        with open(io_dir / "stdin", "rb") as fin, open(io_dir / "stdout", "wb") as fout, \
                open(io_dir / "stderr", "wb") as ferr:
            try:
                proc = subprocess.Popen([*iso.prefix, python, "-I", "-B", HARNESS, str(job_r), str(res_w)],
                                        cwd=work, env=_env("/tmp/work" if iso.prefix else str(work)), stdin=fin,
                                        stdout=fout, stderr=ferr, pass_fds=(job_r, res_w), start_new_session=True)
            finally:
                os.close(job_r)
                os.close(res_w)
        try:
            with os.fdopen(job_w, "wb") as pipe:
                job_w = -1
                pipe.write(json.dumps(job).encode())
        except BrokenPipeError:
            pass  # the harness died before reading its job; reported below as a sandbox failure
        records, flags = _read_records(res_r, proc, start + wall_s)
        _kill_group(proc)
        returncode = proc.wait()
        wall = time.monotonic() - start
        stdout = _read_head(io_dir / "stdout", limits.max_output_bytes + 1)
        stderr = _read_head(io_dir / "stderr", 4096)
    finally:
        for fd in (job_w, res_r):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(base, ignore_errors=True)
    lines = [line[len(nonce) + 1:].decode("utf-8", "replace") for line in records.split(b"\n")
             if line.startswith(nonce.encode() + b" ")]
    if not any(line.startswith("start") for line in lines) and "deadline" not in flags:
        raise SandboxError(f"harness did not start (mode {iso.mode}, exit {returncode}): "
                           f"{stderr.decode('utf-8', 'replace').strip()[-500:]}")
    return lines, returncode, stdout, stderr, wall, flags


def _read_head(path: Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit)


def _exit_signal(returncode: int, iso: Isolation) -> int | None:
    """The signal that ended the program: negative codes from Popen; 128+N from the namespace's PID 1."""
    if returncode < 0:
        return -returncode
    if iso.prefix and returncode > 128:
        return returncode - 128
    return None


def _explain(returncode: int, flags: list[str], iso: Isolation) -> tuple[str, str]:
    """Why a test has no record: the process ended (or was ended) before the harness could write it."""
    if "output_limit" in flags:
        return "output_limit", "flooded the result channel"
    if "deadline" in flags:
        return "timeout", "total time limit"
    sig = _exit_signal(returncode, iso)
    if sig == signal.SIGXCPU:
        return "timeout", "CPU time limit (SIGXCPU)"
    if sig == signal.SIGXFSZ:
        return "output_limit", "file size limit (SIGXFSZ)"
    if sig is not None:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return "crashed", f"killed by {name}"
    return "exited", f"process ended (exit code {returncode}) before reporting"


def _parse_tests(lines: list[str], count: int, returncode: int, flags: list[str], iso: Isolation):
    results: dict[int, tuple[str, str]] = {}
    for line in lines:
        parts = line.split(" ", 3)
        if parts[0] == "test" and len(parts) >= 3 and parts[1].isdigit():
            index = int(parts[1])
            # The harness writes one record per test. A second one means a program that learned the nonce (or
            # forked) wrote records of its own: the test fails, whatever either record says.
            if index in results:
                results[index] = ("tampered", "more than one result record for this test")
            else:
                results[index] = (parts[2], parts[3] if len(parts) > 3 else "")
    missing = [i for i in range(count) if i not in results]
    if missing:
        status, detail = _explain(returncode, flags, iso)
        results[missing[0]] = (status, detail)
        for i in missing[1:]:
            results[i] = ("not_run", f"after test {missing[0]}: {status}")
    return [results[i] for i in range(count)]


# ----------------------------------------------------------------------------------------------- public API
def run_function_tests(program: str, setup: str, tests: list[str], limits: Limits = Limits(), *,
                       isolation: Isolation | None = None, python: str = sys.executable) -> Run:
    """exec(program); exec(setup); then each test snippet (e.g. `check(fn)` or an assert): pass = no exception."""
    iso = isolation or detect_isolation(python)
    job = {"mode": "function", "program": program, "setup": setup, "tests": list(tests),
           "test_timeout_s": limits.test_timeout_s, "limits": limits.for_harness(limits.total_timeout_s)}
    lines, rc, stdout, stderr, wall, flags = _launch(job, limits, limits.total_timeout_s, iso, python, None)
    run = Run(_parse_tests(lines, len(tests), rc, flags, iso), stdout[: limits.max_output_bytes], stderr, rc, wall,
              flags)
    sig = _exit_signal(rc, iso)
    if sig:
        run.flags.append(f"signal:{sig}")
    return run


def run_stdio(program: str, stdin: str | bytes, limits: Limits = Limits(), timeout_s: float | None = None, *,
              isolation: Isolation | None = None, python: str = sys.executable) -> Run:
    """Run the program once with `stdin`; tests[0] is ok only if it ended normally (exit 0) in time.

    The caller compares run.stdout with the expected output (and sees "output_limit" in flags when it was cut)."""
    iso = isolation or detect_isolation(python)
    wall = limits.test_timeout_s if timeout_s is None else timeout_s
    data = stdin.encode() if isinstance(stdin, str) else stdin
    job = {"mode": "stdio", "program": program, "tests": [], "test_timeout_s": wall,
           "limits": limits.for_harness(wall)}
    lines, rc, stdout, stderr, took, flags = _launch(job, limits, wall, iso, python, data)
    status = _parse_tests(lines, 1, rc, flags, iso)[0]
    if status[0] == "exited" and rc == 0 and not flags:  # os._exit(0) after printing: a normal end for stdio
        status = ("ok", "")
    if status[0] == "ok" and rc != 0:  # the program itself called os._exit(N) with N != 0 after finishing
        status = ("exited", f"exit code {rc}")
    if len(stdout) > limits.max_output_bytes:
        flags.append("output_limit")
        status = ("output_limit", f"stdout over {limits.max_output_bytes} bytes")
    return Run([status], stdout[: limits.max_output_bytes], stderr, rc, took, flags)
