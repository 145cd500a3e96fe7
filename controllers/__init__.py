"""Where actions come from: keyboard, scripted, random agent, replay.

Every controller has `reset()` and `actions(n) -> list[int]` (one action id per frame
of the next chunk, asked for when the chunk starts), plus:
- `needs_window`: True if it reads input events (the keyboard); the window then
  forwards key events to its `handle_event(event)`;
- `num_frames`: how many frames it has to give (a replay's length) or None.
`build_controller(cfg)` picks one from the root config's `controller` group.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

from runtime.configs import strict_dataclass


class Controller(Protocol):
    needs_window: bool
    num_frames: int | None

    def reset(self) -> None:
        """Start over (a new play-through)."""

    def actions(self, n: int) -> list[int]:
        """The actions of the next n frames."""


@dataclasses.dataclass
class RandomConfig:
    kind: str = "random"
    seed: int | None = None  # None: the run's seed


class RandomController:
    """The random agent of `controllers.random_agent` behind the controller interface."""

    needs_window = False
    num_frames: int | None = None

    def __init__(self, cfg: RandomConfig, seed: int):
        from controllers.random_agent import RandomAgentController

        self.cfg = cfg
        self.agent = RandomAgentController(seed if cfg.seed is None else cfg.seed)

    def reset(self) -> None:
        self.agent.reset()

    def actions(self, n: int) -> list[int]:
        return [int(a) for a in self.agent.actions(n)]


KINDS = ("keyboard", "scripted", "random", "replay")


def build_controller(cfg) -> Controller:
    """Build the controller chosen by `cfg.controller.kind` (root config in, like build_engine)."""
    node = cfg.controller
    kind = node.get("kind")
    if kind == "keyboard":
        from controllers.keyboard import KeyboardConfig, KeyboardController

        return KeyboardController(strict_dataclass(KeyboardConfig, node, "controller (keyboard)"))
    if kind == "scripted":
        from controllers.scripted import ScriptedConfig, ScriptedController

        return ScriptedController(strict_dataclass(ScriptedConfig, node, "controller (scripted)"))
    if kind == "random":
        return RandomController(strict_dataclass(RandomConfig, node, "controller (random)"), seed=int(cfg.seed))
    if kind == "replay":
        from controllers.replay import ReplayConfig, ReplayController

        return ReplayController(strict_dataclass(ReplayConfig, node, "controller (replay)"))
    raise ValueError(f"unknown controller.kind {kind!r}; expected one of {list(KINDS)}")
