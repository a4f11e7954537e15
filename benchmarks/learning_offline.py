"""The offline preference methods (VRPO, dTRPO) in the learning benchmark (benchmarks/learning.py): their pairs are
built from the SFT checkpoint's own rollouts on the task's training split, inside the run's CPU budget.

1. Rollouts (`data_min` CPU-minutes of the process tree): the online runs' driver, sampling, reward and store
   (launch/driver.Driver.make_batch: 16 prompts x 8 samples at temperature 1 from the RL seed's prompt stream, the
   task's verifier), every scored group written to the store, and no learner update: the policy stays the SFT
   checkpoint, so every trajectory is version 0 (on-policy for the reference).
2. Pairs: best vs worst reward of each (step, prompt) group whose rewards differ (rl.preference_pairs, the
   offline driver's own reading of data.trajectories).
3. Training (the rest of the budget): trainer.mode offline (launch/driver_offline) with trainer.budget in
   CPU-minutes; then the same held-out evaluation as every run.

A run's `cpu_s` is rollouts + training; `data` keeps the rollout part (CPU, steps, groups) apart. The same seed's
rollouts serve both methods (one store per seed, its CPU charged to each).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from launch.budget import tree_cpu_seconds

# Recipe sections per method (their tiny recipes'; beta 0.1 is DPO's usual value, rl/published.py).
OFFLINE_ALGOS: dict[str, dict] = {
    # VRPO: ELBO budget n = 8 timesteps with one mask each, antithetic policy / reference masks.
    "vrpo": {"algorithm": {"name": "vrpo", "beta": 0.1, "antithetic": True},
             "estimator": {"name": "mc_elbo", "mc_num": 8, "stratified": False}},
    # dTRPO: one forward of each response's re-masked final state (its recorded decoding order), frozen reference.
    "dtrpo": {"algorithm": {"name": "dtrpo", "beta": 0.1, "min_margin": 0.0},
              "estimator": {"name": "remasked_step"}},
}
PAIRS_PER_STEP = 16  # as many pairs per update as the online runs take prompts per step


def rollout_store(recipe, budget_s: float) -> dict:
    """Roll the recipe's (SFT) policy out and score it, no update, until `budget_s` CPU seconds of the process tree
    are spent; every batch into the run's store. Returns the store path and what it cost."""
    from launch.driver import Driver
    from launch.driver_setup import prepare_run
    from launch.local_ray import ray_session

    ctx = prepare_run(recipe)
    with ray_session(ctx.recipe.ray):
        import ray  # after ray_session set the local cluster's auth mode (fixed at Ray's first use)

        driver = Driver(ctx, progress=False)
        start, cpu_start, steps, correct, total = time.perf_counter(), tree_cpu_seconds(), 0, 0.0, 0
        try:
            while tree_cpu_seconds() - cpu_start < budget_s:
                batch = driver.make_batch({})
                steps += 1
                ray.get(driver.store.add.remote(steps, batch.samples))
                correct += batch.metrics.get("reward/accuracy", 0.0) * len(batch.samples)
                total += len(batch.samples)
            cpu_s, wall_s = tree_cpu_seconds() - cpu_start, time.perf_counter() - start
        finally:
            driver.close()
    return {"store": str(ctx.store_dir), "steps": steps, "samples": total, "cpu_s": cpu_s, "wall_s": wall_s,
            "accuracy": correct / max(total, 1)}


def offline_recipe(name: str, sft_dir: Path, out_dir: Path, store: str, seed: int, train_min: float,
                   overrides: dict, run_name: str):
    """tiny-base + the benchmark's common learner and decoding + the method's sections, trainer.mode offline on
    `store`, trainer.budget `train_min` CPU-minutes."""
    from launch.recipe import recipe_from_dict
    from launch.recipe_io import deep_merge, read_chain

    from benchmarks.learning import COMMON, REPO, SETUPS

    merged: dict = {}
    for _, data in read_chain(REPO / "recipes" / "tiny-base.yaml"):
        merged = deep_merge(merged, data)
    merged["model"] = {"path": str(sft_dir), "kind": "block", "dtype": "float32"}
    for key in ("algorithm", "estimator", "data"):
        merged.pop(key, None)
    merged["reward"] = SETUPS["countdown"]["reward"]  # not read offline (the store holds the rewards); required
    common = {k: v for k, v in COMMON.items() if k != "data"}
    offline = {"data": {"task": None, "chat_template": COMMON["data"]["chat_template"], "trajectories": store,
                        "pairs_per_step": PAIRS_PER_STEP},
               "rollout": {"max_tokens": SETUPS["countdown"]["max_tokens"]},
               "trainer": {"mode": "offline", "eval_every": 0, "budget": {"minutes": train_min, "clock": "cpu"}}}
    for section in (common, offline, OFFLINE_ALGOS[name], overrides):
        merged = deep_merge(merged, json.loads(json.dumps(section)))
    merged.update(name=run_name.replace("#", "-"), seed=seed, output_dir=str(out_dir))
    return recipe_from_dict(merged, source=f"learning benchmark {name} (offline)")


def run_offline_method(name: str, data: dict, sft_dir: Path, out_dir: Path, seed: int, train_min: float,
                       overrides: dict, run_name: str) -> dict:
    """Train `name` offline on the rollouts in `data` (rollout_store's record) for `train_min` CPU-minutes; the
    result as learning.run_rl's (curve: the per-step pair loss and reward margin; cpu_s: rollouts + training)."""
    from launch.driver_offline import run_offline

    recipe = offline_recipe(name, sft_dir, out_dir, data["store"], seed, train_min, overrides, run_name)
    start, cpu_start = time.perf_counter(), tree_cpu_seconds()
    result = run_offline(recipe, progress=False)
    cpu_s, wall_s = tree_cpu_seconds() - cpu_start, time.perf_counter() - start
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [{"step": r["step"], "loss": r.get("learner/pair_loss"), "margin": r.get("learner/reward_margin")}
             for r in rows]
    latest = (out_dir / "checkpoints" / "latest").read_text().strip()
    pairs = json.loads((out_dir / "run.json").read_text()).get("pairs")
    return {"curve": curve, "policy": str(out_dir / "checkpoints" / latest / "policy"), "steps": result.steps,
            "cpu_s": data["cpu_s"] + cpu_s, "wall_s": data["wall_s"] + wall_s, "train_cpu_s": cpu_s,
            "stop_reason": result.stop_reason, "pairs": pairs, "data": data}
