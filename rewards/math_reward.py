"""Math reward: find the final answer, screen it, judge it against the reference with math-verify, in killable workers.

    score_batch(prompts, responses, references, extract=("boxed", "hash"), timeout_s=5.0, workers=2,
                format_weight=0.0, format_pattern=None, length_coef=0.0, max_length=None, strict=True,
                response_len=None, max_response_chars=100_000, max_answer_chars=500)
    -> [{"score", "reason", "metrics"}]

score = 1[correct] + format_weight * 1[format ok] + length penalty (<= 0).

Answer policy (what the policy is paid for; a reason's category is the part before ':'):
1. `too_long`: a response over `max_response_chars` characters scores 0 before anything parses it (checked in the
   calling process: a megabyte response is not even sent to a worker). The format bonus is not paid either.
2. Final answers: every answer the `extract` markers give (all outermost `\\boxed{}`, every `####` line, every
   recipe-regex match; rewards/extract.py), minus empty boxes and boxes that repeat one of the prompt's own boxes
   verbatim (the model echoing "put your final answer within \\boxed{}" or a quoted problem). `last_number` is a
   fallback used only when no marker finds anything. None left: `no_answer`.
3. The answer judged is the LAST final answer of the first method (in the recipe's order) that found one, and it
   counts only if every final answer agrees with it: equal text, or math-verify-equivalent to it. Otherwise
   `conflicting` (`\\boxed{3} ... \\boxed{4}`), also when there are more than 4 distinct final answers.
4. Each distinct final answer is screened (rewards/answer_policy.py) before parsing: `too_complex` (over
   `max_answer_chars`, deep nesting, power towers, huge factorials), `candidate_list` (hedges with or / and / an
   ellipsis / \\approx, or lists more items than the reference: `\\boxed{1, 2, ..., 100}`, `3 \\text{ or } 4`),
   `bad_format` (look-alike characters: fullwidth or Arabic-Indic digits, mathematical bold, Cyrillic letters,
   invisible characters). A construct the reference itself uses is allowed.
5. `correct` / `wrong: got ...` from math-verify (`strict=True`: no variable-vs-number leniency), gold first.
6. `timeout`: parse + verify of the item ran past `timeout_s` (the worker was interrupted, or killed and replaced);
   `error: ...`: the reference itself does not parse, or the worker died.
Every path has a score (0 except `correct`, plus shaping) and a reason; the item's time is bounded by `timeout_s`
(+1 s grace before the kill).

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

from rewards.answer_policy import MAX_ANSWER_CHARS, screen_answer
from rewards.extract import METHODS, after_hash, all_boxed, final_answers, last_boxed
from rewards.pool import TimeoutPool
from rewards.result import error_result, make_result
from rewards.shaping import format_ok, length_penalty
from rollout.errors import one_line

__all__ = ["DEFAULT_EXTRACT", "get_pool", "gold_answer", "judge", "score_batch", "score_item"]

DEFAULT_EXTRACT = ("boxed", "hash")
MAX_RESPONSE_CHARS = 100_000  # ~25k tokens of English/LaTeX: above the longest reasoning budgets in the recipes
MAX_FINAL_ANSWERS = 4  # distinct final answers checked for agreement; more is `conflicting` without parsing
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


def _normal(answer: str) -> str:
    return "".join(answer.split())


def candidate_answers(prompt: str, response: str, methods: Sequence[str]) -> list[tuple[str, str]]:
    """The final answers that count (policy step 2): empty boxes and echoes of the prompt's own boxes removed."""
    echoed = {_normal(b) for b in all_boxed(prompt)} if "\\boxed" in prompt or "\\fbox" in prompt else set()
    return [(a, m) for a, m in final_answers(response, methods)
            if _normal(a) and not (m == "boxed" and _normal(a) in echoed)]


def choose_answer(prompt: str, response: str, gold: str, opts: dict[str, Any]) -> tuple[str | None, str, str | None]:
    """(answer to judge, its method, None) or (None, "", reason it scores 0): policy steps 2-4."""
    extract = opts.get("extract", DEFAULT_EXTRACT)
    found = candidate_answers(prompt, response, [extract] if isinstance(extract, str) else extract)
    if not found:
        return None, "", "no_answer"
    first_method = found[0][1]
    answer = [a for a, m in found if m == first_method][-1]
    distinct = list({_normal(a): a for a, _ in found}.values())
    if len(distinct) > MAX_FINAL_ANSWERS:
        return None, "", f"conflicting: {len(distinct)} different final answers"
    for candidate in distinct:  # a bomb in an earlier box must not reach the parser either
        if "\\boxed" in candidate or "\\fbox" in candidate:  # math-verify would judge the inner box alone
            return None, "", f"conflicting: a box inside the box {one_line(candidate, 40)!r}"
        reason = screen_answer(candidate, gold, opts.get("max_answer_chars", MAX_ANSWER_CHARS))
        if reason:
            return None, "", reason
    if len(distinct) > 1:
        judged = _parse(answer)
        for other in distinct:
            if _normal(other) != _normal(answer) and not _verify(judged, _parse(other), opts.get("strict", True)):
                return None, "", f"conflicting: final answers {one_line(other, 40)!r} and {one_line(answer, 40)!r}"
    return answer, first_method, None


