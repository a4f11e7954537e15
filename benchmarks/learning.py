"""Proof that it learns: RL algorithms from one SFT checkpoint, equal CPU budget each, held-out accuracy.

1. SFT a tiny block-diffusion model on a toy task (countdown by default; or reuse --sft CKPT) and a block-size-1 twin (the
   autoregressive baseline: one token per block, each predicted from the clean prefix).
2. For each algorithm: the tiny-base recipe pointed at the SFT checkpoint, the task's verifier as reward,
   the driver run in-process step after step until --budget-min CPU-minutes are spent, then a checkpoint.
3. Greedy held-out accuracy (the task's test split, never trained on) before and after, with static decoding
   (one token per forward) and dynamic decoding (threshold 0.9: tokens per forward > 1), reward curves (PNG).

    python benchmarks/learning.py --out bench/learning                        # every algorithm, 20 CPU-min each
    python benchmarks/learning.py --algos tracerl --budget-min 5 --out /tmp/l  # one algorithm, quick
    python benchmarks/learning.py --sft bench/learning/sft --algos gdpo ...    # reuse the SFT checkpoint
    python benchmarks/learning.py --report /tmp/a /tmp/b --out /tmp/all       # merge runs made in parallel
    python benchmarks/learning.py --sft S --algos gdpo --rl-seeds 0,1,2 ...   # 3 RL seeds: mean and spread
    python benchmarks/learning.py --task rg_countdown --algos tracerl ...    # reasoning-gym's Countdown, its scorer

Seeds: --seed fixes the SFT run and the held-out split; --rl-seeds repeats each RL run with those recipe seeds
(rollout sampling, learner masks and shuffles) from the same SFT checkpoint, runs named `algo#sN`, and a summary
table gives the mean and spread over them (sample standard deviation, min..max) and, per seed, the paired
comparison with the SFT start on the same held-out items: items fixed / broken and the exact McNemar p-value
(launch/eval_stats.py), with the count of seeds significant at p < 0.01 (issue 19's bar).

Budgets are CPU seconds of the whole process tree (driver, local Ray, every actor) by default: other jobs on a
shared machine slow a run's wall clock but not its CPU time, so invocations run side by side stay comparable
(--clock wall for wall-clock budgets).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from launch.budget import tree_cpu_seconds  # the CPU clock of a recipe's trainer.budget (light: psutil only)

from benchmarks.learning_offline import OFFLINE_ALGOS
# SETUPS also re-exported (learning_modes, tests)
from benchmarks.learning_setups import SETUPS, SFT_SWEEP, _data, generator

REPO = Path(__file__).resolve().parents[1]


def _sft_run(out: Path, task: str, seed: int, *, block_size: int | None = None, eval_items: int = 0, **config):
    """SETUPS' flat SFT settings -> the typed SFTRun (tiny model size vs training hyper-parameters)."""
    from launch.sft import SFTRun, TinySize
    from rl.sft import SFTConfig

    size = {k: v for k, v in config.items() if k in TinySize.model_fields}
    training = SFTConfig(seed=seed, **{k: v for k, v in config.items() if k not in size})
    return SFTRun(out=str(out), model={"tiny": "qwen3-block", "block_size": block_size}, tiny_size=size,
                  data=_data(task), training=training,
                  eval_items=eval_items, overwrite=True)


