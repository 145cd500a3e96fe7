"""Box-versus-tile collision shared by the player and the creatures.

A body is a tile-sized square box given by its top-left pixel (y, x) in the padded
map. It is blocked when any map tile it overlaps is solid; a box overlaps at most
2x2 tiles, so four lookups per body decide it, vectorized over the batch.
"""
from __future__ import annotations

import numpy as np


def box_blocked(solid: np.ndarray, pos: np.ndarray, tile: int) -> np.ndarray:
    """Which boxes overlap a solid tile.

    solid: (B, Mp, Mp) bool, True where a tile blocks.
    pos:   (B, N, 2) int, top-left pixel (y, x) of each box in the same map.
    Returns (B, N) bool.
    """
    b = np.arange(solid.shape[0])[:, None]  # (B, 1)
    r0 = pos[..., 0] // tile  # (B, N)
    c0 = pos[..., 1] // tile
    r1 = (pos[..., 0] + tile - 1) // tile
    c1 = (pos[..., 1] + tile - 1) // tile
    return solid[b, r0, c0] | solid[b, r0, c1] | solid[b, r1, c0] | solid[b, r1, c1]
