"""Attention entry points: how a chunk's queries see keys, chosen once from config.

The model calls `self_attn(layer, q, k, v)` and `cross_attn(layer, q, k, v)` with
(B, H, L, D) tensors; the callables built here decide where the keys come from:

    training      the whole doubled sequence at once, with a block-causal mask
    cached        the chunk over [cache of past frames | the chunk itself]

The training mask, for clean frames c0..c3 and noisy targets n1..n3 (one frame = one
block of tokens; `x` = attends):

              c0 c1 c2 c3 | n1 n2 n3
        c0    x           |
        c1    x  x        |
        c2    x  x  x     |
        c3    x  x  x  x  |
        n1    x           | x
        n2    x  x        |    x
        n3    x  x  x     |       x

so target n_j sees exactly what generation sees: the clean frames before it (the
cache) and itself. This is what makes cached generation equal the uncached forward.
Log-count biases (TempCache groups) are added in the query dtype: a float32 bias on
the cuDNN path silently gives wrong results.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from runtime.cache import KVCache


# On CUDA, PyTorch's cuDNN attention builds an execution plan for every new input shape
# and keeps it: 55-64 ms per new key length on an H100, against 0.02-1.5 ms for the call
# itself (`python -m runtime.plan_bench`). A cache whose length changes every frame (dense,
# and the others until they fill) would pay that on every frame. Such calls go to the
# flash / memory-efficient kernels, which need no plan, unless the call is so large that
# cuDNN's faster kernel earns its plan back: by plan_bench's figures (flash 1.3 ms slower
# per call at 3200 queries x 36800 keys, two new shapes per frame) that happens over 30
# layers at around 2^27 query-key pairs.
CUDNN_MIN_PAIRS_FOR_NEW_SHAPES = 1 << 27
# At a shape that repeats, cuDNN's plan is built once, but on small calls its kernel is
# the slower one (plan_bench: 0.040 ms against flash's 0.023 at 128 queries x 4224 keys;
# 1.47 against 2.77 ms at 3200 x 36800), and building the plans stalls play for one frame
# when a cache first reaches its static shape. Below this many query-key pairs, about the
# geometric middle of those two shapes, static calls without a bias skip cuDNN too
# (`window` on the shipped model, H100: no more 0.6 s frame when the window fills, and
# 2.11 -> 1.50 ms per frame; BENCHMARKS.md). Calls with a bias (TempCache's log-counts)
# keep cuDNN: without it a bias goes to the memory-efficient kernel, which was slower
# for `fastar`'s frame. Their plans are built at start-up: TempCache's shapes are static
# from the first frame on a GPU (`fill: budget`) and the rollout rehearses the full
# cache's shape at reset (`Rollout.rehearse`).
CUDNN_MIN_PAIRS_FOR_STATIC_SHAPES = 1 << 23
NO_CUDNN = [  # every SDPA backend but cuDNN
    SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# On the CPU, attention in bf16 as two matmuls around a softmax, head by head,
# is much faster than PyTorch's fused CPU kernel at the shapes play has (64-128 queries
# over 256-4200 keys, heads of 64) and gives the same frames to within rounding
# (BENCHMARKS.md, "Optimization log"; tests/test_cpu_attention.py). `engine.cpu_attention`
# picks it (`matmul`, the default) or the fused kernel (`sdpa`); `load_model` applies it.
# Only calls whose shapes repeat take it: the matmul library keeps state for every new
# shape, so a cache whose length changes every frame (dense, or a budget still filling)
# would grow the process with every frame (dense over 400 frames: 1198.5 MB with the
# kernel on every call, 684.3 MB without; docs/results/dense_memory_cpu/).
CPU_ATTENTION_KERNELS = ("matmul", "sdpa")
DEFAULT_CPU_ATTENTION = "matmul"
_cpu_attention = DEFAULT_CPU_ATTENTION


def set_cpu_attention(name: str) -> None:
    """Choose how dense attention runs on the CPU in bf16 (process-wide)."""
    global _cpu_attention
    if name not in CPU_ATTENTION_KERNELS:
        raise ValueError(f"engine.cpu_attention={name!r}; expected one of {list(CPU_ATTENTION_KERNELS)}")
    _cpu_attention = name


def cpu_attention_kernel() -> str:
    """The kernel chosen by `set_cpu_attention` (recorded by the benchmarks)."""
    return _cpu_attention


def uses_matmul_attention(q: torch.Tensor) -> bool:
    """The matmul kernel serves inference (it writes in place); training keeps SDPA."""
    return (_cpu_attention == "matmul" and q.device.type == "cpu" and q.dtype == torch.bfloat16
            and not torch.is_grad_enabled())


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
                     prefix: tuple[int, int] | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + bias) v as two matmuls per head (the scores in the input
    dtype; the softmax reduces in float32 inside). prefix=(m, n): the first m queries see
    only the first n keys (the merged pass's clean frame; see `CachedSelfAttention`).
    Head by head, the keys and values are read where they lie: a batched matmul would
    first copy a cache's strided prefix."""
    b, h = q.shape[:2]
    scaled = q * q.shape[-1] ** -0.5
    bias = None if bias is None else bias.expand(b, h, *bias.shape[2:])
    out = torch.empty_like(q)
    for i in range(b):
        for j in range(h):
            scores = torch.mm(scaled[i, j], k[i, j].t())
            if bias is not None:
                scores += bias[i, j]
            if prefix is not None:
                scores[: prefix[0], prefix[1]:] = float("-inf")
            torch.mm(torch.softmax(scores, -1), v[i, j], out=out[i, j])
    return out


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
         static: bool = True) -> torch.Tensor:
    """Dense attention, the reference. bias: broadcastable to (B, H, Lq, Lk) or None.
    static=False: the key length is new on (nearly) every call; see above."""
    if bias is not None:
        bias = bias.to(q.dtype)
    if static and uses_matmul_attention(q):
        return matmul_attention(q, k, v, bias)
    if not static:
        floor = CUDNN_MIN_PAIRS_FOR_NEW_SHAPES
    else:
        floor = CUDNN_MIN_PAIRS_FOR_STATIC_SHAPES if bias is None else 0
    if q.is_cuda and q.shape[2] * k.shape[2] < floor:
        with sdpa_kernel(NO_CUDNN):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def dense_cross_attn(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if uses_matmul_attention(q):
        return matmul_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def teacher_forcing_mask(num_frames: int, tokens_per_frame: int, device=None, memory: int = 0) -> torch.Tensor:
    """Boolean mask (L, L), True = attend, for [memory | clean 0..F-1 | noisy 1..F-1]
    (drawn above; `memory` frames from further back are described at
    `teacher_forcing_mask_mod`)."""
    mask_mod, frames = teacher_forcing_mask_mod(num_frames, 1, device, memory)
    fi = torch.arange(frames, device=device)
    frame_mask = mask_mod(0, 0, fi[:, None], fi[None, :])  # one token per frame
    n = tokens_per_frame
    return frame_mask.repeat_interleave(n, dim=0).repeat_interleave(n, dim=1)


def merge_mask(bias: torch.Tensor | None, hide: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive bias (query dtype) that also hides the True entries of `hide`."""
    mask = torch.zeros(hide.shape, dtype=dtype, device=hide.device).masked_fill_(hide, float("-inf"))
    return mask if bias is None else bias.to(dtype) + mask


class MaskedSelfAttention:
    """Full-sequence self-attention with a fixed boolean mask (training, reference)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(self, layer: int, q, k, v, k_pre=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


class CachedSelfAttention:
    """The chunk attends to [cache | itself]; `commit` tokens of it are then kept.

    With `commit` = N (one frame) and a chunk of two frames [clean | noisy], this is the
    merged pass: the pending clean frame is written into the cache in the same forward
    as the first denoising step of the next frame. Clean queries must not see the noisy
    frame:
                         cache   clean  noisy
              clean q     x x x   x x
              noisy q     x x x   x x    x x
    """

    def __init__(self, cache: KVCache, commit: int = 0):
        self.cache = cache
        self.commit = commit

    def __call__(self, layer: int, q, k, v, k_pre=None):
        keys, values, bias = self.cache.stage(layer, k, v, k_pre if self.commit else None)
        out = staged_attention(q, keys, values, bias, self.commit, self.cache.static_shape)
        if self.commit:
            self.cache.commit(layer, self.commit)
        return out


def staged_attention(q, keys, values, bias, commit: int, static: bool = True) -> torch.Tensor:
    """Dense attention of a staged chunk over [cache | chunk]. When the chunk is
    [clean (commit tokens) | noisy], each query group sees a key prefix, so this runs two
    unmasked calls instead of one masked call. static: the cache's shapes repeat from
    frame to frame (`KVCache.static_shape`)."""
    m = q.shape[2]
    if not 0 < commit < m:
        return sdpa(q, keys, values, bias, static)
    seen = keys.shape[2] - (m - commit)
    if static and uses_matmul_attention(q):  # one pass per head, the noisy keys hidden from the clean queries
        return matmul_attention(q, keys, values, None if bias is None else bias.to(q.dtype), prefix=(commit, seen))
    clean = sdpa(q[:, :, :commit], keys[:, :, :seen], values[:, :, :seen], None if bias is None else bias[..., :seen],
                 static)
    noisy = sdpa(q[:, :, commit:], keys, values, bias, static)
    return torch.cat([clean, noisy], dim=2)


def teacher_forcing_mask_mod(num_frames: int, tokens_per_frame: int, device, memory: int = 0):
    """The teacher-forcing mask as a FlexAttention mask_mod, and the sequence length.

    With `memory` = M > 0 the sequence starts with M clean frames from further back in
    the same trajectory (m0..m{M-1}, in time order), what a long rollout keeps in its
    cache. They attend to each other block-causally; every later frame attends to all
    of them:
                  m0 m1 | c0 c1 | n1
            m0    x     |       |
            m1    x  x  |       |
            c0    x  x  | x     |
            c1    x  x  | x  x  |
            n1    x  x  | x     | x
    """
    n, f, m = tokens_per_frame, num_frames, memory
    tok = torch.arange((m + 2 * f - 1) * n, device=device)
    frame = tok // n
    kind = (frame >= m).long() + (frame >= m + f).long()  # 0 memory, 1 clean, 2 noisy
    # memory j -> j, clean frame i -> i, noisy target j -> j
    fidx = torch.where(kind == 0, frame, torch.where(kind == 1, frame - m, frame - m - f + 1))

    def mask_mod(b, h, q_idx, kv_idx):
        qk, kk = kind[q_idx], kind[kv_idx]
        qf, kf = fidx[q_idx], fidx[kv_idx]
        mem_k = kk == 0
        memory_q = mem_k & (kf <= qf)
        clean_q = mem_k | ((kk == 1) & (kf <= qf))
        noisy_q = mem_k | ((kk == 1) & (kf < qf)) | ((kk == 2) & (kf == qf))
        return torch.where(qk == 0, memory_q, torch.where(qk == 1, clean_q, noisy_q))

    return mask_mod, tok.numel()


class FlexSelfAttention:
    """Block-sparse training attention on GPUs (FlexAttention; used inside compiled blocks)."""

    def __init__(self, num_frames: int, tokens_per_frame: int, device, memory: int = 0):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        mask_mod, length = teacher_forcing_mask_mod(num_frames, tokens_per_frame, device, memory)
        self.block_mask = create_block_mask(mask_mod, None, None, length, length, device=device)
        self.flex = flex_attention

    def __call__(self, layer: int, q, k, v, k_pre=None):
        return self.flex(q, k, v, block_mask=self.block_mask)
