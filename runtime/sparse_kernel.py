"""AnnSA's block-sparse attention as one Triton kernel (the `triton` kernel of runtime/sparse.py).

The call is the one `flex` makes (runtime/flex_sparse.py): a chunk of `q_len` queries over
[cache | chunk] keys laid out in the cache's buffer, `cached` cached tokens then the chunk,
`kv_len = cached + q_len` valid keys. Keys are cut into selection blocks of `sel_block`
slots; per query block of `sel_block` queries, `sel` names the kept cache blocks (indices
below `cached // sel_block`). Each query attends to

    its kept cache blocks               no mask: every slot of them is a cached token
    every key from the chunk's block    `(cached // sel_block) * sel_block` up to kv_len (the
                                        cache's ragged tail travels with the chunk), except
                                        that in the merged pass (0 < commit < q_len) the
                                        first `commit` queries (the clean frame) do not see
                                        the last q_len - commit keys (the noisy frame)

with an optional per-key bias (TempCache's log counts; -inf on empty slots) added to the
scaled logits. This is the set FlexAttention computes from the same selection, without a
BlockMask: the block lists are `sel` itself, read inside the kernel, so the selection is
the only work around the kernel.

The kernel is a FlashAttention-style forward: one program per (query tile, batch x head),
the chunk's keys first (those that need no mask, then the ragged or partly hidden ones),
then the kept cache blocks, in tiles of `block_n` keys, with an online softmax in float32
(exp2, the log2(e) factor folded into the scale and the bias). With `splits` > 1 a query
tile's list of key tiles is cut into that many programs, each writing a float32 partial
result and its log-sum-exp, which a second kernel combines: at the Wan shape one program
per query tile leaves the last of about four waves a third full on an H100's 132
multiprocessors (`auto_splits` picks the count). Keys, values and the bias are read in
place through their strides (the cache's buffers; only the last dimension must be
contiguous).

Triton is optional, as for TempCache's kernels (runtime/merge_kernel.py): `available`
says whether the kernel can run on a tensor; under `TRITON_INTERPRET=1` it runs on the CPU,
which the tests use to check it against dense attention with the same mask.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import Tensor

from runtime.merge_kernel import INTERPRETED, triton

if triton is not None:
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
else:  # pragma: no cover - depends on the installation
    OutOfResources = RuntimeError

LOG2E = 1.4426950408889634
# 128 x 128 tiles, 8 warps, 3 stages, heads outermost: among the fastest choices timed on an
# H100 (BENCHMARKS.md)
DEFAULT_TILES = {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3, "heads_outer": True}


def available(t: Tensor) -> bool:
    """Can the kernel run on this tensor (CUDA with Triton, or Triton's CPU interpreter)?"""
    return triton is not None and (t.is_cuda or INTERPRETED)


if triton is not None:
    @triton.jit
    def _tile(q, acc, m_i, l_i, K, V, Bias, n0, offs_m, offs_d, skn, svn, sbn, qk_scale, kv_end, hide_q, hide_from,
              HAS_BIAS: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
              TMA: tl.constexpr, KD, VD):
        """One tile of BLOCK_N keys from key n0: the online-softmax update of (acc, m_i, l_i).
        With TMA the keys and values come through tensor descriptors KD, VD (rows past the
        valid keys read as zeros; their scores are masked below)."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            valid = offs_n < kv_end
        if TMA:
            kt = KD.load([n0, 0]).T
            vt = VD.load([n0, 0])
        elif MASKED:
            kt = tl.load(K + offs_n[None, :] * skn + offs_d[:, None], mask=valid[None, :], other=0.0)
            vt = tl.load(V + offs_n[:, None] * svn + offs_d[None, :], mask=valid[:, None], other=0.0)
        else:
            kt = tl.load(K + offs_n[None, :] * skn + offs_d[:, None])
            vt = tl.load(V + offs_n[:, None] * svn + offs_d[None, :])
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        if HAS_BIAS:
            if MASKED:
                b = tl.load(Bias + offs_n * sbn, mask=valid, other=0.0)
            else:
                b = tl.load(Bias + offs_n * sbn)
            s = s * qk_scale + b.to(tl.float32)[None, :] * 1.4426950408889634
        if MASKED:
            see = valid[None, :] & ((offs_m[:, None] >= hide_q) | (offs_n[None, :] < hide_from))
            s = tl.where(see, s, float("-inf"))
        if HAS_BIAS:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
        else:  # the scale applied inside the exponent: one fused multiply-add per score
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]  # rescaled, then accumulated into by the product itself
        if IEEE:
            acc = tl.dot(p.to(vt.dtype), vt, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(vt.dtype), vt, acc)
        return acc, m_new, l_i

    @triton.jit
    def _annsa_fwd(Q, K, V, Bias, Sel, Out, Part, Lse,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sbb, sbh, sbn, ssb, ssh, ssq, sob, soh, som,
                   H, M, BH, kept, chunk_start, kv_len, hide_q, hide_from, qk_scale, per_split,
                   HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr, D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEL_BLOCK: tl.constexpr, TMA: tl.constexpr,
                   HEADS_OUTER: tl.constexpr):
        if HEADS_OUTER:  # splits, then query tiles, then heads: programs running together share a head's keys
            pid_s = tl.program_id(0)
            pid_m = tl.program_id(1)
            pid_bh = tl.program_id(2)
        else:
            pid_m = tl.program_id(0)
            pid_bh = tl.program_id(1)
            pid_s = tl.program_id(2)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        row_ok = offs_m < M
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        K += b * skb + h * skh
        V += b * svb + h * svh
        Bias += b * sbb + h * sbh
        KD = K
        VD = V
        if TMA:
            KD = tl.make_tensor_descriptor(K, shape=[kv_len, D], strides=[skn, 1], block_shape=[BLOCK_N, D])
            VD = tl.make_tensor_descriptor(V, shape=[kv_len, D], strides=[svn, 1], block_shape=[BLOCK_N, D])
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        # the tiles of this query tile, in order: the chunk's (with the cache's ragged tail;
        # a tile whose queries are all clean stops where the noisy frame begins), then the
        # kept cache blocks' in tiles of BLOCK_N keys. Split `pid_s` takes tiles
        # [pid_s * per_split, (pid_s + 1) * per_split) of that list.
        last_q = tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1
        kv_end = kv_len
        if last_q < hide_q:
            kv_end = tl.minimum(kv_len, hide_from)
        n_chunk = tl.cdiv(kv_end - chunk_start, BLOCK_N)
        SUB: tl.constexpr = SEL_BLOCK // BLOCK_N
        lo = pid_s * per_split
        hi = tl.minimum(lo + per_split, n_chunk + kept * SUB)
        # chunk tiles that need no mask come first: all but the ragged last one, and in a tile
        # of clean and noisy queries those before the noisy frame
        safe_end = kv_end
        if (pid_m * BLOCK_M < hide_q) & (last_q >= hide_q):
            safe_end = tl.minimum(kv_end, hide_from)
        n_safe = (safe_end - chunk_start) // BLOCK_N
        for t in range(lo, tl.minimum(hi, n_safe)):
            acc, m_i, l_i = _tile(q, acc, m_i, l_i, K, V, Bias, chunk_start + t * BLOCK_N, offs_m, offs_d, skn, svn,
                                  sbn, qk_scale, kv_end, hide_q, hide_from, HAS_BIAS, False, IEEE, BLOCK_N, TMA, KD, VD)
        for t in range(tl.maximum(lo, n_safe), tl.minimum(hi, n_chunk)):
            acc, m_i, l_i = _tile(q, acc, m_i, l_i, K, V, Bias, chunk_start + t * BLOCK_N, offs_m, offs_d, skn, svn,
                                  sbn, qk_scale, kv_end, hide_q, hide_from, HAS_BIAS, True, IEEE, BLOCK_N, TMA, KD, VD)
        sel = Sel + b * ssb + h * ssh + ((pid_m * BLOCK_M) // SEL_BLOCK) * ssq
        for t in range(tl.maximum(lo, n_chunk) - n_chunk, hi - n_chunk):
            blk = tl.load(sel + t // SUB)
            n0 = blk * SEL_BLOCK + (t % SUB) * BLOCK_N
            acc, m_i, l_i = _tile(q, acc, m_i, l_i, K, V, Bias, n0, offs_m, offs_d, skn, svn, sbn, qk_scale, kv_end,
                                  hide_q, hide_from, HAS_BIAS, False, IEEE, BLOCK_N, TMA, KD, VD)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        if SPLIT:  # a partial result and its log2-sum-exp2, combined by _annsa_combine
            row = (pid_s * BH + pid_bh) * M + offs_m
            tl.store(Part + row[:, None] * D + offs_d[None, :], out, mask=row_ok[:, None])
            tl.store(Lse + row, m_i + tl.math.log2(l_i), mask=row_ok)
        else:
            tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :],
                     out.to(Out.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _annsa_combine(Part, Lse, Out, sob, soh, som, H, M, BH, S: tl.constexpr, D: tl.constexpr,
                       BLOCK_M: tl.constexpr):
        """out = sum_s 2^(lse_s - lse) part_s over the splits (a split that saw no key has
        lse = -inf and weight 0)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        row_ok = offs_m < M
        top = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for s in tl.static_range(S):
            top = tl.maximum(top, tl.load(Lse + (s * BH + pid_bh) * M + offs_m, mask=row_ok, other=float("-inf")))
        top = tl.where(top == float("-inf"), 0.0, top)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        wsum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for s in tl.static_range(S):
            row = (s * BH + pid_bh) * M + offs_m
            w = tl.math.exp2(tl.load(Lse + row, mask=row_ok, other=float("-inf")) - top)
            acc += w[:, None] * tl.load(Part + row[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            wsum += w
        out = acc / tl.where(wsum == 0.0, 1.0, wsum)[:, None]
        b = pid_bh // H
        h = pid_bh % H
        tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None])


def _descriptor_scratch() -> None:
    """Tensor descriptors made inside a kernel need global scratch memory from Triton's
    allocator: torch allocations on the kernel's device (inside a CUDA graph capture they
    come from the graph's pool)."""
    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")

    triton.set_allocator(alloc)


_FITTED: dict = {}  # (device, dtype, head dim, asked tiles) -> (block_n, num_stages) that fit the GPU


def _smaller_tiles(block_n: int, num_stages: int) -> tuple[int, int] | None:
    """The next tile choice to try when shared memory runs out: one pipeline stage fewer
    (down to 2), then half the keys per tile (down to 32) at 3 stages; None when none is left."""
    if num_stages > 2:
        return block_n, num_stages - 1
    if block_n > 32:
        return block_n // 2, 3
    return None


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def auto_splits(programs: int, tiles: int, device: torch.device, max_splits: int = 4) -> int:
    """Key splits per query tile so that the programs fill the GPU's multiprocessors in
    whole waves (one program per multiprocessor at the default tiles): the split count with
    the best wave efficiency, each extra split charged 3% for its partial results, and at
    least 8 key tiles per split."""
    if device.type != "cuda":
        return 1
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())

    def score(s):
        waves = programs * s / sms
        return waves / math.ceil(waves) - 0.03 * (s - 1)

    options = [s for s in range(1, max_splits + 1) if s == 1 or tiles / s >= 8]
    return max(options, key=score)


