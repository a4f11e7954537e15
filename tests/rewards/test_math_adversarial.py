"""The math reward under attack: answers built to score without solving, or to stall the scorer.

Every row has an expected score and reason category (the policy in rewards/math_reward.py's docstring) and must be
scored within its time limit: `timeout_s` for an item that parses, plus the pool's kill grace for one that does not.
Rows marked "was 1.0" scored 1.0 before the answer policy (math-verify leniently accepted them), rows marked
"was timeout" stalled sympy until the time limit.
"""
from __future__ import annotations

import time

import pytest

from rewards.math_reward import get_pool, score_batch
from rewards.pool import HARD_GRACE_S

TIMEOUT_S = 2.0
ECHO_PROMPT = "Compute 3+4. Put your final answer within \\boxed{}, e.g. \\boxed{5}."
MB = 1_000_000

# (label, prompt, response, reference, expected score, expected reason category)
TABLE = [
    # controls: plain, restated and legitimately listed answers still score
    ("plain", "", "so \\boxed{3}", "3", 1.0, "correct"),
    ("restated agreeing answers", "", "\\boxed{\\frac{1}{2}}, i.e. \\boxed{0.5}", "\\frac12", 1.0, "correct"),
    ("both roots as the reference lists them", "", "\\boxed{\\pm 3}", "-3, 3", 1.0, "correct"),
    ("echo of the prompt's boxes", ECHO_PROMPT, "You asked for \\boxed{} like \\boxed{5}. 3+4=7, \\boxed{7}", "7",
     1.0, "correct"),  # without the echo rule: conflicting (5 vs 7)
    # conflicting final answers
    ("two boxes, two values", "", "\\boxed{3} \\boxed{4}", "3", 0.0, "conflicting"),
    ("right answer last, wrong first", "", "maybe \\boxed{4}\nfinal: \\boxed{3}", "3", 0.0, "conflicting"),  # was 1.0
    ("box vs ####", "", "\\boxed{3}\n#### 4", "3", 0.0, "conflicting"),  # was 1.0
    ("several ####", "", "#### 4\n#### 3", "3", 0.0, "conflicting"),  # was 1.0
    ("five different boxes", "", " ".join(f"\\boxed{{{k}}}" for k in range(1, 6)) + " \\boxed{3}", "3", 0.0,
     "conflicting"),  # was 1.0
    ("a box inside the box", "", "\\boxed{3 \\boxed{4}}", "4", 0.0, "conflicting"),  # was 1.0
    # candidate lists
    ("enumeration with an ellipsis", "", "\\boxed{1, 2, 3, \\ldots, 100}", "3", 0.0, "candidate_list"),
    ("or in text", "", "\\boxed{3 \\text{ or } 4}", "3", 0.0, "candidate_list"),
    ("or in parentheses", "", "\\boxed{3 \\text{ (or 4)}}", "3", 0.0, "candidate_list"),  # was 1.0
    ("logical or", "", "\\boxed{x=3 \\lor x=4}", "3", 0.0, "candidate_list"),
    ("plain list", "", "\\boxed{1, 2, 3, 4, 5}", "3", 0.0, "candidate_list"),
    ("pm for one value", "", "\\boxed{\\pm 3}", "3", 0.0, "candidate_list"),
    ("approximately", "", "\\boxed{3 \\approx 4}", "3", 0.0, "candidate_list"),  # was 1.0
    ("every choice", "", "\\boxed{A, B, C, D}", "B", 0.0, "candidate_list"),
    # one value that holds several: math-verify does not take a set, an interval or a membership for its element
    ("set holding the answer", "", "\\boxed{\\{3, 4\\}}", "3", 0.0, "wrong"),
    ("interval holding the answer", "", "\\boxed{[1, 5]}", "3", 0.0, "wrong"),
    ("membership in a set", "", "\\boxed{x \\in \\{3, 4\\}}", "3", 0.0, "wrong"),
    ("or in another language", "", "\\boxed{3 \\text{ oder } 4}", "3", 0.0, "wrong"),
    ("an unmarked hedge is no answer", "", "the answer is 3 or 4 or 5", "3", 0.0, "no_answer"),
    # bombs
    ("power tower", "", "\\boxed{10^{10^{10^{10}}}}", "3", 0.0, "too_complex"),  # was timeout
    ("unbraced tower", "", "\\boxed{9^9^9^9}", "3", 0.0, "too_complex"),
    ("power of a power", "", "\\boxed{(10^{99999})^{99999}}", "3", 0.0, "too_complex"),
    ("factorial of a power", "", "\\boxed{(10^{10})!}", "3", 0.0, "too_complex"),  # was timeout
    ("huge factorial", "", "\\boxed{100000!}", "3", 0.0, "too_complex"),
    ("10,000-deep frac", "", "\\boxed{" + "\\frac{1}{" * 10_000 + "2" + "}" * 10_000 + "}", "3", 0.0,
     "too_long"),  # 100k chars: over the response cap
    ("1,000-deep frac", "", "\\boxed{" + "\\frac{1}{" * 1_000 + "2" + "}" * 1_000 + "}", "3", 0.0,
     "too_complex"),  # was timeout
    ("deep braces in a short answer", "", "\\boxed{" + "{" * 40 + "3" + "}" * 40 + "}", "3", 0.0, "too_complex"),
    ("bomb the screen misses", "", "\\boxed{\\sum_{k=1}^{99999} k^{k}}", "3", 0.0, "timeout"),
    # look-alike characters
    ("fullwidth digit", "", "\\boxed{３}", "3", 0.0, "bad_format"),
    ("Arabic-Indic digit", "", "\\boxed{٣}", "3", 0.0, "bad_format"),
    ("mathematical bold digit", "", "\\boxed{𝟑}", "3", 0.0, "bad_format"),
    ("Cyrillic ha for x", "", "\\boxed{х}", "x", 0.0, "bad_format"),
    ("zero-width space", "", "\\boxed{3\u200b}", "3", 0.0, "bad_format"),
    # size and structure
    ("1 MB response", "", "\\boxed{3} " + "x" * MB, "3", 0.0, "too_long"),
    ("1 MB of unclosed boxes", "", "\\boxed{" * (MB // 7), "3", 0.0, "too_long"),
    ("99k chars of unclosed boxes", "", "\\boxed{" * 14_000, "3", 0.0, "no_answer"),
    ("unbalanced braces", "", "\\boxed{3", "3", 0.0, "no_answer"),
    ("empty box only", "", "put it in \\boxed{}", "3", 0.0, "no_answer"),
]


@pytest.fixture(scope="module")
def warm_pool():
    pool = get_pool(2)
    score_batch([""], ["\\boxed{1}"], ["1"], timeout_s=TIMEOUT_S)  # workers started and warmed up
    return pool


def test_table_is_big_enough():
    assert len(TABLE) >= 20
    assert len({row[0] for row in TABLE}) == len(TABLE)


@pytest.mark.parametrize("label, prompt, response, reference, score, reason", TABLE, ids=[row[0] for row in TABLE])
def test_adversarial_answer(warm_pool, label, prompt, response, reference, score, reason):
    warm_pool.wait_ready()  # a worker killed by an earlier row restarts first: its start-up is not this row's time
    start = time.monotonic()
    result = score_batch([prompt], [response], [reference], timeout_s=TIMEOUT_S)[0]
    elapsed = time.monotonic() - start
    assert result["reason"].split(":", 1)[0] == reason, result["reason"]
    assert result["score"] == score
    limit = TIMEOUT_S + (HARD_GRACE_S if reason == "timeout" else 0.0) + 0.5  # + scheduling slack on a busy box
    assert elapsed < limit, f"{label}: {elapsed:.2f}s > {limit:.2f}s"


def test_too_long_is_refused_before_any_worker_sees_it(warm_pool):
    tasks = warm_pool.stats["tasks"]
    result = score_batch([""], ["\\boxed{3}" + " " * MB], ["3"], timeout_s=TIMEOUT_S)[0]
    assert result["reason"] == f"too_long: {MB + 9} chars > 100000"
    assert warm_pool.stats["tasks"] == tasks
    # the cap is a recipe option
    assert score_batch([""], ["\\boxed{3}" + " " * 50], ["3"], max_response_chars=40)[0]["reason"].startswith("too_long")


def test_a_batch_of_attacks_takes_the_time_of_its_slowest_items(warm_pool):
    """The whole table in one batch, two workers: bounded by the timeout items, not by the parse of every bomb."""
    warm_pool.wait_ready()
    start = time.monotonic()
    results = score_batch([r[1] for r in TABLE], [r[2] for r in TABLE], [r[3] for r in TABLE], timeout_s=TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert [r["reason"].split(":", 1)[0] for r in results] == [row[5] for row in TABLE]
    timeouts = sum(row[5] == "timeout" for row in TABLE)
    assert elapsed < timeouts * (TIMEOUT_S + HARD_GRACE_S) + 3.0


def test_screen_allows_what_the_reference_uses():
    """A construct the reference itself has (an ellipsis, `or`, a tower, more items) is not a hedge."""
    rows = [("\\boxed{1, 2, \\ldots, n}", "1, 2, \\ldots, n"), ("\\boxed{\\text{red or blue}}", "\\text{red or blue}"),
            ("\\boxed{2^{2^{2}}}", "2^{2^{2}}"), ("\\boxed{e^{-x^2}}", "e^{-x^{2}}"), ("\\boxed{1,000}", "1000"),
            ("\\boxed{10\\,\\mathrm{kg}}", "10")]
    results = score_batch([""] * len(rows), [r[0] for r in rows], [r[1] for r in rows], timeout_s=TIMEOUT_S)
    assert [r["reason"].split(":", 1)[0] for r in results] == ["correct"] * len(rows), [r["reason"] for r in results]
