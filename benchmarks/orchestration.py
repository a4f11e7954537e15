"""Orchestration benchmark: where an RL step's time goes (weight sync / rollout / reward / learner / the rest), for the
tiny recipe and for a ~27M-parameter block-diffusion Qwen3 (hidden 512, 8 layers, 8 heads x 64, ffn 1536, the small
character vocabulary), each run exactly as a user runs it: `diffrl train recipes/tiny-tracerl.yaml ...` on a local
Ray cluster, the figures read back from the run's metrics.jsonl.

    python benchmarks/orchestration.py              # both models, 6 steps each (~8 minutes on 2 cores)
    python benchmarks/orchestration.py --steps 3    # quicker (~4 minutes)

Step 1 is left out of the means (first-call warm-up). "other" = step time - (sync + rollout + reward + learner):
the driver's own work (decoding text, advantages, the Parquet write, metrics, checkpoints).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny-tracerl.yaml"
SIZE_30M = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=1536, max_positions=2048)
PARTS = ("sync", "rollout", "reward", "learner")


def build_30m(out_dir: Path) -> Path:
    from rollout.models.tiny import make_tiny_policy

    return make_tiny_policy("block", out_dir, seed=0, **SIZE_30M)


def run(name: str, overrides: list[str], root: Path) -> dict:
    out = root / name
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "launch.cli", "train", str(RECIPE), f"output_dir={out}", "-q",
                           *overrides], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name}: diffrl train failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    mean = {k: statistics.mean(r[f"time/{k}_s"] for r in rows) for k in (*PARTS, "step")}
    mean["other"] = mean["step"] - sum(mean[k] for k in PARTS)
    tokens = statistics.mean(r["rollout/response_tokens"] for r in rows)
    return {"name": name, "wall_s": wall, "steps": len(rows) + 1, "tokens_per_step": tokens,
            "startup_s": wall - sum(r["time/step_s"] for r in rows) - mean["step"], **mean}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    common = [f"trainer.total_steps={args.steps}", "trainer.checkpoint_every=0", "reward.1.fn=format",
              r"reward.1.kwargs.pattern=\d"]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-orch-") as tmp:
        root = Path(tmp)
        results.append(run("tiny (2 layers, hidden 64), 4 prompts x 4, 16 tokens", common, root))
        model = build_30m(root / "model-30m")
        results.append(run("~27M (8 layers, hidden 512), 4 prompts x 4, 64 tokens",
                           [*common, "model.tiny=null", "model.tiny_vocab=null", f"model.path={model}",
                            "rollout.max_tokens=64"], root))
    print("| run | step s | sync s | rollout s | reward s | learner s | other s | tokens/step | startup s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['step']:.2f} | {r['sync']:.3f} | {r['rollout']:.2f} | {r['reward']:.3f} | "
              f"{r['learner']:.2f} | {r['other']:.2f} | {r['tokens_per_step']:.0f} | {r['startup_s']:.0f} |")


if __name__ == "__main__":
    main()
