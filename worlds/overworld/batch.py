"""BatchOverworld: B overworlds stepped together with vectorized numpy.

This is the simulator proper (the data source for training and the ground truth).
One step, for every world at once:
1. move the player by `scroll` pixels unless its box would overlap a solid tile;
2. `place` turns the walkable tile under the player's centre into a marker;
3. advance the frame counter; every `creature_period` frames the creatures move;
4. render: terrain (water drawn as water_a or water_b by the frame counter's phase),
   creatures, then the player at the centre of the view.

Positions are kept in pixels of a padded map (the map plus a ring of void tiles wide
enough that the camera never leaves the array); the public properties report them
in map pixels. A body's position is the top-left pixel (y, x) of its tile-sized box.
Only `reset` loops over worlds (map generation); stepping and rendering do not.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Any, Sequence

import numpy as np

from worlds.actions import MOVES, NUM_ACTIONS, PLACE
from worlds.overworld.collision import box_blocked
from worlds.overworld.config import OverworldConfig
from worlds.overworld.creatures import Creatures, spawn_creatures, step_creatures
from worlds.overworld.mapgen import generate_map
from worlds.overworld.render import draw_sprites, render_terrain, upscale_tiles
from worlds.overworld.tiles import (
    CREATURE, MARKER, PLAYER, VOID, WATER_A, WATER_B, blocking_table, placeable_table,
)
from worlds.overworld.tileset import build_atlas, check_atlas, sprite_mask

_MOVES = np.array(MOVES, dtype=np.int64)  # (NUM_ACTIONS, 2) (dy, dx)


@dataclass
class Layers:
    """A batch of frames taken apart (`BatchOverworld.render_layers`): each layer is drawn
    over the ones before it where it covers."""

    ground: np.ndarray          # (B, V, V, 3) uint8: the terrain (markers and water included)
    creatures: np.ndarray       # (B, K, V, V, 3) uint8: each creature alone, in drawing order
    creature_cover: np.ndarray  # (B, K, V, V) bool: where each creature covers what is below
    player: np.ndarray          # (B, V, V, 3) uint8: the player, drawn last
    player_cover: np.ndarray    # (B, V, V) bool

    def compose(self) -> np.ndarray:
        """The frames (B, V, V, 3) uint8: the layers drawn in order, as `render` draws them."""
        frames = self.ground.copy()
        for k in range(self.creatures.shape[1]):
            frames = np.where(self.creature_cover[:, k, ..., None], self.creatures[:, k], frames)
        return np.where(self.player_cover[..., None], self.player, frames)


class BatchOverworld:
    """`batch_size` overworlds; frames are (B, view, view, 3) uint8."""

    def __init__(self, cfg: OverworldConfig | Any, batch_size: int):
        if not isinstance(batch_size, Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.cfg = OverworldConfig.coerce(cfg)
        self.batch_size = int(batch_size)
        self.default_atlas = build_atlas(self.cfg.tileset)  # (16, 8, 8, 3)
        tile, view = self.cfg.tile, self.cfg.view
        self._pad = view // (2 * tile) + 1  # tiles of void around the map
        self._player_view = self.cfg.player_view  # the player's top-left pixel in the view
        self._blocking = blocking_table()
        self._placeable = placeable_table()
        self.frame_index = 0
        self._maps: np.ndarray | None = None  # (B, Mp, Mp) uint8

    # ----------------------------------------------------------------- state
    def reset(self, seeds: Sequence[int], atlases: np.ndarray | None = None) -> np.ndarray:
        """Generate each seed's map and spawn; returns the first frames (B, V, V, 3) uint8."""
        seeds = [int(s) for s in seeds]
        if len(seeds) != self.batch_size:
            raise ValueError(f"expected {self.batch_size} seeds, got {len(seeds)}")
        cfg, pad = self.cfg, self._pad
        size = cfg.map_size + 2 * pad
        maps = np.full((self.batch_size, size, size), VOID, dtype=np.uint8)
        spawns = np.zeros((self.batch_size, 2), dtype=np.int64)
        parts = []
        for i, seed in enumerate(seeds):
            layout = generate_map(seed, cfg.map_size, cfg.num_houses)
            maps[i, pad:pad + cfg.map_size, pad:pad + cfg.map_size] = layout.tiles
            spawns[i] = layout.spawn
            spawn = (layout.spawn[0] + pad, layout.spawn[1] + pad)
            parts.append(spawn_creatures(seed, self._blocking[maps[i]], spawn, cfg.num_creatures, cfg.tile))
        self._maps = maps
        self._solid = self._blocking[maps]  # (B, Mp, Mp); markers never change what blocks
        self._pos = (spawns + pad) * cfg.tile  # (B, 2)
        self._creatures = Creatures.stack(parts)
        self.frame_index = 0
        self.set_atlases(np.broadcast_to(self.default_atlas, (self.batch_size, *self.default_atlas.shape))
                         if atlases is None else atlases)
        return self.render()

    def set_atlases(self, atlases: np.ndarray) -> None:
        """Restyle every world: atlases (B, 16, 8, 8, 3) uint8; takes effect from the next render."""
        atlases = check_atlas(atlases, batch=self.batch_size)
        self._atlases = np.array(atlases)  # (B, 16, 8, 8, 3), a private copy
        even = np.ascontiguousarray(upscale_tiles(self._atlases, self.cfg.tile))  # (B, 16, T, T, 3)
        odd = even.copy()
        odd[:, WATER_A] = even[:, WATER_B]
        self._drawn = (even, odd)  # what is drawn in each water phase
        self._opaque = sprite_mask(even)  # (B, 16, T, T)
        # the creature sprite turned to face each compass direction (its tile faces up):
        # (B, 4, T, T, 3) and (B, 4, T, T); without facing, the tile as it is in all four
        turns = range(4) if self.cfg.creature_facing else [0] * 4
        self._creature_sprites = np.stack([np.rot90(even[:, CREATURE], -d, axes=(1, 2)) for d in turns], 1)
        self._creature_opaque = np.stack([np.rot90(self._opaque[:, CREATURE], -d, axes=(1, 2)) for d in turns], 1)

    def step(self, actions: np.ndarray) -> np.ndarray:
        """Apply one action per world; returns the next frames (B, V, V, 3) uint8."""
        if self._maps is None:
            raise RuntimeError("call reset() before step()")
        actions = np.asarray(actions)
        if actions.shape != (self.batch_size,) or not np.issubdtype(actions.dtype, np.integer):
            raise ValueError(
                f"actions must be integers of shape ({self.batch_size},), got {actions.dtype} {actions.shape}"
            )
        if actions.min() < 0 or actions.max() >= NUM_ACTIONS:
            raise ValueError(f"actions must lie in [0, {NUM_ACTIONS}), got {actions}")
        tile = self.cfg.tile

        # 1. move the player unless the new box overlaps a solid tile
        target = self._pos + _MOVES[actions] * self.cfg.scroll  # (B, 2)
        blocked = box_blocked(self._solid, target[:, None], tile)[:, 0]  # (B,)
        self._pos = np.where(blocked[:, None], self._pos, target)

        # 2. place a marker on the walkable tile under the player's centre
        placing = np.nonzero(actions == PLACE)[0]
        if len(placing):
            r, c = ((self._pos[placing] + tile // 2) // tile).T
            ok = self._placeable[self._maps[placing, r, c]]
            self._maps[placing[ok], r[ok], c[ok]] = MARKER

        # 3. the clock and the creatures
        self.frame_index += 1
        if self.frame_index % self.cfg.creature_period == 0:
            step_creatures(self._creatures, self._solid, tile)
        return self.render()

    # ---------------------------------------------------------------- render
    def render(self) -> np.ndarray:
        """Frames of the current state, (B, V, V, 3) uint8."""
        cam, atlas, p = self._view()
        frames = render_terrain(self._maps, atlas, cam, self.cfg.view)  # (B, V, V, 3)
        for k in range(self.cfg.num_creatures):
            draw_sprites(frames, *self._creature_sprite(k), self._creatures.pos[:, k] - cam)
        frames[:, p, p] = np.where(self._opaque[:, PLAYER, ..., None], atlas[:, PLAYER], frames[:, p, p])
        return frames

    def _view(self) -> tuple[np.ndarray, np.ndarray, slice]:
        """What a render starts from: the padded-map pixel of the view's top-left (B, 2), the
        tile images of this water phase (B, 16, T, T, 3), and the player's rows and columns."""
        cam = self._pos - self._player_view
        atlas = self._drawn[(self.frame_index // self.cfg.water_period) % 2]
        return cam, atlas, slice(self._player_view, self._player_view + self.cfg.tile)

    def _creature_sprite(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Creature k's sprite in each world, (B, T, T, 3), and where it is opaque, (B, T, T):
        turned to face where it walks when the world's creatures face their heading."""
        b = np.arange(self.batch_size)
        d = self._creatures.direction[:, k]
        return self._creature_sprites[b, d], self._creature_opaque[b, d]

    def creature_covers(self) -> np.ndarray:
        """(B, K, V, V) bool: where each creature covers what is below it in the current
        frames (`Layers.creature_cover`), found without drawing the frames."""
        b, view, k = self.batch_size, self.cfg.view, self.cfg.num_creatures
        cam = self._view()[0]
        covers = np.zeros((b, k, view, view), dtype=bool)
        for i in range(k):
            opaque = self._creature_sprite(i)[1]
            draw_sprites(covers[:, i], opaque, opaque, self._creatures.pos[:, i] - cam)
        return covers

    def render_layers(self) -> Layers:
        """The current frames taken apart into what `render` draws, one over the other:
        the ground, each creature alone and the player (`Layers`; `Layers.compose` gives
        `render`'s frames back). (For evaluation: frames mixed from other states.)"""
        b, view, k = self.batch_size, self.cfg.view, self.cfg.num_creatures
        cam, atlas, p = self._view()
        images = np.zeros((b, k, view, view, 3), dtype=np.uint8)
        covers = self.creature_covers()
        for i in range(k):
            sprite, opaque = self._creature_sprite(i)
            draw_sprites(images[:, i], sprite, opaque, self._creatures.pos[:, i] - cam)
        player = np.zeros((b, view, view, 3), dtype=np.uint8)
        player_cover = np.zeros((b, view, view), dtype=bool)
        player[:, p, p] = atlas[:, PLAYER]
        player_cover[:, p, p] = self._opaque[:, PLAYER]
        return Layers(render_terrain(self._maps, atlas, cam, view), images, covers, player, player_cover)

    def render_creature_moved(self, k: int, offset: np.ndarray) -> np.ndarray:
        """The current frames with creature k drawn `offset` (B, 2) pixels (y, x) from where
        it is; the state is left as it was. (What-if renders for evaluation.)"""
        kept = self._creatures.pos
        self._creatures.pos = kept.copy()
        self._creatures.pos[:, k] += offset
        try:
            return self.render()
        finally:
            self._creatures.pos = kept

    def render_view_moved(self, offset: np.ndarray) -> np.ndarray:
        """The current frames with the view (and the player in its middle) moved `offset`
        (B, 2) pixels (y, x) from where it is, kept on the padded map; the state is left as
        it was. (What-if renders for evaluation: another map seen along this walk.)"""
        kept = self._pos
        span = self.cfg.view // self.cfg.tile + 1
        top = (self._maps.shape[1] - span) * self.cfg.tile + self._player_view  # the last view on the map
        self._pos = np.clip(kept + np.asarray(offset, dtype=kept.dtype), self._player_view, top)
        try:
            return self.render()
        finally:
            self._pos = kept

    def point_creatures(self, direction: int | np.ndarray) -> None:
        """Point the creatures in `direction` (an index into creatures.COMPASS: 0 up,
        1 right, 2 down, 3 left), as if each had been spawned facing it: one for all, or
        one per creature ((K,) or (B, K)). (What-if runs for evaluation: a creature's first
        direction is drawn from the seed, and in a world whose creatures do not face their
        heading no single frame shows it.)"""
        d = np.asarray(direction)
        if not np.issubdtype(d.dtype, np.integer) or d.size == 0 or d.min() < 0 or d.max() > 3:
            raise ValueError(f"direction={direction!r}; expected 0, 1, 2 or 3 (up, right, down, left)")
        try:
            self._creatures.direction[:] = np.broadcast_to(d, self._creatures.direction.shape)
        except ValueError:
            raise ValueError(f"direction has shape {d.shape}; expected one, ({self.cfg.num_creatures},) "
                             f"or ({self.batch_size}, {self.cfg.num_creatures})") from None

    # ------------------------------------------------------------ properties
    @property
    def _origin(self) -> int:
        return self._pad * self.cfg.tile

    @property
    def player_pos(self) -> np.ndarray:
        """(B, 2) int64 map pixel (y, x) of the top-left of the player's box."""
        return self._pos - self._origin

    @property
    def creature_pos(self) -> np.ndarray:
        """(B, K, 2) int64 map pixel (y, x) of the top-left of each creature's box."""
        return self._creatures.pos - self._origin

    @property
    def creature_view_pos(self) -> np.ndarray:
        """(B, K, 2) int64 view pixel (y, x) of the top-left of each creature's box, as
        drawn in the current frame (may lie outside the view)."""
        return self._creatures.pos - (self._pos - self._player_view)[:, None]

    @property
    def tiles(self) -> np.ndarray:
        """(B, map_size, map_size) uint8 current tile ids (markers included), read-only view."""
        p, m = self._pad, self.cfg.map_size
        out = self._maps[:, p:p + m, p:p + m]
        out.flags.writeable = False
        return out

    @property
    def atlases(self) -> np.ndarray:
        """(B, 16, 8, 8, 3) uint8 current tile sets."""
        return self._atlases.copy()
