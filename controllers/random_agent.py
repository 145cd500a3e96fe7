"""The random exploring agent: action streams for training data and a controller.

A stream is built from segments, drawn for all streams of a batch at once:
- move:    hold one direction for `min_hold..max_hold` steps;
- idle:    stand still for a few steps;
- place:   one `place` action (leaves a marker);
- revisit: replay the last `min_hold..max_revisit` actions backwards with every move
  inverted, walking the same way back, so places seen earlier are seen again (what a
  model with memory must get right).
Everything comes from the given numpy Generator, so a seed is a stream.
"""
from __future__ import annotations

import numpy as np

from worlds.actions import DOWN, IDLE, LEFT, NUM_ACTIONS, PLACE, RIGHT, UP

# The action that undoes each action (idle and place undo to idle).
_INVERSE = np.zeros(NUM_ACTIONS, dtype=np.int64)
_INVERSE[[IDLE, UP, DOWN, LEFT, RIGHT, PLACE]] = [IDLE, DOWN, UP, RIGHT, LEFT, IDLE]
_MOVE_IDS = np.array([UP, DOWN, LEFT, RIGHT], dtype=np.int64)
_MOVE, _IDLE, _PLACE, _REVISIT = range(4)  # segment kinds


def inverse_actions(actions: np.ndarray) -> np.ndarray:
    """The per-action inverse (up <-> down, left <-> right, idle/place -> idle)."""
    return _INVERSE[np.asarray(actions)]


def explore_actions(
    rng: np.random.Generator,
    batch: int,
    length: int,
    min_hold: int = 4,
    max_hold: int = 24,
    p_idle: float = 0.08,
    p_place: float = 0.06,
    p_revisit: float = 0.12,
    max_revisit: int = 96,
) -> np.ndarray:
    """Exploration streams; returns (batch, length) int64 action ids."""
    if batch < 1 or length < 1:
        raise ValueError(f"batch and length must be >= 1, got batch={batch} length={length}")
    if not 1 <= min_hold <= max_hold:
        raise ValueError(f"need 1 <= min_hold <= max_hold, got min_hold={min_hold} max_hold={max_hold}")
    if max_revisit < min_hold:
        raise ValueError(f"max_revisit must be >= min_hold={min_hold}, got {max_revisit}")
    probs = np.array([1.0 - p_idle - p_place - p_revisit, p_idle, p_place, p_revisit])
    if np.any(probs < 0):
        raise ValueError(f"p_idle + p_place + p_revisit must be <= 1, got {probs[1:].sum()}")

    out = np.zeros((batch, length), dtype=np.int64)
    cursor = np.zeros(batch, dtype=np.int64)  # next position to write, per stream
    rows = np.arange(batch)
    span = np.arange(max(max_hold, max_revisit))  # (S,) offsets inside a segment
    while np.any(cursor < length):
        kind = rng.choice(4, size=batch, p=probs)  # (B,)
        direction = _MOVE_IDS[rng.integers(0, 4, size=batch)]
        hold = rng.integers(min_hold, max_hold + 1, size=batch)
        back = np.minimum(rng.integers(min_hold, max_revisit + 1, size=batch), cursor)
        kind = np.where((kind == _REVISIT) & (back < min_hold), _MOVE, kind)  # nothing to revisit yet

        seg_len = np.select(
            [kind == _MOVE, kind == _IDLE, kind == _PLACE],
            [hold, np.maximum(hold // 4, 1), np.ones_like(hold)],
            default=back,
        )  # (B,)
        # A revisit at cursor c writes inverse(out[c - 1 - j]) at c + j.
        src = np.clip(cursor[:, None] - 1 - span, 0, length - 1)  # (B, S)
        revisit = _INVERSE[out[rows[:, None], src]]  # (B, S)
        fill = np.select(
            [kind == _MOVE, kind == _IDLE, kind == _PLACE],
            [direction, np.full(batch, IDLE), np.full(batch, PLACE)],
            default=0,
        )  # (B,)
        values = np.where((kind == _REVISIT)[:, None], revisit, fill[:, None])  # (B, S)

        dst = cursor[:, None] + span  # (B, S)
        write = (span < seg_len[:, None]) & (dst < length)
        out[np.nonzero(write)[0], dst[write]] = values[write]
        cursor = cursor + seg_len
    return out


class RandomAgentController:
    """A controller that plays exploration streams: `reset()` and `actions(n)`."""

    def __init__(self, seed: int = 0, block: int = 256, **explore_kwargs):
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.seed = int(seed)
        self.block = block
        self.explore_kwargs = explore_kwargs
        self.reset()

    def reset(self) -> None:
        """Start the stream over from the seed."""
        self._rng = np.random.default_rng(self.seed)
        self._buffer: list[int] = []

    def actions(self, n: int) -> list[int]:
        """The next `n` action ids."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        while len(self._buffer) < n:
            # Blocks are drawn one after another from the same generator; a revisit
            # only reaches back inside its own block.
            self._buffer.extend(explore_actions(self._rng, 1, self.block, **self.explore_kwargs)[0].tolist())
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out
