"""Attention micro-benchmarks at the Wan2.1-1.3B shape: `python -m runtime.micro_bench --device cuda --out DIR`.

Shapes (defaults): 12 heads x 128, bf16, a 3-latent-frame chunk of 4680 queries
(3 x 1560 tokens), cached keys 32760 (21 frames), 65520 and 131040; the engine's
2-frame merged pass (3120 queries, the first 1560 committed) at the first length.
Sections, every time the median of `--repeats` calls after `--warmup` calls (on CUDA
each call between CUDA events; the first call, which compiles, is timed separately):

  dense     F.scaled_dot_product_attention over [cache | chunk] (torch picks the backend)
  flex      AnnSA's block-sparse FlexAttention kernel (runtime/flex_sparse.py) at each
            block density: kernel only (block lists prebuilt), and with the selection
            (pooled block scores, forced sink/recent blocks, top-k, block lists); both as
            a ratio to dense at the same length. `density` is the kept fraction of the
            cache blocks; `computed` the fraction of [cache | chunk] keys each query
            block visits (the chunk is always visited)
  triton    AnnSA's Triton kernel (runtime/sparse_kernel.py): kernel alone, with the
            selection eagerly, and with the selection replayed from one CUDA graph, against
            dense SDPA eagerly and from a graph; rows by kept fraction of the cache blocks
            (`--densities`) and by fraction of [cache | chunk] keys visited (`--computed`).
            More than one `--triton-tiles` choice: each timed first, the fastest used
  merged    the 2-frame merged pass: dense (two SDPA calls, as staged_attention does) and
            flex (and the triton kernel) at 25% with the clean queries masked off the noisy frame
  bias      the per-key log-count bias: SDPA with an additive (1, H, 1, L) bias in the
            query dtype; flex with a score_mod bias at full and 25% density; the triton
            kernel reading float32 log counts in place; and the same without bias
  tma       flex at 25% with kernel_options USE_TMA (skipped with a note if it fails)
  tempcache TempCache.commit of one frame for all layers (30) at a full budget
            (21 frames, merge_target 0.4 so that random keys merge, match_frames 2),
            measured as (stage + commit) minus stage alone for all layers; and one full
            transformer layer at the chunk shape (QKV, dense self-attention over the
            budget, cross-attention over 512 prompt tokens, output projections, MLP
            1536 -> 8960 -> 1536). A chunk is estimated as steps x layers x that layer
            (measured), and as layers x steps x (dense attention + 0.54 ms) from the
            reference figures; the merge cost per chunk (one commit per frame) is
            reported as a fraction of both. On CUDA the stage and commit are also
            captured as CUDA graphs and replayed, as the engine runs them once the
            budget is in use: the device's own time, without the host's launch cost.
            `--merge-profile N` adds where the time goes: the largest operators and
            Triton kernels of N eager stage-and-commit calls (torch.profiler).

Prints a compact table and writes DIR/micro_bench.json. `--small` runs tiny shapes
(CPU smoke test, uncompiled flex on CPU).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from runtime import sparse_kernel
from runtime.ann import pooled_block_scores
from runtime.attention import sdpa, staged_attention
from runtime.cache import CacheSpec
from runtime.flex_sparse import FlexBlockSparse, compiled_signatures
from runtime.sparse_kernel import annsa_attention
from runtime.tempcache import TempCache

REFERENCE_NON_ATTENTION_MS = 0.54  # per layer per chunk pass on an H100 (REFERENCE figures)


def timed(fn, device: torch.device, warmup: int, repeats: int) -> dict:
    """{'ms': median, 'first_s': the first call (compiles), 'all_ms': every repeat}."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return {"ms": statistics.median(times), "first_s": first, "all_ms": times}


