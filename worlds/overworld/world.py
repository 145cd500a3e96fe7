"""Overworld: one world behind the `reset(seed)` / `step(action)` interface.

A thin wrapper over a BatchOverworld of size one, so the single and batched paths
share every line of simulation and rendering. It also owns the world's current tile
set (`atlas`) and the prompt derived from it, and can be restyled with `set_atlas`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from worlds.overworld.batch import BatchOverworld
from worlds.overworld.config import OverworldConfig
from worlds.overworld.tileset import atlas_to_prompt, check_atlas


class Overworld:
    """The overworld simulator; frames are (view, view, 3) uint8."""

    def __init__(self, cfg: OverworldConfig | Any):
        self._batch = BatchOverworld(cfg, batch_size=1)
        self.cfg: OverworldConfig = self._batch.cfg
        self._atlas = self._batch.default_atlas.copy()
        self.seed: int | None = None

    def reset(self, seed: int) -> np.ndarray:
        """Start a play-through of world `seed`; returns the first frame (V, V, 3)."""
        self.seed = int(seed)
        return self._batch.reset([self.seed], self._atlas[None])[0]

    def step(self, action: int) -> np.ndarray:
        """Apply one action id (worlds.actions); returns the next frame (V, V, 3)."""
        return self._batch.step(np.array([action], dtype=np.int64))[0]

    def render(self) -> np.ndarray:
        """The current frame (V, V, 3) without advancing."""
        return self._batch.render()[0]

    def set_atlas(self, atlas: np.ndarray) -> None:
        """Restyle the world with a (16, 8, 8, 3) uint8 tile set (kept across resets)."""
        self._atlas = check_atlas(atlas).copy()
        if self.seed is not None:
            self._batch.set_atlases(self._atlas[None])

    @property
    def atlas(self) -> np.ndarray:
        """(16, 8, 8, 3) uint8 current tile set."""
        return self._atlas.copy()

    @property
    def prompt(self) -> np.ndarray:
        """(256, 12) float32 prompt tokens of the current tile set."""
        return atlas_to_prompt(self._atlas)

    @property
    def player_pos(self) -> np.ndarray:
        """(2,) int64 map pixel (y, x) of the top-left of the player's box."""
        return self._batch.player_pos[0]

    @property
    def creature_pos(self) -> np.ndarray:
        """(K, 2) int64 map pixel (y, x) of each creature's box."""
        return self._batch.creature_pos[0]

    @property
    def tiles(self) -> np.ndarray:
        """(map_size, map_size) uint8 current tile ids, markers included (read-only)."""
        return self._batch.tiles[0]

    @property
    def frame_index(self) -> int:
        """Steps taken since the last reset."""
        return self._batch.frame_index
