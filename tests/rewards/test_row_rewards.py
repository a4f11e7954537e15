"""Rewards see the whole data row: other columns by name, the row as `row`; their extra keys become step metrics.

The path is the driver's own: a data file read by launch.data.load_prompts, items built by launch.data.reward_item,
validated on the first row by rewards.specs, scored by rewards.scorer.Scorer (what each RewardService actor runs),
summarised by launch.metrics.reward_summary (what reaches metrics.jsonl and TensorBoard).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from launch.data import load_prompts, reward_item
from launch.metrics import reward_summary, summary_line
from rewards.result import RewardConfigError
from rewards.scorer import Scorer
from rewards.specs import validate_reward_specs

ROOT = Path(__file__).resolve().parents[2]

METADATA_REWARD = '''
def score(prompt, response, reference, metadata, row):
    """Needs the metadata column: the target lives there, not in the answer column."""
    if row["metadata"] != metadata or row["question"] != prompt:
        raise ValueError("row and columns disagree")
    ok = response.strip() == str(metadata["target"])
    return {"score": float(ok), "reason": "correct" if ok else "wrong", "target": metadata["target"],
            "used_row": 1.0}
'''


def _data_cfg(path: Path, **kw) -> SimpleNamespace:
    return SimpleNamespace(task=None, task_kwargs={}, train=str(path), eval=None, chat_template=False,
                           max_prompt_tokens=512, **{"prompt_field": "question", "answer_field": "answer", **kw})


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    from rollout.models.tiny import small_tokenizer

    return small_tokenizer()


@pytest.fixture
def metadata_rows(tmp_path) -> Path:
    rows = [{"question": f"make {t}", "answer": "see metadata", "metadata": {"target": t, "tag": "x"}}
            for t in (10, 11, 12, 13)]
    return _write_jsonl(tmp_path / "rows.jsonl", rows)


def _items(prompts, responses, cfg) -> list[dict]:
    return [reward_item(p, r, len(r), prompt_field=cfg.prompt_field, answer_field=cfg.answer_field)
            for p, r in zip(prompts, responses)]


def test_a_custom_reward_gets_the_metadata_column_and_the_row(tmp_path, metadata_rows, tokenizer):
    (tmp_path / "meta_reward.py").write_text(METADATA_REWARD)
    cfg = _data_cfg(metadata_rows)
    prompts = load_prompts(cfg, tokenizer)
    specs = [{"fn": "meta_reward.py:score"}]
    sample = reward_item(prompts[0], "", 0, prompt_field="question", answer_field="answer")
    scorer = Scorer(specs, base_dir=tmp_path, sample_row=sample)
    results = scorer.score(_items(prompts, ["10", "0", "12", "nope"], cfg))
    assert [r["reason"] for r in results] == ["correct", "wrong", "correct", "wrong"]
    assert [r["metrics"]["meta_reward/target"] for r in results] == [10, 11, 12, 13]
    summary = reward_summary(results)
    assert summary == {"reward/errors": 0, "reward/meta_reward/score": 0.5, "reward/meta_reward/target": 11.5,
                       "reward/meta_reward/used_row": 1.0}


def test_a_reward_needing_a_column_the_data_lacks_fails_validation_in_one_line(tmp_path, tokenizer):
    (tmp_path / "meta_reward.py").write_text(METADATA_REWARD)
    path = _write_jsonl(tmp_path / "plain.jsonl", [{"question": "make 3", "answer": "3"}])
    prompts = load_prompts(_data_cfg(path), tokenizer)
    sample = reward_item(prompts[0], "", 0, prompt_field="question", answer_field="answer")
    with pytest.raises(RewardConfigError) as err:
        validate_reward_specs([{"fn": "meta_reward.py:score"}], sample, base_dir=tmp_path)
    assert str(err.value) == ("reward[0].fn: 'score' takes 'metadata', which is not a column of the data "
                              "(columns: answer, question) nor a recipe kwarg")


def test_builtin_rewards_take_no_options_from_data_columns(tmp_path, tokenizer):
    """A data column named like a built-in's option (`extract`, `max_response_chars`) must not change its scoring."""
    path = _write_jsonl(tmp_path / "sneaky.jsonl", [{"question": "1+1?", "answer": "2", "extract": "last_number",
                                                    "max_response_chars": 1}])
    cfg = _data_cfg(path)
    prompts = load_prompts(cfg, tokenizer)
    scorer = Scorer([{"fn": "math"}], sample_row=reward_item(prompts[0], "", 0, prompt_field="question"))
    result = scorer.score(_items(prompts, ["it is 2"], cfg))[0]
    assert result["reason"] == "no_answer"  # last_number would have found 2; a 1-char cap would say too_long


def test_errors_are_counted_and_shown_on_the_step_line():
    results = [{"score": 0.0, "reason": "error: judge: ValueError: x", "metrics": {"judge": 0.0}},
               {"score": 1.0, "reason": "correct", "metrics": {"judge": 1.0, "judge/confidence": 0.5}},
               {"score": 0.0, "reason": "error: reward worker crashed twice", "metrics": {}}]
    summary = reward_summary(results)
    assert summary == {"reward/errors": 2, "reward/judge/score": 0.5, "reward/judge/confidence": 0.5}
    assert "rew_err 2" in summary_line(3, 10, {"reward/mean": 0.3, **summary})


def test_reasoning_gym_generator_and_its_own_scorer_through_the_custom_reward_path(tmp_path, tokenizer):
    """reasoning-gym countdown rows (the target and numbers are only in `metadata`) written to a data file, scored
    by reasoning-gym's own `score_answer` through examples/rewards/reasoning_gym_reward.py."""
    reasoning_gym = pytest.importorskip("reasoning_gym")
    dataset = reasoning_gym.create_dataset("countdown", size=4, seed=3)
    rows = [{"question": e["question"], "answer": e["answer"], "metadata": e["metadata"]} for e in dataset]
    path = _write_jsonl(tmp_path / "rg_countdown.jsonl", rows)
    cfg = _data_cfg(path)
    prompts = load_prompts(cfg, tokenizer)
    specs = [{"fn": "examples/rewards/reasoning_gym_reward.py:score"}]
    scorer = Scorer(specs, base_dir=ROOT, sample_row=reward_item(prompts[0], "", 0, prompt_field="question"))
    wrong_numbers = "+".join(str(n) for n in rows[1]["metadata"]["numbers"][:-1])
    responses = [f"<answer>{rows[0]['answer']}</answer>", f"<answer>{wrong_numbers}</answer>",
                 f"the answer is {rows[2]['answer']}", f"<answer>{rows[3]['answer']}</answer>"]
    results = scorer.score(_items(prompts, responses, cfg))
    # reasoning-gym's own scores: 1.0 right, 0.05 a well-formed answer on the wrong numbers, 0.01 no answer
    assert [r["score"] for r in results] == [1.0, 0.05, 0.01, 1.0]
    assert [r["reason"] for r in results] == ["correct", "wrong", "no_answer", "correct"]
    assert [r["metrics"]["reasoning_gym_reward/answered"] for r in results] == [1.0, 1.0, 0.0, 1.0]
    # the scorer really needs the metadata: the same answer against another row's metadata is not right
    swapped = reward_item(prompts[0], responses[0], 1, prompt_field="question")
    swapped["row"] = {**swapped["row"], "metadata": rows[1]["metadata"]}
    assert scorer.score([swapped])[0]["score"] < 1.0
