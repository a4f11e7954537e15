"""Offline preference data: the jsonl loader (one-line errors naming the row and field), store roots, and the recipe
rules of trainer.mode offline."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launch.data import DataError, encode_prompt
from launch.preference_data import load_preference_file, store_root
from launch.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dirs["llada"]))


def _write(tmp_path, lines: list[str]) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_rows_become_pairs_ending_in_eos(tmp_path, tokenizer):
    path = _write(tmp_path, [json.dumps({"prompt": "1+1?", "chosen": "2", "rejected": "3"}), "",
                             json.dumps({"question": "x", "prompt": "2+2?", "chosen": "4", "rejected": "five"})])
    pairs = load_preference_file(path, tokenizer, block_size=4)
    assert len(pairs) == 2
    p = pairs[1]
    assert p.chosen.prompt_ids.tolist() == encode_prompt(tokenizer, "2+2?", chat_template=True)
    want = tokenizer("five", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert p.rejected.response_ids.tolist() == want and p.rejected.valid_length == len(want)
    assert p.chosen.request_id != p.rejected.request_id and p.key == "pref3"  # the file's line number
    assert torch.equal(p.chosen.step_map, torch.zeros_like(p.chosen.step_map))


@pytest.mark.parametrize("line,needle", [
    ('{"prompt": "a", "chosen": "b"}', "row 1: field 'rejected' missing"),
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}', "row 1: field 'chosen' must be a non-empty string"),
    ('{"prompt": "", "chosen": "b", "rejected": "c"}', "row 1: field 'prompt' must be a non-empty string"),
    ('{"prompt": "a", "chosen": "b", "rejected": "b"}', "row 1: field 'rejected' equals 'chosen'"),
    ('{"prompt": "a", "chosen": "b", ', "row 1: not valid JSON"),
    ('["a", "b", "c"]', "row 1: a JSON object"),
])
def test_bad_rows_are_one_line_errors(tmp_path, tokenizer, line, needle):
    path = _write(tmp_path, [line])
    with pytest.raises(DataError) as err:
        load_preference_file(path, tokenizer, block_size=4)
    assert needle in str(err.value) and "\n" not in str(err.value) and str(path) in str(err.value)


def test_a_row_that_is_not_utf8_is_a_one_line_error(tmp_path, tokenizer):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff\xfe", "chosen": "b"}\n')
    with pytest.raises(DataError, match=r"row 2: not UTF-8"):
        load_preference_file(path, tokenizer, block_size=4)


def test_long_prompt_and_missing_file(tmp_path, tokenizer):
    path = _write(tmp_path, [json.dumps({"prompt": "word " * 50, "chosen": "b", "rejected": "c"})])
    with pytest.raises(DataError, match="row 1: field 'prompt' is .* > data.max_prompt_tokens 8"):
        load_preference_file(path, tokenizer, block_size=4, max_prompt_tokens=8)
    with pytest.raises(DataError, match="no such file"):
        load_preference_file(tmp_path / "nope.jsonl", tokenizer, block_size=4)


def test_store_root_takes_a_run_or_a_store(tmp_path):
    (tmp_path / "run" / "store").mkdir(parents=True)
    assert store_root(tmp_path / "run") == tmp_path / "run" / "store"
    assert store_root(tmp_path / "run" / "store") == tmp_path / "run" / "store"
    with pytest.raises(DataError, match="data.trajectories: .*no such run"):
        store_root(tmp_path / "missing")


@pytest.mark.parametrize("recipe,overrides,needle", [
    ("tiny-vrpo.yaml", ["trainer.mode=sync"], "trainer.mode: vrpo trains from stored pairs"),
    ("tiny-tracerl.yaml", ["trainer.mode=offline", "data.task=null"], "trainer.mode: offline trains a preference"),
    ("tiny-dtrpo.yaml", ["data.preferences=x.jsonl"], "data.preferences: dtrpo needs recorded trajectories"),
    ("tiny-dtrpo.yaml", ["data.trajectories=null"], "data.trajectories: dtrpo trains from a run's"),
    ("tiny-vrpo.yaml", ["data.task=arithmetic"], "data.task: not read in trainer.mode offline"),
    ("tiny-vrpo.yaml", ["estimator.name=trajectory"], "estimator.name: vrpo needs a sequence-level ELBO"),
])
def test_offline_recipe_rules(recipe, overrides, needle):
    with pytest.raises(RecipeError, match=needle):
        load_recipe(REPO / "recipes" / recipe, overrides=overrides)


def test_tiny_recipes_validate_with_their_estimators():
    vrpo = load_recipe(REPO / "recipes" / "tiny-vrpo.yaml")
    assert (vrpo.algorithm.name, vrpo.estimator.name, vrpo.estimator.mc_num, vrpo.algorithm.antithetic) == \
        ("vrpo", "mc_elbo", 8, True)
    assert vrpo.learner.reference_model is True and vrpo.trainer.mode == "offline"
    dtrpo = load_recipe(REPO / "recipes" / "tiny-dtrpo.yaml")
    assert (dtrpo.algorithm.name, dtrpo.estimator.name, dtrpo.data.trajectories) == \
        ("dtrpo", "remasked_step", "runs/tiny-tracerl")
