"""Regenerates examples/checkpoints/arith-sft, the starting policy of recipes/tiny-demo.yaml (README's first command).

    PYTHONPATH=. python examples/make_demo_checkpoint.py [OUT]      # ~1-2 min on 2 shared CPU cores

A ~140k-parameter tiny Qwen3 block-diffusion model (hidden 64, 2 layers, character vocabulary) given 100 steps of
diffusion SFT (`diffrl sft`'s code path, launch.sft.run_sft) on 40 one-digit additions of the arithmetic task,
seed 0. It is deliberately short: the policy is imperfect (sampled reward ~0.3 with partial credit), so RL has
something to improve in a few minutes. Same settings as tests/launch/test_learns.py. Deterministic on CPU: the
same seed gives the same weights (the SFT seeds its data order, masks and initialisation from `seed`); checked once:
a regeneration gave a byte-identical model.safetensors (sft.json's wall time differs).
"""
from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "checkpoints" / "arith-sft"
TASK = {"digits": 1, "num_train": 40, "num_test": 15}
SIZE = {"hidden_size": 64, "num_layers": 2}
TRAINING = {"steps": 100, "batch_size": 32, "lr": 3e-3, "seed": 0}


def make(out: Path) -> Path:
    from launch.sft import SFTRun, run_sft
    from rl.sft import SFTConfig

    run_sft(SFTRun(out=str(out), data={"task": "arithmetic", "task_kwargs": TASK}, tiny_size=SIZE,
                   training=SFTConfig(**TRAINING), overwrite=True), progress=False)
    return out


if __name__ == "__main__":
    print(make(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))
