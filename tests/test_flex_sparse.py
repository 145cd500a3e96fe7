"""AnnSA's FlexAttention path (runtime/flex_sparse.py) on CPU: exact at full density, equal to
the gather path for the same selection, block lists that agree with the mask_mod and skip
unselected blocks, the compile guards, and the pooled block scorer. The kernel runs
uncompiled here (it then applies only the mask_mod, element by element); the block-list
tests check that the compiled kernel, which reads the block lists, sees the same pairs."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import runtime.flex_sparse as fs
from runtime.ann import pooled_block_scores
from runtime.attention import CachedSelfAttention
from runtime.cache import CacheSpec
from runtime.flex_sparse import FlexBlockSparse, mask_mod_dense, plan_dense_mask
from runtime.sparse import AnnSelfAttention, AttentionConfig, AttentionRuntime

H, N, D = 2, 8, 16


def spec() -> CacheSpec:
    return CacheSpec(1, 1, H, D, N, torch.device("cpu"), torch.float32)


def filled(policy: str, frames: int, seed: int, **kw):
    """A sparse (flex, uncompiled) and a dense runtime with identical caches."""
    g = torch.Generator().manual_seed(seed)
    base = dict(policy=policy, annsa=True, ann="exact", block=N, density=1.0, max_density=1.0, dense_fraction=0.0,
                budget_frames=8, initial_frames=4, min_blocks=1, kernel="flex", flex_compile=False, flex_block=N,
                merge_target=0.5 if policy == "tempcache" else None)
    base.update(kw)
    rts = [AttentionRuntime(AttentionConfig(**base)), AttentionRuntime(AttentionConfig(**{**base, "annsa": False}))]
    caches = [rt.build_cache(spec()) for rt in rts]
    for _ in range(frames):
        k, v = torch.randn(1, H, N, D, generator=g), torch.randn(1, H, N, D, generator=g)
        for c in caches:
            c.stage(0, k, v, k)
            c.commit(0)
    return rts, caches, g


def chunk(g, merged: bool):
    m = 2 * N if merged else N
    return (torch.randn(1, H, m, D, generator=g) for _ in range(3)), (N if merged else 0)


@pytest.mark.parametrize("policy", ["dense", "tempcache"])
@pytest.mark.parametrize("merged_pass", [False, True])
@pytest.mark.parametrize("flex_block", [N, 2 * N, 5])  # aligned, two frames per block, ragged
def test_flex_at_full_density_equals_dense(policy, merged_pass, flex_block):
    (rt, rt_dense), (cache, cache_dense), g = filled(policy, 6, seed=1, flex_block=flex_block)
    if policy == "tempcache":  # merged groups (log counts > 0) and empty slots (-inf) are both present
        counts = cache.count[0][:, :, : cache._capacity]
        assert (counts > 1).any() and (counts == 0).any()
    (q, k, v), commit = chunk(g, merged_pass)
    out = AnnSelfAttention(rt, cache, commit, sparse=True)(0, q, k, v, k)
    ref = CachedSelfAttention(cache_dense, commit)(0, q, k, v, k)
    assert rt.sa_stats.summary()["density"] == 1.0
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("policy, merged_pass, select", [
    ("dense", False, "pooled"), ("dense", True, "pooled"), ("tempcache", False, "pooled"),
    ("tempcache", True, "pooled"), ("tempcache", True, "ann"), ("dense", False, "ann")])
def test_flex_below_full_density_equals_the_gather_path(policy, merged_pass, select):
    """Same scores, same kept blocks: both kernels are exact over what they keep."""
    kw = dict(density=0.3, max_density=0.9, recent_frames=1, select=select, stats_recall=True)
    (rt_flex, _), (cache_a, dense_a), g = filled(policy, 10, seed=2, **kw)
    (_, _), (cache_b, _), _ = filled(policy, 10, seed=2, **kw)
    rt_gather = AttentionRuntime(AttentionConfig(**{**rt_flex.cfg.__dict__, "kernel": "gather"}))
    (q, k, v), commit = chunk(g, merged_pass)
    out_flex = AnnSelfAttention(rt_flex, cache_a, commit, sparse=True)(0, q, k, v, k)
    out_gather = AnnSelfAttention(rt_gather, cache_b, commit, sparse=True)(0, q, k, v, k)
    sf, sg = rt_flex.sa_stats.summary(), rt_gather.sa_stats.summary()
    assert sf["density"] == pytest.approx(sg["density"]) and sf["density"] < 0.6
    assert sf["recall"] == pytest.approx(sg["recall"], abs=1e-5) and sf["recall"] < 1
    assert torch.allclose(out_flex, out_gather, atol=1e-5)
    assert not torch.allclose(out_flex, CachedSelfAttention(dense_a, commit)(0, q, k, v, k), atol=1e-3)
    assert cache_a.commits[0] == cache_b.commits[0] == 10 + (1 if commit else 0)


@pytest.mark.parametrize("commit", [0, 2 * N, 3 * N])
@pytest.mark.parametrize("blocks", [(16, 16), (8, 24), (16, 5)])
def test_block_lists_agree_with_the_mask_mod_and_skip_unselected_blocks(commit, blocks):
    qb, kb = blocks
    g = torch.Generator().manual_seed(7)
    m, cached, buf = 5 * N, 70, 70 + 7 * N  # ragged everywhere: cached, kv_len and buf_len
    kernel = FlexBlockSparse(qb, kb, compile=False)
    nqb, nsel = math.ceil(m / qb), cached // kb
    keep = max(1, nsel // 3)
    sel = torch.rand(1, H, nqb, nsel, generator=g).topk(keep, dim=-1).indices
    plan = kernel.plan(sel, m, commit, cached, cached + m, buf)
    lists = plan_dense_mask(plan, qb, kb)
    assert torch.equal(lists, mask_mod_dense(plan, qb, kb))
    # what the mask means: the selected cache blocks, the ragged cache tail and the chunk,
    # the noisy frame hidden from the clean queries of a merged pass
    want = torch.zeros(1, H, m, cached + m, dtype=torch.bool)
    for h in range(H):
        for i in range(nqb):
            for j in sel[0, h, i].tolist():
                want[0, h, i * qb:(i + 1) * qb, j * kb:(j + 1) * kb] = True
    want[..., nsel * kb:] = True
    if 0 < commit < m:
        want[:, :, :commit, cached + commit:] = False
    assert torch.equal(lists, want)
    # full blocks are never partly masked, and unselected blocks are not listed at all
    listed = int(plan.full_num.sum() + plan.kv_num.sum())
    assert listed < H * nqb * math.ceil((cached + m) / kb)
    assert int(plan.full_num.min()) >= keep


def test_flex_compiled_kernel_counts_signatures_and_refuses_too_many(monkeypatch):
    calls = []
    monkeypatch.setattr(fs, "_SIGNATURES", set())
    monkeypatch.setattr(fs, "_COMPILED", lambda *a: calls.append(a) or a[0])  # stands in for torch.compile
    kernel = FlexBlockSparse(N, N, compile=True, max_compiles=2)
    for m in (N, 2 * N, 2 * N, N):  # two shapes, each seen twice
        q = torch.zeros(1, H, m, D)
        k = torch.zeros(1, H, 4 * N, D)
        plan = kernel.plan(torch.zeros(1, H, m // N, 1, dtype=torch.long), m, 0, 2 * N, 2 * N + m, 4 * N)
        kernel(q, k, k, None, plan)
    assert len(calls) == 4 and fs.compiled_signatures() == 2
    q = torch.zeros(1, H, 2 * N, D, dtype=torch.float64)  # a third signature
    plan = kernel.plan(torch.zeros(1, H, 2, 1, dtype=torch.long), 2 * N, 0, 2 * N, 4 * N, 4 * N)
    with pytest.raises(RuntimeError, match="signature number 3"):
        kernel(q, k.double(), k.double(), None, plan)


def test_uncompiled_flex_is_refused_on_cuda():
    kernel = FlexBlockSparse(N, N, compile=False)
    plan = kernel.plan(torch.zeros(1, H, 1, 1, dtype=torch.long), N, 0, N, 2 * N, 2 * N)
    q = torch.zeros(1, H, N, D)
    fake = type("FakeCuda", (), {"is_cuda": True, "shape": q.shape})()
    with pytest.raises(ValueError, match="uncompiled"):
        kernel(fake, torch.zeros(1, H, 2 * N, D), torch.zeros(1, H, 2 * N, D), None, plan)


def test_kernel_and_selection_defaults_keep_the_cpu_gather_path():
    rt = AttentionRuntime(AttentionConfig(annsa=True))
    assert rt.sa_kernel("cpu") == "gather" and rt.sa_select("gather") == "ann"
    gpu = "triton" if importlib.util.find_spec("triton") is not None else "flex"
    assert rt.sa_kernel("cuda") == gpu and rt.sa_select(gpu) == "pooled" and rt.sa_select("flex") == "pooled"
    with pytest.raises(ValueError, match="kernel"):
        AttentionConfig(kernel="cutlass")
    with pytest.raises(ValueError, match=r"triton_tiles has unknown keys \['block_k'\]"):
        AttentionConfig(triton_tiles={"block_k": 64})
    with pytest.raises(ValueError, match="select"):
        AttentionConfig(select="lsh")


def test_pooled_block_scores_are_mean_logits_plus_log_counts():
    g = torch.Generator().manual_seed(9)
    q, k = torch.randn(2, 20, D, generator=g), torch.randn(2, 37, D, generator=g)  # ragged blocks
    logc = torch.randn(2, 37, generator=g).abs().log()
    logc[:, 8:16] = float("-inf")  # one empty block
    logc[:, 3] = float("-inf")  # one empty slot
    s = pooled_block_scores(q, k, 8, 8, key_logcount=logc)
    assert s.shape == (2, 3, 5)
    for h in range(2):
        for i in range(3):
            for j in range(5):
                kk, lc = k[h, j * 8:(j + 1) * 8], logc[h, j * 8:(j + 1) * 8]
                ok = torch.isfinite(lc)
                if not ok.any():
                    assert s[h, i, j] == float("-inf")
                    continue
                mean_logit = (q[h, i * 8:(i + 1) * 8] @ kk[ok].T).mean() / math.sqrt(D)
                assert s[h, i, j] == pytest.approx(float(mean_logit + torch.logsumexp(lc[ok], 0)), abs=1e-5)


def test_pooled_block_scores_of_a_cache_prefix_equal_those_of_its_copy():
    # AnnSA scores a prefix of each head's buffer: heads are not adjacent in memory, and
    # the block means take one product per head instead of copying the keys
    g = torch.Generator().manual_seed(4)
    buf = torch.randn(3, 48, D, generator=g)
    q = torch.randn(3, 16, D, generator=g)
    logc = torch.randn(3, 32, generator=g).abs().log()
    logc[1, 8:16] = float("-inf")
    prefix = buf[:, :32]
    assert not prefix.is_contiguous()
    got = pooled_block_scores(q, prefix, 8, 8, key_logcount=logc)
    want = pooled_block_scores(q, prefix.contiguous(), 8, 8, key_logcount=logc)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.isinf(got[1, :, 1]).all()


def test_micro_bench_smoke_runs_and_writes_its_json(tmp_path):
    import json

    from runtime.micro_bench import main

    main(["--device", "cpu", "--small", "--out", str(tmp_path), "--densities", "0.25", "1.0", "--lengths", "1344",
          "--repeats", "1", "--merge-profile", "2"])
    out = json.loads((tmp_path / "micro_bench.json").read_text())
    for key in ("device", "torch", "shapes", "dense", "flex", "merged", "bias", "tempcache"):
        assert key in out
    assert out["shapes"]["heads"] == 2 and out["shapes"]["cached"] == [1344]
    rows = out["flex"]
    assert [r["density"] for r in rows] == [0.25, 1.0]
    assert rows[0]["computed"] < rows[1]["computed"] == pytest.approx(1.0)
    ratios = [r[k] for r in rows for k in ("kernel_ratio", "total_ratio")]
    ratios += [out["merged"]["kernel_ratio"], out["bias"]["flex_25_bias_ratio"], out["bias"]["sdpa_bias_ratio"]]
    assert all(isinstance(x, float) and x > 0 and math.isfinite(x) for x in ratios)
    tc = out["tempcache"]
    # the merge's time is a difference of two timings (stage + commit, stage alone): on a busy
    # machine noise can make it 0, so the test checks how the fractions are made, not a time
    assert tc["commit_ms"] >= 0 and 0 < tc["merge_rate"] < 1
    assert tc["merge_per_chunk_ms"] == pytest.approx(tc["frames_per_chunk"] * tc["commit_ms"])
    assert tc["fraction_reference"] == pytest.approx(tc["merge_per_chunk_ms"] / tc["chunk_ms_reference"])
    assert tc["groups_per_head"] <= tc["capacity"]
    # the merge's profile: operators by their own time, largest first, per stage-and-commit
    prof = tc["profile"]
    assert prof and all(r["us_per_call"] > 0 for r in prof)
    assert [r["us_per_call"] for r in prof] == sorted((r["us_per_call"] for r in prof), reverse=True)
    assert {"aten::copy_", "aten::topk"} <= {r["name"] for r in prof}


def test_flex_tune_says_it_needs_a_gpu(monkeypatch):
    from runtime import flex_tune

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="GPU"):
        flex_tune.main(["--density", "0.25"])
    with pytest.raises(SystemExit, match="not JSON"):  # bad options are refused before anything runs
        flex_tune.main(["--options", "{BLOCK_M: 128}"])
    with pytest.raises(SystemExit, match="not a JSON object"):
        flex_tune.main(["--options", "[128]"])
