"""Training data streamed from the simulator: windows of frames and the actions between them.

A worker keeps a batch of live worlds driven by the random exploring agent (persistent
moves, revisits) and cuts consecutive windows of `frames + 1` frames from them. Worlds
are re-created every `episode_windows` windows with a new seed and tile set: half the
tile sets are random styles, so the model must read its prompt to draw what it has not
seen yet. Seeds used here start at `seed_base` (>= 10**6); evaluation uses small seeds.

A window holds
    frames  (B, F+1, H, W, 3) uint8   x_{-1}, x_0 .. x_{F-1}
    actions (B, F+1) int64            a_i produced x_i from x_{i-1}
    prompt  (B, T, E) float32         each world's tile set
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from controllers.random_agent import explore_actions
from worlds.overworld import BatchOverworld, OverworldConfig, atlas_to_prompt, build_atlas, random_tileset


@dataclass
class DataConfig:
    env_batch: int = 32          # worlds per worker
    frames: int = 17             # clean frames per window (targets = frames - 1)
    episode_windows: int = 8     # windows cut from a world before it is re-created
    random_tileset_prob: float = 0.5
    reset_like_prob: float = 0.1  # windows whose first frame looks like a reset (prev = itself, idle)
    seed_base: int = 1_000_000


class WindowStream:
    """An endless stream of training windows from one worker's worlds."""

    def __init__(self, world_cfgs: list[OverworldConfig], cfg: DataConfig, rank: int):
        self.cfg = cfg
        self.world_cfgs = world_cfgs
        self.rng = np.random.default_rng(cfg.seed_base + 7919 * rank)
        self.rank = rank
        self.world = BatchOverworld(world_cfgs[0], cfg.env_batch)
        self._windows_left = 0

    def _new_episode(self) -> None:
        b = self.cfg.env_batch
        seeds = self.rng.integers(self.cfg.seed_base, 2**31 - 1, size=b)
        atlases = []
        for _ in range(b):
            if self.rng.random() < self.cfg.random_tileset_prob:
                atlases.append(random_tileset(self.rng))
            else:
                wc = self.world_cfgs[self.rng.integers(len(self.world_cfgs))]
                atlases.append(build_atlas(wc.tileset))
        self.atlases = np.stack(atlases)
        self.prompts = np.stack([atlas_to_prompt(a) for a in self.atlases])
        self.last = self.world.reset([int(s) for s in seeds], self.atlases)
        self.actions = explore_actions(self.rng, b, (self.cfg.frames + 1) * self.cfg.episode_windows)
        self._t = 0
        self._windows_left = self.cfg.episode_windows

    def next(self) -> dict[str, torch.Tensor]:
        if self._windows_left == 0:
            self._new_episode()
        f = self.cfg.frames
        acts = self.actions[:, self._t : self._t + f + 1]
        self._t += f + 1
        self._windows_left -= 1
        frames = np.empty((self.cfg.env_batch, f + 1) + self.last.shape[1:], dtype=np.uint8)
        for i in range(f + 1):
            frames[:, i] = self.world.step(acts[:, i])
        reset_like = self.rng.random(self.cfg.env_batch) < self.cfg.reset_like_prob
        frames[reset_like, 0] = frames[reset_like, 1]
        acts = acts.copy()
        acts[reset_like, 1] = 0
        return {
            "frames": torch.from_numpy(frames),
            "actions": torch.from_numpy(acts.astype(np.int64)),
            "prompt": torch.from_numpy(self.prompts.astype(np.float32)),
        }


class WindowDataset(torch.utils.data.IterableDataset):
    """Wraps WindowStream for a DataLoader; each (rank, worker) pair gets its own seeds."""

    def __init__(self, world_cfgs: list[OverworldConfig], cfg: DataConfig, rank: int = 0):
        super().__init__()
        self.world_cfgs, self.cfg, self.rank = world_cfgs, cfg, rank

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        nw = info.num_workers if info is not None else 1
        stream = WindowStream(self.world_cfgs, self.cfg, rank=self.rank * nw + wid)
        while True:
            yield stream.next()
