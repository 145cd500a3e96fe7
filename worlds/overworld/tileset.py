"""Tile sets: the atlas of tile appearances, random styles, and the model's prompt.

An atlas is (NUM_TILES, 8, 8, 3) uint8, row i the look of tile id i. It is drawn
from a config's `TileStyle`s (`build_atlas`) or at random for training
(`random_tileset`: random colours and patterns, same tile semantics, so a model has
to read its prompt to know what water looks like today). `atlas_to_prompt` turns an
atlas into the (256, 12) token sequence that the model cross-attends to.
"""
from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np

from worlds.overworld.config import TileStyle
from worlds.overworld.patterns import draw_pattern
from worlds.overworld.tiles import (
    ATLAS_TILE, BRIDGE, CREATURE, DOOR, FLOWERS, GRASS, MARKER, NUM_TILES, PATH, PLAYER,
    ROCK, ROOF, SAND, TRANSPARENT, TREE, VOID, WALL, WATER_A, WATER_B,
)

PATCH = 2  # prompt tokens are 2x2-pixel patches of a tile
PROMPT_TOKENS = NUM_TILES * (ATLAS_TILE // PATCH) ** 2  # 256
PROMPT_DIM = PATCH * PATCH * 3  # 12

# Which patterns a random tile set may pick for each tile type (its semantics).
_RANDOM_PATTERNS: dict[int, tuple[str, ...]] = {
    GRASS: ("speckle", "tufts", "solid"),
    FLOWERS: ("flowers",),
    SAND: ("speckle", "solid", "glints"),
    WATER_A: ("waves", "glints", "stripes"),
    WATER_B: ("ripples", "glints", "stripes"),
    TREE: ("tree", "pine", "cactus"),
    ROCK: ("rock", "boulders"),
    PATH: ("speckle", "solid", "checker"),
    WALL: ("window", "brick", "planks"),
    ROOF: ("shingles", "stripes", "checker"),
    DOOR: ("door", "arch"),
    MARKER: ("cross", "flag"),
    CREATURE: ("slime", "beetle"),
    PLAYER: ("person", "knight"),
    VOID: ("solid", "checker"),
    BRIDGE: ("planks", "stripes"),
}


def build_atlas(styles: Sequence[TileStyle]) -> np.ndarray:
    """Draw one style per tile id; returns (NUM_TILES, 8, 8, 3) uint8."""
    if len(styles) != NUM_TILES:
        raise ValueError(f"expected {NUM_TILES} tile styles, got {len(styles)}")
    return np.stack([draw_pattern(s.pattern, s.base, s.accent, s.detail, s.back) for s in styles])


def check_atlas(atlas: np.ndarray, batch: int | None = None) -> np.ndarray:
    """Validate an atlas (NUM_TILES, 8, 8, 3) or, with `batch`, a stack (batch, NUM_TILES, 8, 8, 3)."""
    atlas = np.asarray(atlas)
    shape = (NUM_TILES, ATLAS_TILE, ATLAS_TILE, 3)
    expected = shape if batch is None else (batch, *shape)
    if atlas.shape != expected or atlas.dtype != np.uint8:
        raise ValueError(f"atlas must be uint8 of shape {expected}, got {atlas.dtype} {atlas.shape}")
    return atlas


def sprite_mask(atlas: np.ndarray) -> np.ndarray:
    """(..., 8, 8) bool of an atlas's sprite tile(s): True where a pixel is opaque."""
    return np.any(atlas != np.array(TRANSPARENT, dtype=np.uint8), axis=-1)


def atlas_to_prompt(atlas: np.ndarray) -> np.ndarray:
    """(16, 8, 8, 3) uint8 atlas -> (256, 12) float32 tokens in [-1, 1].

    Each tile is cut into its 16 2x2-pixel patches (row-major inside the tile); a
    token is the patch's pixels flattened as (py, px, rgb). Tokens are tile-major:
    token 16 * tile_id + 4 * patch_row + patch_col.
    """
    atlas = check_atlas(atlas)
    n = ATLAS_TILE // PATCH
    patches = atlas.reshape(NUM_TILES, n, PATCH, n, PATCH, 3)  # (T, pr, py, pc, px, 3)
    patches = patches.transpose(0, 1, 3, 2, 4, 5)  # (T, pr, pc, py, px, 3)
    tokens = patches.reshape(PROMPT_TOKENS, PROMPT_DIM).astype(np.float32)  # (256, 12)
    return tokens / 127.5 - 1.0


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    """HSV in [0, 1] (hue wraps) -> RGB kept inside 8..247 (never the transparent key)."""
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return tuple(min(max(round(c * 255), 8), 247) for c in (r, g, b))  # type: ignore[return-value]


def random_tileset(rng: np.random.Generator) -> np.ndarray:
    """A random but plausible tile set; returns (NUM_TILES, 8, 8, 3) uint8.

    Colours are picked in HSV so related tiles stay related (grass and flowers share
    a ground colour, water_a and water_b are two shades of one water, trees and rocks
    stand on the grass colour, darker outlines are darker); patterns come from the
    choices that suit each tile type.
    """
    def u(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    ground_h, ground_s, ground_v = u(0, 1), u(0.2, 0.8), u(0.45, 0.85)
    grass = _hsv(ground_h, ground_s, ground_v)
    grass_dark = _hsv(ground_h + u(-0.03, 0.03), ground_s * u(0.9, 1.2), ground_v * u(0.65, 0.85))
    water_h, water_s, water_v = u(0, 1), u(0.35, 0.9), u(0.4, 0.85)
    water = _hsv(water_h, water_s, water_v)
    water_hi = _hsv(water_h, water_s * u(0.2, 0.6), min(1.0, water_v * u(1.15, 1.5)))
    water_b = _hsv(water_h, water_s, water_v * u(0.85, 0.97))
    sand_h = ground_h + u(-0.25, 0.25)
    sand = _hsv(sand_h, u(0.1, 0.5), u(0.7, 0.95))
    canopy_h = ground_h + u(-0.08, 0.08)
    canopy_v = ground_v * u(0.45, 0.7)
    wall_h, roof_h = u(0, 1), u(0, 1)
    wall_v = u(0.5, 0.9)
    roof_v = u(0.35, 0.75)
    path_h = u(0, 1)
    path_v = u(0.45, 0.8)

    colours: dict[int, tuple] = {
        GRASS: (grass, grass_dark, grass_dark, grass),
        FLOWERS: (grass, _hsv(u(0, 1), u(0.5, 1), u(0.8, 1)), _hsv(u(0, 1), u(0.5, 1), u(0.7, 1)), grass),
        SAND: (sand, _hsv(sand_h, u(0.2, 0.6), u(0.5, 0.75)), sand, sand),
        WATER_A: (water, water_hi, water_hi, water),
        WATER_B: (water_b, water_hi, water_hi, water_b),
        TREE: (_hsv(canopy_h, u(0.4, 0.9), canopy_v), _hsv(canopy_h, u(0.3, 0.7), min(1, canopy_v * 1.4)),
               _hsv(u(0.02, 0.12), u(0.4, 0.8), u(0.25, 0.45)), grass),
        ROCK: (_hsv(u(0, 1), u(0, 0.25), u(0.45, 0.7)), _hsv(u(0, 1), u(0, 0.15), u(0.75, 0.95)),
               _hsv(u(0, 1), u(0, 0.3), u(0.2, 0.35)), grass),
        PATH: (_hsv(path_h, u(0.15, 0.5), path_v), _hsv(path_h, u(0.2, 0.6), path_v * u(0.7, 0.85)),
               _hsv(path_h, 0.3, path_v), _hsv(path_h, 0.3, path_v)),
        WALL: (_hsv(wall_h, u(0.05, 0.5), wall_v), _hsv(wall_h, u(0.2, 0.6), wall_v * u(0.5, 0.7)),
               _hsv(u(0, 1), u(0.2, 0.7), u(0.2, 0.5)), grass),
        ROOF: (_hsv(roof_h, u(0.4, 0.9), roof_v), _hsv(roof_h, u(0.4, 0.9), roof_v * u(0.55, 0.75)),
               _hsv(roof_h, 0.5, roof_v), grass),
        DOOR: (_hsv(u(0, 1), u(0.3, 0.8), u(0.3, 0.6)), _hsv(u(0, 1), u(0.2, 0.6), u(0.15, 0.3)),
               _hsv(u(0.1, 0.18), u(0.6, 1), u(0.8, 1)), _hsv(wall_h, u(0.05, 0.5), wall_v)),
        MARKER: (_hsv(u(0, 1), u(0.7, 1), u(0.75, 1)), _hsv(u(0, 1), u(0.3, 1), u(0.2, 0.5)),
                 _hsv(u(0, 1), u(0.2, 1), u(0.8, 1)), grass),
        CREATURE: (_hsv(u(0, 1), u(0.5, 1), u(0.6, 1)), _hsv(u(0, 1), u(0, 0.3), u(0.85, 1)),
                   _hsv(u(0, 1), u(0.3, 0.9), u(0.1, 0.3)), grass),
        PLAYER: (_hsv(u(0, 1), u(0.5, 1), u(0.6, 1)), _hsv(u(0.03, 0.1), u(0.3, 0.6), u(0.7, 1)),
                 _hsv(u(0, 1), u(0.3, 0.9), u(0.1, 0.35)), grass),
        VOID: (_hsv(u(0, 1), u(0, 0.5), u(0.03, 0.15)), _hsv(u(0, 1), u(0, 0.5), u(0.1, 0.2)),
               (0, 0, 0), (0, 0, 0)),
        BRIDGE: (_hsv(u(0.03, 0.12), u(0.3, 0.7), u(0.45, 0.75)), _hsv(u(0.03, 0.12), u(0.4, 0.8), u(0.2, 0.4)),
                 _hsv(u(0.03, 0.12), u(0.4, 0.8), u(0.3, 0.5)), water),
    }
    tiles = []
    for tile_id in range(NUM_TILES):
        options = _RANDOM_PATTERNS[tile_id]
        pattern = options[int(rng.integers(len(options)))]
        base, accent, detail, back = colours[tile_id]
        tiles.append(draw_pattern(pattern, base, accent, detail, back))
    atlas = np.stack(tiles)  # (16, 8, 8, 3)
    # The two water phases must look different, or the animation disappears.
    if np.array_equal(atlas[WATER_A], atlas[WATER_B]):
        atlas[WATER_B] = atlas[WATER_B] // 2 + 60
    return atlas

