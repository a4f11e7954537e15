"""Hostile config.json values for the issue-14 families (SDAR-MoE, LLaDA2, DiffusionGemma): each is refused with one
line naming config.json and the field, before any model is built. Before rollout/models/families/config_checks.py,
the huge counts never returned (a million meta layers, a billion experts) and the wrong types were tracebacks."""
from __future__ import annotations

import json
import shutil

import pytest

from rollout.models.families.diffusion_gemma import make_tiny_diffusion_gemma
from rollout.models.loading import load_policy
from rollout.models.spec import ModelLoadError
from rollout.models.tiny import make_tiny_policy


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return {"sdar_moe": make_tiny_policy("sdar-moe", root / "sm", seed=1, hidden_size=32, num_layers=2, num_heads=4,
                                         num_kv_heads=2, intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=16),
            "llada2": make_tiny_policy("llada2", root / "l2", seed=1),
            "dgemma": make_tiny_diffusion_gemma(root / "dg", seed=1)}


CASES = [  # family, config change, the field the one-line error must name
    ("sdar_moe", {"num_hidden_layers": 10 ** 6}, "num_hidden_layers is 1000000, but the weights hold 2"),
    ("sdar_moe", {"hidden_size": "32"}, "hidden_size must be a positive integer"),
    ("sdar_moe", {"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
    ("sdar_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step must be a positive integer"),
    ("sdar_moe", {"mlp_only_layers": "x"}, "not a valid Qwen3-MoE (SDAR-MoE) config"),
    ("llada2", {"num_experts": 10 ** 9}, "num_experts is 1000000000, but the weights hold 8"),
    ("llada2", {"num_hidden_layers": 10 ** 6}, "num_hidden_layers is 1000000, but the weights hold 2"),
    ("llada2", {"n_group": 0}, "n_group must be a positive integer"),
    ("llada2", {"routed_scaling_factor": None}, "routed_scaling_factor must be a positive number"),
    ("llada2", {"rope_scaling": "yarn"}, "rope_scaling must be an object or null"),
    ("llada2", {"first_k_dense_replace": "1"}, "first_k_dense_replace must be an integer >= 0"),
    ("llada2", {"intermediate_size": -5}, "intermediate_size must be a positive integer"),
    ("dgemma", {"canvas_length": 10 ** 12}, "canvas_length 1000000000000 exceeds text_config.max_position_embeddings"),
    ("dgemma", {"canvas_length": "8"}, "canvas_length must be a positive integer"),
    ("dgemma", {"text_config": None}, "text_config must be an object"),
    ("dgemma", {"text_config": {"hidden_size": "x"}}, "text_config.hidden_size must be a positive integer"),
    ("dgemma", {"text_config": {"num_hidden_layers": 10 ** 6}}, "text_config.num_hidden_layers is 1000000"),
    ("dgemma", {"vision_config": {"num_hidden_layers": 10 ** 6}}, "vision_config.num_hidden_layers is 1000000"),
]


@pytest.mark.parametrize("family, change, message", CASES, ids=[f"{f}-{m.split()[0]}" for f, _, m in CASES])
def test_hostile_config_is_one_line_naming_file_and_field(sources, tmp_path, family, change, message):
    bad = tmp_path / "bad"
    shutil.copytree(sources[family], bad)
    config = json.loads((bad / "config.json").read_text())
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as err:
        load_policy(bad)
    text = str(err.value)
    assert message in text and str(bad / "config.json") in text and "\n" not in text, text


def test_checkpoint_code_is_never_imported(sources, tmp_path):
    """An auto_map naming the checkpoint's own module: the three families load onto diffrl's / transformers'
    classes and never import it (the module would raise on import)."""
    for family, src in sources.items():
        d = tmp_path / family
        shutil.copytree(src, d)
        (d / "evil_code.py").write_text("raise SystemExit('checkpoint code was run')\n")
        config = json.loads((d / "config.json").read_text())
        config["auto_map"] = {"AutoConfig": "evil_code.C", "AutoModel": "evil_code.M",
                              "AutoModelForCausalLM": "evil_code.M", "AutoTokenizer": ["evil_code.T", None]}
        (d / "config.json").write_text(json.dumps(config))
        policy = load_policy(d)
        assert policy.source["remote_code"] is False
