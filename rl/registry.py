"""A name -> function table, so recipes pick losses, advantages and mask samplers by name.

Each entry may carry defaults (the published hyper-parameters of the method); the registry never applies them
itself, the caller merges them into its config (see `rl.algorithms.make_loss_config`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._fns: dict[str, Callable[..., Any]] = {}
        self._defaults: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **defaults: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: `@LOSSES.register("gdpo", clip_eps_low=0.5)`. A name can be registered once."""

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._fns:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._fns[name] = fn
            self._defaults[name] = dict(defaults)
            return fn

        return decorate

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._fns:
            raise ValueError(f"unknown {self.kind} '{name}'; known: {', '.join(sorted(self._fns))}")
        return self._fns[name]

    def defaults(self, name: str) -> dict[str, Any]:
        self.get(name)
        return dict(self._defaults[name])

    def names(self) -> list[str]:
        return sorted(self._fns)

    def __contains__(self, name: object) -> bool:
        return name in self._fns
