"""The attention runtime: cache policy + AnnSA + AnnCA, chosen once from `attention=NAME`.

    dense      every cached frame (the reference; grows without bound)
    window     sink frames + recent frames (runtime/cache.py)
    tempcache  merged near-duplicate keys under a hard budget (runtime/tempcache.py)
    annsa      sparse self-attention: each query block attends to the key blocks the ANN
               ranks highest (plus sinks, recent frames and the current chunk)
    annca      sparse cross-attention: per frame, only the prompt tokens some query of
               the frame lands near (plus exact merging of identical prompt tokens)
    fastar     tempcache + annsa + annca

AnnSA, per query block of `block` tokens over the cached tokens (blocks of `block` slots):

    scores = block scores(q, cached keys)             cheap relevance per block pair (ann | pooled)
    scores[sink and recent blocks] = +inf             always kept
    scores[blocks with no valid slot] = -inf          empty TempCache slots
    keep the top ceil(density * num_blocks) blocks, gather them, and attend over
    [kept blocks | the current chunk] with the cache's log-count bias

Sparsity is skipped (dense) for the first floor(dense_fraction * steps) denoising steps,
whenever the kept fraction would exceed `max_density`, and while fewer than `min_blocks`
blocks are cached (below that the selection costs more than it saves; docs/attention.md).

Three kernels (`kernel`; auto = triton on CUDA, gather elsewhere) and two block scorers
(`select`; auto = pooled with triton and flex, ann with gather), so the CPU keeps the
gather path and the ANN scores:

    gather  copy the kept blocks of every query block next to the chunk and run SDPA
            (blocks of `block` tokens; needs cached and chunk lengths divisible by it)
    flex    block-sparse FlexAttention (runtime/flex_sparse.py) straight over the cache's
            buffer: per query block of `flex_block` queries, the kept cache blocks of
            `flex_block` keys plus every block of the current chunk, built with
            BlockMask.from_kv_blocks (no q-side lists); the log-count bias is a score_mod,
            the merged pass (clean queries must not see the noisy frame) and the valid
            length a mask_mod on the chunk's blocks only. Compiled once per static shape
            (fixed-capacity caches keep shapes static; a growing dense cache recompiles
            when it doubles); uncompiled flex on CUDA and more than `flex_max_compiles`
            signatures are errors, never a silent slow path. `flex_options` are
            flex_attention kernel_options (e.g. {USE_TMA: true}).
    triton  the same set of keys as flex in one Triton kernel (runtime/sparse_kernel.py)
            that reads the selected block indices itself: no block mask to build, no
            compile per shape, the log-count bias read in place; tiles from
            `triton_tiles`. Faster than flex at the Wan shape (BENCHMARKS.md).
    ann     the ANN backend's `block_scores` (scores every query-key pair, then pools)
    pooled  mean-pooled query blocks against mean-pooled key blocks plus the block's log
            count (runtime/ann.py, pooled_block_scores): the exact mean logit of each
            block pair at 1/(block^2) of the cost, what makes selection cheap on a GPU

Every kernel is exact when every block is kept, and they keep the same blocks for the same
scores (tests/test_attention.py, tests/test_flex_sparse.py, tests/test_sparse_kernel.py).

Statistics per module and layer: density (fraction of query-key pairs computed), and
with `stats_recall: true` recall (fraction of the dense softmax mass on kept keys).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from runtime import sparse_kernel
from runtime.ann import build_ann, mass_recall, pooled_block_scores
from runtime.attention import CachedSelfAttention, merge_mask, sdpa, staged_attention
from runtime.cache import CacheSpec, DenseCache, KVCache, WindowCache, take_rows
from runtime.configs import strict_dataclass
from runtime.flex_sparse import FlexBlockSparse, plan_dense_mask
from runtime.sparse_kernel import annsa_attention, reference_mask
from runtime.tempcache import FILLS, MATCH_DTYPES, HistoryProbe, TempCache

POLICIES = ("dense", "window", "tempcache")
KERNELS = ("auto", "flex", "gather", "triton")
TRITON_TILE_KEYS = ("block_m", "block_n", "num_warps", "num_stages", "splits", "tma", "heads_outer")
SELECTS = ("auto", "ann", "pooled")


@dataclass
class AttentionConfig:
    name: str = "dense"
    policy: str = "dense"
    initial_frames: int = 64        # dense: first capacity (then doubled)
    sink_frames: int = 1            # window / tempcache
    window_frames: int = 15         # window
    budget_frames: int = 16         # tempcache: hard budget in frames of tokens
    threshold: float = 0.95         # tempcache: cosine similarity to merge
    match: str = "post"             # tempcache: post | pre | local (pre-RoPE within match_radius patches)
    match_radius: int = 1           # tempcache, match=local: patches of screen distance
    match_frames: int = 0           # tempcache, match=post|pre: search only groups updated this many commits ago (0: all)
    merge_target: float | None = None  # tempcache: merge this fraction of each frame's tokens regardless of
                                       # similarity (benchmarks of random-weight models); null: threshold
    merge_when: str = "always"      # tempcache: always | full (append without merging while there is room)
    fill: str = "auto"              # tempcache, merge_when=full: attention while the budget fills: prefix (the
                                    # filled prefix, no bias) | budget (the whole budget, static shape) | auto
    match_dtype: str = "auto"       # tempcache: stored match keys in the cache's dtype (cache) | float32 | auto
                                    # (cache on CUDA, float32 elsewhere)
    representative: str = "recent"  # tempcache: newest key, or the mean key
    merge_ann: str = "exact"        # tempcache: ANN backend for the top-1 correspondence
    annsa: bool = False
    annca: bool = False
    ann: str = "quant"              # AnnSA / AnnCA backend: exact | lsh | quant | faiss
    ann_options: dict = field(default_factory=dict)
    block: int = 64                 # AnnSA block size (tokens)
    density: float = 0.5            # AnnSA: fraction of cached blocks kept
    recent_frames: int = 2          # AnnSA: always keep the most recent frames
    dense_fraction: float = 0.3     # AnnSA: dense for the first floor(fraction * steps) steps
    max_density: float = 0.9        # AnnSA: above this kept fraction, run dense
    min_blocks: int = 64            # AnnSA: with fewer cache blocks in the attention span, run dense (selection
                                    # costs more); with fill=budget the span is the whole budget from the start
    annca_min_tokens: int = 0       # AnnCA: with fewer (distinct) prompt tokens, run dense
    stats_recall: bool = False      # measure attention recall (costs a dense pass)
    kernel: str = "auto"            # AnnSA kernel: triton (runtime/sparse_kernel.py) | flex (block-sparse
                                    # FlexAttention) | gather | auto (triton on CUDA, gather elsewhere)
    select: str = "auto"            # AnnSA block scores: pooled (mean-pooled blocks) | ann (the ANN's
                                    # block_scores) | auto (pooled with triton and flex, ann with gather)
    flex_block: int = 128           # AnnSA flex and triton: query and key block size of the selection (a multiple
                                    # of the kernel's tiles)
    flex_compile: bool = True       # AnnSA flex: torch.compile the kernel (required on CUDA)
    flex_options: dict = field(default_factory=dict)  # AnnSA flex: flex_attention kernel_options
    flex_max_compiles: int = 16     # AnnSA flex: more distinct kernel signatures than this is an error
    triton_tiles: dict = field(default_factory=dict)  # AnnSA triton: tile choices (block_m, block_n, num_warps,
                                                      # num_stages, splits, tma); missing keys: the kernel's defaults

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"attention.policy={self.policy!r}; expected one of {list(POLICIES)}")
        if not 0 < self.density <= 1:
            raise ValueError(f"attention.density={self.density} must be in (0, 1]")
        if not 0 <= self.dense_fraction <= 1:
            raise ValueError(f"attention.dense_fraction={self.dense_fraction} must be in [0, 1]")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"attention.threshold={self.threshold} must be a cosine similarity in (0, 1]")
        if self.block < 1:
            raise ValueError(f"attention.block={self.block} must be >= 1")
        if self.kernel not in KERNELS:
            raise ValueError(f"attention.kernel={self.kernel!r}; expected one of {list(KERNELS)}")
        if self.select not in SELECTS:
            raise ValueError(f"attention.select={self.select!r}; expected one of {list(SELECTS)}")
        bad = sorted(set(self.triton_tiles) - set(TRITON_TILE_KEYS))
        if bad:
            raise ValueError(f"attention.triton_tiles has unknown keys {bad}; "
                             f"expected some of {list(TRITON_TILE_KEYS)}")
        if self.flex_block < 1:
            raise ValueError(f"attention.flex_block={self.flex_block} must be >= 1")
        if self.flex_max_compiles < 1:
            raise ValueError(f"attention.flex_max_compiles={self.flex_max_compiles} must be >= 1")
        if self.fill not in FILLS:
            raise ValueError(f"attention.fill={self.fill!r}; expected one of {list(FILLS)}")
        if self.match_dtype not in MATCH_DTYPES:
            raise ValueError(f"attention.match_dtype={self.match_dtype!r}; expected one of {list(MATCH_DTYPES)}")

    @classmethod
    def from_dict(cls, d) -> "AttentionConfig":
        return strict_dataclass(cls, d, "attention")


class LayerStats:
    """Running sums per layer of one module's density and recall. Values may be device
    tensors: they are only read (a host sync) when `summary()` is asked for."""

    def __init__(self):
        self.sums: dict[int, list] = {}
        self.log: list | None = None  # when a list, every add() is also recorded (CUDA graph capture)

    def add(self, layer: int, density, recall=None) -> None:
        if self.log is not None:
            self.log.append((layer, density, recall))
        s = self.sums.setdefault(layer, [0.0, 0.0, 0, 0])
        s[0] = s[0] + density
        s[2] += 1
        if recall is not None:
            s[1] = s[1] + recall
            s[3] += 1

    def summary(self) -> dict:
        per = {l: {"density": float(s[0]) / s[2], "recall": (float(s[1]) / s[3]) if s[3] else None}
               for l, s in sorted(self.sums.items())}
        dens = [p["density"] for p in per.values()]
        recs = [p["recall"] for p in per.values() if p["recall"] is not None]
        return {"density": sum(dens) / len(dens) if dens else None, "recall": sum(recs) / len(recs) if recs else None,
                "per_layer": per}


def _block_rows(x: torch.Tensor, lc: int, blk: int, sel: torch.Tensor) -> torch.Tensor:
    """Blocks `sel` (BH, nQB, K) of the first lc tokens of x (B, H, L, D) ->
    (BH, nQB, K, blk * D), each block one row of blk * D elements (`take_rows`). A prefix
    of an aligned cache buffer is read in place; anything else is copied once."""
    b, h, _, d = x.shape
    row = blk * d
    if x.stride(3) == 1 and x.stride(2) == d and x.stride(1) % row == 0 and x.stride(0) == h * x.stride(1):
        per_head = x.stride(1) // row  # blocks per head in the underlying buffer
        blocks = x.as_strided((b, h, per_head, row), (h * per_head * row, per_head * row, row, 1))
    else:
        blocks = x[:, :, :lc].reshape(b, h, lc // blk, row)
    return take_rows(blocks, sel.reshape(b, h, -1)).view(*sel.shape, row)


class AnnSelfAttention:
    """Block-sparse self-attention over [cache | chunk] through cheap block scores.

    Two kernels: `gather` (any device; copies the kept blocks per query block and runs
    SDPA) and `flex` (block-sparse FlexAttention straight over the cache's buffer, for
    GPUs; runtime/flex_sparse.py). Both keep the same blocks for the same scores."""

    def __init__(self, rt: "AttentionRuntime", cache: KVCache, commit: int, sparse: bool):
        self.rt, self.cache, self.commit, self.sparse = rt, cache, commit, sparse

    def __call__(self, layer: int, q, k, v, k_pre=None):
        cfg = self.rt.cfg
        keys, values, bias = self.cache.stage(layer, k, v, k_pre if self.commit else None)
        b, h, m, d = q.shape
        lk = keys.shape[2]
        lc = lk - m  # cached tokens
        c = self.commit
        flex = self.rt.sa_kernel(q.device) in ("flex", "triton")  # block-sparse straight over the buffer
        blk = cfg.flex_block if flex else cfg.block
        nkb = lc // blk  # selectable cache blocks (flex: a ragged tail travels with the chunk)
        keep_n = min(nkb, math.ceil(cfg.density * nkb))
        if (not self.sparse or nkb < max(1, cfg.min_blocks) or (not flex and (lc % blk or m % blk or c % blk))
                or keep_n / max(nkb, 1) > cfg.max_density):
            out = staged_attention(q, keys, values, bias, c, self.cache.static_shape)
            self.rt.sa_stats.add(layer, 1.0, 1.0 if cfg.stats_recall else None)
        elif flex:
            out = self._flex(layer, q, keys, values, bias, lc, nkb, keep_n)
        else:
            out = self._sparse(layer, q, keys, values, bias, lc, nkb, keep_n)
        if c:
            self.cache.commit(layer, c)
        return out

    def _hide(self, m: int, lk: int, device):
        """(m, lk) bool, True where a clean query of the merged pass must not look (the
        noisy frame), or None outside the merged pass."""
        c = self.commit
        if not 0 < c < m:
            return None
        hide = torch.zeros(m, lk, dtype=torch.bool, device=device)
        hide[:c, lk - (m - c):] = True
        return hide

    def select(self, layer, q, keys, bias, nkb, keep_n, blk, kind: str):
        """(B*H, nQB, keep_n) indices of the kept cache blocks per query block: the top
        block scores, with sink and recent blocks forced in and empty blocks last."""
        b, h, m, d = q.shape
        bh = b * h
        n = nkb * blk
        qf = q.reshape(bh, m, d)
        kc = keys[:, :, :n].reshape(bh, n, d)
        if kind == "pooled":
            logc = None if bias is None else bias[:, :, 0, :n].expand(b, h, n).reshape(bh, n)
            scores = pooled_block_scores(qf, kc, blk, blk, key_logcount=logc)  # empty blocks: -inf
        else:
            scores = self.rt.ann_backend.block_scores(qf, kc, blk, blk)  # (BH, nQB, nKB)
            if bias is not None:
                valid = torch.isfinite(bias[:, :, 0, :n]).reshape(bh, nkb, blk).any(-1)  # (BH, nKB)
                scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        forced = self._forced_blocks(layer, n, nkb, b, h, blk)
        scores = scores.masked_fill(forced[:, None, :], float("inf"))
        return scores.topk(keep_n, dim=-1).indices

    def _flex(self, layer, q, keys, values, bias, lc, nkb, keep_n):
        """The block-sparse kernels over the cache (`triton` or `flex`) for one selection."""
        cfg, rt = self.rt.cfg, self.rt
        b, h, m, d = q.shape
        blk = cfg.flex_block
        lk = lc + m
        sel = self.select(layer, q, keys, bias, nkb, keep_n, blk, rt.sa_select("flex")).view(b, h, -1, keep_n)
        if rt.sa_kernel(q.device) == "triton":  # reads the staged views and the selection in place
            out = annsa_attention(q, keys, values, None if bias is None else bias[:, :, 0], sel, lc, self.commit,
                                  sel_block=blk, **rt.triton_tiles)

            def kept():
                return reference_mask(m, sel, lc, self.commit, blk)
        else:
            kbuf, vbuf = self._buffers(layer, keys, values)
            buf = kbuf.shape[2]
            bias_buf = None
            if bias is not None:  # (B, H, buf) in the query dtype, like the dense path's SDPA bias
                bias_buf = torch.full((b, h, buf), float("-inf"), dtype=q.dtype, device=q.device)
                bias_buf[:, :, :lk] = bias[:, :, 0]
            kernel = rt.flex_kernel()
            plan = kernel.plan(sel, m, self.commit, lc, lk, buf)
            out = kernel(q, kbuf, vbuf, bias_buf, plan)

            def kept():
                return plan_dense_mask(plan, blk, blk)
        recall = None
        if cfg.stats_recall:
            hide = self._hide(m, lk, q.device)
            full_bias = merge_mask(bias, hide, torch.float32) if hide is not None else bias
            recall = mass_recall(q, keys, full_bias, kept())
        self.rt.sa_stats.add(layer, (keep_n * blk + lk - nkb * blk) / lk, recall)
        return out

    def _buffers(self, layer, keys, values):
        """The cache's whole per-layer buffers when `keys`/`values` are prefixes of them
        (their length only changes when a growing cache reallocates: static shapes for the
        compiled kernel), else the staged views themselves."""
        kb, vb = self.cache.k[layer], self.cache.v[layer]
        for buf, view in ((kb, keys), (vb, values)):
            if not (buf.data_ptr() == view.data_ptr() and buf.stride() == view.stride()
                    and buf.shape[:2] == view.shape[:2] and buf.shape[3] == view.shape[3]
                    and buf.shape[2] >= view.shape[2]):
                return keys, values
        return kb, vb

    def _sparse(self, layer, q, keys, values, bias, lc, nkb, keep_n):
        """Gather kernel: for each query block, its kept cache blocks and the whole chunk, in
        one batched SDPA call. Kept blocks are copied as whole rows of blk * D elements
        (`_block_rows`); the bias is one row per query block (the kept blocks' log-counts;
        for the clean queries of the merged pass, -inf over the noisy frame), broadcast over
        the block's queries."""
        cfg = self.rt.cfg
        b, h, m, d = q.shape
        blk = cfg.block
        nqb = m // blk
        bh = b * h
        hide = self._hide(m, lc + m, q.device)
        sel = self.select(layer, q, keys, bias, nkb, keep_n, blk, self.rt.sa_select("gather"))  # (BH, nQB, K)
        gk = _block_rows(keys, lc, blk, sel).view(bh, nqb, keep_n * blk, d)
        gv = _block_rows(values, lc, blk, sel).view(bh, nqb, keep_n * blk, d)
        own_k = keys[:, :, lc:].reshape(bh, 1, m, d).expand(-1, nqb, -1, -1)
        own_v = values[:, :, lc:].reshape(bh, 1, m, d).expand(-1, nqb, -1, -1)
        kk = torch.cat([gk, own_k], dim=2)
        vv = torch.cat([gv, own_v], dim=2)
        ab = None if bias is None and hide is None else torch.zeros(bh, nqb, 1, keep_n * blk + m, device=q.device,
                                                                    dtype=q.dtype)
        if bias is not None:  # the kept slots' log-counts
            ab[..., 0, : keep_n * blk] = _block_rows(bias[:, :, 0, :lc, None], lc, blk, sel).view(bh, nqb, -1)
        if hide is not None:  # the same for every query of a block: clean blocks do not see the noisy frame
            ab[..., 0, keep_n * blk :].masked_fill_(hide[::blk, lc:].view(1, nqb, m), float("-inf"))
        qb = q.reshape(bh, nqb, blk, d)
        out = F.scaled_dot_product_attention(qb, kk, vv, attn_mask=ab).reshape(b, h, m, d)
        recall = None
        if cfg.stats_recall:
            kept = torch.zeros(bh, nqb, nkb, dtype=torch.bool, device=q.device).scatter_(-1, sel, True)
            kept = kept.repeat_interleave(blk, 1).repeat_interleave(blk, 2)  # (BH, m, lc)
            kept = torch.cat([kept, torch.ones(bh, m, m, dtype=torch.bool, device=q.device)], -1).view(b, h, m, -1)
            full_bias = merge_mask(bias, hide, torch.float32) if hide is not None else bias
            recall = mass_recall(q, keys, full_bias, kept)
        self.rt.sa_stats.add(layer, (keep_n * blk + m) / (lc + m), recall)
        return out

    def _forced_blocks(self, layer, n, nkb, b, h, blk):
        """(BH, nKB) blocks that are always kept: sinks and the most recent frames."""
        cfg = self.rt.cfg
        slots = self.cache.recent_slots(layer, cfg.recent_frames)
        return slots[..., :n].reshape(b * h, nkb, blk).any(-1)