def _verify(gold_parsed: list, pred_parsed: list, strict: bool) -> bool:
    from math_verify import verify

    return bool(verify(gold_parsed, pred_parsed, strict=strict, timeout_seconds=None))


def score_item(prompt: str, response: str, reference: Any, opts: dict[str, Any],
               length: int | None = None) -> dict[str, Any]:
    """One item, start to finish (runs inside a pool worker)."""
    shaped_ok = format_ok(response, opts.get("format_pattern")) if opts.get("format_weight") else False
    bonus = opts.get("format_weight", 0.0) * shaped_ok
    penalty = length_penalty(len(response) if length is None else length, opts.get("max_length"),
                             opts.get("length_coef", 0.0))
    gold = gold_answer(reference)
    if not gold.strip():
        raise ValueError("the reference answer is empty")
    answer, method, refused = choose_answer(prompt, response, gold, opts)
    metrics = {"has_answer": float(answer is not None), "format": float(shaped_ok), "length_penalty": penalty}
    if refused is not None:
        return make_result(bonus + penalty if refused == "no_answer" else penalty, refused, correct=0.0, **metrics)
    correct, as_math = judge(gold, answer, strict=opts.get("strict", True))
    reason = "correct" if correct else f"wrong: got {one_line(answer, 60)!r} via {method}"
    if not correct and not as_math:
        reason += f"; reference {one_line(gold, 60)!r} is not math, compared as text"
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


def _check_opts(extract: Any, timeout_s: float, workers: int, max_response_chars: int, max_answer_chars: int) -> None:
    methods = [extract] if isinstance(extract, str) else list(extract)
    bad = [m for m in methods if m not in METHODS and not str(m).startswith("regex:")]
    if bad or not methods:
        raise ValueError(f"extract: unknown method {bad[0] if bad else '(empty)'!r}; "
                         f"use {', '.join(METHODS)} or 'regex:<pattern>'")
    if not timeout_s > 0 or workers < 1:
        raise ValueError(f"timeout_s must be > 0 and workers >= 1, got {timeout_s} and {workers}")
    if max_response_chars < 1 or max_answer_chars < 1:
        raise ValueError(f"max_response_chars and max_answer_chars must be >= 1, got {max_response_chars} and "
                         f"{max_answer_chars}")


def score_batch(prompts: Sequence[str], responses: Sequence[str], references: Sequence[Any], *,
                extract: str | Sequence[str] = DEFAULT_EXTRACT, timeout_s: float = 5.0,
                workers: int = min(2, os.cpu_count() or 1), format_weight: float = 0.0,
                format_pattern: str | None = None, length_coef: float = 0.0, max_length: int | None = None,
                strict: bool = True, response_len: Sequence[int] | None = None,
                max_response_chars: int = MAX_RESPONSE_CHARS, max_answer_chars: int = MAX_ANSWER_CHARS
                ) -> list[dict[str, Any]]:
    _check_opts(extract, timeout_s, workers, max_response_chars, max_answer_chars)
    opts = {"extract": tuple([extract] if isinstance(extract, str) else extract), "strict": strict,
            "format_weight": format_weight, "format_pattern": format_pattern, "length_coef": length_coef,
            "max_length": max_length, "max_answer_chars": max_answer_chars}
    lengths = list(response_len) if response_len is not None else [None] * len(responses)
    results: list[dict[str, Any] | None] = [None] * len(responses)
    args, positions = [], []
    for i, (prompt, response, reference, n) in enumerate(zip(prompts, responses, references, lengths, strict=True)):
        if len(response) > max_response_chars:  # policy step 1: never parsed, never shipped to a worker
            penalty = length_penalty(len(response) if n is None else n, max_length, length_coef)
            results[i] = make_result(penalty, f"too_long: {len(response)} chars > {max_response_chars}",
                                     correct=0.0, has_answer=0.0, format=0.0, length_penalty=penalty)
            continue
        args.append((prompt, response, reference, opts, n))
        positions.append(i)
    for i, outcome in zip(positions, get_pool(workers).map(score_item, args, timeout_s) if args else []):
        if outcome.status == "ok":
            results[i] = outcome.value
        elif outcome.status == "timeout":
            results[i] = make_result(0.0, f"timeout: {outcome.detail}", correct=0.0, has_answer=0.0)
        else:
            results[i] = error_result(outcome.detail)
    for result in results:
        if result["reason"].startswith(("timeout", "error")):
            logging.getLogger(__name__).warning("math reward: %s", result["reason"])
    return results
