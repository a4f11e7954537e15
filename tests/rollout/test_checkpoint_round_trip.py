"""Checkpoints saved by diffrl load in the original tooling (transformers 4.x, SDAR/TraDo's own code), and the tiny
helper builds exactly what it is asked for.

Two checks of the tokenizer files, say which is which (docs/FIDELITY.md):
- always: the saved files' contents are what transformers 4.x's loaders read (class name, special tokens,
  added_tokens_decoder with <|MASK|> at 151669, special_tokens_map.json), the `tokenizers` library (which 4.x's
  fast tokenizers wrap) reads tokenizer.json with the right ids, and the current transformers loads the directory;
- only when DIFFRL_TF4_PYTHON names a Python with transformers 4.x installed (nothing is installed at run time):
  that Python's AutoTokenizer loads the directory and finds the mask id.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from rollout.models.loading import load_policy, save_policy
from rollout.models.tiny import make_tiny_policy

QWEN_TINY = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
TEXT = "Hello world 12\n<|im_start|>user"


@pytest.fixture(scope="module")
def saved_trado(tmp_path_factory):
    """A diffrl-saved tiny TraDo-format directory with the real Qwen vocabulary."""
    root = tmp_path_factory.mktemp("trado")
    policy = load_policy(make_tiny_policy("sdar", root / "src", vocab="qwen", **QWEN_TINY))
    return save_policy(policy, root / "saved")


def test_saved_tokenizer_files_are_what_transformers_4x_reads(saved_trado):
    config = json.loads((saved_trado / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"  # 4.x has no TokenizersBackend
    assert "backend" not in config
    assert config["mask_token"] == "<|MASK|>" and config["eos_token"] == "<|endoftext|>"
    assert config["pad_token"] == "<|endoftext|>"
    mask = config["added_tokens_decoder"]["151669"]
    assert mask["content"] == "<|MASK|>" and mask["special"] and not mask["normalized"]
    assert config["added_tokens_decoder"]["151643"]["content"] == "<|endoftext|>"
    assert config["added_tokens_decoder"]["151644"]["content"] == "<|im_start|>"
    assert "<|im_start|>" in config["chat_template"]
    special = json.loads((saved_trado / "special_tokens_map.json").read_text())
    assert special["mask_token"]["content"] == "<|MASK|>"
    assert special["eos_token"]["content"] == "<|endoftext|>"
    sdar_config = json.loads((saved_trado / "config.json").read_text())
    assert sdar_config["model_type"] == "sdar" and sdar_config["mask_token_id"] == 151669


def test_tokenizer_json_reads_with_the_tokenizers_library(saved_trado):
    from tokenizers import Tokenizer

    core = Tokenizer.from_file(str(saved_trado / "tokenizer.json"))
    assert core.token_to_id("<|MASK|>") == 151669
    assert core.encode("Hello world").ids == [9707, 1879]  # Qwen's own ids


def test_saved_directory_loads_with_the_current_transformers(saved_trado):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(saved_trado))
    assert type(tokenizer).__name__.startswith("Qwen2Tokenizer")
    assert tokenizer.mask_token_id == 151669
    ids = tokenizer(TEXT)["input_ids"]
    assert ids[:2] == [9707, 1879] and 151644 in ids and tokenizer.decode(ids) == TEXT
    again = load_policy(saved_trado)
    assert again.spec.mask_token_id == 151669 and again.spec.block_size == 4


@pytest.mark.skipif(not os.environ.get("DIFFRL_TF4_PYTHON"), reason="set DIFFRL_TF4_PYTHON to a Python with "
                    "transformers 4.x to load the saved tokenizer there")
def test_saved_tokenizer_loads_in_transformers_4x(saved_trado):
    script = ("import json, sys, transformers; from transformers import AutoTokenizer\n"
              "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
              f"ids = t({TEXT!r})['input_ids']\n"
              "print(json.dumps([transformers.__version__, type(t).__name__, t.mask_token_id, ids[:2], "
              f"t.decode(ids) == {TEXT!r}]))\n")
    out = subprocess.run([os.environ["DIFFRL_TF4_PYTHON"], "-c", script, str(saved_trado)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    version, cls, mask_id, first, round_trip = json.loads(out.stdout.strip().splitlines()[-1])
    print(version, cls, mask_id)
    assert version.startswith("4.") and cls == "Qwen2TokenizerFast"
    assert mask_id == 151669 and first == [9707, 1879] and round_trip


@pytest.mark.parametrize("kind", ["block", "sdar", "llada", "dream"])
def test_small_tokenizer_keeps_spaces_and_newlines_after_loading(tiny_model_dirs, kind):
    """The char-level tokenizer is a byte-level BPE, so a Qwen2Tokenizer loader (transformers 5 picks one for
    Dream's qwen2 config) keeps spaces and newlines instead of dropping them as unknown."""
    tokenizer = load_policy(tiny_model_dirs[kind]).tokenizer
    text = "12 + 34 = 46\nok"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text) and tokenizer.decode(ids) == text


def test_a_saved_sdar_directory_records_its_block_size(tiny_model_dirs, tmp_path):
    policy = load_policy(tiny_model_dirs["sdar"], block_size=8)
    out = save_policy(policy, tmp_path / "b8")
    assert json.loads((out / "config.json").read_text())["block_size"] == 8
    (out / "diffrl.json").unlink()  # as the original tooling sees it: config.json alone
    assert load_policy(out).spec.block_size == 8


@pytest.mark.parametrize("kind", ["block", "sdar", "llada", "dream"])
def test_tiny_helper_honours_every_size(tmp_path, kind):
    sizes = dict(hidden_size=48, num_layers=3, num_heads=3, num_kv_heads=1, intermediate_size=40,
                 max_positions=96, block_size=2)
    policy = load_policy(make_tiny_policy(kind, tmp_path / kind, **sizes))
    config = policy.causal_lm.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.max_position_embeddings) == (48, 3, 3, 1, 40, 96)
    assert policy.spec.block_size == 2  # SDAR: from its config.json's block_size, as SDAR records it
    assert sum(p.numel() for p in policy.model.parameters()) > 0
    out = policy.forward(torch.tensor([[10, 11, 12]]), torch.arange(3)[None], torch.zeros(1, 1, 3, 3)).logits
    assert out.shape[:2] == (1, 3)


@pytest.mark.parametrize("sizes,message", [
    (dict(block_size=0), "block_size must be a positive integer"),
    (dict(hidden_size=50, num_heads=4), "hidden_size 50 is not a multiple of num_heads 4"),
    (dict(num_heads=4, num_kv_heads=3), "num_heads 4 is not a multiple of num_kv_heads 3"),
    (dict(hidden_size=12, num_heads=4, num_kv_heads=1), "head size 3 must be even"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
])
def test_tiny_helper_refuses_sizes_it_cannot_build(tmp_path, sizes, message):
    with pytest.raises(ValueError, match=message):
        make_tiny_policy("sdar", tmp_path / "x", **sizes)
