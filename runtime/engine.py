"""Engines: something with `reset(seed)` and `step(actions) -> frames`.

An engine owns the state of one play-through (the world state, or the model's KV
cache and frame history). It knows nothing of windows, keyboards or recordings.

Frames are numpy uint8 arrays of shape (H, W, 3); a chunk is (C, H, W, 3).
`step` takes exactly `chunk_size` actions, one per generated frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import time
import warnings

import numpy as np
import torch

from runtime.attention import CachedSelfAttention, dense_cross_attn
from runtime.cache import KVCache
from runtime.configs import config_int
from runtime.model import push_frame


@dataclass
class StepStats:
    """What the HUD, the benchmark and the evaluation may show about the last step."""

    latency_ms: float = 0.0
    frame_index: int = 0
    cache_tokens: int | None = None
    memory_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    chunk_size: int
    frame_shape: tuple[int, int, int]
    stats: StepStats
    info: dict[str, Any]  # written into meta.json (kind, checkpoint sha256, ...)

    def reset(self, seed: int) -> np.ndarray:
        """Start a new play-through; returns the first frame (H, W, 3) uint8."""

    def step(self, actions: Sequence[int]) -> np.ndarray:
        """Advance by `chunk_size` frames; returns (chunk_size, H, W, 3) uint8."""


def check_chunk_size(chunk_size: int) -> None:
    """Both engines' frames per step: at least one."""
    if chunk_size < 1:
        raise ValueError(f"engine.chunk_size must be >= 1, got {chunk_size}")


def check_chunk_actions(actions: Sequence[int], chunk_size: int) -> None:
    """A step takes one action per frame of its chunk."""
    if len(actions) != chunk_size:
        raise ValueError(f"expected {chunk_size} actions, got {len(actions)}")


class SimulatorEngine:
    """The ground-truth world behind the engine interface (`engine=simulator`)."""

    def __init__(self, world, chunk_size: int = 1):
        check_chunk_size(chunk_size)
        self.world = world
        self.chunk_size = chunk_size
        self.frame_shape = (world.cfg.view, world.cfg.view, 3)
        self.stats = StepStats()
        self.info = {"kind": "simulator", "checkpoint": None, "checkpoint_sha256": None}

    def reset(self, seed: int) -> np.ndarray:
        self.stats = StepStats()
        return self.world.reset(seed)

    def step(self, actions: Sequence[int]) -> np.ndarray:
        check_chunk_actions(actions, self.chunk_size)
        t0 = time.perf_counter()
        frames = np.stack([self.world.step(int(a)) for a in actions])
        self.stats.latency_ms = (time.perf_counter() - t0) * 1e3
        self.stats.frame_index += len(actions)
        return frames


class NonFiniteFrameError(RuntimeError):
    """The model produced NaN or Inf: reported instead of shown as garbage."""


def to_unit(frames_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]."""
    return frames_u8.movedim(-1, -3).float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (..., 3, H, W) in [-1, 1] -> uint8 (..., H, W, 3)."""
    return ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).movedim(-3, -1)


