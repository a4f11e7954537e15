"""Test-only fault injection: the `diffrl` command line with a NaN loss at one step.

    python tests/launch/nan_fault.py STEP train recipe.yaml ...      (any `diffrl` arguments after STEP)

At step STEP every sample reaches the learner with a NaN advantage, so its loss is NaN and the learner must skip
the update (the last good weights kept). Only the learner's copy is poisoned: the store records the true
advantages. Production code carries no hook for this; the driver's learner is wrapped from here.
"""
from __future__ import annotations

import dataclasses
import sys


class NanAdvantages:
    """Stands in for the driver's learner for one step: update() gets every sample with a NaN advantage."""

    def __init__(self, learner):
        self._learner = learner

    def __getattr__(self, name):
        return getattr(self._learner, name)

    def update(self, samples):
        return self._learner.update([dataclasses.replace(s, advantage=float("nan")) for s in samples])


def install(step: int) -> None:
    """Make `Driver.learn` of step `step` train through NanAdvantages."""
    from launch.driver import Driver

    learn = Driver.learn

    def learn_with_nan(self, current: int, *args, **kwargs):
        if current != step:
            return learn(self, current, *args, **kwargs)
        real, self.learner = self.learner, NanAdvantages(self.learner)
        try:
            return learn(self, current, *args, **kwargs)
        finally:
            self.learner = real

    Driver.learn = learn_with_nan


if __name__ == "__main__":
    install(int(sys.argv[1]))
    from launch.cli import main

    sys.exit(main(sys.argv[2:]))
