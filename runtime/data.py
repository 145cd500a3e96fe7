"""Training data streamed from the simulator: windows of frames and the actions between them.

A worker keeps a batch of live worlds driven by the random exploring agent (persistent
moves, revisits) and cuts consecutive windows of `frames + 1` steps from them. Worlds
are re-created every `episode_windows` windows with a new seed and tile set: half the
tile sets are random styles, so the model must read its prompt to draw what it has not
seen yet. Seeds used here start at `seed_base` (>= 10**6); evaluation uses small seeds.

A window holds, for a model whose tokens carry K previous frames (`prev_frames`, set by
the training from the model config),
    frames  (B, F+K, H, W, 3) uint8   x_{-K} .. x_{-1}, x_0 .. x_{F-1} (frames before the
                                      episode's first are that first frame, as at a reset)
    actions (B, F+1) int64            a_i produced x_i from x_{i-1}
    prompt  (B, T, E) float32         each world's tile set
    creatures (B, F+K, C, 2) int64    view pixel (y, x) of each of the C creatures' boxes
                                      in each frame (what the training loss may weight:
                                      the moving objects the view's scroll does not
                                      explain); the K-1 leading entries repeat x_{-1}'s

and, with `memory_frames` = M > 0, M earlier frames of the same trajectories, what a
long rollout's cache holds (the model learns to attend to frames far back, at their
true temporal distance, and to recall places it has seen):
    memory          (B, M, H, W, 3) uint8   in time order
    memory_prev     (B, M, K, H, W, 3) uint8 the K frames before each, the last one first
    memory_actions  (B, M) int64            the action that produced each
    memory_index    (M,) int64              each one's step relative to x_0 (< 0)
Memory steps are shared by the batch (its worlds step together). With probability
`memory_recent_prob` they are the M steps just before the window (one longer
contiguous context); otherwise distinct steps drawn with probability proportional to
1/distance over the whole past of the episode, so near and far both occur. Episodes
start with M warm-up steps so that every window has M steps behind it.

With probability `start_prob` a batch is instead a *start window*: fresh worlds from
their reset, x_0 the reset frame (its previous frames are itself, its action idle) and
no memory keys, so the context is the reset frame alone, as when generation starts. A
world's first steps after a reset follow rules no later window shows (every creature
starts a new leg, so it walks straight for at least its shortest leg); windows cut from
the middle of an episode never teach them. Start windows come from worlds of their own,
so each episode's trajectory and memory frames are as without them.
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
    memory_frames: int = 0       # earlier frames of the trajectory given as extra context
    memory_recent_prob: float = 0.25  # memory = the steps just before the window
    prev_frames: int = 1         # previous frames each frame's tokens carry (the model's)
    start_prob: float = 0.0      # batches that are start windows (fresh worlds from their reset, no memory)

    def __post_init__(self):
        if self.prev_frames < 1:
            raise ValueError(f"model.prev_frames={self.prev_frames!r}; expected an integer >= 1")
        if self.memory_frames < 0:
            raise ValueError(f"train.data.memory_frames={self.memory_frames!r}; expected an integer >= 0")
        if not 0.0 <= self.memory_recent_prob <= 1.0:
            raise ValueError(f"train.data.memory_recent_prob={self.memory_recent_prob!r}; expected a probability in [0, 1]")
        if not 0.0 <= self.start_prob <= 1.0:
            raise ValueError(f"train.data.start_prob={self.start_prob!r}; expected a probability in [0, 1]")


class WindowStream:
    """An endless stream of training windows from one worker's worlds."""

    def __init__(self, world_cfgs: list[OverworldConfig], cfg: DataConfig, rank: int):
        self.cfg = cfg
        self.world_cfgs = world_cfgs
        self.rng = np.random.default_rng(cfg.seed_base + 7919 * rank)
        self.rank = rank
        self.world = BatchOverworld(world_cfgs[0], cfg.env_batch)
        self.starter = BatchOverworld(world_cfgs[0], cfg.env_batch) if cfg.start_prob > 0 else None
        self._windows_left = 0

    def _fresh_worlds(self, world: BatchOverworld) -> tuple[np.ndarray, np.ndarray]:
        """Reset `world` with new seeds and tile sets; returns (prompts, first frames)."""
        cfg = self.cfg
        seeds = self.rng.integers(cfg.seed_base, 2**31 - 1, size=cfg.env_batch)
        atlases = []
        for _ in range(cfg.env_batch):
            if self.rng.random() < cfg.random_tileset_prob:
                atlases.append(random_tileset(self.rng))
            else:
                wc = self.world_cfgs[self.rng.integers(len(self.world_cfgs))]
                atlases.append(build_atlas(wc.tileset))
        atlases = np.stack(atlases)
        prompts = np.stack([atlas_to_prompt(a) for a in atlases])
        return prompts, world.reset([int(s) for s in seeds], atlases)

    def _new_episode(self) -> None:
        cfg = self.cfg
        b, m = cfg.env_batch, cfg.memory_frames
        self.prompts, first = self._fresh_worlds(self.world)
        steps = m + (cfg.frames + 1) * cfg.episode_windows
        self.actions = explore_actions(self.rng, b, steps)
        self._t = 0
        self._windows_left = cfg.episode_windows
        self.history = None
        if m or cfg.prev_frames > 1:  # every step of the episode: history[s] is step s (0 = reset)
            self.history = np.empty((steps + 1,) + first.shape, dtype=np.uint8)
            self.history[0] = first
            for _ in range(m):
                self._step()

    def _step(self) -> np.ndarray:
        """Advance every world by its next scripted action; returns the new frames."""
        frame = self.world.step(self.actions[:, self._t])
        self._t += 1
        if self.history is not None:
            self.history[self._t] = frame
        return frame

    def _memory_steps(self, last: int) -> np.ndarray:
        """M distinct steps in [1, last], in time order (`last` >= M: the warm-up)."""
        m = self.cfg.memory_frames
        if self.rng.random() < self.cfg.memory_recent_prob:
            return np.arange(last - m + 1, last + 1)
        distance = np.arange(1, last + 1)  # step = last + 1 - distance
        p = 1.0 / distance
        picked = self.rng.choice(distance, size=m, replace=False, p=p / p.sum())
        return np.sort(last + 1 - picked)

    def start_window(self) -> dict[str, torch.Tensor]:
        """A start window (see the module docstring): x_{-K} .. x_0 the reset frame, the
        actions of x_{-1} and x_0 idle, x_1 .. x_{F-1} the worlds' first steps."""
        f, k = self.cfg.frames, self.cfg.prev_frames
        prompts, first = self._fresh_worlds(self.starter)
        acts = np.zeros((self.cfg.env_batch, f + 1), dtype=np.int64)
        acts[:, 2:] = explore_actions(self.rng, self.cfg.env_batch, f - 1)
        frames = [first] * (k + 1)
        creatures = [self.starter.creature_view_pos.copy()] * (k + 1)
        for i in range(2, f + 1):
            frames.append(self.starter.step(acts[:, i]))
            creatures.append(self.starter.creature_view_pos.copy())
        return {
            "frames": torch.from_numpy(np.stack(frames, axis=1)),
            "actions": torch.from_numpy(acts),
            "prompt": torch.from_numpy(prompts.astype(np.float32)),
            "creatures": torch.from_numpy(np.stack(creatures, axis=1)),
        }

    def next(self) -> dict[str, torch.Tensor]:
        if self.starter is not None and self.rng.random() < self.cfg.start_prob:
            return self.start_window()
        if self._windows_left == 0:
            self._new_episode()
        f = self.cfg.frames
        start = self._t  # the step before x_{-1}
        acts = self.actions[:, start : start + f + 1]
        self._windows_left -= 1
        frames, creatures = [], []
        for _ in range(f + 1):
            frames.append(self._step())
            creatures.append(self.world.creature_view_pos)
        k = self.cfg.prev_frames
        if k > 1:  # the frames before x_{-1} (step start + 1); before the reset, the reset frame
            earlier = self.history[np.maximum(np.arange(start + 2 - k, start + 1), 0)]  # (K-1, B, ...)
            frames = list(earlier) + frames
            creatures = [creatures[0]] * (k - 1) + creatures  # no loss falls on these frames
        frames, creatures = np.stack(frames, axis=1), np.stack(creatures, axis=1)
        out = {}
        if self.cfg.memory_frames:
            steps = self._memory_steps(start + 1)  # up to x_{-1}, step start + 1
            out = {
                "memory": torch.from_numpy(self.history[steps].swapaxes(0, 1).copy()),
                "memory_prev": torch.from_numpy(self.history[np.maximum(steps[:, None] - 1 - np.arange(k), 0)]
                                                .transpose(2, 0, 1, 3, 4, 5).copy()),
                # actions[:, s - 1] produced step s
                "memory_actions": torch.from_numpy(self.actions[:, steps - 1].astype(np.int64)),
                "memory_index": torch.from_numpy(steps - (start + 2)),  # x_0 is step start + 2
            }
        reset_like = self.rng.random(self.cfg.env_batch) < self.cfg.reset_like_prob
        frames[reset_like, :k] = frames[reset_like, k : k + 1]
        acts = acts.copy()
        acts[reset_like, 1] = 0
        return {
            "frames": torch.from_numpy(frames),
            "actions": torch.from_numpy(acts.astype(np.int64)),
            "prompt": torch.from_numpy(self.prompts.astype(np.float32)),
            "creatures": torch.from_numpy(creatures),
            **out,
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
