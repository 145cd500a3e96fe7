"""Approximate nearest-neighbour (ANN) search over attention keys, batched over heads.

FAST-AR treats attention as nearest-neighbour search: a cheap ANN proposes, for each
query, the keys worth attending to. This module is that ANN, behind one API with four
backends chosen by `build_ann(kind, **options)`. It knows nothing of caches, frames or
attention kernels; its three consumers are

  TempCache  `topk(q, k, 1)`: the most similar cached key of each new key and its
             exact score (a merge threshold on it is meaningful).
  AnnSA      `block_scores(q, k, q_block, k_block)`: relevance of each key block to
             each query block; the consumer keeps the top blocks per query block.
  AnnCA      `key_mask(q, k)`: the prompt keys some query lands near.
AnnSA's GPU path scores blocks without the ANN: `pooled_block_scores` (mean-pooled query
blocks against mean-pooled key blocks, the exact mean logit per block pair) costs
1/(q_block * k_block) of a full score matrix; every backend's `block_scores` scores all
pairs first, which on a GPU costs as much as dense attention's QK^T.

Shapes (one convention for the whole file):
  H heads, Nq queries, Nk keys, D head dim, L hash tables, P multi-probes per table,
  C candidates per query, nQB / nKB query / key blocks.
  queries (H, Nq, D), keys (H, Nk, D), any float dtype; scores are float32.

`topk` always re-ranks its candidates exactly (float32 inner product, or cosine with
metric='cosine'), so returned scores are exact for the returned pairs; slots with no
candidate hold index -1 and score -inf.

Backends, and what each trades. Timings per call from `python -m runtime.ann` (bf16
inputs, k=10) on one H100: small = H4 Nq64 Nk4096 D64, large = H12 Nq4680 Nk32760
D128 (Wan2.1 shapes); recall@10 on its clustered synthetic keys. docs/ann.md has more.
  exact  Brute force in float32, chunked over queries. The reference, and hard to beat:
         topk 0.23 ms small / 46 ms large, most of the large one spent selecting the
         top k out of 32760 scores per query, not in the matmul.
  lsh    SimHash: L tables of num_bits sign bits of seeded random projections, plus
         multi-probe of the `probes` least confident bits (Hamming distance 1). Keys
         are sorted by bucket once per call; each query reads at most `bucket_cap`
         keys from each probed bucket, candidates are voted by how many tables (own
         bucket 2, probe 1) they collide in, the best `max_candidates` are re-ranked.
         Memory ~ H*Nq*(L*(1+P)*bucket_cap + max_candidates*D) per query chunk, never
         H*Nq*Nk. The only backend whose block_scores and key_mask need no Nq x Nk
         product (bucket histograms, bucket membership): 1.6 ms / 2.6 ms large against
         38 / 46 ms for exact. topk: 1.7 ms small (recall 0.98), 37 ms large, where
         the defaults (10 bits) give recall 0.57: use num_bits ~ log2(Nk) - 2 (13 bits
         reached 0.89 at Nk=32768). Lowest recall of the four, and it falls fast as
         clusters loosen.
  quant  Symmetric per-vector `bits`-bit quantization of queries and keys, a full
         low-precision Nq x Nk product (bf16 on CPU, fp16 on CUDA, both exact on the
         integer values), top `candidates` re-ranked exactly. Recall 1.0 at 8 bits
         (0.81 large at 4 bits). No faster than exact on an H100 (52 ms large): the
         per-query selection dominates, not the product. On CUDA `torch._int_mm` is
         not used: over 12 heads it took 9.0 ms against 2.5 ms for the fp16 batched
         product at the large shape, whose output is half the bytes.
  faiss  faiss-cpu per head: IndexFlatIP (exact), IndexHNSWFlat or IndexIVFFlat.
         The index is built on every call (the API is stateless), so HNSW/IVF only
         pay off when Nq is large against Nk; with CUDA tensors and no faiss GPU
         build, searches run on the host (3.2 s flat / 1.5 s IVF large, 16 cores).
         A faiss GPU build, when importable, gets CUDA tensors directly (that path
         has not been run against a GPU build yet). faiss is imported lazily.

SimHash buckets depend only on the direction of a vector, so LSH hashes angles for
both metrics; with metric='ip' keys of unequal norm are proposed by angle and then
ranked by inner product.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Metric = Literal["ip", "cosine"]
AnnKind = Literal["exact", "lsh", "quant", "faiss"]
BlockPool = Literal["max", "mass"]

# Upper bound on the elements of one chunk of per-query work (scores, candidate lists,
# gathered keys): 2**25 float32 = 128 MiB. Bounds memory, not a tuning knob.
_CHUNK_ELEMENTS = 1 << 25
# Multiplier of the per-table bijection that orders keys inside one bucket.
_MIX = 0x9E3779B1
_MIX_BITS = 31


@dataclass
class AnnResult:
    scores: Tensor  # (H, Nq, k) float32, exact for the returned pairs; -inf if empty
    indices: Tensor  # (H, Nq, k) int64 key indices; -1 if empty


# ----------------------------------------------------------------------------- helpers


def _prepare(x: Tensor, metric: Metric) -> Tensor:
    x = x.float()
    return F.normalize(x, dim=-1) if metric == "cosine" else x


def _rows_per_chunk(num_rows: int, per_row: int, multiple: int = 1) -> int:
    rows = max(1, _CHUNK_ELEMENTS // max(1, per_row))
    rows = max(multiple, rows // multiple * multiple)
    return min(rows, math.ceil(num_rows / multiple) * multiple)


def _pad_k(scores: Tensor, indices: Tensor, k: int) -> AnnResult:
    missing = k - scores.shape[-1]
    if missing > 0:
        scores = F.pad(scores, (0, missing), value=-math.inf)
        indices = F.pad(indices, (0, missing), value=-1)
    return AnnResult(scores, indices)


def _rerank(q: Tensor, keys: Tensor, cand: Tensor, k: int) -> AnnResult:
    """Exact top-k among candidate keys. q (H, n, D) f32, keys (H, Nk, D) f32,
    cand (H, n, C) int64 with -1 for empty slots and no duplicates."""
    H, n, C = cand.shape
    Nk, D = keys.shape[1:]
    offset = torch.arange(H, device=cand.device).view(H, 1, 1) * Nk
    flat = (cand.clamp_min(0) + offset).reshape(-1)
    cand_keys = keys.reshape(H * Nk, D).index_select(0, flat).view(H, n, C, D)
    s = (cand_keys @ q.unsqueeze(-1)).squeeze(-1)  # (H, n, C)
    s = s.masked_fill(cand < 0, -math.inf)
    top_s, top_i = s.topk(min(k, C), dim=-1)
    idx = cand.gather(-1, top_i).masked_fill(top_s == -math.inf, -1)
    return _pad_k(top_s, idx, k)


def _top1(s: Tensor) -> tuple[Tensor, Tensor]:
    """(H, n, Nk) scores -> best score and its index, each (H, n, 1): one max reduction,
    cheaper than topk(1) on CPU."""
    best, idx = s.max(dim=-1, keepdim=True)
    return best, idx


def _mask_from_indices(indices: Tensor, num_keys: int) -> Tensor:
    """(H, Nq, k) indices with -1 holes -> (H, Nk) bool: key appears somewhere."""
    H = indices.shape[0]
    flat = indices.reshape(H, -1)
    hits = torch.zeros(H, num_keys + 1, dtype=torch.bool, device=indices.device)
    hits.scatter_(1, torch.where(flat < 0, num_keys, flat), True)  # holes -> slot Nk
    return hits[:, :num_keys]


def _pool_blocks(s: Tensor, q_block: int, k_block: int, pool: BlockPool, scale: float) -> Tensor:
    """Pool a chunk of (approximate) scores (H, n, Nk) into (H, ceil(n/q_block), nKB).

    'max':  the largest score of the block pair.
    'mass': the softmax(scale * s) mass the block's queries put on the key block,
            i.e. what AnnSA keeps when it keeps that block pair.
    """
    H, n, Nk = s.shape
    nqb, nkb = math.ceil(n / q_block), math.ceil(Nk / k_block)
    if pool == "mass":
        s = torch.softmax(s * scale, dim=-1)
    fill = -math.inf if pool == "max" else 0.0
    s = F.pad(s, (0, nkb * k_block - Nk, 0, nqb * q_block - n), value=fill)
    s = s.view(H, nqb, q_block, nkb, k_block)
    return s.amax(dim=(2, 4)) if pool == "max" else s.sum(dim=(2, 4))


def keep_top_blocks(block_scores: Tensor, num_blocks: int) -> Tensor:
    """(H, nQB, nKB) scores -> bool mask keeping the `num_blocks` best key blocks per
    query block (all of them if there are fewer)."""
    top = block_scores.topk(min(num_blocks, block_scores.shape[-1]), dim=-1).indices
    return torch.zeros_like(block_scores, dtype=torch.bool).scatter_(-1, top, True)


def _block_means(x: Tensor, block: int, weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """x (H, N, D) -> (weighted mean per block (H, nB, D), weight per block (H, nB)).
    One batched product reads x once (no float copy of x); the last block may be ragged."""
    H, N, D = x.shape
    nb = math.ceil(N / block)
    w = torch.ones(H, N, device=x.device, dtype=torch.float32) if weight is None else weight.float()
    pad = nb * block - N
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
        w = F.pad(w, (0, pad))
    w = w.view(H * nb, 1, block)
    total = w.sum(-1, keepdim=True)  # (H*nB, 1, 1)
    w = (w / total.clamp_min(1e-30)).to(x.dtype)
    if x.stride(0) != nb * block * D and x.stride(1) == D and x.stride(2) == 1:
        # each head's rows are contiguous but the heads are not next to each other (a prefix
        # of a cache buffer): fold (H, nB) would copy all of x, so one product per head
        wh = w.view(H, nb, 1, block)
        mean = torch.stack([torch.bmm(wh[i], x[i].view(nb, block, D)) for i in range(H)])
    else:
        mean = torch.bmm(w, x.reshape(H * nb, block, D))
    return mean.view(H, nb, D), total.view(H, nb)


def pooled_block_scores(queries: Tensor, keys: Tensor, q_block: int, k_block: int,
                        key_logcount: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Cheap block relevance (H, nQB, nKB) float32: mean-pooled query blocks against
    mean-pooled key blocks, plus the log of each key block's total count.

    Why this scorer: q.k is bilinear, so mean(q) . mean(k) is *exactly* the mean logit of
    the block pair, computed with nQB * nKB dot products instead of Nq * Nk (a
    q_block * k_block = 16384-fold reduction at 128 x 128 blocks; the ANN backends'
    `block_scores` score every (query, key) pair first, which costs as much as dense
    attention's QK^T on a GPU). Under "every key of the block has the mean logit" the
    block's softmax mass is exp(scale * mean logit) * (sum of its counts), hence the
    log-count term (TempCache groups; log(block size) for plain caches). Its blind spot
    is a single strong key inside an otherwise unrelated block; sinks and recent frames
    are forced in by AnnSA for that reason.

    key_logcount (H, Nk): per-key log count, -inf for empty slots (TempCache's bias);
    empty slots are left out of the key means, and blocks without a valid key score -inf.
    """
    H, Nq, Nk = AnnBackend._check(queries, keys)
    if q_block < 1 or k_block < 1:
        raise ValueError(f"block sizes must be >= 1, got q_block={q_block}, k_block={k_block}")
    scale = scale if scale is not None else queries.shape[-1] ** -0.5
    valid = None if key_logcount is None else torch.isfinite(key_logcount)
    pq, _ = _block_means(queries, q_block, None)
    pk, nvalid = _block_means(keys, k_block, valid)
    s = torch.bmm(pq.float(), pk.float().transpose(1, 2)) * scale  # (H, nQB, nKB)
    if key_logcount is None:
        mass = nvalid.log()
    else:
        lc = key_logcount.float()
        nkb = pk.shape[1]
        pad = nkb * k_block - Nk
        if pad:
            lc = F.pad(lc, (0, pad), value=-math.inf)
        mass = torch.logsumexp(lc.view(H, nkb, k_block), dim=-1)  # log(sum of counts); -inf if empty
    return s + mass[:, None, :]


