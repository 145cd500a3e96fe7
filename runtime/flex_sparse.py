"""Block-sparse attention of a chunk over [cache | chunk] with FlexAttention (the GPU path of AnnSA).

Keys are laid out as the caches stage them: `cached` tokens, then the chunk's `q_len`
tokens, `kv_len = cached + q_len` valid keys in all, inside a buffer of `buf_len` slots
(the cache's whole per-layer buffer, so that shapes stay static while the cache fills
up). Keys are cut into blocks of `kv_block` slots, queries into blocks of `q_block`.

Per query block the kernel visits

    full blocks     the selected cache blocks (block index < cached // kv_block) and the
                    chunk blocks that need no masking: no mask_mod is evaluated there
    partial blocks  the chunk blocks that need one: the ragged block at kv_len, and in the
                    merged pass (0 < commit < q_len) the blocks where the first `commit`
                    queries (the clean frame) must not see the last q_len - commit keys
                    (the noisy frame)

and nothing else: unselected cache blocks are skipped. The cache tokens of the ragged
block before the chunk (cached % kv_block of them) travel with the chunk and are always
kept. The mask_mod states the same set element by element (a per-block table of the
selection, the valid length and the merged-pass rule), so the uncompiled reference
(which ignores block lists and only applies mask_mod) computes the same thing; tests
check that the block lists and the mask_mod agree.

A per-key bias (TempCache's log counts, -inf on empty slots) enters through a score_mod
that adds bias[b, h, kv]; the bias is passed in the query dtype, like the dense path's
SDPA bias, so both paths round log counts the same way.

Compilation: `torch.compile(dynamic=False, fullgraph=True)` of one function that builds
the BlockMask (from_kv_blocks, compute_q_blocks=False) and calls flex_attention. Each new
input signature (shapes, strides, dtypes, bias or not, block sizes, kernel options) is one
compile; they are counted per process and more than `max_compiles` raises instead of
letting dynamo fall back silently to the unfused path. Uncompiled flex on CUDA is refused
(it silently materializes the whole score matrix); on CPU it is allowed for tests.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

_SIGNATURES: set = set()  # distinct compiled signatures of `_attend` in this process
_COMPILED = None
_UNEXPECTED_WARNED = False


def _attend(q, k, v, bias, table, lims, kv_num, kv_idx, full_num, full_idx, q_block: int, kv_block: int,
            kernel_options):
    """flex_attention over the block lists. Everything that changes between calls is a
    tensor argument: the mods are created here, inside the compiled region."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        chosen = table[b, h, q_idx // q_block, kv_idx // kv_block]
        return chosen & (kv_idx < lims[0]) & ((q_idx >= lims[1]) | (kv_idx < lims[2]))

    score_mod = None
    if bias is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, h, kv_idx]

    block_mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(q_block, kv_block),
                                          mask_mod=mask_mod, seq_lengths=(q.shape[2], k.shape[2]),
                                          compute_q_blocks=False)
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options=kernel_options)


def _compiled():
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_attend, dynamic=False, fullgraph=True)
    return _COMPILED


def _limit_name() -> str | None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            return name
    return None


def _cache_entries() -> int | None:
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        return len(_debug_get_cache_entry_list(_attend.__code__))
    except Exception:  # private API: the check is best effort
        return None


def compiled_signatures() -> int:
    """How many distinct signatures the compiled kernel has been called with."""
    return len(_SIGNATURES)


@dataclass
class ChunkLayout:
    """What does not depend on the selection: the chunk's blocks per query block, the
    per-block table with the chunk blocks set, and the mask_mod limits. Static for a
    given (shape, commit, cached, kv_len, buf_len), so it is built once and reused."""

    num_sel: int  # selectable cache blocks: cached // kv_block
    width: int  # ceil(buf_len / kv_block): the static last dim of every block list
    full_idx: Tensor  # (B, H, nQB, W) int32 chunk full blocks, padded
    full_num: Tensor  # (nQB,) int32
    part_idx: Tensor  # (B, H, nQB, W) int32 partial blocks, padded
    part_num: Tensor  # (B, H, nQB) int32
    table: Tensor  # (B, H, nQB, W) bool, True on chunk blocks
    lims: Tensor  # (3,) int32: kv_len, hide_q, hide_from


@dataclass
class BlockPlan:
    """The block lists of one call (inputs of `FlexBlockSparse.__call__`)."""

    kv_num: Tensor
    kv_idx: Tensor
    full_num: Tensor
    full_idx: Tensor
    table: Tensor
    lims: Tensor
    q_len: int
    kv_len: int
    buf_len: int
    kept_blocks: int  # selected cache blocks per query block


