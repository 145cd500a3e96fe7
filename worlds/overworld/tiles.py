"""The overworld's tile vocabulary: ids, names and what each tile does.

This file fixes the *semantics* of the 16 tile types (which block, which can be
marked); how each one looks is data (the tile set in the world config, drawn by
`patterns.py` / `tileset.py`). The tile id is the row of the atlas, so the model's
prompt (the atlas as tokens) is ordered by these ids too.
"""
from __future__ import annotations

import numpy as np

TILE_NAMES: tuple[str, ...] = (
    "grass",     # 0  open ground
    "flowers",   # 1  open ground, a grass variant
    "sand",      # 2  shores around water
    "water_a",   # 3  water, first animation phase (the map stores water as this id)
    "water_b",   # 4  water, second animation phase (only ever drawn, never stored)
    "tree",      # 5  blocks
    "rock",      # 6  blocks
    "path",      # 7  dirt paths between houses and the village square
    "wall",      # 8  house front wall, blocks
    "roof",      # 9  house roof, blocks
    "door",      # 10 house door, walkable
    "marker",    # 11 what `place` leaves behind
    "creature",  # 12 sprite of the wandering creatures (transparent pixels allowed)
    "player",    # 13 sprite of the player (transparent pixels allowed)
    "void",      # 14 drawn outside the map
    "bridge",    # 15 where a path crosses water
)
NUM_TILES = len(TILE_NAMES)
TILE_IDS: dict[str, int] = {name: i for i, name in enumerate(TILE_NAMES)}

(GRASS, FLOWERS, SAND, WATER_A, WATER_B, TREE, ROCK, PATH, WALL, ROOF, DOOR,
 MARKER, CREATURE, PLAYER, VOID, BRIDGE) = range(NUM_TILES)

# Tiles whose appearance is drawn over other pixels: their transparent pixels carry
# this exact colour in the atlas (so an atlas alone describes the whole look).
SPRITE_TILES: tuple[int, ...] = (CREATURE, PLAYER)
TRANSPARENT: tuple[int, int, int] = (255, 0, 255)

# The atlas is always drawn at this resolution; a larger `tile` upsamples it.
ATLAS_TILE = 8


def blocking_table() -> np.ndarray:
    """(NUM_TILES,) bool: tiles the player's and creatures' boxes may not overlap."""
    table = np.zeros(NUM_TILES, dtype=bool)
    table[[WATER_A, WATER_B, TREE, ROCK, WALL, ROOF, VOID]] = True
    return table


def placeable_table() -> np.ndarray:
    """(NUM_TILES,) bool: walkable ground that `place` may turn into a marker."""
    table = np.zeros(NUM_TILES, dtype=bool)
    table[[GRASS, FLOWERS, SAND, PATH, BRIDGE]] = True
    return table