def check_tiles(sel_block: int, block_m: int, block_n: int, head_dim: int) -> None:
    """The tile sizes the kernel can run with, or a ValueError naming the bad one."""
    for name, val in (("block_m", block_m), ("block_n", block_n), ("head_dim", head_dim)):
        if val < 16 or val & (val - 1):
            raise ValueError(f"AnnSA triton kernel: {name}={val} must be a power of two >= 16")
    if sel_block % block_m or sel_block % block_n:
        raise ValueError(f"AnnSA triton kernel: the selection block ({sel_block}) must be a multiple of "
                         f"block_m={block_m} and block_n={block_n}")


def annsa_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, sel: Tensor, cached: int, commit: int,
                    sel_block: int = 128, block_m: int = 128, block_n: int = 128, num_warps: int = 8,
                    num_stages: int = 3, splits: int | None = None, tma: bool = False, heads_outer: bool = True,
                    scale: float | None = None) -> Tensor:
    """q (B, H, q_len, D); k, v (B, H, L, D) with L >= cached + q_len (the cache's buffer:
    only the first cached + q_len slots are read); bias None or (B, H, L) (any float dtype,
    read in place); sel (B, H, ceil(q_len / sel_block), kept) integer indices of the kept
    cache blocks, each below cached // sel_block. `splits` cuts each query tile's key tiles
    into that many programs whose partial results are then combined (None: `auto_splits`).
    `tma`: keys and values through tensor descriptors (Hopper's TMA unit; needs the rows'
    strides in 16-byte multiples). `heads_outer`: programs launched splits first, then query
    tiles, then heads, so that those running at once read the same head's keys (fewer heads'
    caches in L2 at a time). Returns (B, H, q_len, D) in q's dtype."""
    b, h, m, d = q.shape
    kv_len = cached + m
    if k.shape[:2] != (b, h) or v.shape[:2] != (b, h) or k.shape[3] != d or v.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not match")
    if k.shape[2] < kv_len or v.shape[2] < kv_len:
        raise ValueError(f"keys hold {k.shape[2]} slots, fewer than cached + q_len = {kv_len}")
    check_tiles(sel_block, block_m, block_n, d)
    nqb = math.ceil(m / sel_block)
    if sel.dim() != 4 or sel.shape[:3] != (b, h, nqb):
        raise ValueError(f"sel {tuple(sel.shape)} must be (B, H, {nqb}, kept) for {m} queries in blocks of "
                         f"{sel_block}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(3) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, strides {t.stride()}")
    sel = sel.to(torch.int32).contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if bias is None:
        bias_t, bstr = q, (0, 0, 0)  # never read
    else:
        if bias.shape[:2] != (b, h) or bias.shape[2] < kv_len:
            raise ValueError(f"bias {tuple(bias.shape)} must be (B, H, >= {kv_len})")
        bias_t, bstr = bias, bias.stride()
    hide_q, hide_from = (commit, cached + commit) if 0 < commit < m else (0, kv_len)
    scale = d ** -0.5 if scale is None else scale
    if splits is not None and splits < 1:
        raise ValueError(f"AnnSA triton kernel: splits={splits} must be >= 1")
    chunk_start = (cached // sel_block) * sel_block
    if tma:
        _descriptor_scratch()
    key = (str(q.device), q.dtype, d, block_m, block_n, num_warps, num_stages)
    block_n, num_stages = _FITTED.get(key, (block_n, num_stages))
    while True:
        n_tiles = math.ceil((kv_len - chunk_start) / block_n) + sel.shape[3] * (sel_block // block_n)
        grid_m = math.ceil(m / block_m)
        n_splits = auto_splits(grid_m * b * h, n_tiles, q.device) if splits is None else splits
        part = lse = out
        if n_splits > 1:
            part = torch.empty(n_splits, b * h, m, d, device=q.device, dtype=torch.float32)
            lse = torch.empty(n_splits, b * h, m, device=q.device, dtype=torch.float32)
        grid = (n_splits, grid_m, b * h) if heads_outer else (grid_m, b * h, n_splits)
        try:
            _annsa_fwd[grid](
                q, k, v, bias_t, sel, out, part, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *bstr,
                *sel.stride()[:3], *out.stride()[:3], h, m, b * h, sel.shape[3], chunk_start, kv_len, hide_q,
                hide_from, scale * LOG2E, math.ceil(n_tiles / n_splits), HAS_BIAS=bias is not None,
                IEEE=q.dtype == torch.float32, SPLIT=n_splits > 1, D=d, BLOCK_M=block_m, BLOCK_N=block_n,
                SEL_BLOCK=sel_block, TMA=bool(tma), HEADS_OUTER=bool(heads_outer), num_warps=num_warps,
                num_stages=num_stages)
            break
        except OutOfResources as err:  # a GPU with less shared memory than an H100: smaller tiles
            smaller = _smaller_tiles(block_n, num_stages)
            if smaller is None:
                raise
            warnings.warn(f"AnnSA triton kernel: block_n={block_n}, num_stages={num_stages} do not fit this GPU "
                          f"({err}); using block_n={smaller[0]}, num_stages={smaller[1]}", RuntimeWarning,
                          stacklevel=2)
            block_n, num_stages = _FITTED[key] = smaller
    if n_splits > 1:
        _annsa_combine[(math.ceil(m / 64), b * h)](part, lse, out, *out.stride()[:3], h, m, b * h, S=n_splits, D=d,
                                                   BLOCK_M=64, num_warps=4)
    return out


def reference_mask(q_len: int, sel: Tensor, cached: int, commit: int, sel_block: int) -> Tensor:
    """(B, H, q_len, cached + q_len) bool: the pairs `annsa_attention` computes."""
    b, h, nqb, _ = sel.shape
    kv_len = cached + q_len
    nsel = cached // sel_block
    blocks = torch.zeros(b, h, nqb, nsel, dtype=torch.bool, device=sel.device).scatter_(-1, sel.long(), True)
    cache_part = blocks.repeat_interleave(sel_block, 2)[:, :, :q_len].repeat_interleave(sel_block, 3)
    mask = torch.ones(b, h, q_len, kv_len, dtype=torch.bool, device=sel.device)
    mask[..., : nsel * sel_block] = cache_part
    if 0 < commit < q_len:
        mask[:, :, :commit, cached + commit:] = False
    return mask
