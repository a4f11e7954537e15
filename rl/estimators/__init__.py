"""Likelihood estimators, registered by name in `rl.estimators.base.ESTIMATORS`."""
