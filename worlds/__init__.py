"""Ground-truth game worlds: simulators, tile sets (the model's prompt) and checkpoints.

`build_world(world_cfg)` builds the simulator a world config (the Hydra `world`
group, conf/world/*.yaml) describes; its `family` key picks the simulator.
"""
from __future__ import annotations

from typing import Any, Mapping

FAMILIES = ("overworld",)


def world_settings(world_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A world config mapping with the keys its family lets it leave out filled in as the
    family reads them, so two configs of one world compare equal however they were
    written (a recording made before a key existed played it as left out)."""
    if world_cfg.get("family", "overworld") == "overworld":
        from worlds.overworld.config import OMITTED_MEANS

        return {**OMITTED_MEANS, **world_cfg}
    return dict(world_cfg)


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
