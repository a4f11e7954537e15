"""Math reward: extract the final answer, judge it against the reference with math-verify, in killable workers.

    score_batch(prompts, responses, references, extract=("boxed", "hash"), timeout_s=5.0, workers=2,
                format_weight=0.0, format_pattern=None, length_coef=0.0, max_length=None, strict=True,
                response_len=None) -> [{"score", "reason", "metrics"}]

score = 1[correct] + format_weight * 1[format ok] + length penalty (<= 0). Reasons:
`correct`, `wrong`, `no_answer` (nothing extracted), `timeout` (parse + verify ran past timeout_s; the worker was
interrupted or killed), `error: ...` (the reference itself does not parse, or the worker died).

Everything for one item (extraction with a recipe's regex included) runs in a TimeoutPool worker, because
math-verify's own timeouts use signal.alarm and do not work off the main thread (Ray actors call us from threads).
math-verify's timeouts are therefore switched off (None) and ours, in pool.py, cut every item off.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from rewards.extract import METHODS, after_hash, extract_answer, last_boxed
from rewards.pool import TimeoutPool
from rewards.result import error_result, make_result, one_line
from rewards.shaping import format_ok, length_penalty

__all__ = ["DEFAULT_EXTRACT", "get_pool", "gold_answer", "judge", "score_batch", "score_item"]

DEFAULT_EXTRACT = ("boxed", "hash")
# We switch math-verify's signal-based timeouts off on purpose (pool.py enforces ours); silence its warning saying so.
logging.getLogger("math_verify").setLevel(logging.ERROR)
_POOLS: dict[int, TimeoutPool] = {}
_POOLS_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------------------ worker side
def gold_answer(reference: Any) -> str:
    """The reference's final answer: a GSM8K solution ('... #### 72') or a boxed solution reduces to its answer."""
    text = str(reference).strip()
    if "####" in text:
        return after_hash(text) or text
    if "\\boxed" in text or "\\fbox" in text:
        return last_boxed(text) or text
    return text


def _strip_dollars(answer: str) -> str:
    # `$72$` / `$72` (money) inside a box would start a math-mode group latex parsing chokes on
    return answer.strip().strip("$").strip() if answer.count("$") in (1, 2) else answer


def _parse(answer: str) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    # Boxing the bare answer lets one latex path handle `\frac12`, `50\%`, `[1,2)` and plain `72` alike.
    return parse("\\boxed{" + _strip_dollars(answer) + "}", extraction_config=config, parsing_timeout=None)


def judge(gold: str, predicted: str, strict: bool = True) -> tuple[bool, bool]:
    """(equivalent, gold parsed as math): math-verify on two extracted answers (gold first: verify is asymmetric).

    A gold that does not parse as math is still compared as text (multiple-choice letters, words), and the caller
    says so in the reason, so that a broken reference shows up in the logs instead of as a silent `wrong`."""
    from math_verify import verify
    from sympy import Basic, MatrixBase

    if not gold.strip():
        raise ValueError("the reference answer is empty")
    gold_parsed, pred_parsed = _parse(gold), _parse(predicted)
    as_math = any(isinstance(g, (Basic, MatrixBase)) for g in gold_parsed)
    return bool(verify(gold_parsed, pred_parsed, strict=strict, timeout_seconds=None)), as_math


def warm_up() -> None:
    """One judgement at worker start-up: math-verify builds its LaTeX parser lazily on first use (seconds on a
    loaded machine), which must not be charged to the first real item's time limit."""
    judge("\\frac{1}{2}", "0.5")


def score_item(response: str, reference: Any, opts: dict[str, Any], length: int | None = None) -> dict[str, Any]:
    """One item, start to finish (runs inside a pool worker)."""
    extract = opts.get("extract", DEFAULT_EXTRACT)
    answer, method = extract_answer(response, [extract] if isinstance(extract, str) else extract)
    shaped_ok = format_ok(response, opts.get("format_pattern")) if opts.get("format_weight") else False
    bonus = opts.get("format_weight", 0.0) * shaped_ok
    penalty = length_penalty(len(response) if length is None else length, opts.get("max_length"),
                             opts.get("length_coef", 0.0))
    metrics = {"has_answer": float(answer is not None), "format": float(shaped_ok), "length_penalty": penalty}
    if answer is None:
        return make_result(bonus + penalty, "no_answer", correct=0.0, **metrics)
    correct, as_math = judge(gold_answer(reference), answer, strict=opts.get("strict", True))
    reason = "correct" if correct else f"wrong: got {one_line(answer, 60)!r} via {method}"
    if not correct and not as_math:
        reason += f"; reference {one_line(gold_answer(reference), 60)!r} is not math, compared as text"
    return make_result(float(correct) + bonus + penalty, reason, correct=float(correct), **metrics)


# ------------------------------------------------------------------------------------------------ parent side
def get_pool(workers: int) -> TimeoutPool:
    """The process's math pool of that size (created once, closed at exit): workers are slow to warm up."""
    with _POOLS_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = TimeoutPool(workers, preload=("rewards.math_reward", "math_verify", "sympy"),
                                          warmup="rewards.math_reward:warm_up")
        return _POOLS[workers]


@atexit.register
def _close_pools() -> None:
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.close()
        _POOLS.clear()


def _check_opts(extract: Any, timeout_s: float, workers: int) -> None:
    methods = [extract] if isinstance(extract, str) else list(extract)
    bad = [m for m in methods if m not in METHODS and not str(m).startswith("regex:")]
    if bad or not methods:
        raise ValueError(f"extract: unknown method {bad[0] if bad else '(empty)'!r}; "
                         f"use {', '.join(METHODS)} or 'regex:<pattern>'")
    if not timeout_s > 0 or workers < 1:
        raise ValueError(f"timeout_s must be > 0 and workers >= 1, got {timeout_s} and {workers}")


def score_batch(prompts: Sequence[str], responses: Sequence[str], references: Sequence[Any], *,
                extract: str | Sequence[str] = DEFAULT_EXTRACT, timeout_s: float = 5.0,
                workers: int = min(2, os.cpu_count() or 1), format_weight: float = 0.0,
                format_pattern: str | None = None, length_coef: float = 0.0, max_length: int | None = None,
                strict: bool = True, response_len: Sequence[int] | None = None) -> list[dict[str, Any]]:
    _check_opts(extract, timeout_s, workers)
    opts = {"extract": tuple([extract] if isinstance(extract, str) else extract), "strict": strict,
            "format_weight": format_weight, "format_pattern": format_pattern, "length_coef": length_coef,
            "max_length": max_length}
    lengths = list(response_len) if response_len is not None else [None] * len(responses)
    args = [(r, ref, opts, n) for r, ref, n in zip(responses, references, lengths)]
    results = []
    for outcome in get_pool(workers).map(score_item, args, timeout_s):
        if outcome.status == "ok":
            results.append(outcome.value)
        elif outcome.status == "timeout":
            results.append(make_result(0.0, f"timeout: {outcome.detail}", correct=0.0, has_answer=0.0))
        else:
            results.append(error_result(outcome.detail))
    for result in results:
        if result["reason"].startswith(("timeout", "error")):
            logging.getLogger(__name__).warning("math reward: %s", result["reason"])
    return results