def dense_block_mask(block_mask: Tensor, q_block: int, k_block: int, num_q: int, num_k: int) -> Tensor:
    """Expand a (H, nQB, nKB) block mask to (H, Nq, Nk), trimming ragged last blocks."""
    m = block_mask.repeat_interleave(q_block, dim=1).repeat_interleave(k_block, dim=2)
    return m[:, :num_q, :num_k]


# ----------------------------------------------------------------------------- backends


@dataclass
class AnnBackend:
    """Common API. Subclasses implement `_topk`, `_block_scores` and `_key_mask` on
    validated, non-empty inputs."""

    metric: Metric = "ip"

    def __post_init__(self) -> None:
        if self.metric not in ("ip", "cosine"):
            raise ValueError(f"metric must be 'ip' or 'cosine', got {self.metric!r}")

    # ---- public API
    def topk(self, queries: Tensor, keys: Tensor, k: int) -> AnnResult:
        """The k best keys of every query: scores/indices (H, Nq, k), best first."""
        H, Nq, Nk = self._check(queries, keys)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if Nq == 0 or Nk == 0:
            empty = torch.empty(H, Nq, 0, device=queries.device)
            return _pad_k(empty, empty.long(), k)
        return self._topk(queries, keys, k)

    def block_scores(self, queries: Tensor, keys: Tensor, q_block: int, k_block: int) -> Tensor:
        """Relevance of each key block to each query block, (H, nQB, nKB) float32,
        larger is more relevant; the last blocks may be ragged."""
        H, Nq, Nk = self._check(queries, keys)
        if q_block < 1 or k_block < 1:
            raise ValueError(f"block sizes must be >= 1, got q_block={q_block}, k_block={k_block}")
        if Nq == 0 or Nk == 0:
            shape = (H, math.ceil(Nq / q_block), math.ceil(Nk / k_block))
            return torch.zeros(shape, device=queries.device)
        return self._block_scores(queries, keys, q_block, k_block)

    def key_mask(self, queries: Tensor, keys: Tensor) -> Tensor:
        """(H, Nk) bool: the keys that at least one query lands near."""
        H, Nq, Nk = self._check(queries, keys)
        if Nq == 0 or Nk == 0:
            return torch.zeros(H, Nk, dtype=torch.bool, device=keys.device)
        return self._key_mask(queries, keys)

    @staticmethod
    def _check(queries: Tensor, keys: Tensor) -> tuple[int, int, int]:
        if queries.dim() != 3 or keys.dim() != 3:
            raise ValueError(
                f"expected queries (H, Nq, D) and keys (H, Nk, D), got {tuple(queries.shape)} "
                f"and {tuple(keys.shape)}")
        if queries.shape[0] != keys.shape[0] or queries.shape[2] != keys.shape[2]:
            raise ValueError(
                f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} disagree on H or D")
        if not (queries.is_floating_point() and keys.is_floating_point()):
            raise ValueError(f"expected float tensors, got {queries.dtype} and {keys.dtype}")
        return queries.shape[0], queries.shape[1], keys.shape[1]

    def _topk(self, queries: Tensor, keys: Tensor, k: int) -> AnnResult:
        raise NotImplementedError

    def _block_scores(self, queries: Tensor, keys: Tensor, q_block: int, k_block: int) -> Tensor:
        raise NotImplementedError

    def _key_mask(self, queries: Tensor, keys: Tensor) -> Tensor:
        raise NotImplementedError


