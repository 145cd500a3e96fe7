"""Ground-truth game worlds: simulators, tile sets (the model's prompt) and checkpoints.

`build_world(world_cfg)` builds the simulator a world config (the Hydra `world`
group, conf/world/*.yaml) describes; its `family` key picks the simulator.
"""
from __future__ import annotations

from typing import Any

FAMILIES = ("overworld",)


def build_world(world_cfg: Any):
    """Build the world of a config mapping or DictConfig (e.g. `cfg.world`).

    Returns an object with `cfg`, `reset(seed) -> frame` and `step(action) -> frame`
    (currently always a `worlds.overworld.Overworld`).
    """
    family = world_cfg.get("family", "overworld") if hasattr(world_cfg, "get") else getattr(world_cfg, "family", None)
    if family == "overworld":
        from worlds.overworld import Overworld

        return Overworld(world_cfg)
    raise ValueError(f"unknown world.family {family!r}; expected one of {list(FAMILIES)}")