def chunk_layout(batch: int, heads: int, q_len: int, commit: int, cached: int, kv_len: int, buf_len: int,
                 q_block: int, kv_block: int, device) -> ChunkLayout:
    if kv_len != cached + q_len or kv_len > buf_len:
        raise ValueError(f"bad lengths: cached={cached}, q_len={q_len}, kv_len={kv_len}, buf_len={buf_len}")
    nqb = math.ceil(q_len / q_block)
    width = math.ceil(buf_len / kv_block)
    nsel = cached // kv_block
    last = math.ceil(kv_len / kv_block)  # chunk blocks: [nsel, last)
    hide_q, hide_from = (commit, cached + commit) if 0 < commit < q_len else (0, kv_len)
    full = torch.zeros(nqb, width, dtype=torch.int32)
    part = torch.zeros(nqb, width, dtype=torch.int32)
    full_num = torch.zeros(nqb, dtype=torch.int32)
    part_num = torch.zeros(nqb, dtype=torch.int32)
    for i in range(nqb):
        qlo, qhi = i * q_block, min((i + 1) * q_block, q_len)
        for j in range(nsel, last):
            klo, khi = j * kv_block, (j + 1) * kv_block
            if not (klo < kv_len and (qhi > hide_q or klo < hide_from)):
                continue  # nothing visible in this tile: skipped
            if khi <= kv_len and (qlo >= hide_q or khi <= hide_from):
                full[i, full_num[i]] = j
                full_num[i] += 1
            else:
                part[i, part_num[i]] = j
                part_num[i] += 1
    table = torch.zeros(nqb, width, dtype=torch.bool)
    table[:, nsel:] = True
    expand = (batch, heads, nqb, width)
    return ChunkLayout(
        num_sel=nsel, width=width,
        full_idx=full.to(device)[None, None].expand(expand).contiguous(),
        full_num=full_num.to(device),
        part_idx=part.to(device)[None, None].expand(expand).contiguous(),
        part_num=part_num.to(device)[None, None].expand(batch, heads, nqb).contiguous(),
        table=table.to(device)[None, None].expand(expand).contiguous(),
        lims=torch.tensor([kv_len, hide_q, hide_from], dtype=torch.int32, device=device))


