"""It generalises: a short RL run through the driver raises the policy's accuracy on held-out problems of the
project's shortcut-free Countdown, significantly by a paired exact test, on a fixed seed and a fixed number of steps,
and computes the same bits on any x86-64 machine with AVX2.

1. SFT (`launch.sft.run_sft`) a tiny block-diffusion model on the shortcut-free Countdown (targets equal to the
   plain sum or product of the numbers redrawn, rl/tasks/countdown.py), kept short so that it is imperfect.
2. RL exactly as `diffrl train` runs it, minus the CLI: recipes/tiny-base.yaml with overrides, `prepare_run`, then
   `Driver.train_step` STEPS times on a local Ray cluster. A fixed step count, not a CPU budget: how far the run
   gets must not depend on the machine's load.
3. Held-out accuracy on the task's test split (never trained on: the driver's held-out check refuses any item of
   the SFT or RL training data), before and after, decoded by the run's rollout worker and scored by its reward
   service: SAMPLES answers per item at the rollout temperature (the quantity RL maximises; the same sample seeds
   before and after) and the greedy answer; items up / down and the exact sign (McNemar) p-value
   (launch/eval_stats.py). Asserted: the sampled gain is positive with p < 0.05, and the greedy gain is positive.

All of it runs in a child process under `launch.numerics.portable_cpu_env` (MKL and ATen on their AVX2 kernels, one
thread), whose Ray actors inherit it. Without that the outcome depended on the machine: the previous 30-step version
of this test passed on one machine (seed 0: 11.3% -> 16.0% greedy, p = 0.0013) and failed in CI on an AVX-512 one
(12.7% -> 13.2%, p = 0.82), because last-bit kernel differences over 500 SFT steps give another model.

Measured under the pinned numerics (2-core box, partly two runs at once), 500 SFT steps (64 hidden, 2 layers), lr
1e-4, 16 prompts x 8 samples, 600 held-out items; sampled = mean of 8 answers per item at temperature 1:
    30 steps, seed 0: sampled (4 per item) 6.7 -> 8.4 (p = 0.015), greedy 11.2 -> 11.8 (p = 0.73); with 4 optimizer
      steps per batch (micro-batch 32): sampled 6.3 -> 8.7 (p = 0.024), greedy 11.2 -> 12.2 (p = 0.60). Before the
      pins, 30 steps on seeds 0-2 and on the shortcut task gained +0.5..+2 greedy, +1..+4 sampled, rarely
      significantly: too short.
    60 steps (this test), seed 0: sampled 6.3 -> 9.6 (158 up / 87 down, p = 6.7e-06), greedy 11.2 -> 15.7 (p = 0.0067)
      seed 1: sampled 7.7 -> 10.4 (154 / 103, p = 0.0018), greedy 12.5 -> 14.0 (p = 0.40)
      seed 2: sampled 8.8 -> 10.1 (134 / 119, p = 0.38), greedy 13.7 -> 15.5 (p = 0.29)
So at 60 steps every seed gains on both measures, the sampled gain is significant on 2 of 3 seeds and the greedy one
on 1 of 3: the pinned seed passes with margin, but this is a deterministic tripwire for one run, not evidence that
any 60-step run gains significantly (BENCHMARKS.md ## Learning, issue 19). A change of the random streams
(sampling, masks, prompt order) still changes the run; a failure then needs seeds 0-2 checked before it is read as a
regression. The file took ~5 minutes on the 2-core box (SFT ~1.5 min, 60 steps, four held-out decodes).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "recipes" / "tiny-base.yaml"
SEED = 0
STEPS = 60
TASK_NAME = "countdown"
REWARD = "{fn: countdown, kwargs: {format_score: 0.1}}"
MAX_TOKENS = 16
TASK = {"num_train": 5000, "num_test": 600, "reject_shortcuts": ["sum", "product"]}
SFT_SIZE = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}
SFT = {"steps": 500, "batch_size": 64, "lr": 3e-3}
LR = 1e-4
SAMPLES = 8


def overrides() -> list[str]:
    return [
        "name=learns-heldout", "model.tiny=null", "model.tiny_vocab=null",
        f"data.task={TASK_NAME}", "data.task_seed=0", "data.chat_template=false", "data.num_prompts_per_step=16",
        *[f"data.task_kwargs.{k}={v}" for k, v in TASK.items() if k != "reject_shortcuts"],
        f"data.task_kwargs.reject_shortcuts=[{','.join(TASK['reject_shortcuts'])}]",
        f"reward=[{REWARD}]", f"rollout.max_tokens={MAX_TOKENS}",
        "rollout.samples_per_prompt=8", "rollout.batch_size=128", "rollout.cache=block",
        "estimator.name=trajectory", "algorithm.filter.accuracy_lo=null", "algorithm.filter.accuracy_hi=null",
        "algorithm.filter.drop_zero_variance=true",
        f"learner.lr={LR}", "learner.mu=1", "learner.micro_batch_size=64", "learner.weight_decay=0.0",
        f"trainer.total_steps={STEPS}", "trainer.checkpoint_every=0", "trainer.keep_last=1", "trainer.log=[jsonl]",
        "trainer.eval_every=1000000",  # loads and checks the held-out split; never reached by STEPS
    ]


def make_recipe(sft_dir: Path, out_dir: Path, seed: int = SEED):
    from launch.recipe import load_recipe

    return load_recipe(BASE, [*overrides(), f"seed={seed}", f"model.path={sft_dir}", f"output_dir={out_dir}"])


def make_sft(out: Path, seed: int = SEED) -> Path:
    """The SFT start (in this process: run it under the portable numerics, see run_experiment)."""
    from launch.sft import SFTRun, run_sft
    from rl.sft import SFTConfig

    run_sft(SFTRun(out=str(out), data={"task": TASK_NAME, "task_kwargs": TASK, "task_seed": 0, "chat_template": False},
                   tiny_size=SFT_SIZE, training=SFTConfig(seed=seed, **SFT)), progress=False)
    return out


def heldout_scores(driver, samples: int = 0) -> dict[str, float]:
    """Per held-out item, the fraction of correct answers: greedy (samples=0: one answer, 1/0) or `samples`
    answers at the recipe's temperature (seeds fixed per item and sample, the same before and after: common random
    numbers), decoded by the run's rollout workers with the weights they hold and scored by the run's reward service
    (correct = the verifier's reason `correct`). Keyed by prompt index."""
    from launch.decoding import decode_block, sampling_params
    from launch.driver_scoring import response_item
    from rollout.sampling import GenerationRequest

    prompts = driver.ctx.eval_prompts
    params = sampling_params(driver.recipe.rollout, block_size=decode_block(driver.recipe), greedy=samples == 0)
    draws = max(1, samples)
    requests = [GenerationRequest(list(p.prompt_ids), params, seed=1000 * p.index + k,
                                  request_id=f"heldout-p{p.index}-s{k}") for p in prompts for k in range(draws)]
    trajectories = driver.rollout.generate(requests)
    tok = driver.ctx.tokenizer
    items = [response_item(p, tok.decode(t.response_ids[:t.valid_length].tolist(), skip_special_tokens=True),
                           t.valid_length, driver.recipe.data)
             for p, t in zip((p for p in prompts for _ in range(draws)), trajectories, strict=True)]
    correct = [float(r["reason"] == "correct") for r in driver.rewards.score(items)]
    return {str(p.index): sum(correct[i * draws:(i + 1) * draws]) / draws for i, p in enumerate(prompts)}


def train_and_compare(sft_dir: Path, out_dir: Path, seed: int = SEED, samples: int = SAMPLES):
    """Held-out scores with the SFT weights, STEPS driver steps, again with the final weights: the paired
    comparisons of sampled accuracy (`samples` per item) and of greedy accuracy, and the rollout accuracy curve."""
    from launch.driver import Driver
    from launch.driver_setup import prepare_run
    from launch.eval_stats import compare_paired

    driver = Driver(prepare_run(make_recipe(sft_dir, out_dir, seed)), progress=False)
    try:
        assert len(driver.ctx.eval_prompts) == TASK["num_test"]
        # the rollout workers hold version 0: the SFT weights
        before = {"sampled": heldout_scores(driver, samples), "greedy": heldout_scores(driver)}
        curve = [round(driver.train_step(step)["reward/accuracy"], 3) for step in range(1, STEPS + 1)]
        driver.rollout.sync(driver.learner, driver.step)
        after = {"sampled": heldout_scores(driver, samples), "greedy": heldout_scores(driver)}
    finally:
        driver.close()
    return ({kind: compare_paired(before[kind], after[kind], seed=seed, what=f"held-out {kind}") for kind in before},
            curve)


def run_experiment(out: Path, seed: int = SEED) -> dict:
    """SFT, then RL on a local Ray started here, then the held-out comparisons: a JSON-able summary. Meant for a
    process whose numerics are pinned (launch.numerics.portable_cpu_env, one thread): the Ray actors it starts
    inherit its environment, and the driver's own arithmetic (advantages) runs in it."""
    import torch

    from launch.local_ray import ray_session
    from launch.recipe import load_recipe

    torch.set_num_threads(1)
    sft_dir = make_sft(out / "sft", seed)
    with ray_session(load_recipe(BASE).ray):
        comparisons, curve = train_and_compare(sft_dir, out / "run", seed)
    return {"comparisons": {kind: c.to_dict() for kind, c in comparisons.items()}, "curve": curve}


def summary(result: dict) -> str:
    parts = [f"{kind} {100 * c['before']:.1f} -> {100 * c['after']:.1f} (up {c['fixed']} / down {c['broken']}, "
             f"p = {c['p_value']:.3g})" for kind, c in result["comparisons"].items()]
    return "; ".join(parts) + f"; rollout accuracy per step {result['curve']}"


def test_rl_raises_heldout_accuracy_significantly(tmp_path):
    from launch.numerics import portable_cpu_env

    done = subprocess.run([sys.executable, __file__, str(tmp_path), str(SEED)], env=portable_cpu_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=1800, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(summary(result))
    sampled, greedy = result["comparisons"]["sampled"], result["comparisons"]["greedy"]
    assert 0.05 < greedy["before"] < 0.6, f"the SFT start should be imperfect but not hopeless: {summary(result)}"
    assert sampled["after"] > sampled["before"] and sampled["p_value"] < 0.05, summary(result)
    assert greedy["after"] > greedy["before"], summary(result)


if __name__ == "__main__":  # the test's child process: python test_learns_heldout.py OUT SEED
    print(json.dumps(run_experiment(Path(sys.argv[1]), int(sys.argv[2]))))
