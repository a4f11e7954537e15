"""A run's compute budget (`trainer.budget`): stop at the first step boundary past N CPU- or wall-minutes.

    budget = RunBudget(minutes=20, clock="cpu")            # trainer.budget: {minutes: 20, clock: cpu}
    budget.restore(ckpt.state.get("budget"))              # resume: what earlier runs spent counts
    while not budget.exhausted(): train_step(...)
    state["budget"] = budget.state_dict()                 # saved in every checkpoint

cpu: CPU seconds (user + system) of this process and every live descendant: the local Ray cluster's raylet, GCS
and worker processes (rollout, learner, reward actors) all run below the driver, so the figure is the work the run
did, and it does not grow when other jobs share the machine (comparisons across runs made side by side hold).
On a joined cluster (`ray.address`) the actors are not descendants: use wall there (the recipe refuses cpu).
wall: seconds of wall clock.

What counts: everything the driver does from its first step on (rollouts, rewards, learner updates, in-run
evaluations, checkpoints), not starting Ray and the actors. A resumed run adds to what the checkpoint recorded;
the time between that checkpoint and an interruption is not counted (those steps are re-run).
"""
from __future__ import annotations

import logging
import time
from typing import Literal

log = logging.getLogger(__name__)

__all__ = ["RunBudget", "tree_cpu_seconds"]

Clock = Literal["cpu", "wall"]


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and every live descendant, plus the reaped children this
    process waited for. A descendant that exits between listing and reading loses its time."""
    import psutil

    me = psutil.Process()
    own = me.cpu_times()
    total = own.user + own.system + own.children_user + own.children_system
    for proc in me.children(recursive=True):
        try:
            times = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # exited (or not ours) between listing and reading
            continue
        total += times.user + times.system
    return total


class RunBudget:
    """Minutes of `clock` a run may spend; `spent_s()` includes what earlier (resumed-from) runs spent."""

    def __init__(self, minutes: float, clock: Clock = "cpu"):
        if minutes <= 0:
            raise ValueError(f"trainer.budget.minutes: must be > 0, got {minutes}")
        if clock not in ("cpu", "wall"):
            raise ValueError(f"trainer.budget.clock: {clock!r} is not cpu or wall")
        self.minutes, self.clock = float(minutes), clock
        self.earlier_s = 0.0  # spent by the runs this one resumed from
        self._start = self._now()

    def _now(self) -> float:
        return tree_cpu_seconds() if self.clock == "cpu" else time.perf_counter()

    def start(self) -> None:
        """Count from now (the first step), not from when the actors were started."""
        self._start = self._now()

    def spent_s(self) -> float:
        return self.earlier_s + max(0.0, self._now() - self._start)

    def exhausted(self) -> bool:
        return self.spent_s() >= 60.0 * self.minutes

    def reason(self, step: int, total_steps: int) -> str:
        return (f"budget: {self.spent_s() / 60:.2f} of {self.minutes:g} {self.clock}-minutes spent at step {step} "
                f"(of trainer.total_steps {total_steps})")

    def state_dict(self) -> dict:
        return {"clock": self.clock, "minutes": self.minutes, "spent_s": self.spent_s()}

    def restore(self, state: dict | None) -> None:
        """Carry what a checkpoint says was spent. A checkpoint of another clock kind still counts its seconds
        (said in a warning): seconds of CPU and of wall clock are the closest measures there are of each other."""
        if not state:
            return
        if state.get("clock") != self.clock:
            log.warning("trainer.budget: the checkpoint counted %s-seconds, this run counts %s-seconds; its %.0f s "
                        "are carried over as they are", state.get("clock"), self.clock, float(state["spent_s"]))
        self.earlier_s = float(state["spent_s"])
