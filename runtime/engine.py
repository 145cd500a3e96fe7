"""Engines: something with `reset(seed)` and `step(actions) -> frames`.

An engine owns the state of one play-through (the world state, or the model's KV
cache and frame history). It knows nothing of windows, keyboards or recordings.

Frames are numpy uint8 arrays of shape (H, W, 3); a chunk is (C, H, W, 3).
`step` takes exactly `chunk_size` actions, one per generated frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np


@dataclass
class StepStats:
    """What the HUD, the benchmark and the evaluation may show about the last step."""

    latency_ms: float = 0.0
    frame_index: int = 0
    cache_tokens: int | None = None
    memory_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    chunk_size: int
    frame_shape: tuple[int, int, int]
    stats: StepStats
    info: dict[str, Any]  # written into meta.json (kind, checkpoint sha256, ...)

    def reset(self, seed: int) -> np.ndarray:
        """Start a new play-through; returns the first frame (H, W, 3) uint8."""

    def step(self, actions: Sequence[int]) -> np.ndarray:
        """Advance by `chunk_size` frames; returns (chunk_size, H, W, 3) uint8."""


class SimulatorEngine:
    """The ground-truth world behind the engine interface (`engine=simulator`)."""

    def __init__(self, world, chunk_size: int = 1):
        if chunk_size < 1:
            raise ValueError(f"engine.chunk_size must be >= 1, got {chunk_size}")
        self.world = world
        self.chunk_size = chunk_size
        self.frame_shape = (world.cfg.view, world.cfg.view, 3)
        self.stats = StepStats()
        self.info = {"kind": "simulator", "checkpoint": None, "checkpoint_sha256": None}

    def reset(self, seed: int) -> np.ndarray:
        self.stats = StepStats()
        return self.world.reset(seed)

    def step(self, actions: Sequence[int]) -> np.ndarray:
        import time

        if len(actions) != self.chunk_size:
            raise ValueError(f"expected {self.chunk_size} actions, got {len(actions)}")
        t0 = time.perf_counter()
        frames = np.stack([self.world.step(int(a)) for a in actions])
        self.stats.latency_ms = (time.perf_counter() - t0) * 1e3
        self.stats.frame_index += len(actions)
        return frames


def build_engine(cfg, world) -> Engine:
    """Build the engine chosen by `cfg.engine.kind` for an already built world."""
    kind = cfg.engine.kind
    if kind == "simulator":
        return SimulatorEngine(world, chunk_size=int(cfg.engine.chunk_size))
    raise ValueError(f"unknown engine.kind {kind!r}; expected 'simulator' or 'neural'")
