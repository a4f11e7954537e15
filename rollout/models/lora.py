"""LoRA through PEFT on any policy; `save_policy` merges adapters into the saved weights."""
from __future__ import annotations

import torch

from rollout.models.policy import DiffusionPolicy

# Every projection of a Qwen/Llama block, as d1 trains (r 128 / alpha 64 on all projections).
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def apply_lora(
    policy: DiffusionPolicy,
    *,
    r: int = 128,
    alpha: int = 64,
    dropout: float = 0.0,
    target_modules: tuple[str, ...] | list[str] = ALL_PROJECTIONS,
    seed: int | None = None,
) -> DiffusionPolicy:
    """Wrap the policy's model with fresh LoRA adapters (B = 0, so outputs are unchanged at first). seed: lora_A's
    initialisation drawn from a generator seeded with it (the global one is restored afterwards); None: drawn from
    the global generator, as PEFT does."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        bias="none", task_type="CAUSAL_LM")
    if seed is None:
        policy.model = get_peft_model(policy.causal_lm, config)
        return policy
    with torch.random.fork_rng(devices=[]):  # PEFT initialises the adapters on the CPU, then moves them
        torch.manual_seed(seed)
        policy.model = get_peft_model(policy.causal_lm, config)
    return policy


def lora_state(policy: DiffusionPolicy) -> dict:
    """Only the trainable adapter tensors (what weight sync sends when training LoRA)."""
    return {name: p.detach() for name, p in policy.model.named_parameters() if p.requires_grad and "lora_" in name}