class AnnCrossAttention:
    """Cross-attention to the prompt, per frame only over the tokens its queries land near."""

    def __init__(self, rt: "AttentionRuntime", tokens_per_frame: int):
        self.rt, self.n = rt, tokens_per_frame

    def __call__(self, layer: int, q, pk, pv):
        rt = self.rt
        bias = rt.prompt_logc[layer] if rt.prompt_logc else None  # (B, H, 1, T) or None
        if not rt.cfg.annca:
            return sdpa(q, pk, pv, bias)
        if pk.shape[2] < rt.cfg.annca_min_tokens:  # selection would cost more than it saves
            rt.ca_stats.add(layer, 1.0, 1.0 if rt.cfg.stats_recall else None)
            return sdpa(q, pk, pv, bias)
        b, h, l, d = q.shape
        t = pk.shape[2]
        frames = l // self.n
        keep = []
        for f in range(frames):  # one or two frames per pass
            qf = q[:, :, f * self.n : (f + 1) * self.n].reshape(b * h, self.n, d)
            keep.append(rt.ann_backend.key_mask(qf, pk.reshape(b * h, t, d)).view(b, h, 1, t))
        keep = torch.cat(keep, dim=2).repeat_interleave(self.n, dim=2)  # (B, H, L, T)
        if bias is not None:
            keep = keep & torch.isfinite(bias)
        out = sdpa(q, pk, pv, merge_mask(bias, ~keep, q.dtype))
        recall = mass_recall(q, pk, bias, keep) if rt.cfg.stats_recall else None
        # density over the real prompt tokens (merged duplicates leave padding behind)
        kept = keep.float().mean()
        density = kept if bias is None else kept / torch.isfinite(bias).float().mean()
        rt.ca_stats.add(layer, density, recall)
        return out