class FlexBlockSparse:
    """Block-sparse FlexAttention over [cache | chunk] from selected cache block indices."""

    def __init__(self, q_block: int = 128, kv_block: int = 128, compile: bool = True,
                 kernel_options: dict | None = None, max_compiles: int = 16, layouts: int = 16):
        if q_block < 1 or kv_block < 1:
            raise ValueError(f"flex block sizes must be >= 1, got {q_block}, {kv_block}")
        self.q_block, self.kv_block = q_block, kv_block
        self.compile = compile
        self.kernel_options = dict(kernel_options) if kernel_options else None
        self.max_compiles = max_compiles
        self._layouts: dict[tuple, ChunkLayout] = {}
        self._max_layouts = layouts

    def layout(self, batch, heads, q_len, commit, cached, kv_len, buf_len, device) -> ChunkLayout:
        key = (batch, heads, q_len, commit, cached, kv_len, buf_len, str(device))
        lay = self._layouts.get(key)
        if lay is None:
            if len(self._layouts) >= self._max_layouts:  # a growing cache: forget the oldest
                self._layouts.pop(next(iter(self._layouts)))
            lay = chunk_layout(batch, heads, q_len, commit, cached, kv_len, buf_len, self.q_block, self.kv_block,
                               device)
            self._layouts[key] = lay
        return lay

    def plan(self, sel: Tensor, q_len: int, commit: int, cached: int, kv_len: int, buf_len: int) -> BlockPlan:
        """sel (B, H, nQB, K): selected cache block indices (< cached // kv_block) per
        query block, K the same for every query block (static shapes)."""
        b, h, nqb, kept = sel.shape
        lay = self.layout(b, h, q_len, commit, cached, kv_len, buf_len, sel.device)
        if nqb != lay.table.shape[2]:
            raise ValueError(f"selection has {nqb} query blocks, expected {lay.table.shape[2]}")
        sel = sel.sort(dim=-1).values.to(torch.int32)  # ascending: friendlier memory order
        full_idx = lay.full_idx.clone()
        # [selected cache blocks | chunk full blocks | padding]
        full_idx[..., kept:] = lay.full_idx[..., : lay.width - kept]
        full_idx[..., :kept] = sel
        full_num = (lay.full_num + kept).expand(b, h, nqb).contiguous()
        table = lay.table.clone().scatter_(-1, sel.long(), True)
        return BlockPlan(lay.part_num, lay.part_idx, full_num, full_idx, table, lay.lims, q_len, kv_len, buf_len,
                         kept)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, plan: BlockPlan) -> Tensor:
        """q (B, H, q_len, D); k, v (B, H, buf_len, D) (valid up to plan.kv_len); bias None
        or (B, H, buf_len) in q's dtype (values past kv_len are never used)."""
        if k.shape[2] != plan.buf_len or q.shape[2] != plan.q_len:
            raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)} do not match the plan "
                             f"(q_len={plan.q_len}, buf_len={plan.buf_len})")
        args = (q, k, v, bias, plan.table, plan.lims, plan.kv_num, plan.kv_idx, plan.full_num, plan.full_idx,
                self.q_block, self.kv_block, self.kernel_options)
        if not self.compile:
            if q.is_cuda:
                raise ValueError("uncompiled flex_attention on CUDA silently runs an unfused path that "
                                 "materializes every score; use compile=True")
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
                return _attend(*args)
        return self._call_compiled(args)

    def _call_compiled(self, args):
        global _UNEXPECTED_WARNED
        q, k, v, bias = args[:4]
        sig = (tuple(q.shape), q.stride(), q.dtype, str(q.device), tuple(k.shape), k.stride(), v.stride(), k.dtype,
               None if bias is None else (tuple(bias.shape), bias.stride(), bias.dtype), tuple(args[9].shape),
               self.q_block, self.kv_block, tuple(sorted((self.kernel_options or {}).items())))
        fn = _compiled()
        if sig in _SIGNATURES:
            out = fn(*args)
        else:
            if len(_SIGNATURES) >= self.max_compiles:
                raise RuntimeError(
                    f"the block-sparse flex kernel would compile for signature number {len(_SIGNATURES) + 1} "
                    f"(limit {self.max_compiles}; new signature {sig}). Compiled flex falls back silently to "
                    f"a slow path after repeated recompiles: keep shapes static (a fixed-capacity cache such "
                    f"as tempcache or window) or raise attention.flex_max_compiles.")
            _SIGNATURES.add(sig)
            name = _limit_name()
            patch = {name: max(getattr(torch._dynamo.config, name), self.max_compiles + 1)} if name else {}
            with torch._dynamo.config.patch(**patch):
                out = fn(*args)
        entries = _cache_entries()
        if entries is not None and entries > len(_SIGNATURES) and not _UNEXPECTED_WARNED:
            _UNEXPECTED_WARNED = True
            warnings.warn(f"the block-sparse flex kernel recompiled for a known signature ({entries} compiled "
                          f"versions for {len(_SIGNATURES)} signatures): some input changes a dynamo guard; "
                          f"watch for slow steps", RuntimeWarning, stacklevel=3)
        return out


def plan_dense_mask(plan: BlockPlan, q_block: int, kv_block: int) -> Tensor:
    """(B, H, q_len, kv_len) bool: the pairs the kernel computes, from the block lists the
    way the kernel reads them (full blocks entirely, partial blocks through the mask_mod)."""
    b, h, nqb, w = plan.table.shape

    def listed(idx, num):
        pos = torch.arange(w, device=idx.device)
        slot = torch.where(pos < num[..., None].long(), idx.long(), w)
        return torch.zeros(b, h, nqb, w + 1, dtype=torch.bool, device=idx.device).scatter_(-1, slot, True)[..., :w]

    def elements(blocks):  # (B, H, nQB, W) -> (B, H, q_len, kv_len)
        e = blocks.repeat_interleave(q_block, 2).repeat_interleave(kv_block, 3)
        return e[:, :, : plan.q_len, : plan.kv_len]

    full = elements(listed(plan.full_idx, plan.full_num))
    part = elements(listed(plan.kv_idx, plan.kv_num))
    qi = torch.arange(plan.q_len, device=full.device)[:, None]
    ki = torch.arange(plan.kv_len, device=full.device)[None, :]
    lims = plan.lims.long()
    mod = elements(plan.table) & (ki < lims[0]) & ((qi >= lims[1]) | (ki < lims[2]))
    return full | (part & mod)


def mask_mod_dense(plan: BlockPlan, q_block: int, kv_block: int) -> Tensor:
    """(B, H, q_len, kv_len) bool: the mask_mod's own answer for every pair."""
    qi = torch.arange(plan.q_len, device=plan.table.device)
    ki = torch.arange(plan.kv_len, device=plan.table.device)
    t = plan.table[:, :, qi // q_block][:, :, :, ki // kv_block]
    lims = plan.lims.long()
    return t & (ki[None, :] < lims[0]) & ((qi[:, None] >= lims[1]) | (ki[None, :] < lims[2]))
