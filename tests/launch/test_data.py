"""Prompt data: files through `datasets`, field mapping, chat template, deterministic resumable order, toy task."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launch.data import DataError, PromptSampler, encode_prompt, load_prompts, read_rows
from launch.recipe import DataSection


@pytest.fixture(scope="module")
def tokenizer():
    from rollout.models.tiny import small_tokenizer

    return small_tokenizer()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sampler_order_is_deterministic_and_resumes_across_epochs():
    a = PromptSampler(5, seed=1)
    first = a.take(7)  # crosses into epoch 1
    assert sorted(first[:5]) == [0, 1, 2, 3, 4] and a.epoch == 1
    state = a.state_dict()
    rest = a.take(9)
    b = PromptSampler(5, seed=1)
    b.load_state_dict(state)
    assert b.take(9) == rest
    assert PromptSampler(20, seed=2).take(20) != PromptSampler(20, seed=1).take(20)
    assert PromptSampler(5, seed=1, shuffle=False).take(6) == [0, 1, 2, 3, 4, 0]
    with pytest.raises(DataError, match="num_rows"):
        PromptSampler(6, seed=1).load_state_dict(state)


def test_resume_exactly_at_an_epoch_boundary():
    a = PromptSampler(4, seed=0)
    a.take(4)
    state = a.state_dict()
    expected = a.take(4)
    b = PromptSampler(4, seed=0)
    b.load_state_dict(state)
    assert b.epoch == 1 and b.take(4) == expected


def test_jsonl_and_parquet_with_field_mapping_and_chat_template(tmp_path, tokenizer):
    _jsonl(tmp_path / "d.jsonl", [{"q": "1+1=", "a": 2, "id": "x"}, {"q": "2+3=", "a": "5", "id": "y"}])
    pq.write_table(pa.table({"q": ["1+1=", "2+3="], "a": ["2", "5"]}), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.parquet"):
        cfg = DataSection(train=str(tmp_path / name), prompt_field="q", answer_field="a")
        prompts = load_prompts(cfg, tokenizer)
        assert [p.answer for p in prompts] == ["2", "5"] and [p.index for p in prompts] == [0, 1]
        text = tokenizer.decode(list(prompts[1].prompt_ids))
        assert text == "<|im_start|>user\n2+3=<|im_end|>\n<|im_start|>assistant\n"
    assert prompts[0].meta == {}  # parquet: no other columns
    jsonl = load_prompts(DataSection(train=str(tmp_path / "d.jsonl"), prompt_field="q", answer_field="a"), tokenizer)
    assert jsonl[0].meta == {"id": "x"}
    raw = encode_prompt(tokenizer, "2+3=", chat_template=False)
    assert tokenizer.decode(raw) == "2+3="


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "answer": "1"}, {"prompt": "b"}],
     r"1 of 2 rows unusable; first at line 2: no answer \(field 'answer'"),
    ([{"prompt": "a", "answer": "1"}, {"prompt": "", "answer": "2"}], "first at line 2: field 'prompt'"),
    ([{"question": "a", "answer": "1"}], "no column 'prompt' .data.prompt_field"),
    ([{"prompt": "a", "solution": "1"}], "no column 'answer' .data.answer_field"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, rows, message):
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message) as info:
        read_rows(path, "prompt", "answer")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a" "answer": 1}\n')
    with pytest.raises(DataError, match="broken.jsonl: 1 of 1 rows unusable; first at line 1: not valid JSON"):
        read_rows(tmp_path / "broken.jsonl", "prompt", "answer")
    with pytest.raises(DataError, match="no such file"):
        read_rows(tmp_path / "absent.jsonl", "prompt", "answer")


def test_overlong_prompts_are_left_out(tmp_path, tokenizer):
    _jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "answer": 2}, {"prompt": "9" * 200, "answer": 1}])
    cfg = DataSection(train=str(tmp_path / "d.jsonl"), chat_template=False, max_prompt_tokens=50)
    assert [p.index for p in load_prompts(cfg, tokenizer)] == [0]
    with pytest.raises(DataError, match="every prompt is longer"):
        load_prompts(DataSection(train=str(tmp_path / "d.jsonl"), max_prompt_tokens=2), tokenizer)


def test_generated_task_splits(tokenizer):
    train = load_prompts(DataSection(task="arithmetic", task_kwargs={"num_train": 10, "num_test": 5}), tokenizer,
                         split="train", seed=3)
    held_out = load_prompts(DataSection(task="arithmetic", task_kwargs={"num_train": 10, "num_test": 5}), tokenizer,
                            split="eval", seed=3)
    assert len(train) == 10 and len(held_out) == 5
    assert not {p.text for p in train} & {p.text for p in held_out}
    a, b = train[0].text[:-1].split("+")
    assert int(a) + int(b) == int(train[0].answer)
    with pytest.raises(DataError, match="data.task_kwargs"):
        load_prompts(DataSection(task="arithmetic", task_kwargs={"bogus": 1}), tokenizer)