class Rollout:
    """Batched autoregressive generation with a KV cache: the neural engine's core.

    One frame is one block of the block-causal model. Per frame:
      1. start from noise (explicit generator), run the few-step sampler; every step
         attends to [cache | the frame] without keeping anything;
      2. quantize the clean frame to uint8 (what is shown is what is remembered);
      3. the clean pass: run the model on the clean frame at t=0 and commit its keys
         and values into the cache (the policy decides what is kept).
    Step 3 is deferred: the clean frame stays *pending* and runs in the same forward as
    the first denoising step of the next frame (one pass of two frames instead of two
    passes of one; identical results, see CachedSelfAttention). `flush()` runs it alone.
    """

    def __init__(self, model, sampler, cache: KVCache, attention=None, cuda_graph: bool = False,
                 rehearse: bool = False):
        self.model = model
        self.sampler = sampler
        self.cache = cache
        self.attention = attention  # builds the self/cross-attention callables
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.pending = None
        # CUDA graphs (runtime/graphs.py): once the cache's shapes stop changing, one frame
        # is captured and every later frame replays it: no Python or launch cost per kernel
        self.cuda_graph = bool(cuda_graph) and self.device.type == "cuda"
        self.graph = None
        # at every reset, one throwaway pass at the shape the cache keeps once full (see
        # `rehearse`); the factory turns it on for GPUs (`engine.rehearse`)
        self.rehearse_on_reset = bool(rehearse)

    def _attn(self, commit: int, step_index: int | None):
        if self.attention is None:
            return CachedSelfAttention(self.cache, commit), dense_cross_attn
        return self.attention.build(self.cache, commit=commit, step_index=step_index, num_steps=len(self.sampler.times))

    def _forward(self, x, prev, times: list[float], actions, indices: list[int], commit: int, step_index,
                 outputs: int | None = None):
        """x: (B, F, 3, H, W); prev: (B, F, K*3, H, W), each frame's K previous frames;
        actions (B, F); one time and frame index per frame; x0 estimates of the last
        `outputs` frames (all: None)."""
        b = x.shape[0]
        tt = (times if isinstance(times, torch.Tensor)
              else torch.tensor(times, device=self.device, dtype=torch.float32)).expand(b, -1)
        idx = indices if isinstance(indices, torch.Tensor) else torch.tensor(indices, device=self.device)
        sa, ca = self._attn(commit, step_index)
        return self.model(x, prev, tt, actions, idx, sa, ca, self.prompt_kv, outputs=outputs)

    @torch.no_grad()
    def reset(self, first_frames_u8: torch.Tensor, prompt: torch.Tensor, seed: int) -> None:
        """first_frames_u8: (B, H, W, 3); prompt: (B, T, E)."""
        self.gen = torch.Generator(device=self.device).manual_seed(int(seed))
        self.graph = None
        self.steady_frames = 0  # eager frames in a row with graph_ready() (warm-up before capture)
        self.cache.reset()
        if self.attention is not None:
            self.attention.reset()
        self.prompt_kv = self.model.encode_prompt(prompt.to(self.device, self.dtype))
        if self.attention is not None:
            self.prompt_kv = self.attention.prepare_prompt(self.prompt_kv)
        self.frame_index = 0
        first = to_unit(first_frames_u8.to(self.device)).to(self.dtype)[:, None]  # (B, 1, 3, H, W)
        idle = torch.zeros(first.shape[0], dtype=torch.long, device=self.device)
        if self.rehearse_on_reset and self.cache.rehearsable:
            self.rehearse(first)
        # the first frame comes from reset: its previous frames are itself, its action idle
        self.prev = first.repeat(1, 1, self.model.cfg.prev_frames, 1, 1)  # (B, 1, K*3, H, W)
        self.pending = (first, self.prev, idle, 0)

    @torch.no_grad()
    def rehearse(self, like: torch.Tensor) -> None:
        """Throwaway passes over a cache that pretends to be full, with the attention shapes
        of every later frame: the merged pass (a clean frame committed with the next frame's
        first denoising step) and, with more than one sampler step, a later step's pass over
        [cache | the frame]; then a fresh cache. On a GPU the attention plans of those shapes
        (cuDNN builds one per new shape: 1.8 s for `window` at the Wan shape when the window
        fills) and their compiled kernels are made now, at start-up, instead of in the middle
        of play (TempCache's Triton kernels are compiled when it is built). It uses zeros
        and draws nothing from the generator: the frames that follow are the same with or
        without it. like: (B, 1, 3, H, W), the shape of one frame."""
        self.cache.pretend_full()
        zero = torch.zeros_like(like)
        zero_prev = zero.repeat(1, 1, self.model.cfg.prev_frames, 1, 1)
        actions = torch.zeros(like.shape[0], 2, dtype=torch.long, device=self.device)
        times = self.sampler.times
        self._forward(torch.cat([zero, zero], 1), torch.cat([zero_prev, zero_prev], 1), [0.0, times[0]], actions,
                      [0, 1], self.model.cfg.tokens_per_frame, 0)
        if len(times) > 1:
            self._forward(zero, zero_prev, [times[1]], actions[:, :1], [1], 0, 1)
        self.cache.reset()
        if self.attention is not None:
            self.attention.reset_stats()

    @torch.no_grad()
    def predict(self, x: torch.Tensor, t: float, actions: torch.Tensor, step_index: int = 0) -> torch.Tensor:
        """One denoising step of frame `frame_index`: x (B, 1, 3, H, W) at time t -> x0 estimate."""
        a = actions.to(self.device)[:, None]
        if self.pending is None:
            return self._forward(x, self.prev, [t], a, [self.frame_index], 0, step_index)
        clean, prev, act, index = self.pending
        self.pending = None
        return self.merged_pass(clean, prev, act, x, a, [0.0, t], [index, self.frame_index], step_index)

    def merged_pass(self, clean, prev_of_clean, act_of_clean, x, a, times, indices, step_index):
        """The pending clean frame (committed to the cache) and the frame x being denoised
        (actions a (B, 1)) in one forward; returns the x0 estimate of x. times and indices:
        one per frame, as lists or device tensors (a CUDA graph passes tensors)."""
        return self._forward(torch.cat([clean, x], 1), torch.cat([prev_of_clean, self.prev], 1), times,
                             torch.cat([act_of_clean[:, None], a], 1), indices, self.model.cfg.tokens_per_frame,
                             step_index, outputs=1)

    def draw_noise(self) -> torch.Tensor:
        """The next frame's starting noise (float32) from the rollout's generator."""
        return torch.randn(self.noise_shape, generator=self.gen, device=self.device, dtype=torch.float32)

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """(B, 1, 3, H, W): one frame of the batch."""
        b, _, _, h, w = self.prev.shape
        return (b, 1, self.model.cfg.channels, h, w)

    def check_finite(self, x0: torch.Tensor) -> None:
        if not bool(torch.isfinite(x0).all()):
            raise NonFiniteFrameError(
                f"the model produced non-finite values at frame {self.frame_index}; "
                "check the checkpoint and the dtype (engine.dtype)"
            )

    @torch.no_grad()
    def append(self, clean: torch.Tensor, actions: torch.Tensor) -> None:
        """Queue the clean frame (B, 1, 3, H, W) made by `actions` for the cache."""
        self.flush()
        self.pending = (clean, self.prev, actions.to(self.device), self.frame_index)
        self.prev = push_frame(self.prev, clean)

    @torch.no_grad()
    def flush(self) -> None:
        """Write a pending clean frame into the cache now (a clean pass of its own)."""
        self.leave_graph()
        if self.pending is None:
            return
        clean, prev, act, index = self.pending
        self.pending = None
        self._forward(clean, prev, [0.0], act[:, None], [index], self.model.cfg.tokens_per_frame, None)

    @torch.no_grad()
    def step(self, actions: torch.Tensor, true_next: torch.Tensor | None = None) -> torch.Tensor:
        """actions: (B,) int64 -> the next frame, uint8 (B, H, W, 3).

        With `true_next` (B, H, W, 3) uint8 the cache keeps that frame instead of the
        generated one: next-frame prediction from the true context (evaluation)."""
        if true_next is None and self.graph is None and self._graph_allowed():
            from runtime.graphs import FrameGraph

            if self.steady_frames >= FrameGraph.WARMUP_FRAMES:
                try:
                    self.graph = FrameGraph(self)
                except Exception as err:  # keep playing, eagerly
                    warnings.warn(f"CUDA graph capture failed, frames stay eager: {err}", RuntimeWarning, stacklevel=2)
                    self.cuda_graph = False
        if true_next is None and self.graph is not None:
            return self.graph.step(actions)
        self.leave_graph()
        actions = actions.to(self.device)
        self.frame_index += 1
        noise = self.draw_noise().to(self.dtype)
        x0 = self.sampler.sample(lambda x, t, i: self.predict(x, t, actions, i), noise)
        self.check_finite(x0)
        # quantize: what is shown is what is remembered
        frame_u8 = to_uint8(x0[:, 0])
        kept = frame_u8 if true_next is None else true_next.to(self.device)
        self.append(to_unit(kept)[:, None].to(self.dtype), actions)
        self.steady_frames = self.steady_frames + 1 if self.cuda_graph and self.cache.graph_ready() else 0
        return frame_u8

    def _graph_allowed(self) -> bool:
        """CUDA graphs are on, the cache's shapes have stopped changing, and nothing
        measures per call (recall statistics read every attention call's inputs)."""
        if not self.cuda_graph or self.pending is None or not self.cache.graph_ready():
            return False
        return self.attention is None or not self.attention.cfg.stats_recall

    def leave_graph(self) -> None:
        """Back to eager frames: the state the graph kept in its buffers becomes the
        rollout's own again (a copy, so the graph's next replay cannot change it)."""
        if self.graph is not None:
            self.graph.release()
            self.graph = None
            self.steady_frames = 0