class Selection:
    """AnnSA's selection for one shape: pooled block scores of the chunk's queries against
    the cache blocks, sink (first frame) and recent (last 2 frames) blocks forced, top-k,
    then the kernel's block lists."""

    def __init__(self, kernel: FlexBlockSparse, h: int, q_len: int, cached: int, commit: int, block: int,
                 frame_tokens: int, device):
        self.kernel, self.q_len, self.cached, self.commit, self.block = kernel, q_len, cached, commit, block
        self.nsel = cached // block
        slots = torch.arange(self.nsel * block, device=device)
        forced = (slots < frame_tokens) | (slots >= cached - 2 * frame_tokens)
        self.forced = forced.view(self.nsel, block).any(-1)

    def keep(self, density: float) -> int:
        return max(1, min(self.nsel, math.ceil(density * self.nsel)))

    def keep_computed(self, computed: float) -> int:
        """Kept blocks so that `computed` of the [cache | chunk] keys are visited."""
        kv = self.cached + self.q_len
        return max(1, min(self.nsel, round((computed * kv - (kv - self.nsel * self.block)) / self.block)))

    def __call__(self, q, k, bias, density: float):
        return self.kernel.plan(self.indices(q, k, bias, self.keep(density)), self.q_len, self.commit, self.cached,
                                self.cached + self.q_len, k.shape[2])

    def indices(self, q, k, bias, keep: int):
        """(B, H, nQB, keep) indices of the kept cache blocks."""
        b, h, m, d = q.shape
        n = self.nsel * self.block
        logc = None if bias is None else bias[:, :, :n].reshape(b * h, n).float()
        s = pooled_block_scores(q.reshape(b * h, m, d), k[:, :, :n].reshape(b * h, n, d), self.block, self.block,
                                key_logcount=logc)
        s = s.masked_fill(self.forced, float("inf"))
        return s.topk(keep, dim=-1, sorted=False).indices.view(b, h, -1, keep)

    def computed(self, density: float) -> float:
        return self.computed_of(self.keep(density))

    def computed_of(self, keep: int) -> float:
        kv = self.cached + self.q_len
        return (keep * self.block + kv - self.nsel * self.block) / kv


def bench_flex(out: dict, args, device, dt, kernel: FlexBlockSparse, lengths) -> None:
    h, d, m, n = args.heads, args.head_dim, args.queries, args.frame_tokens
    out["dense"], out["flex"] = {}, []
    for lc in lengths:
        q = torch.randn(1, h, m, d, device=device, dtype=dt)
        k, v = (torch.randn(1, h, lc + m, d, device=device, dtype=dt) for _ in range(2))
        dense = timed(lambda: sdpa(q, k, v), device, args.warmup, args.repeats)
        out["dense"][str(lc)] = dense["ms"]
        print(f"cached {lc:7d}  dense SDPA {dense['ms']:8.3f} ms", flush=True)
        sel = Selection(kernel, h, m, lc, 0, args.block, n, device)
        for dens in args.densities:
            plan = sel(q, k, None, dens)
            kern = timed(lambda: kernel(q, k, v, None, plan), device, args.warmup, args.repeats)
            total = timed(lambda: kernel(q, k, v, None, sel(q, k, None, dens)), device, args.warmup, args.repeats)
            select = timed(lambda: sel(q, k, None, dens), device, args.warmup, args.repeats)
            row = {"cached": lc, "density": dens, "kept_blocks": sel.keep(dens), "cache_blocks": sel.nsel,
                   "computed": sel.computed(dens), "kernel_ms": kern["ms"], "with_selection_ms": total["ms"],
                   "selection_ms": select["ms"], "kernel_ratio": kern["ms"] / dense["ms"],
                   "total_ratio": total["ms"] / dense["ms"], "first_call_s": kern["first_s"]}
            out["flex"].append(row)
            print(f"   density {dens:4.2f} (computed {row['computed']:.2f})  flex {kern['ms']:8.3f} ms "
                  f"x{row['kernel_ratio']:.2f}  +selection {total['ms']:8.3f} ms x{row['total_ratio']:.2f}  "
                  f"(selection alone {select['ms']:.3f} ms)", flush=True)
        del q, k, v


