"""A pool of worker processes where every task has a hard deadline: a worker past it is killed and replaced.

Why not multiprocessing.Pool or concurrent.futures: neither can kill one stuck task. math-verify (sympy) can run
for minutes on a pathological answer, and its own timeouts use signal.alarm, which only works on a process's main
thread. So each task runs on a worker's main thread with a soft deadline (SIGALRM raising `SoftTimeout`, a
BaseException that library `except Exception` blocks do not swallow) and the parent enforces the hard one with
SIGKILL, which also covers code that never returns to the interpreter.

    pool = TimeoutPool(workers=2, preload=("rewards.math_reward",))
    outcomes = pool.map(fn, [args, ...], timeout_s=5.0)   # [Outcome(status="ok"|"timeout"|"error", value, detail)]

Workers are fresh interpreters that import `preload` once; a replacement costs an interpreter start plus those
imports (~0.5 s for math-verify), paid only when a task is killed, which the soft deadline makes rare.
"""
from __future__ import annotations

import importlib
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

__all__ = ["Outcome", "SoftTimeout", "TimeoutPool"]

log = logging.getLogger(__name__)
# How long past the soft deadline the parent waits before SIGKILL: enough for a worker to unwind and reply.
HARD_GRACE_S = 1.0


class SoftTimeout(BaseException):
    """Raised inside a worker when its task runs past the deadline (BaseException: survives `except Exception`)."""


@dataclass
class Outcome:
    status: str  # "ok" | "timeout" | "error"
    value: Any = None
    detail: str = ""


READY = "ready"
READY_LIMIT_S = 300.0  # an interpreter start plus imports; only a broken environment takes this long


def _on_alarm(signum, frame):
    raise SoftTimeout()


def _worker_main(conn: Connection) -> None:
    signal.signal(signal.SIGALRM, _on_alarm)
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent went away
            return
        if message is None:
            return
        fn, args, timeout_s = message
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                reply = Outcome("ok", fn(*args))
            finally:  # disarm inside the outer try: an alarm landing here is still caught as a timeout
                signal.setitimer(signal.ITIMER_REAL, 0)
        except SoftTimeout:
            reply = Outcome("timeout", detail=f"exceeded {timeout_s:g}s")
        except BaseException as exc:  # the task's failure is the answer, not the worker's death
            frame = traceback.extract_tb(exc.__traceback__)[-1:] or [None]
            where = f" at {frame[0].filename.rsplit('/', 1)[-1]}:{frame[0].lineno}" if frame[0] else ""
            reply = Outcome("error", detail=f"{type(exc).__name__}: {exc}{where}")
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:  # an unpicklable return value
            conn.send(Outcome("error", detail=f"result not picklable: {exc}"))


def _serve(fd: int, preload: Sequence[str], warmup: str | None = None) -> None:
    """Entry point of a worker process (see _Worker): import what tasks need, run the warm-up, say "ready",
    then answer tasks until EOF."""
    for module in preload:
        importlib.import_module(module)
    if warmup:
        module, _, name = warmup.partition(":")
        getattr(importlib.import_module(module), name)()
    conn = Connection(fd)
    conn.send(READY)
    _worker_main(conn)


class _Worker:
    """A fresh interpreter (not a fork of the parent, not multiprocessing, which would re-import the parent's
    __main__ in every worker) talking pickled (fn, args, timeout) messages over a socketpair."""

    def __init__(self, preload: Sequence[str], warmup: str | None = None):
        parent_end, child_end = socket.socketpair()
        code = f"from rewards.pool import _serve; _serve({child_end.fileno()}, {list(preload)!r}, {warmup!r})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(child_end.fileno(),),
                                     stdin=subprocess.DEVNULL)
        child_end.close()
        self.conn = Connection(parent_end.detach())
        self.task: int | None = None
        self.deadline = 0.0
        self.ready = False

    def wait_ready(self) -> None:
        """Block until start-up (imports, warm-up) is done: a task's time limit must measure the task alone, not
        an interpreter start and lazily built parsers on a loaded machine."""
        if self.ready:
            return
        if not self.conn.poll(READY_LIMIT_S):
            raise RuntimeError(f"reward pool: worker pid {self.pid} not ready after {READY_LIMIT_S:g}s")
        try:
            message = self.conn.recv()
        except (EOFError, OSError):
            raise RuntimeError(f"reward pool: worker pid {self.pid} died while starting "
                               f"(exit code {self.proc.wait(5)})") from None
        if message != READY:
            raise RuntimeError(f"reward pool: worker pid {self.pid} sent {message!r} instead of ready")
        self.ready = True

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
        self.conn.close()


