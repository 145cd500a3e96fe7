"""Procedural map generation: one seed -> one island of tiles.

Steps (all from one numpy Generator seeded by the world seed, so a seed is a map):
1. elevation = fractal value noise + an island falloff; low -> water, a band above it
   -> sand shores, the highest spots -> rock outcrops;
2. forest noise -> tree clusters; flower noise -> flower meadows; a sprinkle of lone
   trees, rocks and flowers;
3. a village square (path) at the centre, where the player spawns;
4. houses (roof rows over a wall row with a door) on free ground, mostly near the
   square;
5. dirt paths from each door to the square and from the square to a few shores;
   where a path crosses water it becomes a bridge;
6. a two-tile water ring around the map, so the border is impassable.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worlds.overworld.tiles import (
    BRIDGE, DOOR, FLOWERS, GRASS, NUM_TILES, PATH, ROCK, ROOF, SAND, TREE, WALL, WATER_A,
)

BORDER = 2  # width in tiles of the water ring around the map
_HOUSE = (ROOF, WALL, DOOR)


def _lookup(*tile_ids: int) -> np.ndarray:
    """A read-only (NUM_TILES,) bool table, True at the given ids."""
    table = np.zeros(NUM_TILES, dtype=bool)
    table[list(tile_ids)] = True
    table.flags.writeable = False
    return table


_IS_HOUSE = _lookup(*_HOUSE)
_IS_BUILDABLE = _lookup(GRASS, FLOWERS, TREE, ROCK)
_IS_WET = _lookup(WATER_A, BRIDGE)
_IS_CLUTTER = _lookup(TREE, ROCK)


@dataclass(frozen=True)
class MapLayout:
    tiles: np.ndarray        # (M, M) uint8 tile ids
    spawn: tuple[int, int]   # (row, col) of the player's starting tile


def value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smoothly interpolated random lattice values; returns (size, size) float in [0, 1]."""
    lattice = rng.random((cells + 1, cells + 1))
    u = np.arange(size) * (cells / size)
    i = u.astype(np.int64)
    f = u - i
    f = f * f * (3.0 - 2.0 * f)  # smoothstep, hides the lattice
    rows = lattice[i] * (1 - f)[:, None] + lattice[i + 1] * f[:, None]  # (size, cells + 1)
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]  # (size, size)


def fractal_noise(rng: np.random.Generator, size: int, base_cells: int, octaves: int) -> np.ndarray:
    """Sum of value-noise octaves, each twice as fine and half as strong; (size, size) in [0, 1]."""
    total = np.zeros((size, size))
    weight_sum = 0.0
    for k in range(octaves):
        cells = min(base_cells * 2 ** k, size)
        weight = 0.5 ** k
        total += weight * value_noise(rng, size, cells)
        weight_sum += weight
    return total / weight_sum


def _quantile(values: np.ndarray, q: float) -> float:
    """The value below which a fraction q of `values` lies (no interpolation)."""
    flat = values.ravel()
    k = min(int(q * flat.size), flat.size - 1)
    return float(np.partition(flat, k)[k])


def _terrain(rng: np.random.Generator, m: int) -> np.ndarray:
    """Steps 1-2: water, sand, grass, flowers, trees and rocks; (m, m) uint8."""
    elevation = fractal_noise(rng, m, 4, 4)
    forest = fractal_noise(rng, m, 6, 3)
    meadow = fractal_noise(rng, m, 8, 2)
    scatter = rng.random((4, m, m))

    axis = np.square(np.square(np.arange(m) / (m / 2) - 1.0))  # (m,)
    r = np.sqrt(np.sqrt(axis[:, None] + axis[None, :]))  # (m, m) squarish island: uses more of the map than a disc
    falloff = 0.9 * np.square(np.clip((r - 0.68) / 0.27, 0, 1))  # sinks the rim into the sea
    lift = 0.3 * np.exp(-np.square(r / 0.15))  # keeps the village square dry
    height = elevation - falloff + lift
    water_level = _quantile(elevation, 0.14)  # of the raw noise: the lowest spots are lakes
    water = height < water_level
    shore = _grow(water, 1) | (height < water_level + 0.02)
    rock = elevation > _quantile(elevation, 0.965)
    forest_level = _quantile(forest, 0.72)
    meadow_level = _quantile(meadow, 0.75)

    tiles = np.full((m, m), GRASS, dtype=np.uint8)
    tiles[(meadow > meadow_level) & (scatter[0] < 0.45)] = FLOWERS
    tiles[scatter[0] > 0.985] = FLOWERS
    tiles[(forest > forest_level) & (scatter[1] < 0.8)] = TREE
    tiles[scatter[1] > 0.985] = TREE
    tiles[scatter[2] > 0.993] = ROCK
    tiles[rock & (scatter[3] < 0.75)] = ROCK
    tiles[shore] = SAND
    tiles[water] = WATER_A
    return tiles