def bench_merged(out: dict, args, device, dt, kernel, lc) -> None:
    h, d, n = args.heads, args.head_dim, args.frame_tokens
    m, c = 2 * n, n
    q = torch.randn(1, h, m, d, device=device, dtype=dt)
    k, v = (torch.randn(1, h, lc + m, d, device=device, dtype=dt) for _ in range(2))
    dense = timed(lambda: staged_attention(q, k, v, None, c), device, args.warmup, args.repeats)
    sel = Selection(kernel, h, m, lc, c, args.block, n, device)
    plan = sel(q, k, None, 0.25)
    kern = timed(lambda: kernel(q, k, v, None, plan), device, args.warmup, args.repeats)
    total = timed(lambda: kernel(q, k, v, None, sel(q, k, None, 0.25)), device, args.warmup, args.repeats)
    out["merged"] = {"cached": lc, "queries": m, "commit": c, "dense_ms": dense["ms"], "density": 0.25,
                     "computed": sel.computed(0.25), "flex_ms": kern["ms"], "flex_with_selection_ms": total["ms"],
                     "kernel_ratio": kern["ms"] / dense["ms"], "total_ratio": total["ms"] / dense["ms"]}
    print(f"merged pass ({m} queries, {c} committed) over {lc}: dense {dense['ms']:.3f} ms, flex 25% "
          f"{kern['ms']:.3f} ms x{out['merged']['kernel_ratio']:.2f}, +selection {total['ms']:.3f} ms "
          f"x{out['merged']['total_ratio']:.2f}", flush=True)
    if sparse_kernel.available(q):
        tiles = triton_tiles(out, args)
        keep = sel.keep(0.25)
        idx = sel.indices(q, k, None, keep)
        tri = timed(lambda: annsa_attention(q, k, v, None, idx, lc, c, sel_block=args.block, **tiles), device,
                    args.warmup, args.repeats)["ms"]
        out["merged"].update({"triton_ms": tri, "triton_ratio": tri / dense["ms"], "triton_tiles": tiles})
        print(f"   triton 25% {tri:.3f} ms x{tri / dense['ms']:.2f}", flush=True)


def triton_tiles(out: dict, args) -> dict:
    """The triton kernel's tiles: the triton section's choice, else the first `--triton-tiles`."""
    return out.get("triton", {}).get("tiles", args.triton_tiles[0])


def bench_bias(out: dict, args, device, dt, kernel, lc) -> None:
    h, d, m = args.heads, args.head_dim, args.queries
    lk = lc + m
    q = torch.randn(1, h, m, d, device=device, dtype=dt)
    k, v = (torch.randn(1, h, lk, d, device=device, dtype=dt) for _ in range(2))
    counts = torch.randint(1, 5, (1, h, lk), device=device).float()
    logc = counts.log()
    logc[:, :, :lc][torch.rand(1, h, lc, device=device) < 0.05] = float("-inf")  # a few empty slots
    logc[:, :, lc:] = 0.0
    bias_q = logc.to(dt)  # (1, H, L) in the query dtype
    sel = Selection(kernel, h, m, lc, 0, args.block, args.frame_tokens, device)
    res = {"cached": lc,
           "sdpa_ms": timed(lambda: sdpa(q, k, v), device, args.warmup, args.repeats)["ms"],
           "sdpa_bias_ms": timed(lambda: sdpa(q, k, v, bias_q[:, :, None]), device, args.warmup, args.repeats)["ms"]}
    for dens, tag in ((1.0, "full"), (0.25, "25")):
        plan = sel(q, k, logc, dens)
        res[f"flex_{tag}_ms"] = timed(lambda: kernel(q, k, v, None, plan), device, args.warmup, args.repeats)["ms"]
        res[f"flex_{tag}_bias_ms"] = timed(lambda: kernel(q, k, v, bias_q, plan), device, args.warmup,
                                           args.repeats)["ms"]
        if sparse_kernel.available(q):  # the log counts read in place, in float32 as TempCache keeps them
            tiles = triton_tiles(out, args)
            idx = sel.indices(q, k, logc, sel.keep(dens))
            for bias, name in ((None, f"triton_{tag}_ms"), (logc, f"triton_{tag}_bias_ms")):
                res[name] = timed(lambda: annsa_attention(q, k, v, bias, idx, lc, 0, sel_block=args.block, **tiles),
                                  device, args.warmup, args.repeats)["ms"]
    for key in [k_ for k_ in res if k_.endswith("_ms") and k_ != "sdpa_ms"]:
        res[key.replace("_ms", "_ratio")] = res[key] / res["sdpa_ms"]
    out["bias"] = res
    print(f"bias over {lc}: SDPA {res['sdpa_ms']:.3f} / with bias {res['sdpa_bias_ms']:.3f} ms; flex full "
          f"{res['flex_full_ms']:.3f} / {res['flex_full_bias_ms']:.3f} ms; flex 25% {res['flex_25_ms']:.3f} / "
          f"{res['flex_25_bias_ms']:.3f} ms (no bias / score_mod bias)"
          + (f"; triton full {res['triton_full_ms']:.3f} / {res['triton_full_bias_ms']:.3f} ms, 25% "
             f"{res['triton_25_ms']:.3f} / {res['triton_25_bias_ms']:.3f} ms" if "triton_25_ms" in res else ""),
          flush=True)


