"""RewardService on a local Ray cluster (127.0.0.1, 2 CPUs): ordering, built-ins in actors, crashed workers."""
from __future__ import annotations

from pathlib import Path

import pytest

from rewards.result import RewardConfigError

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
CRASHING = "tests/rewards/crashing_reward.py:score"


@pytest.fixture(scope="module")
def crash_service(local_ray):
    from rewards.service import RewardService

    service = RewardService([{"fn": CRASHING}], num_workers=2, num_cpus_per_worker=0.5, chunk_size=3,
                            base_dir=ROOT, sample_row={"prompt": "", "response": "a", "reference": "a"})
    yield service
    service.shutdown()


def items(responses, reference="ok"):
    return [{"prompt": "", "response": r, "reference": reference} for r in responses]


def test_results_in_order_across_chunks_and_workers(crash_service):
    responses = ["ok" if i % 3 else "no" for i in range(20)]
    results = crash_service.score(items(responses))
    assert [r["score"] for r in results] == [float(r == "ok") for r in responses]
    stats = crash_service.stats()
    assert stats["items"] >= 20 and stats["items_per_s"] > 0


def test_a_crashed_worker_is_replaced_and_its_items_retried_once(crash_service, tmp_path):
    before = crash_service.stats()
    batch = items(["ok", f"CRASH_ONCE:{tmp_path / 'marker'}", "ok", "no", "CRASH", "ok"])
    results = crash_service.score(batch)
    assert [r["score"] for r in results[:4]] == [1.0, 1.0, 1.0, 0.0]  # the neighbours of both crashes are scored
    assert results[4]["score"] == 0.0
    assert results[4]["reason"] == "error: reward worker crashed twice while scoring this item"
    after = crash_service.stats()
    assert after["restarts"] - before["restarts"] >= 3  # CRASH_ONCE once, CRASH twice
    assert after["crashed"] - before["crashed"] == 1
    assert after["reasons"]["crashing_reward/error"] >= 1
    # and the pool still serves
    assert [r["score"] for r in crash_service.score(items(["ok", "no"]))] == [1.0, 0.0]


def test_builtin_math_and_code_rewards_in_actors(local_ray):
    from rewards.service import RewardService

    code_ref = {"tests": [{"input": "2 3", "output": "5"}]}
    service = RewardService([{"fn": "math", "kwargs": {"timeout_s": 2}}], num_workers=1, num_cpus_per_worker=0.5,
                            sample_row={"prompt": "", "reference": "1"})
    code = RewardService([{"fn": "code"}], num_workers=1, num_cpus_per_worker=0.5,
                         sample_row={"prompt": "", "response": "print(5)", "reference": code_ref})
    try:
        # a power tower is screened as too_complex before sympy; this bomb is not and must run into the timeout
        bomb = "\\boxed{\\binom{99999}{49999}^{9999}}"
        math_results = service.score(items(["\\boxed{1/2}", bomb, "\\boxed{10^{10^{9}}}", "#### 0.5"],
                                           reference="0.5"))
        assert [r["reason"].split(":")[0] for r in math_results] == ["correct", "timeout", "too_complex", "correct"]
        program = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
        code_results = code.score([{"prompt": "", "response": program, "reference": code_ref}])
        assert code_results[0]["reason"] == "correct"
    finally:
        service.shutdown()
        code.shutdown()


def test_bad_specs_fail_in_the_driver_before_any_actor(local_ray):
    from rewards.service import RewardService

    with pytest.raises(RewardConfigError, match=r"^reward\[0\]\.fn: unknown reward 'mth'"):
        RewardService([{"fn": "mth"}], num_workers=1)
    service = RewardService([{"fn": "format"}], num_workers=1, num_cpus_per_worker=0.5)
    try:
        with pytest.raises(ValueError, match="item 0 has no 'response'"):
            service.score([{"prompt": "", "reference": ""}])
    finally:
        service.shutdown()
