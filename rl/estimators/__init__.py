"""Likelihood estimators, registered by name: `get_estimator("sdmc")(policy, inp, seed=..., inner_iter=...)`."""


def get_estimator(name: str):
    """The registered estimator `name` (importing the modules registers them; they load no model)."""
    from rl.estimators import (  # noqa: F401  (registration side effect)
        ar, canvas_trace, elbo, espo, intermediate, remasked, sampled_steps, trajectory)
    from rl.estimators.base import ESTIMATORS

    return ESTIMATORS.get(name)
