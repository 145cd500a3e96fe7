"""The KV cache of past frames: a typed object with named verbs, owned by the engine.

Each layer's cache holds keys and values of clean past frames, (B, H, capacity, D),
already rotated (post-RoPE), and optionally a per-token log-count (TempCache groups).
Attention of a chunk runs in two verbs:

    K, V, bias = cache.stage(layer, k, v)   # put the chunk after the valid tokens,
                                            # return views over [valid | chunk]
    cache.commit(layer)                     # only for the clean pass: keep the chunk

Staging writes the chunk into the slots right after the valid tokens, so attention reads
one contiguous slice and nothing is concatenated in the hot loop. Denoising steps stage
and never commit; the clean pass commits, and the policy decides what is kept:

    dense   keeps everything; capacity grows by doubling (never per frame)
    window  `sink_frames` first frames + a ring of the `window_frames` most recent ones;
            fixed capacity, so shapes are static after the window fills

    memory layout of `window` (S sink, R ring, C the staged chunk):
        [ S S S | R R R R R R R R | C ]     full: the chunk is staged at the end and,
                                             on commit, overwrites the oldest ring slot
TempCache (merging near-duplicate keys) lives in runtime/tempcache.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CacheSpec:
    num_layers: int
    batch: int
    heads: int
    head_dim: int
    tokens_per_frame: int
    device: torch.device
    dtype: torch.dtype


class KVCache:
    """Base class: contiguous valid tokens per layer; subclasses choose what commit keeps."""

    policy = "base"
    grows = False  # capacity grows with the rollout (dense): lengths never repeat
    rehearsable = True  # has a full shape that play reaches and keeps (`pretend_full`)
    sink_tokens = 0  # leading slots that always count as recent (window sinks)

    def __init__(self, spec: CacheSpec, capacity_tokens: int):
        self.spec = spec
        self._capacity = capacity_tokens
        self.reset()

    # --- verbs
    def reset(self) -> None:
        self._drop_buffers()
        s = self.spec
        # room after the valid tokens for a staged chunk: up to two frames (the pending
        # clean frame and the frame being denoised run in one pass)
        shape = (s.batch, s.heads, self._capacity + 2 * s.tokens_per_frame, s.head_dim)
        self.k, self.v = self._allocate_kv(shape)
        self.length = [0] * s.num_layers  # valid tokens per layer
        self.staged = [0] * s.num_layers
        self.commits = [0] * s.num_layers  # clean frames committed per layer
        # the same count on the device: tensor code reads this one, so a CUDA graph that
        # captured a commit keeps counting when it replays (runtime/graphs.py)
        self._steps_t = torch.zeros(s.num_layers, device=s.device, dtype=torch.long)
        # whether the last `stage` returned views of the same length as the frame before
        # (a full cache) rather than a length new on every frame: GPU kernels that build
        # a plan per shape are only worth it for the former (runtime/attention.py)
        self.static_shape = False
        # which commit wrote each slot (-1: never): what "recent" means for AnnSA
        self.slot_frame = [torch.full(shape[2:3], -1, device=s.device, dtype=torch.long) for _ in range(s.num_layers)]
        self.frames_seen = 0

    def _drop_buffers(self) -> None:
        """Let go of the previous buffers before a reset allocates new ones, so that a
        reset never holds two sets (at the Wan shape a set is tens of GB): every attribute
        that holds tensors, directly or in lists, tuples and dicts (reset makes them again;
        tables built lazily are rebuilt on use)."""
        for name, value in list(vars(self).items()):
            if _holds_tensors(value):
                setattr(self, name, None)

    def pretend_full(self) -> None:
        """Host state of a full cache, so that the next pass stages and commits at the
        shape play keeps once the cache is full (contents: whatever the buffers hold).
        For one throwaway pass at start-up (`Rollout.rehearse`); `reset()` undoes it."""
        self.length = [self._capacity] * self.spec.num_layers

    def _allocate_kv(self, shape) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer key and value buffers of `shape` (B, H, slots, D)."""
        s = self.spec
        return ([torch.zeros(shape, device=s.device, dtype=s.dtype) for _ in range(s.num_layers)],
                [torch.zeros(shape, device=s.device, dtype=s.dtype) for _ in range(s.num_layers)])

    def stage(self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor | None = None):
        """k, v: (B, H, M, D) -> (K, V, bias) over [valid | staged]; bias is None here.

        k_pre (pre-RoPE keys) is only used by policies that match content (TempCache); callers
        pass it only for a pass that commits, since only committed tokens are matched."""
        m = k.shape[2]
        self._ensure(layer, m)
        n = self.length[layer]
        self.k[layer][:, :, n : n + m] = k
        self.v[layer][:, :, n : n + m] = v
        self.staged[layer] = m
        self.static_shape = not self.grows and n >= self._capacity  # full: the length stops changing
        return self.k[layer][:, :, : n + m], self.v[layer][:, :, : n + m], None

    def commit(self, layer: int, count: int | None = None) -> None:
        """Keep the first `count` staged tokens (all by default): one clean frame."""
        n = self.length[layer]
        m = self.staged[layer] if count is None else count
        self._committed(layer, n, m)
        self.length[layer] = n + m

    def _committed(self, layer: int, start: int | torch.Tensor, m: int) -> None:
        """Book-keeping after slots [start, start + m) (or the slot indices `start`)
        received a clean frame."""
        if isinstance(start, torch.Tensor):
            self.slot_frame[layer].index_copy_(0, start, self._steps_t[layer].expand(m))
        else:
            self.slot_frame[layer][start : start + m] = self.commits[layer]
        self._steps_t[layer].add_(1)
        self.commits[layer] += 1
        self.staged[layer] = 0
        if layer == self.spec.num_layers - 1:
            self.frames_seen += 1

    # --- facts
    def num_tokens(self, layer: int = 0) -> int:
        return self.length[layer]

    def recent_slots(self, layer: int, frames: int) -> torch.Tensor:
        """(B, H, slots) True for slots written by the last `frames` commits, and sinks."""
        sf = self.slot_frame[layer]
        keep = sf >= self._steps_t[layer] - frames
        keep[: self.sink_tokens] = True
        return keep[None, None].expand(self.spec.batch, self.spec.heads, -1)

    def graph_ready(self) -> bool:
        """Every stage and commit from now on has the same shapes and Python-side control
        flow, so a CUDA graph may capture them (runtime/graphs.py). Subclasses that reach
        such a state say when."""
        return False

    def memory_bytes(self) -> int:
        """Bytes of every tensor the cache holds (each storage once: the per-layer lists
        are views of shared buffers): keys and values, and whatever else a policy keeps,
        such as TempCache's match keys, counts and stamps."""
        storages: dict[int, int] = {}
        pending = list(vars(self).values())
        while pending:
            item = pending.pop()
            if isinstance(item, torch.Tensor):
                storage = item.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            elif isinstance(item, (list, tuple)):
                pending.extend(item)
            elif isinstance(item, dict):
                pending.extend(item.values())
        return sum(storages.values())

    def _ensure(self, layer: int, m: int) -> None:
        need = self.length[layer] + m
        buf = self.k[layer]
        if need <= buf.shape[2]:
            return
        raise AssertionError(f"{self.policy} cache overflow: {need} > {buf.shape[2]}")