def sft_sweep(out: Path, seed: int, eval_items: int) -> list[dict]:
    from launch.sft import run_sft

    rows = []
    for task, size in SFT_SWEEP:
        config = {**SETUPS[task]["sft"], **size}
        name = f"{task}_h{config['hidden_size']}_l{config['num_layers']}_s{config['steps']}"
        s = run_sft(_sft_run(out / "sft_sweep" / name, task, seed, eval_items=eval_items, **config), progress=False)
        rows.append({"run": name, "parameters": s["parameters"], "train_s": s["train_wall_s"],
                     "heldout_masked_ce": [s["heldout_masked_ce_before"], s["heldout_masked_ce_after"]],
                     "greedy_accuracy": s["eval"]["accuracy"]})
        print(f"| {task} | {config['hidden_size']} x {config['num_layers']} | {s['parameters'] / 1e6:.2f}M | "
              f"{config['steps']} x {config['batch_size']} | {s['train_wall_s']:.0f} | "
              f"{s['heldout_masked_ce_before']:.2f} -> {s['heldout_masked_ce_after']:.2f} | "
              f"{100 * s['eval']['accuracy']:.1f} |", flush=True)
    (out / "sft_sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


_NO_FILTER = {"drop_zero_variance": True, "accuracy_lo": None, "accuracy_hi": None}
# TraceRL's "within 5 tokens of the limit counts as wrong" was made for 2000-token limits: at this 16-token limit it
# would fail most correct equations, so it is off here (the loss maths is TraceRL's).
_TRACERL = {"name": "tracerl", "filter": _NO_FILTER, "length_limit_margin": None}
# Per algorithm: recipe sections merged over tiny-base (block model, block 4, 4 steps per block, static decoding).
ALGOS: dict[str, dict] = {
    # TraceRL's published accuracy filter [0.2, 0.8] is off: from an SFT model at ~20%, the groups it drops (one
    # right answer in 8) are the informative ones. Zero-variance groups carry no advantage in any algorithm.
    "tracerl": {"algorithm": _TRACERL, "estimator": {"name": "trajectory"}},
    "tracerl_value": {"algorithm": {**_TRACERL, "value_model": {"lr": 1e-4}}, "estimator": {"name": "trajectory"}},
    "diffu_grpo": {"algorithm": {"name": "diffu_grpo"}, "estimator": {"name": "one_step", "p_mask": 0.15}},
    "gdpo": {"algorithm": {"name": "gdpo"}, "estimator": {"name": "sdmc", "quadrature": "gauss-3"}},
    "cj_grpo": {"algorithm": {"name": "cj_grpo"}, "estimator": {"name": "trajectory"}},
    "coupled_grpo": {"algorithm": {"name": "coupled_grpo"}, "estimator": {"name": "coupled"}},
    "wd1": {"algorithm": {"name": "wd1"}, "estimator": {"name": "one_step"}},
    "spg": {"algorithm": {"name": "spg"}, "estimator": {"name": "block_random"}},  # SPG's block-wise masks
    # Issue 15's methods, estimators as in their tiny recipes; mu stays COMMON's 1 (their recipes' 2, ESPO's
    # published 8, would halve the rollouts a CPU budget buys; at mu 1 every ratio is 1 and clipping is inert, as
    # for the algorithms above).
    "espo": {"algorithm": {"name": "espo"}, "estimator": {"name": "espo", "mc_num": 2}},  # coupled ELBO, k2 KL
    "bgpo": {"algorithm": {"name": "bgpo"}, "estimator": {"name": "mc_elbo", "mc_num": 8}},  # per-draw backward
    "ebpo": {"algorithm": {"name": "ebpo"}, "estimator": {"name": "block_elbo", "mc_num": 2, "share_t": True}},
    # AGRPO: 4 denoising steps per sample drawn by the rollout's token entropies (its tiny recipe; AGRPO: 24).
    "agrpo": {"algorithm": {"name": "agrpo"}, "estimator": {"name": "sampled_steps", "mc_num": 4,
                                                             "proposal": "entropy"}},
    # MDPO: per-step rewards of each recorded intermediate state, the 4 steps of largest |advantage| trained (its
    # tiny recipe; MDPO: 16 of 128).
    "mdpo": {"algorithm": {"name": "mdpo", "train_steps": 4}, "estimator": {"name": "intermediate_state"}},
    # d-TreeRPO: 4 root children x 2 branches = the 8 samples per prompt (its tiny recipe: 2 x 2; published 4 x 4).
    "dtreerpo": {"algorithm": {"name": "dtreerpo", "num_tree_samples": 4, "tree_branch_factor": 2,
                               "tree_contraction_factor": 2}, "estimator": {"name": "intermediate_state"}},
    # JustGRPO: AR-order rollouts (one token a step, left to right, the whole canvas) and exact AR log-probs: its
    # decoding is the method, so it replaces COMMON's.
    "justgrpo": {"algorithm": {"name": "justgrpo"}, "estimator": {"name": "ar_exact"},
                 "rollout": {"remasking": "left_to_right", "stop_at_eos": False}},
    # IGPO: all-wrong groups regenerated with the row's answer inpainted as the hint (the toy task has no reasoning
    # traces; its tiny recipe's chunks), the one-step estimator with the prompt never masked.
    "igpo": {"algorithm": {"name": "igpo", "inpaint": {"reference_field": "answer", "min_chunk": 1, "max_chunk": 2,
                                                       "free_tail": 4}},
             "estimator": {"name": "one_step", "p_mask": 0.0}},
}
# The same batch, optimiser and decoding for every algorithm: what differs is the loss and its estimator.
# mu = 1 (one pass per rollout batch): under a CPU budget the learner dominates a step (TraceRL: ~0.4 CPU-s rollout,
# ~2 CPU-s per learner pass), so fresh rollouts buy more than re-using a batch; 5 CPU-min of TraceRL on countdown
# gave +5.0 (lr 5e-5) and +7.0 points (lr 1e-4) with mu = 1; mu = 4 at lr 2e-5 gave +10.5 in ~10 CPU-min.
# wd1, SPG, CJ-GRPO and TraceRL + value model lose accuracy at 1e-4 and gain at 2e-5 (BENCHMARKS.md ## Learning):
# run them with --set '{"learner": {"lr": 2e-5}}'.
COMMON = {
    "rollout": {"block_size": 4, "steps_per_block": 4, "remasking": "low_confidence_static", "temperature": 1.0,
                "samples_per_prompt": 8, "cache": "block", "batch_size": 128},
    "data": {"chat_template": True, "num_prompts_per_step": 16},
    "learner": {"lr": 1e-4, "grad_clip": 1.0, "micro_batch_size": 64, "grad_accum": 1, "mu": 1, "warmup_steps": 0,
                "weight_decay": 0.0, "betas": [0.9, 0.999]},
    "trainer": {"total_steps": 100000, "checkpoint_every": 0, "keep_last": 1, "log": ["jsonl"], "eval_every": 0},
}


def task_sections(task: str, data_seed: int = 0) -> dict:
    """The task's data, reward and response budget. The generator's seed is the SFT run's (`data_seed`), whatever
    the RL seed: with the RL seed instead, runs with --rl-seeds 1,2 trained on about half of the held-out problems
    (countdown 5000/200: 95 and 100 of the 200 test problems are in the seed-1 / seed-2 training splits)."""
    setup = SETUPS[task]
    return {"data": _data(task, data_seed),
            "reward": [setup["reward"]],
            "rollout": {"max_tokens": setup["max_tokens"]}}


def build_recipe(name: str, task: str, sft_dir: Path, out_dir: Path, seed: int, overrides: dict,
                 run_name: str | None = None, data_seed: int = 0):
    from launch.recipe import recipe_from_dict
    from launch.recipe_io import deep_merge, read_chain

    merged: dict = {}
    for _, data in read_chain(REPO / "recipes" / "tiny-base.yaml"):
        merged = deep_merge(merged, data)
    merged["model"] = {"path": str(sft_dir), "kind": "block", "dtype": "float32"}
    merged.pop("algorithm", None)
    merged.pop("estimator", None)
    for section in (COMMON, task_sections(task, data_seed), ALGOS[name.split("@")[0]], overrides):
        merged = deep_merge(merged, json.loads(json.dumps(section)))
    merged.update(name=(run_name or name).replace("@", "-").replace("#", "-"), seed=seed, output_dir=str(out_dir))
    return recipe_from_dict(merged, source=f"learning benchmark {name}")


def run_rl(recipe, budget_s: float, clock: str = "cpu", log_every: int = 5) -> dict:
    """The driver, step after step, until `budget_s` seconds of `clock` (cpu: CPU seconds of the whole process
    tree; wall: wall clock) are spent or trainer.total_steps are done; returns the curve and the final policy dir."""
    from launch.driver import Driver
    from launch.driver_setup import prepare_run
    from launch.local_ray import ray_session

    ctx = prepare_run(recipe)
    curve, setup_start = [], time.perf_counter()
    with ray_session(ctx.recipe.ray):
        driver = Driver(ctx, progress=False)
        # The budget counts RL steps, not starting Ray and the actors.
        start, cpu_start = time.perf_counter(), tree_cpu_seconds()
        spent = (lambda: tree_cpu_seconds() - cpu_start) if clock == "cpu" else (lambda: time.perf_counter() - start)
        try:
            # A recipe's trainer.total_steps still ends the run first (a step-based lr schedule spans it).
            while spent() < budget_s and driver.step < ctx.recipe.trainer.total_steps:
                metrics = driver.train_step(driver.step + 1)
                curve.append({"step": driver.step, "wall_s": time.perf_counter() - start,
                              "cpu_s": tree_cpu_seconds() - cpu_start,
                              "reward": metrics.get("reward/mean"), "accuracy": metrics.get("reward/accuracy"),
                              "samples": metrics.get("learner/samples"), "step_s": metrics.get("time/step_s")})
                if driver.step % log_every == 0:
                    logging.info("%s step %d (%.0fs): reward %.3f", recipe.name, driver.step, curve[-1]["wall_s"],
                                 curve[-1]["reward"] or 0.0)
            path = driver.save(driver.step, driver.sampler_position)
        finally:
            driver.close()
    return {"curve": curve, "policy": str(path / "policy"), "steps": driver.step,
            "wall_s": curve[-1]["wall_s"] if curve else 0.0, "cpu_s": curve[-1]["cpu_s"] if curve else 0.0,
            "setup_s": start - setup_start}


def heldout(policy_dir: str | Path, task: str, seed: int, limit: int) -> dict:
    """Greedy accuracy on the task's test split, static (1 token per forward) and dynamic (threshold 0.9), each
    with its per-item correctness (`items`: id -> 0/1, for paired comparisons), and the rollout distribution's
    accuracy (temperature 1, 4 samples per problem). Items the checkpoint trained on are refused (launch/heldout)."""
    from launch.evaluate import (EvalRun, checkpoint_name, evaluate_sets, load_checkpoint_policy, load_eval_sets,
                                 run_eval)

    out = {}
    setup = SETUPS[task]
    if "file_task" in setup:  # its test file, scored by the task's own reward (the recipe's)
        where = dict(data=[setup["files"]["test"]], reward=[setup["reward"]])
    else:
        where = dict(data=[generator(task)], task_kwargs=setup["task_kwargs"], task_seed=seed)
    common = dict(**where, limit=limit, print_table=False, max_tokens=setup["max_tokens"])
    for decoding in ("static", "dynamic"):
        rollout = {"remasking": f"low_confidence_{decoding}", "threshold": 0.9 if decoding == "dynamic" else None,
                   "temperature": 0.0, "batch_size": 32}
        run = EvalRun(rollout=rollout, **common)
        ((s, rows),) = evaluate_sets(load_checkpoint_policy(str(policy_dir), run), load_eval_sets(str(policy_dir), run),
                                     run, checkpoint_name=checkpoint_name(str(policy_dir)), progress=False)
        out[decoding] = {"accuracy": s["avg@1"], "tokens_per_forward": s["tokens_per_forward"],
                         "gen_wall_s": s["gen_wall_s"], "items": {r["id"]: r["num_correct"] for r in rows}}
    sampled = EvalRun(n=4, k=(1, 4), rollout={"temperature": 1.0, "batch_size": 32}, **common)
    s = run_eval(str(policy_dir), sampled, progress=False)[0]
    out["sampled"] = {"avg@4": s["avg@4"], "pass@4": s["pass@4"]}
    return out


def make_sft(out: Path, task: str, seed: int, block_size: int) -> Path:
    from launch.sft import run_sft

    if not (out / "sft.json").is_file():
        run_sft(_sft_run(out, task, seed, block_size=block_size, **SETUPS[task]["sft"]), progress=False)
    return out


def plot(results: dict, task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    for i, (name, res) in enumerate(results.items()):
        curve = res.get("curve") or []
        if not curve or "accuracy" not in curve[0]:  # offline runs (VRPO, dTRPO) roll nothing out while training
            continue
        xs = [c.get("cpu_s", c["wall_s"]) / 60 for c in curve]
        k = 20  # moving average over 20 steps (one step: 16 prompts x 8 samples, too noisy alone)
        ys = [sum(c["accuracy"] for c in curve[max(0, i - k + 1):i + 1]) / len(curve[max(0, i - k + 1):i + 1])
              for i in range(len(curve))]
        ax.plot(xs, ys, label=name, color=plt.cm.tab20(i % 20))  # tab10 would repeat colours past ten runs
    ax.set_xlabel("CPU-minutes of RL (whole process tree)")
    ax.set_ylabel("rollout accuracy, T=1 (moving average of 20 steps)")
    ax.set_title(f"{task}: RL from one SFT checkpoint")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def paired_static(name: str, res: dict, sft: dict):
    """The paired comparison (launch/eval_stats.py: flips, exact McNemar p, bootstrap CI seeded by the run's RL
    seed) of a run's static greedy held-out items with its SFT start's on the same items; None for results saved
    before per-item scores were kept."""
    from launch.eval_stats import compare_paired

    base = sft["block1" if "@block1" in name else "block4"]["static"].get("items")
    after = res["after"]["static"].get("items")
    if not base or not after:
        return None
    return compare_paired(base, after, seed=int(res.get("rl_seed", 0)), what=f"run {name}")


def _paired_cell(cmp) -> str:
    return "-" if cmp is None else f"{cmp.fixed} / {cmp.broken}, p = {cmp.p_value:.2g}"


def _row(name: str, steps: str, minutes: str, res: dict, before: float | None, paired: str = "-") -> str:
    st, dy, sa = res["static"], res["dynamic"], res["sampled"]
    gain = "-" if before is None else f"{100 * (st['accuracy'] - before):+.1f}"
    return (f"| {name} | {steps} | {minutes} | {100 * st['accuracy']:.1f} | {100 * dy['accuracy']:.1f} "
            f"({dy['tokens_per_forward']:.2f}) | {100 * sa['avg@4']:.1f} / {100 * sa['pass@4']:.1f} | {gain} | "
            f"{paired} |")


def table(results: dict, sft: dict) -> str:
    lines = ["| run | RL steps | RL CPU min (wall) | held-out greedy, static | dynamic (tokens/forward) | "
             "T=1 avg@4 / pass@4 | gain (static) | fixed / broken, exact McNemar p |",
             "|---|---|---|---|---|---|---|---|"]
    for name, base in sft.items():
        lines.append(_row(f"SFT ({name})", "-", "-", base, None))
    for name, res in results.items():
        if "after" not in res:
            lines.append(f"| {name} | failed: {res.get('error', '?')[:80]} | | | | | | |")
            continue
        before = sft["block1" if "@block1" in name else "block4"]["static"]["accuracy"]
        lines.append(_row(name, str(res["steps"]), f"{res.get('cpu_s', 0) / 60:.1f} ({res['wall_s'] / 60:.1f})",
                          res["after"], before, _paired_cell(paired_static(name, res, sft))))
    return "\n".join(lines)


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    sd = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else float("nan")
    return mean, sd


def seed_table(results: dict, sft: dict) -> str:
    """Per algorithm (runs `algo#sN` grouped), mean and spread over its RL seeds: held-out static accuracy and its
    gain over the SFT start (mean +- sample sd, min..max), dynamic accuracy and tokens per forward, T=1 avg@4."""
    groups: dict[tuple[str, float], list[dict]] = {}  # (algorithm, lr): runs merged from several invocations
    for name, res in results.items():
        if "after" in res:
            lr = res.get("overrides", {}).get("learner", {}).get("lr", COMMON["learner"]["lr"])
            groups.setdefault((name.split("#")[0], lr), []).append({**res, "_name": name})
    lines = ["| algorithm | lr | seeds | RL steps (mean) | held-out static, mean +- sd | gain: mean +- sd "
             "[min..max] | dynamic (tokens/forward) | T=1 avg@4 | per seed: gain (fixed / broken, exact McNemar p) "
             "| seeds with p < 0.01 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (base, lr), runs in groups.items():
        before = sft["block1" if "@block1" in base else "block4"]["static"]["accuracy"]
        acc = [100 * r["after"]["static"]["accuracy"] for r in runs]
        gain = [a - 100 * before for a in acc]
        (am, asd), (gm, gsd) = _mean_sd(acc), _mean_sd(gain)
        dyn = _mean_sd([100 * r["after"]["dynamic"]["accuracy"] for r in runs])[0]
        tpf = _mean_sd([r["after"]["dynamic"]["tokens_per_forward"] for r in runs])[0]
        avg4 = _mean_sd([100 * r["after"]["sampled"]["avg@4"] for r in runs])[0]
        steps = _mean_sd([float(r["steps"]) for r in runs])[0]
        paired = [paired_static(r["_name"], r, sft) for r in runs]
        per_seed = "; ".join(f"s{r.get('rl_seed', '?')}: {g:+.1f}" + (f" ({c.fixed} / {c.broken}, p = {c.p_value:.2g})"
                                                                     if c is not None else "")
                             for r, g, c in zip(runs, gain, paired))
        significant = "-" if any(c is None for c in paired) else f"{sum(c.p_value < 0.01 for c in paired)}/{len(runs)}"
        lines.append(f"| {base} | {lr:.0e} | {len(runs)} | {steps:.0f} | "
                     f"{am:.1f} +- {asd:.1f} | {gm:+.1f} +- {gsd:.1f} [{min(gain):+.1f}..{max(gain):+.1f}] | "
                     f"{dyn:.1f} ({tpf:.2f}) | {avg4:.1f} | {per_seed} | {significant} |")
    return "\n".join(lines)


def _scores(evaluation: dict) -> dict:
    """An evaluation without its timings (which differ between identical evaluations)."""
    return {mode: {k: v for k, v in figures.items() if not k.endswith("_s")} for mode, figures in evaluation.items()}


def merge_results(dirs: list[Path]) -> dict:
    """One results dict from several invocations; they must share the task and the SFT evaluation."""
    merged: dict = {}
    for d in dirs:
        data = json.loads((d / "results.json").read_text())
        if not merged:
            merged = {**data, "runs": {}}
        elif data["task"] != merged["task"] or any(_scores(merged["sft"].get(k, v)) != _scores(v)
                                                   for k, v in data["sft"].items()):
            raise SystemExit(f"{d / 'results.json'}: another task or SFT start than {dirs[0]}: not comparable")
        merged["sft"].update(data["sft"])
        for name, res in data["runs"].items():  # the same algorithm from two invocations: keep both, by folder
            merged["runs"][f"{name} ({d.name})" if name in merged["runs"] else name] = res
    return merged


def _offline_run(name: str, key: str, rl_seed: int, args, sft_dir: Path, out: Path, overrides: dict,
                 rollouts: dict[int, dict]) -> dict:
    """An offline method (benchmarks/learning_offline.py): the seed's SFT rollouts (made once per seed per
    invocation, --offline-data-min CPU-minutes, charged to every method trained on them), then the rest of the
    budget training on their best-vs-worst pairs."""
    from benchmarks.learning_offline import rollout_store, run_offline_method

    if args.clock != "cpu" or not 0 < args.offline_data_min < args.budget_min:
        raise SystemExit("offline methods: --clock cpu and 0 < --offline-data-min < --budget-min")
    if rl_seed not in rollouts:
        data_dir = out / "runs" / f"rollouts-s{rl_seed}"
        if data_dir.exists():
            import shutil

            shutil.rmtree(data_dir)
        # The online runs' sampling and prompt stream for this seed (the tracerl recipe: only its rollout is used).
        recipe = build_recipe("tracerl", args.task, sft_dir, data_dir, rl_seed, {}, run_name=f"rollouts#s{rl_seed}",
                              data_seed=args.seed)
        rollouts[rl_seed] = rollout_store(recipe, args.offline_data_min * 60)
        logging.info("rollouts s%d: %s", rl_seed, {k: v for k, v in rollouts[rl_seed].items() if k != "store"})
    run_dir = out / "runs" / key.replace("#", "-")
    return run_offline_method(name, rollouts[rl_seed], sft_dir, run_dir, rl_seed,
                              args.budget_min - args.offline_data_min, overrides, key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/learning")
    parser.add_argument("--task", default="countdown", choices=sorted(SETUPS))
    parser.add_argument("--algos", default=",".join(ALGOS),
                        help=f"comma list of {', '.join(ALGOS)}, or the offline {', '.join(OFFLINE_ALGOS)}")
    parser.add_argument("--ar-algo", default="tracerl", help="algorithm for the block-size-1 baseline ('' = skip)")
    parser.add_argument("--budget-min", type=float, default=20.0, help="RL minutes per algorithm (see --clock)")
    parser.add_argument("--clock", default="cpu", choices=("cpu", "wall"),
                        help="cpu: CPU-minutes of the whole process tree (robust to a shared machine); wall: minutes")
    parser.add_argument("--sft", default=None, help="reuse this SFT checkpoint (block 4)")
    parser.add_argument("--sft-block1", default=None, help="reuse this SFT checkpoint (block 1, the AR baseline)")
    parser.add_argument("--seed", type=int, default=0, help="SFT run and held-out split")
    parser.add_argument("--rl-seeds", default=None,
                        help="comma list of RL seeds: each run repeated per seed as algo#sN (default: --seed, one run)")
    parser.add_argument("--offline-data-min", type=float, default=1.0,
                        help="offline methods: minutes of --budget-min spent rolling out the SFT model for their pairs "
                             "(benchmarks/learning_offline.py); the rest trains")
    parser.add_argument("--eval-items", type=int, default=None, help="first N held-out items (default: all)")
    parser.add_argument("--task-kwargs", default=None,
                        help="JSON replacing the task's generator parameters (SFT, RL and held-out alike), e.g. the "
                             "older countdown tables' '{\"num_train\": 5000, \"num_test\": 200}'")
    parser.add_argument("--sft-sweep", action="store_true", help="only the SFT starting-point table")
    parser.add_argument("--report", nargs="+", default=None, metavar="DIR",
                        help="only merge the results.json of runs made in parallel (same task and SFT) into --out: "
                             "one table, one plot")
    parser.add_argument("--set", action="append", default=[], help="recipe override for every run, JSON: "
                        "'{\"learner\": {\"lr\": 1e-4}}'")
    args = parser.parse_args()
    if args.task_kwargs is not None:
        SETUPS[args.task]["task_kwargs"] = json.loads(args.task_kwargs)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "datasets", "httpx", "filelock", "launch.driver", "launch.driver_roles"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if "file_task" in SETUPS[args.task]:  # written once beside the SFT checkpoint, shared by runs reusing it
        from benchmarks.learning_rg import make_data

        data_dir = (Path(args.sft).resolve().parent if args.sft else out) / f"{args.task}_data"
        files = make_data(data_dir, **SETUPS[args.task]["file_task"])
        SETUPS[args.task]["files"] = {split: str(path) for split, path in files.items()}
    if args.report:
        merged = merge_results([Path(d) for d in args.report])
        (out / "results.json").write_text(json.dumps(merged, indent=1) + "\n")
        plot(merged["runs"], merged["task"], out / "reward_curves.png")
        print(table(merged["runs"], merged["sft"]))
        print(seed_table(merged["runs"], merged["sft"]))
        return
    if args.sft_sweep:
        print("| task | hidden x layers | params | steps x batch | train s | held-out masked CE | greedy % |\n"
              "|---|---|---|---|---|---|---|", flush=True)
        sft_sweep(out, args.seed, args.eval_items or 200)
        return
    overrides: dict = {}
    for text in args.set:
        from launch.recipe_io import deep_merge

        overrides = deep_merge(overrides, json.loads(text))
    sft_dirs = {"block4": Path(args.sft).resolve() if args.sft else make_sft(out / "sft", args.task, args.seed, 4)}
    algos = [a for a in args.algos.split(",") if a]
    if args.ar_algo:
        sft_dirs["block1"] = (Path(args.sft_block1).resolve() if args.sft_block1
                              else make_sft(out / "sft_block1", args.task, args.seed, 1))
        algos.append(f"{args.ar_algo}@block1")
    if args.rl_seeds is None:
        runs = [(a, a, args.seed) for a in algos]
    else:
        seeds = [int(x) for x in args.rl_seeds.split(",") if x]
        runs = [(a, f"{a}#s{s}", s) for a in algos for s in seeds]
    results_path = out / "results.json"
    saved = json.loads(results_path.read_text()) if results_path.is_file() else {}
    sft_eval = saved.get("sft") or {k: heldout(d, args.task, args.seed, args.eval_items) for k, d in sft_dirs.items()}
    results = saved.get("runs", {})

    def save() -> None:
        results_path.write_text(json.dumps({"task": args.task, "setup": SETUPS[args.task], "sft": sft_eval,
                                            "runs": results, "budget_min": args.budget_min, "clock": args.clock,
                                            "common": COMMON, "overrides": overrides}, indent=1) + "\n")

    save()  # the SFT evaluation at once: invocations started later from the same SFT reuse it (copy results.json)
    rollouts: dict[int, dict] = {}  # offline methods: the SFT model's scored rollouts per RL seed, shared
    for name, key, rl_seed in runs:
        ar = name.endswith("@block1")
        sft_dir = sft_dirs["block1" if ar else "block4"]
        extra = json.loads(json.dumps(overrides))
        if ar:
            extra = {**extra, "rollout": {**extra.get("rollout", {}), "block_size": 1, "steps_per_block": 1}}
        run_dir = out / "runs" / key.replace("@", "-").replace("#", "-")
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        try:
            if name in OFFLINE_ALGOS:
                res = _offline_run(name, key, rl_seed, args, sft_dir, out, extra, rollouts)
            else:
                recipe = build_recipe(name, args.task, sft_dir, run_dir, rl_seed, extra, run_name=key,
                                      data_seed=args.seed)
                res = run_rl(recipe, args.budget_min * 60, args.clock)
            res["after"] = heldout(res["policy"], args.task, args.seed, args.eval_items)
        except Exception as err:  # noqa: BLE001 - one algorithm failing must not lose the others' results
            logging.exception("%s failed", name)
            res = {"error": " ".join(f"{type(err).__name__}: {err}".split())[:300]}
        res["overrides"] = overrides  # kept per run: --report merges invocations made with different --set
        res["rl_seed"] = rl_seed
        results[key] = res
        save()
        plot(results, args.task, out / "reward_curves.png")
        print(table({key: res}, sft_eval), flush=True)
    print(table(results, sft_eval))
    print(seed_table(results, sft_eval))


if __name__ == "__main__":
    main()
