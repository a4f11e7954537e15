"""One prompt path: the same data row gives the same prompt token ids in `diffrl train`, `diffrl sft` and
`diffrl eval` (same field, chat template, no suffix), with the recipe's chat_template setting either way."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.cli import build_parser, eval_run
from launch.data import load_prompts
from launch.evaluate import eval_prompt_ids
from launch.evaluate_data import load_eval_set
from launch.recipe import load_recipe
from launch.sft import SFTRun, _rows, build_examples

REPO = Path(__file__).resolve().parents[2]
ROWS = [{"question": "Make 24 from 3 8 1 1.", "answer": "3*8*1*1", "metadata": {"numbers": [3, 8, 1, 1]}},
        {"question": "Sort: b a c", "answer": "a b c", "metadata": {}}]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    from rollout.models.loading import load_policy
    from rollout.models.tiny import make_tiny_policy

    path = tmp_path_factory.mktemp("policy")
    make_tiny_policy("qwen3-block", path, vocab="small", seed=0)
    loaded = load_policy(path)
    assert loaded.tokenizer.chat_template  # so that chat_template: false below is a real choice
    return path, loaded


@pytest.mark.parametrize("chat", [True, False])
def test_train_sft_and_eval_encode_a_row_identically(tmp_path, policy, chat):
    policy_dir, loaded = policy
    data = tmp_path / "rg.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    recipe = load_recipe(REPO / "recipes" / "tiny-tracerl.yaml",
                         ["data.task=null", "data.task_kwargs={}", f"data.train={data}", "data.prompt_field=question",
                          f"data.chat_template={str(chat).lower()}"])
    tok = loaded.tokenizer
    train = [list(p.prompt_ids) for p in load_prompts(recipe.data, tok, seed=recipe.seed)]

    sft_run = SFTRun.from_recipe(recipe, str(tmp_path / "sft"))
    pairs, _ = _rows(sft_run.data, seed=0)
    sft = [e.prompt_ids.tolist() for e in build_examples(loaded, pairs, chat_template=sft_run.data.chat_template)]

    args = build_parser().parse_args(["eval", str(policy_dir), "--data", str(data)])
    run = eval_run(args, recipe.to_dict(), policy_dir)
    assert run.chat_template is chat and run.format == "prompt"
    evalset = load_eval_set(str(data), prompt_field=run.prompt_field, answer_field=run.answer_field,
                            format=run.format)
    evaluated = [eval_prompt_ids(tok, item, chat_template=run.chat_template) for item in evalset.items]

    assert train == sft == evaluated
    text = tok.decode(evaluated[0])
    assert ROWS[0]["question"] in text and "boxed" not in text
    assert (text != ROWS[0]["question"]) is chat  # the chat template wraps the question, or nothing does
