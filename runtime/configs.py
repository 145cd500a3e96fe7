"""Turning config mappings into the dataclasses that sit next to the classes they configure.

One rule for every group: unknown keys are an error that names them and lists what is
expected, raised once at start-up.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
CONF = Path(__file__).resolve().parent.parent / "conf"


def compose_config(name: str = "config", overrides: list[str] | None = None):
    """conf/NAME.yaml with command-line style overrides, for tools that run outside
    `hydra.main` (benchmarks, checks, tests)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides or []))


def strict_dataclass(cls: type[T], d: Any, group: str) -> T:
    """Build `cls` from a mapping (or omegaconf node), rejecting keys it does not know.

    `group` names the config in the message, e.g. "model" or "controller (scripted)"."""
    from omegaconf import DictConfig, OmegaConf

    d = OmegaConf.to_container(d, resolve=True) if isinstance(d, DictConfig) else dict(d)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {group} config keys {unknown}; expected a subset of {sorted(known)}")
    return cls(**d)
