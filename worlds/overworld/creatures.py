"""Wandering creatures: spawned near the player, moved by a fixed deterministic rule.

Each creature walks straight, one pixel per move tick, for `leg` pixels or until its
box would overlap a solid tile; then it turns (and does not move that tick). Turn
i goes right if bit (i mod 8) of its `turns` byte is set, else left. All randomness
(where it starts, its first direction, its leg length and turn byte) is drawn once
at reset from the world seed; stepping draws nothing, so a creature's next moves
follow from its recent ones. Creatures do not block the player.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worlds.overworld.collision import box_blocked

# Clockwise compass, so +1 is a right turn: up, right, down, left as (dy, dx).
COMPASS = np.array([(-1, 0), (0, 1), (1, 0), (0, -1)], dtype=np.int64)


@dataclass
class Creatures:
    """State of K creatures in each of B worlds (positions in padded-map pixels)."""

    pos: np.ndarray        # (B, K, 2) int64, top-left pixel (y, x) of the sprite box
    direction: np.ndarray  # (B, K) int64, index into COMPASS
    walked: np.ndarray     # (B, K) int64, pixels walked since the last turn
    leg: np.ndarray        # (B, K) int64, pixels to walk before turning
    turns: np.ndarray      # (B, K) int64, 8-bit turn pattern
    num_turns: np.ndarray  # (B, K) int64

    @classmethod
    def stack(cls, parts: list["Creatures"]) -> "Creatures":
        """Concatenate per-world states (each with B = 1) into one batch."""
        return cls(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in cls.__dataclass_fields__})


def spawn_creatures(
    seed: int, solid: np.ndarray, spawn: tuple[int, int], num: int, tile: int, radius: int = 3
) -> Creatures:
    """Place `num` creatures on free tiles within `radius` tiles of the spawn tile.

    solid: (Mp, Mp) bool of one world; spawn: (row, col) tile in the same map.
    Returns a state with B = 1.
    """
    rng = np.random.default_rng([seed, 1])
    r, c = spawn
    rows, cols = np.mgrid[r - radius:r + radius + 1, c - radius:c + radius + 1]
    free = ~solid[rows, cols] & ((rows != r) | (cols != c))
    candidates = np.stack([rows[free], cols[free]], axis=-1)  # (F, 2) tiles
    if len(candidates) == 0:
        candidates = np.array([[r, c]])
    pick = rng.choice(len(candidates), size=num, replace=num > len(candidates))
    pos = candidates[pick].astype(np.int64) * tile  # (K, 2)
    return Creatures(
        pos=pos[None],
        direction=rng.integers(0, 4, size=(1, num)),
        walked=np.zeros((1, num), dtype=np.int64),
        leg=rng.integers(2, 7, size=(1, num)) * (tile // 2),
        turns=rng.integers(0, 256, size=(1, num)),
        num_turns=np.zeros((1, num), dtype=np.int64),
    )


def step_creatures(state: Creatures, solid: np.ndarray, tile: int) -> None:
    """One move tick for every creature, in place. solid: (B, Mp, Mp) bool."""
    target = state.pos + COMPASS[state.direction]  # (B, K, 2)
    turn = box_blocked(solid, target, tile) | (state.walked >= state.leg)  # (B, K)
    state.pos = np.where(turn[..., None], state.pos, target)
    state.walked = np.where(turn, 0, state.walked + 1)
    right = (state.turns >> (state.num_turns % 8)) & 1  # (B, K)
    state.direction = np.where(turn, (state.direction + np.where(right == 1, 1, 3)) % 4, state.direction)
    state.num_turns = state.num_turns + turn
