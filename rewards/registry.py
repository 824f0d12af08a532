"""Reward registry and resolution of a recipe's reward spec to a callable.

A reward has the TRL signature `fn(completions, prompts, **columns) -> list[float | None]`; a spec is a
registry name, `pkg.module:function`, `path/to/file.py:function`, or an entry point in group `r1kit.rewards`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

RewardFn = Callable[..., list]
_REGISTRY: dict[str, RewardFn] = {}


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn` available to recipes under `name`."""

    def deco(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered by {_REGISTRY[name].__module__}")
        _REGISTRY[name] = fn
        fn.reward_name = name  # type: ignore[attr-defined]
        return fn

    return deco


def names() -> list[str]:
    """Registered names plus those offered by installed packages' `r1kit.rewards` entry points."""
    return sorted(set(_REGISTRY) | {ep.name for ep in entry_points(group="r1kit.rewards")})


def get(name: str) -> RewardFn:
    """The registered reward called `name` (built-in or from an entry point)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    for ep in entry_points(group="r1kit.rewards"):
        if ep.name == name:
            return ep.load()
    hint = difflib.get_close_matches(name, names(), n=1)
    more = f"; did you mean {hint[0]!r}?" if hint else f"; known: {', '.join(names())}"
    raise KeyError(f"unknown reward {name!r}{more}")


def _load_file(path: Path):
    """Import a user's .py file as a module (cached by absolute path)."""
    key = f"r1kit_user_reward_{abs(hash(str(path.resolve())))}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import reward file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


def resolve(spec: str) -> RewardFn:
    """Turn a recipe's reward spec into a callable; errors name the spec."""
    if ":" not in spec:
        return get(spec)
    where, _, attr = spec.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise FileNotFoundError(f"reward {spec!r}: file {where} does not exist")
        module = _load_file(path)
    else:
        module = importlib.import_module(where)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise AttributeError(f"reward {spec!r}: {where} has no function {attr!r}")
    return fn
