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
the chunk's keys first (at least one of them is visible to every query, so the running
maximum is finite from the first tile on), then the kept cache blocks in tiles of
`block_n` keys, with an online softmax in float32 (exp2, the log2(e) factor folded into
the scale and the bias). Keys, values and the bias are read in place through their strides
(the cache's buffers; only the last dimension must be contiguous).

Triton is optional, as for TempCache's kernels (runtime/merge_kernel.py): `available`
says whether the kernel can run on a tensor; under `TRITON_INTERPRET=1` it runs on the CPU,
which the tests use to check it against dense attention with the same mask.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from runtime.merge_kernel import INTERPRETED, triton

if triton is not None:
    import triton.language as tl

LOG2E = 1.4426950408889634
DEFAULT_TILES = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}


def available(t: Tensor) -> bool:
    """Can the kernel run on this tensor (CUDA with Triton, or Triton's CPU interpreter)?"""
    return triton is not None and (t.is_cuda or INTERPRETED)


if triton is not None:
    @triton.jit
    def _tile(q, acc, m_i, l_i, K, V, Bias, n0, offs_m, offs_d, skn, svn, sbn, qk_scale, kv_end, hide_q, hide_from,
              HAS_BIAS: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr):
        """One tile of BLOCK_N keys from key n0: the online-softmax update of (acc, m_i, l_i)."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            valid = offs_n < kv_end
            kt = tl.load(K + offs_n[None, :] * skn + offs_d[:, None], mask=valid[None, :], other=0.0)
            vt = tl.load(V + offs_n[:, None] * svn + offs_d[None, :], mask=valid[:, None], other=0.0)
        else:
            kt = tl.load(K + offs_n[None, :] * skn + offs_d[:, None])
            vt = tl.load(V + offs_n[:, None] * svn + offs_d[None, :])
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * qk_scale
        if HAS_BIAS:
            if MASKED:
                b = tl.load(Bias + offs_n * sbn, mask=valid, other=0.0)
            else:
                b = tl.load(Bias + offs_n * sbn)
            s = s + b.to(tl.float32)[None, :] * 1.4426950408889634
        if MASKED:
            see = valid[None, :] & ((offs_m[:, None] >= hide_q) | (offs_n[None, :] < hide_from))
            s = tl.where(see, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        return acc, m_new, l_i

    @triton.jit
    def _annsa_fwd(Q, K, V, Bias, Sel, Out,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sbb, sbh, sbn, ssb, ssh, ssq, sob, soh, som,
                   H, M, kept, chunk_start, kv_len, hide_q, hide_from, qk_scale,
                   HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, SEL_BLOCK: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        row_ok = offs_m < M
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        K += b * skb + h * skh
        V += b * svb + h * svh
        Bias += b * sbb + h * sbh
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        # the chunk (and the cache's ragged tail): a tile whose queries are all clean stops
        # where the noisy frame begins
        last_q = tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1
        kv_end = kv_len
        if last_q < hide_q:
            kv_end = tl.minimum(kv_len, hide_from)
        for n0 in range(chunk_start, kv_end, BLOCK_N):
            acc, m_i, l_i = _tile(q, acc, m_i, l_i, K, V, Bias, n0, offs_m, offs_d, skn, svn, sbn, qk_scale, kv_end,
                                  hide_q, hide_from, HAS_BIAS, True, IEEE, BLOCK_N)
        # the kept cache blocks of this query block, in tiles of BLOCK_N keys
        SUB: tl.constexpr = SEL_BLOCK // BLOCK_N
        sel = Sel + b * ssb + h * ssh + ((pid_m * BLOCK_M) // SEL_BLOCK) * ssq
        for t in range(0, kept * SUB):
            blk = tl.load(sel + t // SUB)
            n0 = blk * SEL_BLOCK + (t % SUB) * BLOCK_N
            acc, m_i, l_i = _tile(q, acc, m_i, l_i, K, V, Bias, n0, offs_m, offs_d, skn, svn, sbn, qk_scale, kv_end,
                                  hide_q, hide_from, HAS_BIAS, False, IEEE, BLOCK_N)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None])


def check_tiles(sel_block: int, block_m: int, block_n: int, head_dim: int) -> None:
    """The tile sizes the kernel can run with, or a ValueError naming the bad one."""
    for name, val in (("block_m", block_m), ("block_n", block_n), ("head_dim", head_dim)):
        if val < 16 or val & (val - 1):
            raise ValueError(f"AnnSA triton kernel: {name}={val} must be a power of two >= 16")
    if sel_block % block_m or sel_block % block_n:
        raise ValueError(f"AnnSA triton kernel: the selection block ({sel_block}) must be a multiple of "
                         f"block_m={block_m} and block_n={block_n}")


def annsa_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, sel: Tensor, cached: int, commit: int,
                    sel_block: int = 128, block_m: int = 128, block_n: int = 64, num_warps: int = 8,
                    num_stages: int = 3, scale: float | None = None) -> Tensor:
    """q (B, H, q_len, D); k, v (B, H, L, D) with L >= cached + q_len (the cache's buffer:
    only the first cached + q_len slots are read); bias None or (B, H, L) (any float dtype,
    read in place); sel (B, H, ceil(q_len / sel_block), kept) integer indices of the kept
    cache blocks, each below cached // sel_block. Returns (B, H, q_len, D) in q's dtype."""
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
        if bias.shape != (b, h, k.shape[2]) and (bias.shape[:2] != (b, h) or bias.shape[2] < kv_len):
            raise ValueError(f"bias {tuple(bias.shape)} must be (B, H, >= {kv_len})")
        bias_t, bstr = bias, bias.stride()
    hide_q, hide_from = (commit, cached + commit) if 0 < commit < m else (0, kv_len)
    scale = d ** -0.5 if scale is None else scale
    grid = (math.ceil(m / block_m), b * h)
    _annsa_fwd[grid](q, k, v, bias_t, sel, out, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *bstr,
                     *sel.stride()[:3], *out.stride()[:3], h, m, sel.shape[3], (cached // sel_block) * sel_block,
                     kv_len, hide_q, hide_from, scale * LOG2E, HAS_BIAS=bias is not None,
                     IEEE=q.dtype == torch.float32, D=d, BLOCK_M=block_m, BLOCK_N=block_n, SEL_BLOCK=sel_block,
                     num_warps=num_warps, num_stages=num_stages)
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
