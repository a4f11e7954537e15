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

log = logging.getLogger(__name__)

__all__ = ["MetricsLogger", "read_metrics", "plot_curves", "reward_summary", "summary_line", "rewind_metrics"]

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
    errors = sum(str(r.get("reason", "")).split(":", 1)[0].strip() == "error" for r in results)
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


def plot_curves(metrics_path: str | os.PathLike, out_png: str | os.PathLike,
                keys: Iterable[str] = ("reward/mean", "reward/accuracy", "eval/accuracy")) -> Path | None:
    """Reward / accuracy curves against the step, one panel per key present; None when nothing to plot."""
    rows = read_metrics(metrics_path)
    series = {}
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if points:
            series[key] = points
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.2), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o", markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