class NeuralEngine:
    """The neural world model behind the engine interface (`engine=neural`)."""

    def __init__(self, world, rollout: Rollout, chunk_size: int = 1, info: dict | None = None):
        check_chunk_size(chunk_size)
        self.world = world
        self.rollout = rollout
        self.chunk_size = chunk_size
        self.frame_shape = (world.cfg.view, world.cfg.view, 3)
        self.stats = StepStats()
        self._memory_at: int | None = None  # the cache length at which its memory was last counted
        self._memory_mb = 0.0
        self.info = dict(info or {})
        self.info.setdefault("kind", "neural")

    def reset(self, seed: int) -> np.ndarray:
        self.stats = StepStats()
        first = self.world.reset(seed)
        prompt = torch.from_numpy(np.asarray(self.world.prompt, dtype=np.float32))[None]
        self.rollout.reset(torch.from_numpy(first)[None], prompt, seed)
        self._memory_at = None  # the reset made new buffers
        self._update_stats(0.0)
        return first

    def step(self, actions: Sequence[int]) -> np.ndarray:
        check_chunk_actions(actions, self.chunk_size)
        t0 = time.perf_counter()
        out = []
        for a in actions:
            frame = self.rollout.step(torch.tensor([int(a)], dtype=torch.long))
            out.append(frame[0])
        frames = torch.stack(out).cpu()
        self._update_stats((time.perf_counter() - t0) * 1e3)
        self.stats.frame_index += len(actions)
        return frames.numpy()

    def _update_stats(self, latency_ms: float) -> None:
        cache = self.rollout.cache
        self.stats.latency_ms = latency_ms
        tokens = cache.num_tokens(0)
        if tokens != self._memory_at:
            # a cache's buffers change only with its length (and at reset): counting them
            # only then keeps the walk over the cache's tensors out of most frames
            self._memory_at, self._memory_mb = tokens, cache.memory_bytes() / 2**20
        self.stats.cache_tokens, self.stats.memory_mb = tokens, self._memory_mb
        if self.rollout.attention is not None:
            self.stats.extra = self.rollout.attention.summary()


def build_engine(cfg, world) -> Engine:
    """Build the engine chosen by `cfg.engine.kind` for an already built world."""
    kind = cfg.engine.kind
    config_int(cfg.engine.chunk_size, "engine.chunk_size", minimum=1)
    if kind == "simulator":
        return SimulatorEngine(world, chunk_size=cfg.engine.chunk_size)
    if kind == "neural":
        from runtime.factory import build_neural_engine

        return build_neural_engine(cfg, world)
    raise ValueError(f"unknown engine.kind {kind!r}; expected 'simulator' or 'neural'")