@dataclass
class _NeighbourBackend(AnnBackend):
    """Backends whose key_mask (and by default block_scores) derive from `topk`."""

    # a key is kept by key_mask if it is among some query's `mask_k` nearest
    mask_k: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask_k < 1:
            raise ValueError(f"mask_k must be >= 1, got {self.mask_k}")

    def _key_mask(self, queries: Tensor, keys: Tensor) -> Tensor:
        return _mask_from_indices(self._topk(queries, keys, self.mask_k).indices, keys.shape[1])

    def _block_scores(self, queries: Tensor, keys: Tensor, q_block: int, k_block: int) -> Tensor:
        """Neighbour hits: how many of the `mask_k` nearest keys of the block's queries
        fall into each key block."""
        H, Nq, Nk = queries.shape[0], queries.shape[1], keys.shape[1]
        nqb, nkb = math.ceil(Nq / q_block), math.ceil(Nk / k_block)
        idx = self._topk(queries, keys, self.mask_k).indices  # (H, Nq, mask_k)
        q_blk = (torch.arange(Nq, device=idx.device) // q_block).view(1, Nq, 1)
        cell = torch.where(idx >= 0, q_blk * nkb + idx // k_block, nqb * nkb)
        hits = torch.zeros(H, nqb * nkb + 1, device=idx.device)
        hits.scatter_add_(1, cell.reshape(H, -1), torch.ones(cell.shape, device=idx.device).view(H, -1))
        return hits[:, :-1].view(H, nqb, nkb)


@dataclass
class _ScoredBackend(_NeighbourBackend):
    """Backends that score every (query, key) pair (exactly or quantized) in chunks
    over queries; block scores pool those scores per block pair."""

    block_pool: BlockPool = "mass"
    softmax_scale: float | None = None  # for block_pool='mass'; None: 1/sqrt(D)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_pool not in ("max", "mass"):
            raise ValueError(f"block_pool must be 'max' or 'mass', got {self.block_pool!r}")

    def _scores(self, q: Tensor, keys: Tensor) -> Tensor:
        """Scores (H, n, Nk) float32 of prepared queries against prepared keys."""
        raise NotImplementedError

    def _prepared_keys(self, keys: Tensor) -> Tensor:
        return keys

    def _block_scores(self, queries: Tensor, keys: Tensor, q_block: int, k_block: int) -> Tensor:
        q, kp = _prepare(queries, self.metric), self._prepared_keys(_prepare(keys, self.metric))
        H, Nq, Nk, D = *q.shape[:2], keys.shape[1], q.shape[2]
        scale = self.softmax_scale if self.softmax_scale is not None else D ** -0.5
        rows = _rows_per_chunk(Nq, H * Nk, multiple=q_block)
        out = [_pool_blocks(self._scores(q[:, s:s + rows], kp), q_block, k_block, self.block_pool, scale)
               for s in range(0, Nq, rows)]
        return torch.cat(out, dim=1)


@dataclass
class ExactAnn(_ScoredBackend):
    """Brute-force float32 reference."""

    def _scores(self, q: Tensor, keys: Tensor) -> Tensor:
        return q @ keys.transpose(1, 2)

    def _topk(self, queries: Tensor, keys: Tensor, k: int) -> AnnResult:
        q, kf = _prepare(queries, self.metric), _prepare(keys, self.metric)
        H, Nq, Nk = q.shape[0], q.shape[1], kf.shape[1]
        rows = _rows_per_chunk(Nq, H * Nk)
        if k == 1:  # TempCache's correspondence: one reduction instead of a top-k
            parts = [_top1(self._scores(q[:, s:s + rows], kf)) for s in range(0, Nq, rows)]
        else:
            parts = [self._scores(q[:, s:s + rows], kf).topk(min(k, Nk), dim=-1) for s in range(0, Nq, rows)]
        return _pad_k(torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1), k)


@dataclass
class QuantAnn(_ScoredBackend):
    """Symmetric per-vector `bits`-bit quantization; approximate top `candidates`,
    then exact re-rank."""

    bits: int = 8
    candidates: int = 32  # re-rank depth; at least k is always used

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in [2, 8], got {self.bits}")
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (H, N, D) f32 -> (values, scale (H, N, 1) f32), values * scale ~ x.

        Values are the integers in [-qmax, qmax], held exactly in the dtype the
        product runs in: bf16 on CPU (its matrix units), fp16 on CUDA, there divided
        by 2**(bits-1) so that sums of D products stay far below the fp16 maximum.
        Both matmuls accumulate in fp32, so the integer products are exact until the
        final rounding of each output to 16 bits.
        """
        qmax = 2 ** (self.bits - 1) - 1
        scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / qmax
        values = torch.round(x / scale).clamp_(-qmax, qmax)
        if not x.is_cuda:
            return values.bfloat16(), scale
        shift = 2.0 ** (self.bits - 1)
        return (values / shift).half(), scale * shift

    def _prepared_keys(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        return self._quantize(keys)

    def _scores(self, q: Tensor, keys: tuple[Tensor, Tensor]) -> Tensor:
        kv, k_scale = keys  # (H, Nk, D) 16-bit integer values, (H, Nk, 1)
        qv, q_scale = self._quantize(q)
        prod = (qv @ kv.transpose(1, 2)).float()  # (H, n, Nk)
        return prod.mul_(q_scale).mul_(k_scale.transpose(1, 2))  # dequantized

    def _topk(self, queries: Tensor, keys: Tensor, k: int) -> AnnResult:
        q, kf = _prepare(queries, self.metric), _prepare(keys, self.metric)
        kv, k_scale = self._quantize(kf)
        # ranking a query's keys ignores its own (positive) scale; bf16 has the range
        # of fp32, fp16 products times the key scale could overflow
        rank_dtype = torch.bfloat16 if kv.dtype == torch.bfloat16 else torch.float32
        k_scale = k_scale.transpose(1, 2).to(rank_dtype)  # (H, 1, Nk)
        H, Nq, Nk = q.shape[0], q.shape[1], kf.shape[1]
        num_cand = min(max(self.candidates, k), Nk)
        rows = _rows_per_chunk(Nq, H * max(Nk, num_cand * q.shape[2]))
        parts = []
        for s in range(0, Nq, rows):
            qc = q[:, s:s + rows]
            rank = (self._quantize(qc)[0] @ kv.transpose(1, 2)).to(rank_dtype).mul_(k_scale)
            parts.append(_rerank(qc, kf, rank.topk(num_cand, dim=-1).indices, k))
        return AnnResult(torch.cat([p.scores for p in parts], 1), torch.cat([p.indices for p in parts], 1))


@dataclass
class LshAnn(AnnBackend):
    """Multi-probe SimHash with `num_tables` tables of `num_bits` bits."""

    num_tables: int = 8
    num_bits: int = 10
    probes: int = 2  # Hamming-distance-1 buckets probed per table, 0..num_bits
    bucket_cap: int = 32  # keys read from one probed bucket
    max_candidates: int = 128  # distinct candidates re-ranked exactly (at least k)
    block_bits: int = 8  # leading bits that define buckets for block_scores
    # key_mask keeps a key that shares a (probed) bucket with some query in at least
    # this many tables; 1 is the published rule, larger is more selective
    mask_min_tables: int = 1
    seed: int = 0
    _planes: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_tables", "num_bits", "bucket_cap", "max_candidates", "block_bits"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_bits > 32:
            raise ValueError(f"num_bits must be <= 32, got {self.num_bits}")
        if not 1 <= self.mask_min_tables <= self.num_tables:
            raise ValueError(f"mask_min_tables must be in [1, num_tables={self.num_tables}], "
                             f"got {self.mask_min_tables}")
        if not 0 <= self.probes <= self.num_bits:
            raise ValueError(f"probes must be in [0, num_bits={self.num_bits}], got {self.probes}")
        if self.block_bits > 16:
            raise ValueError(f"block_bits must be <= 16 (histograms have 2**block_bits bins), got {self.block_bits}")

    def _tables(self, dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Seeded hyperplanes (D, L*num_bits) and per-table bucket-order salts (L,)."""
        key = (dim, str(device))
        if key not in self._planes:
            g = torch.Generator().manual_seed(self.seed)
            planes = torch.randn(dim, self.num_tables * self.num_bits, generator=g)
            salt = torch.randint(0, 2 ** _MIX_BITS, (self.num_tables,), generator=g)
            self._planes[key] = (planes.to(device), salt.to(device))
        return self._planes[key]

    def _hash(self, x: Tensor, probes: int) -> Tensor:
        """x (H, N, D) -> bucket codes (H, L, N, 1 + probes) int64; slot 0 is the
        vector's own bucket, the rest flip its least confident bits."""
        # The sign of a projection does not change when x is rescaled, so these are the
        # buckets of the normalized vectors (angular LSH) without normalizing.
        planes, _ = self._tables(x.shape[-1], x.device)
        H, N = x.shape[:2]
        proj = (x.float() @ planes).view(H, N, self.num_tables, self.num_bits).transpose(1, 2)
        weights = 2 ** torch.arange(self.num_bits, device=x.device)
        codes = ((proj > 0).long() * weights).sum(-1, keepdim=True)  # (H, L, N, 1)
        if probes == 0:
            return codes
        flip = proj.abs().topk(probes, dim=-1, largest=False).indices  # (H, L, N, P)
        return torch.cat([codes, codes ^ weights[flip]], dim=-1)

    def _sorted_keys(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Keys sorted by (bucket, salted order) per table: (H, L, Nk) sort keys and
        key indices. The salted order makes each table read a different subset of an
        over-full bucket."""
        _, salt = self._tables(keys.shape[-1], keys.device)
        Nk = keys.shape[1]
        codes = self._hash(keys, 0).squeeze(-1)  # (H, L, Nk)
        idx = torch.arange(Nk, device=keys.device)
        order = ((idx + salt.view(-1, 1)) * _MIX) & (2 ** _MIX_BITS - 1)  # (L, Nk), bijective
        return ((codes << _MIX_BITS) | order).sort(dim=-1)

    def _candidates(self, q: Tensor, sorted_keys: Tensor, perm: Tensor) -> Tensor:
        """Distinct candidates (H, n, M) of a query chunk, best voted first, -1 holes."""
        H, L, Nk = perm.shape
        n, P1, cap = q.shape[1], 1 + self.probes, self.bucket_cap
        codes = self._hash(q, self.probes).reshape(H, L, n * P1)
        start = torch.searchsorted(sorted_keys, codes << _MIX_BITS)
        end = torch.searchsorted(sorted_keys, (codes + 1) << _MIX_BITS)
        pos = start.unsqueeze(-1) + torch.arange(cap, device=q.device)  # (H, L, n*P1, cap)
        cand = perm.gather(-1, pos.clamp_max(Nk - 1).view(H, L, -1))
        # Sort key id*2 + is_probe (holes last) so that equal ids form runs; the run's
        # votes (2 for the query's own bucket, 1 for a probed one) rank the candidates.
        is_probe = (torch.arange(P1, device=q.device) > 0).view(1, 1, P1, 1).int()
        code = torch.where(pos < end.unsqueeze(-1), cand.view(pos.shape).int() * 2, 2 * Nk)
        code = (code.view(H, L, n, P1, cap) + is_probe).permute(0, 2, 1, 3, 4).reshape(H, n, -1)
        code = code.sort(dim=-1).values  # (H, n, L*P1*cap)
        ids = code >> 1
        first = torch.ones_like(ids, dtype=torch.bool)
        first[..., 1:] = ids[..., 1:] != ids[..., :-1]
        run = first.cumsum(-1) - 1
        votes = torch.zeros_like(code).scatter_add_(-1, run, 2 - (code & 1))
        rank = torch.where(first & (ids < Nk), votes.gather(-1, run), -1)
        top_v, top_i = rank.topk(min(self.max_candidates, rank.shape[-1]), dim=-1)
        return ids.gather(-1, top_i).long().masked_fill(top_v < 0, -1)

    def _topk(self, queries: Tensor, keys: Tensor, k: int) -> AnnResult:
        q, kf = _prepare(queries, self.metric), _prepare(keys, self.metric)
        sorted_keys, perm = self._sorted_keys(kf)
        H, Nq, D = q.shape
        raw = self.num_tables * (1 + self.probes) * self.bucket_cap
        rows = _rows_per_chunk(Nq, H * (4 * raw + max(self.max_candidates, k) * D))
        parts = []
        for s in range(0, Nq, rows):
            cand = self._candidates(q[:, s:s + rows], sorted_keys, perm)
            if cand.shape[-1] < k:
                cand = F.pad(cand, (0, k - cand.shape[-1]), value=-1)
            parts.append(_rerank(q[:, s:s + rows], kf, cand, k))
        return AnnResult(torch.cat([p.scores for p in parts], 1), torch.cat([p.indices for p in parts], 1))

    def _key_mask(self, queries: Tensor, keys: Tensor) -> Tensor:
        q_codes = self._hash(queries, self.probes).flatten(2).sort(dim=-1).values  # (H, L, Nq*P1)
        k_codes = self._hash(keys, 0).squeeze(-1)  # (H, L, Nk)
        pos = torch.searchsorted(q_codes, k_codes).clamp_max(q_codes.shape[-1] - 1)
        shared = q_codes.gather(-1, pos) == k_codes  # (H, L, Nk)
        return shared.sum(dim=1) >= self.mask_min_tables

    def _block_scores(self, queries: Tensor, keys: Tensor, q_block: int, k_block: int) -> Tensor:
        # Bucket collisions between the queries of a block and the keys of a block,
        # summed over tables: hist_q (H, nQB, L*B) @ hist_k^T (H, L*B, nKB), B = 2**bits.
        bits = min(self.block_bits, self.num_bits)
        hist_q = self._histogram(self._hash(queries, 0).squeeze(-1), bits, q_block)
        hist_k = self._histogram(self._hash(keys, 0).squeeze(-1), bits, k_block)
        return hist_q @ hist_k.transpose(1, 2)

    @staticmethod
    def _histogram(codes: Tensor, bits: int, block: int) -> Tensor:
        """codes (H, L, N) -> per-block bucket counts (H, nB, L * 2**bits) float32."""
        H, L, N = codes.shape
        nb, B = math.ceil(N / block), 2 ** bits
        blk = (torch.arange(N, device=codes.device) // block).view(1, 1, N)
        table = torch.arange(L, device=codes.device).view(1, L, 1)
        cell = (blk * L + table) * B + (codes & (B - 1))  # (H, L, N)
        hist = torch.zeros(H, nb * L * B, device=codes.device)
        hist.scatter_add_(1, cell.view(H, -1), torch.ones(H, L * N, device=codes.device))
        return hist.view(H, nb, L * B)


def _import_faiss():
    try:
        import faiss
    except ImportError as err:
        raise ImportError("the 'faiss' ANN backend needs faiss (pip install faiss-cpu)") from err
    import faiss.contrib.torch_utils  # noqa: F401  (lets indexes take torch tensors)

    return faiss


@dataclass
class FaissAnn(_NeighbourBackend):
    """faiss per head: 'flat' (exact), 'hnsw' or 'ivf'; scores re-computed in torch."""

    index: Literal["flat", "hnsw", "ivf"] = "flat"
    hnsw_m: int = 32
    ef_search: int = 64
    nlist: int = 64  # IVF lists, capped at Nk // 39 so k-means has enough points
    nprobe: int = 8
    _gpu: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.index not in ("flat", "hnsw", "ivf"):
            raise ValueError(f"faiss index must be 'flat', 'hnsw' or 'ivf', got {self.index!r}")
        for name in ("hnsw_m", "ef_search", "nlist", "nprobe"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        _import_faiss()  # fail at build time, not in the first frame

    def _make_index(self, faiss, keys: Tensor, k: int):
        """A searchable index over keys (Nk, D), on the GPU when keys are on CUDA."""
        Nk, D = keys.shape
        ip = faiss.METRIC_INNER_PRODUCT
        nlist = max(1, min(self.nlist, Nk // 39))
        if self.index == "flat":
            index = faiss.IndexFlatIP(D)
        elif self.index == "hnsw":
            index = faiss.IndexHNSWFlat(D, self.hnsw_m, ip)
            index.hnsw.efSearch = max(self.ef_search, k)
        else:
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(D), D, nlist, ip)  # keeps its quantizer
        if keys.is_cuda and self.index != "hnsw":  # faiss has no GPU HNSW
            if not self._gpu:
                self._gpu.append(faiss.StandardGpuResources())
            index = faiss.index_cpu_to_gpu(self._gpu[0], keys.device.index or 0, index)
        if self.index == "ivf":
            index.train(keys)
            index.nprobe = min(self.nprobe, nlist)
        index.add(keys)
        return index

    def _topk(self, queries: Tensor, keys: Tensor, k: int) -> AnnResult:
        faiss = _import_faiss()
        q, kf = _prepare(queries, self.metric), _prepare(keys, self.metric)
        search_q, search_k = q, kf
        if q.is_cuda and not hasattr(faiss, "StandardGpuResources"):  # CPU-only faiss build
            search_q, search_k = q.cpu(), kf.cpu()
        kk = min(k, kf.shape[1])
        found = [self._make_index(faiss, search_k[h].contiguous(), kk).search(search_q[h].contiguous(), kk)[1]
                 for h in range(q.shape[0])]  # faiss has no batched-over-heads search
        cand = torch.stack(found).to(q.device)  # (H, Nq, kk), -1 where nothing found
        return _rerank(q, kf, cand, k)


_BACKENDS: dict[str, type[AnnBackend]] = {
    "exact": ExactAnn, "lsh": LshAnn, "quant": QuantAnn, "faiss": FaissAnn,
}


def build_ann(kind: AnnKind, **options) -> AnnBackend:
    """The ANN backend `kind` configured by `options` (the backend's fields)."""
    if kind not in _BACKENDS:
        raise ValueError(f"unknown ANN kind {kind!r}; expected one of {sorted(_BACKENDS)}")
    cls = _BACKENDS[kind]
    allowed = sorted(f.name for f in fields(cls) if f.init)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for ANN kind {kind!r}; expected some of {allowed}")
    return cls(**options)


# ----------------------------------------------------------------------------- statistics


def recall_at_k(approx_indices: Tensor, exact_indices: Tensor) -> float:
    """Fraction of the exact neighbours (..., k) found among the approximate ones
    (..., k'); -1 entries of the exact list are ignored."""
    valid = exact_indices >= 0
    hit = (exact_indices.unsqueeze(-1) == approx_indices.unsqueeze(-2)).any(-1) & valid
    return (hit.sum() / valid.sum().clamp_min(1)).item()


def mass_recall(q: Tensor, keys: Tensor, bias: Tensor | None, kept: Tensor) -> Tensor:
    """Fraction of the dense softmax(q k^T / sqrt(D) + bias) mass on kept keys, a device
    scalar. q (..., Nq, D), keys (..., Nk, D); kept: bool broadcastable to the scores."""
    s = (q.float() @ keys.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias.float()
    return (torch.softmax(s, dim=-1) * kept).sum(-1).mean()


def attention_mass_recall(q: Tensor, k: Tensor, kept_mask: Tensor, scale: float | None = None) -> float:
    """Mean over heads and queries of the dense softmax(scale * q k^T) mass that falls on
    kept keys. kept_mask (H, Nq, Nk) or (H, Nk); scale defaults to 1/sqrt(D)."""
    H, Nq, D = q.shape
    scale = scale if scale is not None else D ** -0.5
    mask = kept_mask.unsqueeze(1) if kept_mask.dim() == 2 else kept_mask
    kf = k.float()
    rows = _rows_per_chunk(Nq, H * k.shape[1])
    mass = torch.zeros((), device=q.device)
    for s in range(0, Nq, rows):
        p = torch.softmax(q[:, s:s + rows].float() @ kf.transpose(1, 2) * scale, dim=-1)
        m = mask if mask.shape[1] == 1 else mask[:, s:s + rows]
        mass += (p * m).sum()
    return (mass / (H * Nq)).item()


# ----------------------------------------------------------------------------- benchmark


def clustered_qk(H: int, Nq: int, Nk: int, D: int, num_centroids: int = 256, noise: float = 0.3,
                 run: int = 1, seed: int = 0, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """Synthetic keys = noisy copies of `num_centroids` centroids, in runs of `run`
    consecutive keys sharing a centroid (spatial locality); queries = noisy copies of
    random keys, taken in key order when run > 1 so query blocks are local too.
    Entries have unit RMS, like qk-normed attention inputs."""
    g = torch.Generator().manual_seed(seed)
    centroids = F.normalize(torch.randn(H, num_centroids, D, generator=g), dim=-1)
    assign = torch.randint(0, num_centroids, (H, math.ceil(Nk / run)), generator=g)
    assign = assign.repeat_interleave(run, dim=1)[:, :Nk]
    keys = centroids.gather(1, assign.unsqueeze(-1).expand(-1, -1, D))
    keys = F.normalize(keys + noise * torch.randn(H, Nk, D, generator=g) / D ** 0.5, dim=-1)
    pick = torch.randint(0, Nk, (H, Nq), generator=g)
    if run > 1:
        pick = pick.sort(dim=1).values
    queries = keys.gather(1, pick.unsqueeze(-1).expand(-1, -1, D))
    queries = F.normalize(queries + noise * torch.randn(H, Nq, D, generator=g) / D ** 0.5, dim=-1)
    return (queries * D ** 0.5).to(device), (keys * D ** 0.5).to(device)


def time_calls(fn, device: torch.device, repeats: int, warmup: int = 1):
    """(ms per call, last result) of fn() after `warmup` calls (mean over the repeats)."""
    out = None
    for _ in range(warmup):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / repeats * 1e3, out


def _benchmark(shape: tuple[int, int, int, int], device: torch.device, repeats: int,
               kinds: list[tuple[str, dict]], k: int = 10, block: int = 64) -> None:
    H, Nq, Nk, D = shape
    q, keys = clustered_qk(H, Nq, Nk, D, run=16, device=str(device))
    q, keys = q.to(torch.bfloat16), keys.to(torch.bfloat16)
    ref = ExactAnn().topk(q, keys, k).indices
    keep = max(1, math.ceil(Nk / block) // 8)
    print(f"\nH={H} Nq={Nq} Nk={Nk} D={D} bf16 on {device}; k={k}; blocks {block}x{block}, "
          f"keeping the best {keep} key blocks (1/8) per query block")
    print(f"{'backend':28s} {'topk ms':>9s} {'blocks ms':>10s} {'mask ms':>9s} "
          f"{'R@' + str(k):>6s} {'R@1':>6s} {'blk mass':>8s} {'mask kept':>9s}")
    for kind, opts in kinds:
        name = kind + "".join(f" {a}={b}" for a, b in opts.items())
        try:
            ann = build_ann(kind, **opts)
        except ImportError as err:
            print(f"{name:28s} skipped: {err}")
            continue
        t_topk, res = time_calls(lambda: ann.topk(q, keys, k), device, repeats)
        t_blk, blocks = time_calls(lambda: ann.block_scores(q, keys, block, block), device, repeats)
        t_mask, mask = time_calls(lambda: ann.key_mask(q, keys), device, repeats)
        kept = dense_block_mask(keep_top_blocks(blocks, keep), block, block, Nq, Nk)
        print(f"{name:28s} {t_topk:9.2f} {t_blk:10.2f} {t_mask:9.2f} {recall_at_k(res.indices, ref):6.3f} "
              f"{recall_at_k(res.indices[..., :1], ref[..., :1]):6.3f} "
              f"{attention_mass_recall(q, keys, kept):8.3f} {mask.float().mean().item():9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Time and recall of the ANN backends.")
    parser.add_argument("--large", action="store_true", help="also run H=12 Nq=4680 Nk=32760 D=128")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], help="backend names to leave out, e.g. faiss-hnsw")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch and faiss (0: default)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            _import_faiss().omp_set_num_threads(args.threads)
        except ImportError:
            pass  # the faiss rows report the missing package themselves
    kinds = [("exact", {}), ("quant", {}), ("quant", {"bits": 4}), ("lsh", {}),
             ("faiss", {}), ("faiss", {"index": "hnsw"}), ("faiss", {"index": "ivf"})]
    kinds = [(kind, opts) for kind, opts in kinds
             if "-".join([kind, *map(str, opts.values())]) not in args.skip]
    _benchmark((4, 64, 4096, 64), device, args.repeats, kinds)
    if args.large:
        _benchmark((12, 4680, 32760, 128), device, max(1, args.repeats // 5), kinds, block=128)


if __name__ == "__main__":
    main()
