"""The action vocabulary shared by worlds, controllers, recordings and the model.

Actions are small integers; the one-letter names are the script grammar
(README, "Script grammar") and the full names appear in recordings.
"""
from __future__ import annotations

ACTIONS: tuple[str, ...] = ("idle", "up", "down", "left", "right", "place")
NUM_ACTIONS = len(ACTIONS)
IDLE, UP, DOWN, LEFT, RIGHT, PLACE = range(NUM_ACTIONS)

LETTERS: dict[str, int] = {"I": IDLE, "U": UP, "D": DOWN, "L": LEFT, "R": RIGHT, "P": PLACE}
NAMES: dict[str, int] = {name: i for i, name in enumerate(ACTIONS)}

# Pixel displacement direction (dy, dx) of each action; place and idle do not move.
MOVES: tuple[tuple[int, int], ...] = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (0, 0))


def action_id(name: str) -> int:
    """Parse an action given as a full name or a one-letter name."""
    if name in NAMES:
        return NAMES[name]
    if name.upper() in LETTERS and len(name) == 1:
        return LETTERS[name.upper()]
    raise ValueError(f"unknown action {name!r}; expected one of {list(ACTIONS)} or letters {list(LETTERS)}")