class DenseCache(KVCache):
    """Keeps every past token: the reference, and what grows without bound."""

    policy = "dense"
    grows = True
    rehearsable = False

    def __init__(self, spec: CacheSpec, initial_frames: int = 64):
        super().__init__(spec, initial_frames * spec.tokens_per_frame)

    def _ensure(self, layer: int, m: int) -> None:
        buf = self.k[layer]
        need = self.length[layer] + m
        if need <= buf.shape[2]:
            return
        # grow in large steps (double) so reallocation is rare, never per frame
        new_cap = max(need, 2 * buf.shape[2])
        n = self.length[layer]
        for store in (self.k, self.v):
            old = store[layer]
            new = torch.zeros(*old.shape[:2], new_cap, old.shape[3], device=old.device, dtype=old.dtype)
            new[:, :, :n] = old[:, :, :n]
            store[layer] = new
        frames = torch.full((new_cap,), -1, device=buf.device, dtype=torch.long)
        frames[:n] = self.slot_frame[layer][:n]
        self.slot_frame[layer] = frames


class WindowCache(KVCache):
    """Sink frames + a sliding window of recent frames (Self-Forcing / LongLive style)."""

    policy = "window"

    def __init__(self, spec: CacheSpec, sink_frames: int = 1, window_frames: int = 15):
        if sink_frames < 0 or window_frames < 1:
            raise ValueError(
                f"window cache needs sink_frames >= 0 and window_frames >= 1, got {sink_frames}, {window_frames}"
            )
        self.sink_tokens = sink_frames * spec.tokens_per_frame
        self.ring_tokens = window_frames * spec.tokens_per_frame
        super().__init__(spec, self.sink_tokens + self.ring_tokens)

    def reset(self) -> None:
        super().reset()
        # next ring slot to overwrite once full, on the device (a CUDA graph replays it)
        self._next_t = torch.zeros(self.spec.num_layers, device=self.spec.device, dtype=torch.long)

    def commit(self, layer: int, count: int | None = None) -> None:
        cap = self._capacity
        n = self.length[layer]
        m = self.staged[layer] if count is None else count
        if n + m <= cap:
            super().commit(layer, m)
            return
        # full: move the committed part of the chunk (at [cap, cap+m)) over the oldest ring slots
        assert m <= self.ring_tokens, "a chunk larger than the window cannot be cached"
        nxt = self._next_t[layer]
        slots = self.sink_tokens + (nxt + torch.arange(m, device=nxt.device)) % self.ring_tokens
        for store in (self.k, self.v):
            store[layer].index_copy_(2, slots, store[layer][:, :, cap : cap + m])
        nxt.copy_((nxt + m) % self.ring_tokens)
        self._committed(layer, slots, m)

    def graph_ready(self) -> bool:
        return min(self.length) >= self._capacity  # full: the same shapes every frame


def _holds_tensors(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, (list, tuple)) and any(_holds_tensors(x) for x in value)


def flat_rows(store: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Indices into store.view(B * H * S, D) of store[b, h, slots[b, h, i]], flattened;
    store (B, H, S, D), slots (B, H, c)."""
    b, h, s = store.shape[:3]
    base = torch.arange(b * h, device=slots.device).view(b, h, 1) * s
    return (base + slots).reshape(-1)


def take_rows(store: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """store[b, h, slots[b, h, i]] -> (B, H, c, D); store (B, H, S, D) contiguous. One
    index_select of whole rows: a gather with the index expanded over D was several times
    slower on the CPU."""
    b, h, s, d = store.shape
    return store.view(b * h * s, d).index_select(0, flat_rows(store, slots)).view(*slots.shape, d)