class AttentionRuntime:
    """Owns the attention choices of one engine: builds the cache and the callables."""

    def __init__(self, cfg: AttentionConfig):
        self.cfg = cfg
        self.ann_backend = build_ann(cfg.ann, **cfg.ann_options) if (cfg.annsa or cfg.annca) else None
        self.cache: KVCache | None = None
        self._flex: FlexBlockSparse | None = None
        self.triton_tiles = {**sparse_kernel.DEFAULT_TILES, **cfg.triton_tiles}
        self.reset()

    def build_cache(self, spec: CacheSpec) -> KVCache:
        c = self.cfg
        if c.policy == "dense":
            cache = DenseCache(spec, initial_frames=c.initial_frames)
        elif c.policy == "window":
            cache = WindowCache(spec, sink_frames=c.sink_frames, window_frames=c.window_frames)
        else:
            cache = TempCache(spec, budget_frames=c.budget_frames, sink_frames=c.sink_frames, threshold=c.threshold,
                              match=c.match, representative=c.representative, ann=build_ann(c.merge_ann, metric="ip"),
                              radius=c.match_radius, match_frames=c.match_frames,
                              merge_target=c.merge_target, merge_when=c.merge_when, fill=c.fill,
                              match_dtype=c.match_dtype)
        self.cache = cache
        self.tokens_per_frame = spec.tokens_per_frame
        return cache

    def sa_kernel(self, device) -> str:
        """The AnnSA kernel on this device: `kernel`, with auto = triton on CUDA (flex where
        Triton is missing), else gather."""
        k = self.cfg.kernel
        if k != "auto":
            return k
        if torch.device(device).type != "cuda":
            return "gather"
        return "triton" if sparse_kernel.triton is not None else "flex"

    def sa_select(self, kernel: str) -> str:
        """The AnnSA block scorer: `select`, with auto = pooled for flex and triton, ann for gather."""
        s = self.cfg.select
        return s if s != "auto" else ("ann" if kernel == "gather" else "pooled")

    def flex_kernel(self) -> FlexBlockSparse:
        if self._flex is None:
            c = self.cfg
            self._flex = FlexBlockSparse(c.flex_block, c.flex_block, compile=c.flex_compile,
                                         kernel_options=c.flex_options, max_compiles=c.flex_max_compiles)
        return self._flex

    def reset(self) -> None:
        self.reset_stats()
        self.prompt_logc: list[torch.Tensor] = []

    def reset_stats(self) -> None:
        self.sa_stats = LayerStats()
        self.ca_stats = LayerStats()

    def prepare_prompt(self, prompt_kv: list[tuple[torch.Tensor, torch.Tensor]]):
        """Merge exactly identical prompt tokens (same key and value) with a log-count bias."""
        if not self.cfg.annca:
            return prompt_kv
        out, self.prompt_logc = [], []
        for pk, pv in prompt_kv:
            k2, v2, lc = dedupe_tokens(pk, pv)
            out.append((k2, v2))
            self.prompt_logc.append(lc)
        if all(lc is None for lc in self.prompt_logc):
            self.prompt_logc = []
        return out

    def build(self, cache: KVCache, commit: int, step_index: int | None, num_steps: int):
        c = self.cfg
        dense_steps = math.floor(c.dense_fraction * num_steps)
        sparse = c.annsa and (step_index is None or step_index >= dense_steps)
        sa = AnnSelfAttention(self, cache, commit, sparse) if c.annsa else CachedSelfAttention(cache, commit)
        if isinstance(cache, TempCache) and cache.track_history:  # evaluation: what the cache still represents
            sa = HistoryProbe(sa, cache)
        return sa, AnnCrossAttention(self, self.tokens_per_frame)

    def summary(self) -> dict:
        out = {"attention": self.cfg.name, "self_attn": self.sa_stats.summary(), "cross_attn": self.ca_stats.summary()}
        parts = [self.cfg.name]  # one line for the HUD
        for key, label in (("self_attn", "sa"), ("cross_attn", "ca")):
            if out[key]["density"] is not None:
                parts.append(f"{label} {out[key]['density']:.2f}")
        if isinstance(self.cache, TempCache):
            out["merge_rate"] = self.cache.merge_rate()
            rates = self.cache.last_merge_rates()
            out["last_merge_rate"] = sum(rates) / len(rates)
            parts.append(f"merge {out['last_merge_rate']:.2f}")
        out["hud"] = " ".join(parts)
        return out


