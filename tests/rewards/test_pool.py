"""TimeoutPool: hard per-task deadlines, dead workers replaced, results in order.

Tasks are builtins (eval/exec on source strings) so that the worker processes can unpickle them."""
from __future__ import annotations

import time

import pytest

from rewards.pool import TimeoutPool

IGNORE_ALARM_AND_HANG = "import signal, time\nsignal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\ntime.sleep(60)"


@pytest.fixture(scope="module")
def pool():
    with TimeoutPool(workers=2) as p:
        yield p


def test_results_come_back_in_order(pool):
    outcomes = pool.map(eval, [(f"{i} * 2",) for i in range(7)], timeout_s=5)
    assert [(o.status, o.value) for o in outcomes] == [("ok", 2 * i) for i in range(7)]


def test_soft_timeout_interrupts_without_killing(pool):
    killed = pool.stats["killed"]
    outcomes = pool.map(exec, [("import time\ntime.sleep(30)",), ("x = 1",)], timeout_s=0.5)
    assert [o.status for o in outcomes] == ["timeout", "ok"]
    assert pool.stats["killed"] == killed


def test_hard_timeout_kills_and_replaces_the_worker(pool):
    killed = pool.stats["killed"]
    start = time.monotonic()
    outcomes = pool.map(exec, [(IGNORE_ALARM_AND_HANG,), ("x = 1",)], timeout_s=0.5)
    assert time.monotonic() - start < 5
    assert [o.status for o in outcomes] == ["timeout", "ok"]
    assert "killed" in outcomes[0].detail
    assert pool.stats["killed"] == killed + 1
    assert pool.map(eval, [("1 + 1",)], timeout_s=5)[0].value == 2  # the replacement serves


def test_a_dying_worker_is_an_error_and_is_replaced(pool):
    outcomes = pool.map(exec, [("import os\nos._exit(3)",), ("y = 2",)], timeout_s=5)
    assert outcomes[0].status == "error" and "exit code 3" in outcomes[0].detail
    assert outcomes[1].status == "ok"
    assert pool.map(eval, [("3",)], timeout_s=5)[0].value == 3


def test_exceptions_and_unpicklable_results_are_errors(pool):
    raised, unpicklable = pool.map(eval, [("1 / 0",), ("lambda: 1",)], timeout_s=5)
    assert raised.status == "error" and raised.detail.startswith("ZeroDivisionError")
    assert unpicklable.status == "error" and "picklable" in unpicklable.detail


def test_map_after_close_raises():
    p = TimeoutPool(workers=1)
    p.close()
    with pytest.raises(RuntimeError):
        p.map(eval, [("1",)], timeout_s=1)
