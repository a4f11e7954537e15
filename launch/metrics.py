"""Run metrics: one JSON line per step (always), TensorBoard and W&B when the recipe asks, a one-line console
summary per step, and a PNG of the reward/accuracy curves at the end of a run.

    logger = MetricsLogger(run_dir, backends=recipe.trainer.log, run_name=recipe.name, config=recipe.to_dict())
    logger.log(step, {"reward/mean": 0.4, "time/step_s": 3.1, ...})
    logger.close(); plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")

On resume, rows of steps after the checkpoint are moved out of metrics.jsonl into metrics.superseded.jsonl (kept,
never deleted), so the log reads as one run.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from rewards.result import reason_category
from rl.atomic_io import atomic_write

log = logging.getLogger(__name__)

__all__ = ["MetricsLogger", "read_metrics", "plot_curves", "closing_summary", "moving_average", "reward_summary",
           "summary_line", "rewind_metrics"]

METRICS_FILE = "metrics.jsonl"
# Keys shown in the one-line summary, in this order, when present.
SUMMARY_KEYS = (
    ("reward/mean", "reward", "{:.3f}"), ("reward/accuracy", "acc", "{:.2f}"), ("reward/errors", "rew_err", "{:.0f}"), ("learner/loss", "loss", "{:.4f}"),
    ("learner/grad_norm", "gnorm", "{:.3f}"), ("rollout/response_len", "len", "{:.1f}"),
    ("rollout/staleness", "stale", "{:.1f}"), ("time/rollout_s", "gen", "{:.1f}s"), ("time/reward_s", "rew", "{:.1f}s"),
    ("time/learner_s", "learn", "{:.1f}s"), ("time/sync_s", "sync", "{:.1f}s"), ("time/step_s", "step", "{:.1f}s"),
)


def _plain(value: Any) -> float | int | str | None:
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no NaN: keep it visible as a string
    return None


def reward_summary(results: Iterable[Mapping[str, Any]]) -> dict[str, float | int]:
    """Step metrics from the reward results of a step's scored items (rewards/scorer.py's format):

    `reward/errors`: items whose reason is `error: ...` (a reward raised, returned garbage or its worker crashed);
    `reward/<component>/score`: the mean unweighted score of each reward of the recipe;
    `reward/<component>/<key>`: the mean of every metric a reward returned (a dict's extra keys, `metrics`),
    over the items that have it."""
    results = list(results)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for result in results:
        for key, value in (result.get("metrics") or {}).items():
            name = f"reward/{key}/score" if "/" not in key else f"reward/{key}"
            sums[name] = sums.get(name, 0.0) + float(value)
            counts[name] = counts.get(name, 0) + 1
    errors = sum(reason_category(str(r.get("reason", ""))) == "error" for r in results)
    return {"reward/errors": errors, **{k: sums[k] / counts[k] for k in sorted(sums)}}


def summary_line(step: int, total: int, metrics: Mapping[str, Any]) -> str:
    parts = [f"step {step}/{total}"]
    for key, label, fmt in SUMMARY_KEYS:
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {fmt.format(value)}")
    if metrics.get("learner/skipped"):
        parts.append("SKIPPED (non-finite loss)")
    return " | ".join(parts)


class MetricsLogger:
    def __init__(self, run_dir: str | os.PathLike, *, backends: Iterable[str] = ("jsonl",), run_name: str = "",
                 config: Mapping[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._jsonl = open(self.path, "a")
        self._tb = None
        self._wandb = None
        backends = set(backends)
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        if "wandb" in backends:
            try:
                import wandb
            except ImportError:
                log.warning("trainer.log: wandb requested but not installed; logging to JSONL/TensorBoard only")
            else:
                self._wandb = wandb.init(project="diffrl", name=run_name or None, dir=str(self.run_dir),
                                         config=dict(config or {}), resume="allow", id=run_name or None)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        row = {"step": int(step)}
        for key, value in metrics.items():
            plain = _plain(value)
            if plain is not None:
                row[key] = plain
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        os.fsync(self._jsonl.fileno())
        numeric = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        return row

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a torn last line (a crash mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1}: corrupt JSON") from None
    return rows


def rewind_metrics(run_dir: str | os.PathLike, step: int) -> int:
    """Move rows of steps > `step` to metrics.superseded.jsonl (resume replays them); returns how many moved."""
    path = Path(run_dir) / METRICS_FILE
    rows = read_metrics(path)
    keep = [r for r in rows if int(r.get("step", 0)) <= step]
    later = [r for r in rows if int(r.get("step", 0)) > step]
    if later:
        with open(Path(run_dir) / "metrics.superseded.jsonl", "a") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in later)
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in keep))
    return len(later)


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


PLOT_PANELS = (  # (title, y label, keys drawn in it)
    ("training reward", "mean reward of the step's samples", ("reward/mean",)),
    ("accuracy", "fraction correct", ("reward/accuracy", "eval/accuracy", "eval/probe/sampled_accuracy")),
    ("learning signal", "fraction", ("adv/frac_groups_zero_std", "learner/clipfrac")),
    ("policy entropy", "nats per scored token", ("learner/entropy",)),
)
_LABELS = {"reward/mean": "training reward", "reward/accuracy": "training accuracy (sampled)",
           "eval/accuracy": "held-out accuracy (greedy)",
           "eval/probe/sampled_accuracy": "probe accuracy (sampled, fixed seeds)",
           "adv/frac_groups_zero_std": "groups with zero reward variance", "learner/clipfrac": "clipped tokens",
           "learner/entropy": "policy entropy"}


def plot_curves(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> Path | None:
    """Reward and accuracy against the step: each step's value (faint dots) and its moving average (line); held-out
    accuracy as points with a line. None when nothing to plot."""
    rows = read_metrics(metrics_path)
    panels = []
    for title, ylabel, keys in PLOT_PANELS:
        series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if series:
            panels.append((title, ylabel, series))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, ylabel, series) in zip(axes.flat, panels):
        for i, (key, points) in enumerate(series.items()):
            steps, values = zip(*points)
            color = f"C{i}"
            if key.startswith("eval/"):
                ax.plot(steps, values, marker="s", color=color, label=_LABELS.get(key, key))
                continue
            window = max(1, min(5, len(values) // 4))
            ax.plot(steps, values, "o", markersize=3, alpha=0.35, color=color)
            ax.plot(steps, moving_average(list(values), window), color=color,
                    label=f"{_LABELS.get(key, key)} ({window}-step moving average)")
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(float(r[key]) for r in rows) / len(rows)


def closing_summary(run_dir: str | os.PathLike, window: int = 3) -> str:
    """What `diffrl train` prints at the end: where the run is, training reward (mean of the first `window`
    logged steps -> the last), held-out accuracy before -> after when the run evaluated, and the files to open."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / METRICS_FILE)
    lines = [f"run finished: {run_dir}"]
    status = run_dir / "run.json"
    stop_reason = json.loads(status.read_text()).get("stop_reason") if status.is_file() else None
    if stop_reason:
        lines.append(f"  stopped:    {stop_reason}")
    rewarded = [r for r in rows if isinstance(r.get("reward/mean"), (int, float))]
    if rewarded:
        first, last = rewarded[:window], rewarded[-window:]
        lines.append(f"  training reward: {_mean(first, 'reward/mean'):.3f} -> {_mean(last, 'reward/mean'):.3f} "
                     f"(mean of steps {first[0]['step']}-{first[-1]['step']} -> "
                     f"{last[0]['step']}-{last[-1]['step']})")
    evaluated = [r for r in rows if isinstance(r.get("eval/accuracy"), (int, float))]
    if len(evaluated) >= 2:
        before, after = evaluated[0], evaluated[-1]
        lines.append(f"  held-out accuracy: {before['eval/accuracy']:.2f} (step {before['step']}) -> "
                     f"{after['eval/accuracy']:.2f} (step {after['step']}), greedy, "
                     f"{after.get('eval/num_prompts', '?')} problems")
    plot = run_dir / "curves.png"
    if plot.is_file():
        lines.append(f"  plot:       {plot}")
    lines.append(f"  metrics:    {run_dir / METRICS_FILE}")
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file():
        lines.append(f"  checkpoint: {run_dir / 'checkpoints' / latest.read_text().strip()}"
                     f"  (diffrl eval {run_dir} --data ...; diffrl resume {run_dir} trainer.total_steps=N)")
    return "\n".join(lines)