def _grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbour dilation of a boolean (m, m) mask."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _place_house(tiles: np.ndarray, rng: np.random.Generator, top: int, left: int) -> tuple[int, int] | None:
    """Step 4: put a house with its top-left tile at (top, left) if the ground is free.

    Returns the tile in front of the door, or None when the spot is taken.
    """
    width, roof_rows = int(rng.integers(3, 6)), int(rng.integers(1, 3))
    height = roof_rows + 1
    m = tiles.shape[0]
    # One free tile around the house and two below the wall (room for the door's path).
    r0, r1, c0, c1 = top - 1, top + height + 2, left - 1, left + width + 1
    if r0 < BORDER + 1 or c0 < BORDER + 1 or r1 > m - BORDER - 1 or c1 > m - BORDER - 1:
        return None
    lot = tiles[r0:r1, c0:c1]
    if not _IS_BUILDABLE[lot].all():
        return None
    lot[_IS_CLUTTER[lot]] = GRASS
    tiles[top:top + roof_rows, left:left + width] = ROOF
    tiles[top + roof_rows, left:left + width] = WALL
    door_col = left + int(rng.integers(1, width - 1))
    tiles[top + roof_rows, door_col] = DOOR
    return top + height, door_col


def _draw_path(tiles: np.ndarray, rng: np.random.Generator, start: tuple[int, int], goal: tuple[int, int]) -> None:
    """Step 5: a 4-connected path from start to goal in straight runs, stepping around houses.

    Runs alternate between vertical and horizontal, each 3-11 tiles (or what is left);
    a run stops before a house tile, and a run that cannot start sidesteps one tile.
    Water under the path becomes bridge. (Plain Python ints: runs are short.)
    """
    m = tiles.shape[0]
    is_house = _IS_HOUSE.tolist()
    r, c = start
    axis = int(rng.integers(2))  # 0: vertical run, 1: horizontal run
    side = int(rng.choice((-1, 1)))  # which way to sidestep an obstacle
    lengths = rng.integers(3, 12, size=2 * m).tolist()
    rows, cols = [r], [c]
    for length in lengths:
        dr, dc = goal[0] - r, goal[1] - c
        if dr == 0 and dc == 0:
            break
        if (dr, dc)[axis] == 0:
            axis = 1 - axis
        d = (dr, dc)[axis]
        sr, sc = ((d > 0) - (d < 0), 0) if axis == 0 else (0, (d > 0) - (d < 0))
        length = min(length, abs(d))
        walked = 0
        while walked < length and not is_house[tiles[r + sr, c + sc]]:
            r, c = r + sr, c + sc
            rows.append(r)
            cols.append(c)
            walked += 1
        if walked:
            axis = 1 - axis
            continue
        for sign in (side, -side):
            nr, nc = r + sign * sc, c + sign * sr
            if BORDER <= min(nr, nc) and max(nr, nc) < m - BORDER and not is_house[tiles[nr, nc]]:
                r, c = nr, nc
                rows.append(r)
                cols.append(c)
                break
        else:
            break
    rr, cc = np.array(rows), np.array(cols)
    wet = _IS_WET[tiles[rr, cc]]
    tiles[rr, cc] = np.where(wet, BRIDGE, PATH)


def generate_map(seed: int, map_size: int, num_houses: int) -> MapLayout:
    """Generate the (map_size, map_size) tile map of one seed."""
    if seed < 0:
        raise ValueError(f"world seed must be >= 0, got {seed}")
    rng = np.random.default_rng([seed, 0])
    m = map_size
    tiles = _terrain(rng, m)

    # Step 3: the village square, on dry ground, free of trees and rocks around it.
    c = m // 2
    near = tiles[c - 4:c + 5, c - 4:c + 5]
    near[np.isin(near, (TREE, ROCK, WATER_A))] = GRASS
    tiles[c - 1:c + 2, c - 1:c + 2] = PATH

    # Step 4: houses, the first half close to the square.
    doors: list[tuple[int, int]] = []
    for attempt in range(num_houses * 40):
        if len(doors) >= num_houses:
            break
        radius = 0.3 * m if len(doors) < (num_houses + 1) // 2 else 0.5 * m
        top = c + int(rng.uniform(-radius, radius))
        left = c + int(rng.uniform(-radius, radius))
        front = _place_house(tiles, rng, top, left)
        if front is not None:
            doors.append(front)

    # Step 5: paths from doors to the square, and from the square to a few shores.
    for front in doors:
        _draw_path(tiles, rng, front, (c, c))
    shore = np.argwhere(tiles == SAND)
    if len(shore):
        for idx in rng.choice(len(shore), size=min(3, len(shore)), replace=False):
            _draw_path(tiles, rng, (c, c), (int(shore[idx][0]), int(shore[idx][1])))

    # Step 6: the impassable border.
    tiles[:BORDER, :] = WATER_A
    tiles[-BORDER:, :] = WATER_A
    tiles[:, :BORDER] = WATER_A
    tiles[:, -BORDER:] = WATER_A
    return MapLayout(tiles=tiles, spawn=(c, c))
