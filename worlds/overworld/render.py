"""Batched rendering of the overworld's camera view, in numpy.

A frame is drawn in two vectorized steps:
1. terrain: for each view row and each of the (view/tile + 1) tile columns under the
   camera, copy one pixel row of that tile's image out of the atlas (a gather of
   tile-wide strips, already laid out in row order), then crop the strip canvas at
   the camera's sub-tile x offset;
2. sprites (creatures, then the player): scatter their opaque pixels over it.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def upscale_tiles(atlas: np.ndarray, tile: int) -> np.ndarray:
    """(..., N, 8, 8, C) -> (..., N, tile, tile, C) by pixel repetition."""
    factor = tile // atlas.shape[-2]
    if factor == 1:
        return atlas
    return atlas.repeat(factor, axis=-3).repeat(factor, axis=-2)


def render_terrain(maps: np.ndarray, atlas: np.ndarray, cam: np.ndarray, view: int) -> np.ndarray:
    """Step 1.

    maps:  (B, Mp, Mp) uint8 tile ids (padded so the camera never leaves them).
    atlas: (B, N, T, T, 3) uint8 tile images, contiguous.
    cam:   (B, 2) int, top-left pixel (y, x) of the view in the padded map.
    Returns (B, view, view, 3) uint8.
    """
    num, n, t = atlas.shape[:3]
    span = view // t + 1  # tile columns (and rows) the view can touch
    b = np.arange(num)
    first = cam // t  # (B, 2) tile under the view's top-left pixel
    offset = cam - first * t  # (B, 2) sub-tile offset in [0, T)
    windows = sliding_window_view(maps, (span, span), axis=(1, 2))  # (B, Mp-span+1, Mp-span+1, span, span)
    tiles = windows[b, first[:, 0], first[:, 1]]  # (B, span, span)
    rows = offset[:, :1] + np.arange(view)  # (B, V) pixel row inside the tile block
    row_tiles = tiles[b[:, None], rows // t]  # (B, V, span)
    strip = (b[:, None, None] * n + row_tiles) * t + (rows % t)[:, :, None]  # (B, V, span) atlas row index
    strips = atlas.reshape(num * n * t, t * 3).take(strip, axis=0)  # (B, V, span, T*3)
    canvas = strips.reshape(num, view, span * t * 3)  # (B, V, span*T*3) bytes of each row
    crops = sliding_window_view(canvas, view * 3, axis=2)  # (B, V, (span*T - view)*3 + 1, V*3)
    return crops[b, :, 3 * offset[:, 1]].reshape(num, view, view, 3)


def draw_sprites(frames: np.ndarray, sprite: np.ndarray, opaque: np.ndarray, top_left: np.ndarray) -> None:
    """Step 2, in place: one sprite per world at a view position, clipped to the view.

    frames: (B, V, V, 3) uint8; sprite: (B, T, T, 3) uint8; opaque: (B, T, T) bool;
    top_left: (B, 2) int view pixel of the sprite's top-left (may lie outside).
    """
    view, t = frames.shape[1], sprite.shape[1]
    rows = top_left[:, :1] + np.arange(t)  # (B, T)
    cols = top_left[:, 1:] + np.arange(t)  # (B, T)
    visible = opaque & ((rows >= 0) & (rows < view))[:, :, None] & ((cols >= 0) & (cols < view))[:, None, :]
    bb, i, j = np.nonzero(visible)
    if len(bb):
        frames[bb, rows[bb, i], cols[bb, j]] = sprite[bb, i, j]