def bench_tma(out: dict, args, device, dt, lc) -> None:
    h, d, m = args.heads, args.head_dim, args.queries
    q = torch.randn(1, h, m, d, device=device, dtype=dt)
    k, v = (torch.randn(1, h, lc + m, d, device=device, dtype=dt) for _ in range(2))
    try:
        kernel = FlexBlockSparse(args.block, args.block, compile=args.compile, kernel_options={"USE_TMA": True},
                                 max_compiles=64)
        sel = Selection(kernel, h, m, lc, 0, args.block, args.frame_tokens, device)
        plan = sel(q, k, None, 0.25)
        ms = timed(lambda: kernel(q, k, v, None, plan), device, args.warmup, args.repeats)["ms"]
        out["tma"] = {"cached": lc, "density": 0.25, "flex_tma_ms": ms}
        print(f"flex 25% over {lc} with USE_TMA: {ms:.3f} ms", flush=True)
    except Exception as err:  # an optional kernel option: record why it did not run
        out["tma"] = {"cached": lc, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        print(f"USE_TMA failed: {out['tma']['error']}", flush=True)


def graph_of(fn, device):
    """`fn` captured in a CUDA graph (after an eager call, which allocates and compiles):
    returns the graph's replay, the device's time without the host's launch cost."""
    fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _tile_sweep(args, device, dt, lc) -> tuple[dict, list]:
    """Time each `--triton-tiles` choice at the first length and 25% of the cache blocks;
    returns the fastest and every row (each checked against the first choice)."""
    h, d, m = args.heads, args.head_dim, args.queries
    q = torch.randn(1, h, m, d, device=device, dtype=dt)
    k, v = (torch.randn(1, h, lc + m, d, device=device, dtype=dt) for _ in range(2))
    sel = Selection(None, h, m, lc, 0, args.block, args.frame_tokens, device)
    idx = sel.indices(q, k, None, sel.keep(0.25))
    rows, first = [], None
    for tiles in args.triton_tiles:
        try:
            o = annsa_attention(q, k, v, None, idx, lc, 0, sel_block=args.block, **tiles)
            ms = timed(lambda: annsa_attention(q, k, v, None, idx, lc, 0, sel_block=args.block, **tiles), device,
                       args.warmup, args.repeats)["ms"]
        except Exception as err:  # a tile choice that does not fit the device (shared memory)
            rows.append({"tiles": tiles, "error": f"{type(err).__name__}: {str(err)[:200]}"})
            print(f"   tiles {tiles}: failed ({rows[-1]['error'][:80]})", flush=True)
            continue
        first = o if first is None else first
        rows.append({"tiles": tiles, "ms": ms, "max_abs_diff": (o.float() - first.float()).abs().max().item()})
        print(f"   tiles {tiles}: {ms:.3f} ms", flush=True)
    ok = [r for r in rows if "ms" in r]
    if not ok:
        raise RuntimeError(f"no --triton-tiles choice ran: {rows}")
    return min(ok, key=lambda r: r["ms"])["tiles"], rows


def bench_triton(out: dict, args, device, dt, lengths) -> None:
    """AnnSA's Triton kernel (runtime/sparse_kernel.py): the kernel alone, the selection
    (pooled block scores, forced blocks, top-k) plus the kernel eagerly, and both replayed
    from one CUDA graph, against dense SDPA eagerly and from a graph. Rows for each
    `--densities` (kept fraction of the cache blocks) and each `--computed` (fraction of the
    [cache | chunk] keys each query visits, the chunk included)."""
    h, d, m, n = args.heads, args.head_dim, args.queries, args.frame_tokens
    probe = torch.empty(1, device=device)
    if not sparse_kernel.available(probe):
        out["triton"] = {"skipped": "Triton cannot run on this device (no CUDA; TRITON_INTERPRET unset)"}
        print(f"triton: skipped ({out['triton']['skipped']})", flush=True)
        return
    cuda = device.type == "cuda"
    tiles, sweep = (_tile_sweep(args, device, dt, lengths[0]) if len(args.triton_tiles) > 1
                    else (args.triton_tiles[0], []))
    res = {"tiles": tiles, "sweep": sweep, "dense_ms": {}, "dense_graph_ms": {}, "rows": []}
    print(f"triton tiles {tiles}", flush=True)
    for lc in lengths:
        q = torch.randn(1, h, m, d, device=device, dtype=dt)
        k, v = (torch.randn(1, h, lc + m, d, device=device, dtype=dt) for _ in range(2))
        dense = timed(lambda: sdpa(q, k, v), device, args.warmup, args.repeats)["ms"]
        dense_g = timed(graph_of(lambda: sdpa(q, k, v), device), device, args.warmup, args.repeats)["ms"] if cuda \
            else dense
        res["dense_ms"][str(lc)], res["dense_graph_ms"][str(lc)] = dense, dense_g
        print(f"cached {lc:7d}  dense SDPA {dense:8.3f} ms, from a graph {dense_g:8.3f} ms", flush=True)
        sel = Selection(None, h, m, lc, 0, args.block, n, device)
        targets = [("cache_blocks", x, sel.keep(x)) for x in args.densities]
        targets += [("computed", x, sel.keep_computed(x)) for x in args.computed]
        for kind, x, keep in targets:
            def attend(idx):
                return annsa_attention(q, k, v, None, idx, lc, 0, sel_block=args.block, **tiles)

            idx = sel.indices(q, k, None, keep)
            kern = timed(lambda: attend(idx), device, args.warmup, args.repeats)["ms"]
            select = timed(lambda: sel.indices(q, k, None, keep), device, args.warmup, args.repeats)["ms"]
            total = timed(lambda: attend(sel.indices(q, k, None, keep)), device, args.warmup, args.repeats)["ms"]
            total_g = timed(graph_of(lambda: attend(sel.indices(q, k, None, keep)), device), device, args.warmup,
                            args.repeats)["ms"] if cuda else total
            row = {"cached": lc, "target": kind, "value": x, "kept_blocks": keep, "cache_blocks": sel.nsel,
                   "density_cache_blocks": keep / sel.nsel, "computed": sel.computed_of(keep), "kernel_ms": kern,
                   "selection_ms": select, "with_selection_ms": total, "graph_with_selection_ms": total_g,
                   "kernel_ratio": kern / dense, "total_ratio": total / dense, "graph_total_ratio": total_g / dense_g}
            res["rows"].append(row)
            print(f"   {kind} {x:4.2f}: {keep:4d}/{sel.nsel} blocks, computed {row['computed']:.3f}  kernel "
                  f"{kern:7.3f} ms x{row['kernel_ratio']:.2f}  +selection {total:7.3f} ms x{row['total_ratio']:.2f}"
                  f"  graph {total_g:7.3f} ms x{row['graph_total_ratio']:.2f}  (selection {select:.3f})", flush=True)
        del q, k, v
    out["triton"] = res


class Layer(torch.nn.Module):
    """One DiT block's work at the chunk shape (no norms or modulation: matmuls + attention)."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.h = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.o = torch.nn.Linear(dim, dim)
        self.cq = torch.nn.Linear(dim, dim)
        self.co = torch.nn.Linear(dim, dim)
        self.up = torch.nn.Linear(dim, ffn)
        self.down = torch.nn.Linear(ffn, dim)

    def forward(self, x, cache_k, cache_v, pk, pv):
        b, m, dim = x.shape
        h, d = self.h, dim // self.h
        q, k, v = self.qkv(x).view(b, m, 3, h, d).permute(2, 0, 3, 1, 4)
        lc = cache_k.shape[2] - m
        cache_k[:, :, lc:] = k  # staged after the cache, as the caches do
        cache_v[:, :, lc:] = v
        a = F.scaled_dot_product_attention(q, cache_k, cache_v)
        x = x + self.o(a.transpose(1, 2).reshape(b, m, dim))
        cq = self.cq(x).view(b, m, h, d).transpose(1, 2)
        x = x + self.co(F.scaled_dot_product_attention(cq, pk, pv).transpose(1, 2).reshape(b, m, dim))
        return x + self.down(F.gelu(self.up(x), approximate="tanh"))


def bench_tempcache(out: dict, args, device, dt) -> None:
    h, d, n, layers = args.heads, args.head_dim, args.frame_tokens, args.layers
    spec = CacheSpec(layers, 1, h, d, n, device, dt)
    match = dict(match="post", match_frames=2) if args.merge_match == "post" else dict(match="local", radius=0, match_frames=1)
    cache = TempCache(spec, budget_frames=args.budget_frames, sink_frames=1, threshold=0.95, merge_target=0.4, **match)
    frame = [(torch.randn(1, h, n, d, device=device, dtype=dt), torch.randn(1, h, n, d, device=device, dtype=dt))
             for _ in range(4)]
    step = [0]

    def stage_all():
        k, v = frame[step[0] % len(frame)]
        for layer in range(layers):
            cache.stage(layer, k, v, k)

    def commit_all():
        k, v = frame[step[0] % len(frame)]
        step[0] += 1
        for layer in range(layers):
            cache.stage(layer, k, v, k)
            cache.commit(layer, n)

    for _ in range(args.budget_frames + 2):  # fill the budget
        commit_all()
    both = timed(commit_all, device, args.warmup, args.repeats)
    staged = timed(stage_all, device, args.warmup, args.repeats)
    merge_ms = max(both["ms"] - staged["ms"], 0.0)
    graphed = {}
    if device.type == "cuda":
        # the same work replayed from CUDA graphs, as the engine runs it once the budget is
        # in use (runtime/graphs.py): the device's time without the host's launch cost
        for name, fn in (("stage_and_commit", commit_all), ("stage", stage_all)):
            fn()
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            graphed[name] = timed(graph.replay, device, args.warmup, args.repeats)["ms"]
        graphed["commit"] = max(graphed["stage_and_commit"] - graphed["stage"], 0.0)
    profiled = profile_ops(commit_all, device, args.merge_profile) if args.merge_profile else None
    res = {"layers": layers, "frame_tokens": n, "budget_frames": args.budget_frames, "merge_target": 0.4,
           "match": args.merge_match, **{k: v for k, v in match.items() if k != "match"}, "stage_and_commit_ms": both["ms"], "stage_ms": staged["ms"], "commit_ms": merge_ms,
           "merge_rate": sum(cache.last_merge_rates()) / layers,
           "groups_per_head": cache.num_tokens(0), "capacity": cache._capacity}
    del cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # one full layer at the chunk shape, dense self-attention over the budget
    dim = h * d
    m, lc = args.queries, args.budget_frames * n
    layer = Layer(dim, h, args.ffn).to(device=device, dtype=dt)
    x = torch.randn(1, m, dim, device=device, dtype=dt)
    ck, cv = (torch.randn(1, h, lc + m, d, device=device, dtype=dt) for _ in range(2))
    pk, pv = (torch.randn(1, h, args.prompt_tokens, d, device=device, dtype=dt) for _ in range(2))
    qa = torch.randn(1, h, m, d, device=device, dtype=dt)
    with torch.no_grad():
        layer_ms = timed(lambda: layer(x, ck, cv, pk, pv), device, args.warmup, args.repeats)["ms"]
        attn_ms = timed(lambda: sdpa(qa, ck, cv), device, args.warmup, args.repeats)["ms"]
    frames_per_chunk = max(1, round(m / n))
    chunk_measured = args.steps * layers * layer_ms
    chunk_reference = args.steps * layers * (attn_ms + REFERENCE_NON_ATTENTION_MS)
    merge_per_chunk = frames_per_chunk * merge_ms
    res.update({"layer_ms": layer_ms, "layer_attention_ms": attn_ms, "steps": args.steps,
                "frames_per_chunk": frames_per_chunk, "chunk_ms_measured": chunk_measured,
                "chunk_ms_reference": chunk_reference, "merge_per_chunk_ms": merge_per_chunk,
                "fraction_measured": merge_per_chunk / chunk_measured,
                "fraction_reference": merge_per_chunk / chunk_reference})
    if profiled is not None:
        res["profile"] = profiled
    if graphed:
        res.update({f"graph_{k}_ms": v for k, v in graphed.items()})
        res["graph_fraction_measured"] = frames_per_chunk * graphed["commit"] / chunk_measured
    out["tempcache"] = res
    print(f"tempcache commit of one {n}-token frame, {layers} layers, budget {args.budget_frames} frames: "
          f"{merge_ms:.2f} ms (stage+commit {both['ms']:.2f}, stage {staged['ms']:.2f}; merge rate "
          f"{res['merge_rate']:.2f}); one layer {layer_ms:.3f} ms (attention {attn_ms:.3f}); chunk of "
          f"{frames_per_chunk} frames x {args.steps} steps ~ {chunk_measured:.1f} ms measured / "
          f"{chunk_reference:.1f} ms reference: merge = {res['fraction_measured']:.1%} / "
          f"{res['fraction_reference']:.1%}"
          + (f"; from a CUDA graph the merge takes {graphed['commit']:.2f} ms = "
             f"{res['graph_fraction_measured']:.1%}" if graphed else ""), flush=True)
    for row in profiled or []:
        print(f"   {row['us_per_call']:9.1f} us  {row['calls_per_call']:6.1f} calls  {row['name'][:60]}", flush=True)


def profile_ops(fn, device: torch.device, repeats: int, top: int = 25) -> list[dict]:
    """Where `fn`'s time goes: torch.profiler over `repeats` eager calls, by PyTorch operator
    and by Triton kernel (a kernel that no operator launched), the `top` largest by their own
    device time (CPU time on a CPU), per call of `fn`."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    fn()
    sync()
    with profile(activities=acts) as prof:
        for _ in range(repeats):
            fn()
        sync()
    rows = []
    for e in prof.key_averages():
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        op = e.key.startswith("aten::")
        # a kernel row that no operator launched: a Triton kernel (the `void ...` rows of
        # PyTorch's own kernels are already counted in their operators' rows)
        kernel = cuda and e.device_type == torch.autograd.DeviceType.CUDA and not e.key.startswith("void ")
        if us > 0 and (op or kernel):
            rows.append({"name": e.key, "us_per_call": us / repeats, "calls_per_call": e.count / repeats})
    rows.sort(key=lambda r: -r["us_per_call"])
    return rows[:top]


SMALL = dict(heads=2, head_dim=32, frame_tokens=64, queries=192, lengths=[1344, 2688], block=64, layers=2,
             ffn=256, prompt_tokens=32, repeats=2, warmup=0)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True, help="directory for micro_bench.json")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--frame-tokens", type=int, default=1560)
    ap.add_argument("--queries", type=int, default=4680, help="queries of the chunk (3 frames)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32760, 65520, 131040], help="cached keys")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.4, 0.6])
    ap.add_argument("--computed", type=float, nargs="+", default=[0.25],
                    help="triton rows: fractions of the [cache | chunk] keys each query visits")
    ap.add_argument("--triton-tiles", type=json.loads, nargs="+", default=[dict(sparse_kernel.DEFAULT_TILES)],
                    help="tile choices of the triton kernel (JSON objects of block_m, block_n, num_warps, "
                         "num_stages); more than one: timed at the first length and 25%%, the fastest used")
    ap.add_argument("--block", type=int, default=128, help="flex block size (queries and keys)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--budget-frames", type=int, default=21)
    ap.add_argument("--ffn", type=int, default=8960)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4, help="denoising passes per chunk, for the chunk estimate")
    ap.add_argument("--merge-match", choices=["post", "same-position"], default="post",
                    help="TempCache correspondence for the merge timing: post-RoPE over the last 2 commits' groups, "
                         "or the group at the same screen position in the last commit (local, radius 0)")
    ap.add_argument("--merge-profile", type=int, default=0, metavar="N",
                    help="also profile N eager stage-and-commit calls of the merge (torch.profiler): the largest "
                         "operators and Triton kernels by their own device time, in the JSON and printed")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", choices=["auto", "yes", "no"], default="auto",
                    help="compile flex (auto: on CUDA only; uncompiled flex on CUDA is refused)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["flex", "triton", "merged", "bias", "tma", "tempcache"])
    args = ap.parse_args(argv)
    if args.small:
        defaults = ap.parse_args(["--out", "x"])
        for key, val in SMALL.items():
            if getattr(args, key) == getattr(defaults, key):
                setattr(args, key, val)
    args.compile = args.compile == "yes" or (args.compile == "auto" and torch.device(args.device).type == "cuda")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dt = torch.device(args.device), torch.bfloat16
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("micro_bench: --device cuda but CUDA is not available")
    torch.manual_seed(0)  # the random inputs are the same on every run
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": "bfloat16",
           "compiled_flex": args.compile,
           "shapes": {"heads": args.heads, "head_dim": args.head_dim, "frame_tokens": args.frame_tokens,
                      "queries": args.queries, "cached": args.lengths, "densities": args.densities,
                      "block": args.block, "layers": args.layers, "budget_frames": args.budget_frames,
                      "ffn": args.ffn, "prompt_tokens": args.prompt_tokens, "steps": args.steps},
           "timing": f"median of {args.repeats} calls after {args.warmup} warm-up calls (first call excluded)"}
    print(f"{name}, torch {torch.__version__}, bf16, {args.heads} heads x {args.head_dim}, {args.queries} queries, "
          f"flex blocks {args.block}, compiled flex: {args.compile}", flush=True)
    kernel = FlexBlockSparse(args.block, args.block, compile=args.compile, max_compiles=64)
    t0 = time.perf_counter()
    with torch.no_grad():
        if "flex" not in args.skip:
            bench_flex(out, args, device, dt, kernel, args.lengths)
        if "triton" not in args.skip:
            bench_triton(out, args, device, dt, args.lengths)
        if "merged" not in args.skip:
            bench_merged(out, args, device, dt, kernel, args.lengths[0])
        if "bias" not in args.skip:
            bench_bias(out, args, device, dt, kernel, args.lengths[0])
        if "tma" not in args.skip and device.type == "cuda":
            bench_tma(out, args, device, dt, args.lengths[0])
        if "tempcache" not in args.skip:
            bench_tempcache(out, args, device, dt)
    out["compiled_signatures"] = compiled_signatures()
    out["wall_s"] = time.perf_counter() - t0
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "micro_bench.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {path / 'micro_bench.json'} ({out['wall_s']:.0f} s)")
    return out


if __name__ == "__main__":
    main()