class TimeoutPool:
    def __init__(self, workers: int = 2, preload: Sequence[str] = (), warmup: str | None = None):
        """`warmup`: "module:function" each worker calls once after `preload`, before its first task."""
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._preload = tuple(preload)
        self._warmup = warmup
        self._lock = threading.Lock()  # one map() at a time: workers are not shared between callers
        self._workers = [_Worker(self._preload, warmup) for _ in range(workers)]
        self.stats = {"tasks": 0, "timeouts": 0, "errors": 0, "killed": 0, "busy_s": 0.0}

    @property
    def size(self) -> int:
        return len(self._workers)

    def wait_ready(self) -> None:
        """Block until every worker has started (a replacement for a killed one included): for callers that time
        tasks and must not charge an interpreter start-up to them."""
        with self._lock:
            for worker in self._workers:
                worker.wait_ready()

    def worker_cpu_s(self) -> float:
        """CPU seconds (user + system) used so far by the live workers, from /proc (benchmarks: per-core rates
        that do not depend on what else the machine is running)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for worker in self._workers:
            with open(f"/proc/{worker.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15 of stat)
        return total

    def map(self, fn: Callable, arg_list: Sequence[tuple], timeout_s: float) -> list[Outcome]:
        """Run fn(*args) for every args; results in input order. `fn` must be importable (module-level)."""
        with self._lock:
            if not self._workers:
                raise RuntimeError("TimeoutPool.map() after close()")
            start = time.perf_counter()
            outcomes = self._run(fn, list(arg_list), float(timeout_s))
            self.stats["busy_s"] += time.perf_counter() - start
            return outcomes

    def _run(self, fn: Callable, arg_list: list[tuple], timeout_s: float) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(arg_list)
        pending = list(range(len(arg_list)))[::-1]  # a stack; popped in input order
        while pending or any(w.task is not None for w in self._workers):
            for slot in range(len(self._workers)):
                if self._workers[slot].task is None and pending:
                    index = pending.pop()
                    self._start(slot, index, (fn, arg_list[index], timeout_s))
            busy = [w for w in self._workers if w.task is not None]
            next_deadline = min(w.deadline for w in busy)
            ready = wait([w.conn for w in busy], timeout=max(0.0, next_deadline - time.monotonic()))
            for worker in busy:
                slot, index = self._workers.index(worker), worker.task
                if worker.conn in ready:
                    outcomes[index] = self._receive(slot)
                elif time.monotonic() >= worker.deadline:
                    outcomes[index] = Outcome("timeout", detail=f"exceeded {timeout_s:g}s (worker killed)")
                    self._replace(slot)
        for outcome in outcomes:
            self.stats["tasks"] += 1
            self.stats["timeouts"] += outcome.status == "timeout"
            self.stats["errors"] += outcome.status == "error"
        return outcomes  # type: ignore[return-value]

    def _start(self, slot: int, index: int, message: tuple) -> None:
        self._workers[slot].wait_ready()
        try:
            self._workers[slot].conn.send(message)
        except (BrokenPipeError, ConnectionResetError):  # it died while idle (killed from outside): replace once
            fresh = self._replace(slot)
            fresh.wait_ready()
            fresh.conn.send(message)
        worker = self._workers[slot]
        worker.task, worker.deadline = index, time.monotonic() + message[2] + HARD_GRACE_S

    def _receive(self, slot: int) -> Outcome:
        worker = self._workers[slot]
        try:
            outcome = worker.conn.recv()
            worker.task = None
            return outcome
        except (EOFError, OSError):  # the worker died mid-task (segfault, os._exit, OOM kill)
            code = worker.proc.wait(5)
            self._replace(slot)
            return Outcome("error", detail=f"worker process died (exit code {code})")

    def _replace(self, slot: int) -> _Worker:
        old = self._workers[slot]
        old.kill()
        self.stats["killed"] += 1
        log.warning("reward pool: killed worker pid %s, starting a new one", old.pid)
        self._workers[slot] = _Worker(self._preload, self._warmup)
        return self._workers[slot]

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (OSError, BrokenPipeError):
                pass  # already dead: kill() below reaps it
            worker.kill()
        self._workers = []

    def __enter__(self) -> TimeoutPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