def dedupe_tokens(pk: torch.Tensor, pv: torch.Tensor):
    """(B, H, T, D) keys/values -> unique (key, value) rows per head, padded, and log counts
    (B, H, 1, T') with -inf on padding. Exact: identical tokens get one row + log(count).
    When no token repeats, the prompt comes back unchanged with no bias (None), so
    cross-attention runs exactly the dense computation."""
    b, h, t, d = pk.shape
    rows = torch.cat([pk, pv], dim=-1).reshape(b * h, t, 2 * d)
    uniq, counts = [], []
    for r in rows:  # at reset only: B*H small
        u, cnt = torch.unique(r.float(), dim=0, return_counts=True)
        uniq.append(u)
        counts.append(cnt)
    if all(u.shape[0] == t for u in uniq):
        return pk, pv, None  # nothing repeats: the prompt as it is, in its order, without a bias
    tmax = max(u.shape[0] for u in uniq)
    k2 = torch.zeros(b * h, tmax, d, dtype=pk.dtype, device=pk.device)
    v2 = torch.zeros_like(k2)
    lc = torch.full((b * h, tmax), float("-inf"), device=pk.device)
    for i, (u, cnt) in enumerate(zip(uniq, counts)):
        k2[i, : u.shape[0]] = u[:, :d].to(pk.dtype)
        v2[i, : u.shape[0]] = u[:, d:].to(pk.dtype)
        lc[i, : u.shape[0]] = cnt.float().log()
    return k2.view(b, h, tmax, d), v2.view(b, h, tmax, d), lc.view(b, h, 1, tmax)
