"""A tiny checkpoint that ships its own modelling code, configured the way LLaDA/Dream checkpoints are.

Real LLaDA and Dream directories carry `configuration_*.py` / `modeling_*.py` and an `auto_map` in config.json;
diffrl loads them through `trust_remote_code` only when the recipe allows it. This writes the same shape with our
own minimal code (a bidirectional Llama whose forward, like LLaDA's, takes no position ids and at most a 2D
padding mask), so that loading path is exercised offline.
"""
from __future__ import annotations

import json
from pathlib import Path

from rollout.models.tiny import make_tiny_policy

CONFIG_CODE = '''from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "{model_type}"
'''

MODELING_CODE = '''import torch
from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteModelLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig

    def forward(self, input_ids, attention_mask=None, output_hidden_states=None, **kwargs):
        # Bidirectional attention over every valid key, as masked diffusion models attend.
        bsz, n = input_ids.shape
        if attention_mask is None:
            valid = torch.ones(bsz, n, dtype=torch.bool, device=input_ids.device)
        else:
            valid = attention_mask.bool()
        bias = torch.zeros(bsz, 1, n, n, dtype=self.dtype, device=input_ids.device)
        bias = bias.masked_fill(~valid[:, None, None, :], torch.finfo(self.dtype).min)
        return super().forward(input_ids=input_ids, attention_mask=bias, output_hidden_states=output_hidden_states)
'''


def make_tiny_remote_code_policy(kind: str, out_dir: str | Path, **size) -> Path:
    """Write a tiny `kind` ("llada" or "dream") checkpoint whose config points at its own code via auto_map."""
    if kind not in ("llada", "dream"):
        raise ValueError(f"make_tiny_remote_code_policy: kind must be llada or dream, got {kind!r}")
    out_dir = make_tiny_policy("llada", out_dir, **size)  # Llama weights; the kind lives in model_type below
    config = json.loads((out_dir / "config.json").read_text())
    config.update(
        model_type=kind,
        architectures=["TinyRemoteModelLM"],
        auto_map={
            "AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
            "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteModelLM",
        },
    )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "configuration_tiny_remote.py").write_text(CONFIG_CODE.format(model_type=kind))
    (out_dir / "modeling_tiny_remote.py").write_text(MODELING_CODE)
    (out_dir / "diffrl.json").unlink()  # the kind must come from config.json, as with real checkpoints
    return out_dir
