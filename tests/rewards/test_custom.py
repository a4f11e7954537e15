"""Custom rewards: a recipe's reward section resolved, validated on a sample, combined; every bad spec is one line."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from rewards.registry import register_reward, reward
from rewards.result import RewardConfigError
from rewards.scorer import Scorer
from rewards.specs import resolve_reward_specs, validate_reward_specs

ROOT = Path(__file__).resolve().parents[2]
RECIPE = Path(__file__).with_name("custom_reward_recipe.yaml")
SAMPLE = {"prompt": "What is 6 * 7?", "reference": "42"}


@pytest.fixture(scope="module")
def recipe_specs():
    return yaml.safe_load(RECIPE.read_text())["reward"]


def test_recipe_with_example_rewards_scores_and_logs_each_component(recipe_specs):
    scorer = Scorer(recipe_specs, base_dir=ROOT, sample_row=SAMPLE)
    assert [r.name for r in scorer.rewards] == ["math", "length_bonus", "keyword_batch", "judge"]
    assert [(r.kind, r.is_async) for r in scorer.rewards] == [("batch", False), ("single", False), ("batch", False),
                                                               ("single", True)]
    items = [
        {"prompt": "6*7?", "response": "6 * 7 = 42, therefore \\boxed{42}", "reference": "42"},
        {"prompt": "6*7?", "response": "I believe the answer is \\boxed{41}" + " really" * 20, "reference": "42"},
    ]
    first, second = scorer.score(items)
    bonus = 1 - len(items[0]["response"]) / 100
    assert first["score"] == pytest.approx(1.0 + 0.1 * bonus + 0.2 * 1.0 + 0.5 * 1.0)
    assert first["reason"] == "correct"
    assert first["reasons"] == {"math": "correct", "length_bonus": "ok", "keyword_batch": "ok", "judge": "correct"}
    assert first["metrics"]["length_bonus/chars"] == len(items[0]["response"])
    assert first["metrics"]["math/correct"] == 1.0
    assert second["score"] == pytest.approx(0.0)
    assert second["reason"].startswith("wrong")
    assert second["reasons"]["length_bonus"] == "too_long"
    stats = scorer.stats()
    assert stats["items"] == 2 and stats["errors"] == 0
    assert stats["reasons"]["math/correct"] == 1 and stats["reasons"]["math/wrong"] == 1


def _write(tmp_path: Path, name: str, source: str) -> str:
    (tmp_path / name).write_text(textwrap.dedent(source))
    return f"{name}"


@pytest.fixture
def my_pkg(tmp_path, monkeypatch):
    pkg = tmp_path / "my_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "rewards.py").write_text("def score(prompt, response, reference, **kw):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


BAD_FILES = {
    "text_sig.py": "def score(text):\n    return 1.0\n",
    "returns_str.py": "def score(prompt, response, reference, **kw):\n    return 'good'\n",
    "returns_nan.py": "def score(prompt, response, reference, **kw):\n    return float('nan')\n",
    "no_score_key.py": "def score(prompt, response, reference, **kw):\n    return {'value': 1.0}\n",
    "bad_metric.py": "def score(prompt, response, reference, **kw):\n    return {'score': 1.0, 'note': 'hi'}\n",
    "raises.py": "def score(prompt, response, reference, **kw):\n    return 1 / 0\n",
    "strict_kwargs.py": "def score(prompt, response, reference, scale=1.0):\n    return scale\n",
    "broken.py": "def score(prompt, response, reference:\n    return 1\n",
    "short_batch.py": "def score_batch(prompts, responses, references):\n    return []\n",
    "not_callable.py": "score = 3\n",
}


@pytest.mark.parametrize("spec, message", [
    ({"fn": "my_pkg.rewards:scor"}, "reward[1].fn: module 'my_pkg.rewards' has no function 'scor' (did you mean 'score'?)"),
    ({"fn": "no_such_pkg.rewards:score"},
     "reward[1].fn: cannot import module 'no_such_pkg.rewards' (ModuleNotFoundError: No module named 'no_such_pkg')"),
    ({"fn": "./missing.py:score"}, "reward[1].fn: file './missing.py' not found (resolved to {tmp}/missing.py)"),
    ({"fn": "mth"}, "reward[1].fn: unknown reward 'mth' (did you mean 'math'?); registered: "),
    ({"fn": "text_sig.py:score"}, "reward[1].fn: score(text) cannot be called as (prompt, response, reference, **kwargs)"),
    ({"fn": "returns_str.py:score"},
     "reward[1].fn: 'score' returned 'good' (str); expected a number or a dict with a numeric 'score' on the sample row"),
    ({"fn": "returns_nan.py:score"}, "reward[1].fn: 'score' returned nan (float); expected a number"),
    ({"fn": "no_score_key.py:score"}, "reward[1].fn: 'score' returned a dict without 'score' (keys: value)"),
    ({"fn": "bad_metric.py:score"}, "reward[1].fn: 'score' returned metric 'note' = 'hi' is not a number"),
    ({"fn": "raises.py:score"}, "reward[1].fn: 'score' raised ZeroDivisionError: division by zero on the sample row"),
    ({"fn": "strict_kwargs.py:score", "kwargs": {"scael": 2}},
     "reward[1].kwargs: 'strict_kwargs.py:score' has no parameter 'scael' (did you mean 'scale'?); it accepts: scale"),
    ({"fn": "broken.py:score"}, "reward[1].fn: importing 'broken.py' failed: SyntaxError: "),
    ({"fn": "short_batch.py:score_batch"}, "reward[1].fn: 'score_batch' raised ValueError: a batch reward returned list"),
    ({"fn": "not_callable.py:score"}, "reward[1].fn: file 'not_callable.py': 'score' is a int, not a function"),
    ({"fn": "code"}, "reward[1].fn: 'code' cannot score the sample row: error: bad code reference: a code reference is"),
    ({"fn": "math", "wieght": 2}, "reward[1]: unknown key 'wieght' (did you mean 'weight'?)"),
    ({"fn": "math", "weight": "heavy"}, "reward[1].weight: expected a finite number, got 'heavy'"),
    ({"fn": "math", "kwargs": [1]}, "reward[1].kwargs: expected a mapping of names to values, got [1]"),
    ({"weight": 1}, "reward[1].fn: missing"),
    ({"fn": "math", "kwargs": {"extract": "boxd"}}, "reward[1].fn: 'math' raised ValueError: extract: unknown method 'boxd'"),
    ({"fn": "math", "kwargs": {"timeout": 3}},
     "reward[1].kwargs: 'math' has no parameter 'timeout' (did you mean 'timeout_s'?); it accepts: extract, timeout_s,"),
])
def test_each_bad_spec_fails_early_with_one_line(spec, message, tmp_path, my_pkg):
    for name, source in BAD_FILES.items():
        _write(tmp_path, name, source)
    with pytest.raises(RewardConfigError) as info:
        validate_reward_specs([{"fn": "format"}, spec], SAMPLE, base_dir=tmp_path)
    text = str(info.value)
    assert "\n" not in text
    assert isinstance(info.value, ValueError)
    assert text.startswith(message.format(tmp=tmp_path)), text


def test_good_module_path_and_shorthands(my_pkg):
    specs = validate_reward_specs("my_pkg.rewards:score", SAMPLE)
    assert specs[0].name == "rewards" and specs[0].weight == 1.0
    assert validate_reward_specs({"fn": "format", "name": "fmt"}, SAMPLE)[0].name == "fmt"
    with pytest.raises(RewardConfigError, match=r"^reward: the sample row has no 'reference'"):
        validate_reward_specs("format", {"prompt": "p"})
    with pytest.raises(RewardConfigError, match=r"^reward: expected a list"):
        resolve_reward_specs([])


def test_registry_decorator_and_extra_item_fields():
    @register_reward("test_only_len_ratio")
    def len_ratio(prompt, response, reference, response_len=None, **kw):
        return {"score": response_len / 10, "reason": "ok"}

    @register_reward("test_only_batch_echo", batch=True)
    def echo(p, r, refs, **kw):
        return [float(x) for x in refs]

    scorer = Scorer([{"fn": "test_only_len_ratio"}, {"fn": "test_only_batch_echo", "weight": 2}])
    out = scorer.score([{"prompt": "", "response": "abc", "reference": "0.5", "response_len": 5}])
    assert out[0]["score"] == pytest.approx(0.5 + 2 * 0.5)
    assert reward(batch=True)(lambda prompts, responses, references: []).__diffrl_reward_kind__ == "batch"


def test_registered_names_travel_to_other_processes_as_import_paths():
    from rewards.shaping import format_reward

    register_reward("test_only_fmt", format_reward)
    spec = resolve_reward_specs([{"fn": "test_only_fmt"}, {"fn": "math"}])
    assert [s.to_dict()["fn"] for s in spec] == ["rewards.shaping:format_reward", "math"]
    assert spec[0].to_dict()["name"] == "test_only_fmt"


def test_toy_task_verifiers_are_built_in_names_with_their_options():
    specs = resolve_reward_specs([{"fn": "countdown"}, {"fn": "sudoku", "kwargs": {"partial_credit": True}}])
    assert [s.to_dict()["fn"] for s in specs] == ["countdown", "sudoku"]  # names travel to other processes as is
    validate_reward_specs([{"fn": "arithmetic", "kwargs": {"partial_credit": True}}], {"prompt": "1+2=", "reference": "3"})
    out = Scorer([{"fn": "arithmetic", "kwargs": {"partial_credit": True}}]).score(
        [{"prompt": "37+85=", "response": "132", "reference": "122"}])
    assert out[0]["score"] == pytest.approx(0.5 * 2 / 3)  # partial credit: two of three digits
    with pytest.raises(RewardConfigError, match=r"^reward\[0\]\.kwargs: 'arithmetic' has no parameter 'partial'"):
        resolve_reward_specs([{"fn": "arithmetic", "kwargs": {"partial": True}}])


def test_runtime_failures_are_error_reasons_never_silent_zeros(caplog):
    calls = {"n": 0}

    @register_reward("test_only_flaky")
    def flaky(prompt, response, reference, **kw):
        calls["n"] += 1
        if response == "boom":
            raise RuntimeError("judge unavailable")
        return "nonsense" if response == "junk" else 1.0

    scorer = Scorer([{"fn": "format"}, {"fn": "test_only_flaky"}])
    ok, boom, junk = scorer.score([{"prompt": "", "response": r, "reference": ""} for r in ("\\boxed{1}", "boom", "junk")])
    assert ok["reason"] == "ok" and ok["score"] == 2.0
    assert boom["reason"] == "error: test_only_flaky: RuntimeError: judge unavailable"
    assert boom["score"] == 0.0 and boom["reasons"]["format"] == "bad_format"
    assert junk["reason"].startswith("error: test_only_flaky: returned 'nonsense'")
    assert scorer.stats()["errors"] == 2
    assert "judge unavailable" in caplog.text
    with pytest.raises(ValueError, match="item 0 has no 'reference'"):
        scorer.score([{"prompt": "", "response": ""}])
