"""AnnSA's Triton kernel (runtime/sparse_kernel.py) against dense attention with the same mask,
and through the engine's AnnSelfAttention against dense (full density) and flex (below it).

On a machine without a GPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1,
set before Triton is imported, so in a child process), in float32. The GPU run of the same
checks, plus bfloat16 at a larger shape against the flex kernel, is
`pytest -m gpu tests/test_sparse_kernel.py` on a CUDA machine.
"""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import run_interpreted
from runtime.sparse_kernel import annsa_attention, reference_mask

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _inputs(g, b, h, m, d, cached, buf, dtype, device, bias=False):
    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q = rnd(b, h, m, d)
    # keys and values in one buffer with the heads apart (as a cache's per-layer buffer)
    kv = rnd(b, h, 2, buf, d)
    k, v = kv[:, :, 0], kv[:, :, 1]
    lc = None
    if bias:
        lc = (torch.rand(b, h, buf, generator=g) * 2).log1p()
        lc[torch.rand(b, h, buf, generator=g) < 0.1] = float("-inf")  # empty slots
        lc[..., cached:] = 0.0  # the chunk's own tokens count once
        lc = lc.to(device=device, dtype=dtype)
    return q, k, v, lc


def _selection(g, b, h, m, cached, blk, kept, device):
    nsel, nqb = cached // blk, -(-m // blk)
    return torch.stack([torch.randperm(nsel, generator=g)[:kept] for _ in range(b * h * nqb)]).view(
        b, h, nqb, kept).to(device)


def _reference(q, k, v, bias, sel, cached, commit, blk):
    m = q.shape[2]
    kv = cached + m
    mask = reference_mask(m, sel, cached, commit, blk)
    add = torch.zeros(mask.shape, dtype=torch.float32, device=q.device).masked_fill(~mask, float("-inf"))
    if bias is not None:
        add = add + bias[:, :, None, :kv].float()
    return F.scaled_dot_product_attention(q.float(), k[:, :, :kv].float(), v[:, :, :kv].float(), attn_mask=add)


# (b, h, m, d, cached, buf, commit, kept, sel_block, tiles, bias)
CASES = [
    (1, 2, 64, 32, 128, 200, 0, 2, 32, dict(block_m=32, block_n=16), False),   # plain chunk
    (1, 2, 80, 32, 133, 240, 40, 3, 32, dict(block_m=32, block_n=16), True),   # merged pass, ragged tail, bias
    (2, 1, 64, 32, 128, 192, 32, 4, 32, dict(block_m=16, block_n=32), True),   # tiles smaller than the block
    (1, 1, 96, 16, 74, 200, 50, 1, 32, dict(block_m=32, block_n=32), True),    # clean tile that straddles
    (1, 2, 64, 32, 160, 224, 0, 5, 32, dict(block_m=32, block_n=32), True),    # every cache block kept
]


def _checks(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    for b, h, m, d, cached, buf, commit, kept, blk, tiles, bias_on in CASES:
        q, k, v, bias = _inputs(g, b, h, m, d, cached, buf, torch.float32, device, bias_on)
        sel = _selection(g, b, h, m, cached, blk, kept, device)
        ref = _reference(q, k, v, bias, sel, cached, commit, blk)
        # the key tiles in one program, or split and combined; keys through pointers or
        # tensor descriptors
        for splits, tma, outer in ((1, False, False), (2, False, False), (3, False, False), (1, True, False),
                                   (2, True, False), (1, False, True), (3, False, True)):
            out = annsa_attention(q, k, v, bias, sel, cached, commit, sel_block=blk, splits=splits, tma=tma,
                                  heads_outer=outer, **tiles)
            err = (out - ref).abs().max().item()
            assert err < 1e-4, (b, h, m, cached, commit, kept, tiles, splits, tma, outer, err)
        if kept == cached // blk:  # sparse at full density == dense attention over [cache | chunk]
            kv = cached + m
            hide = torch.zeros(m, kv, dtype=torch.bool, device=device)
            if 0 < commit < m:
                hide[:commit, cached + commit:] = True
            add = bias[:, :, None, :kv].float().masked_fill(hide, float("-inf"))
            dense = F.scaled_dot_product_attention(q, k[:, :, :kv], v[:, :, :kv], attn_mask=add)
            assert (out - dense).abs().max().item() < 1e-4
    # large logits: running maxima that move a long way from tile to tile
    q, k, v, bias = _inputs(g, 1, 2, 64, 32, 128, 200, torch.float32, device, True)
    q = q * 6
    sel = _selection(g, 1, 2, 64, 128, 32, 3, device)
    out = annsa_attention(q, k, v, bias, sel, 128, 0, sel_block=32, block_m=32, block_n=16)
    assert (out - _reference(q, k, v, bias, sel, 128, 0, 32)).abs().max().item() < 1e-4
    # a different selection gives a different answer (the kernel reads `sel`)
    q, k, v, _ = _inputs(g, 1, 1, 32, 32, 128, 160, torch.float32, device)
    one = torch.tensor([[[[0]]]], device=device)
    two = torch.tensor([[[[3]]]], device=device)
    a = annsa_attention(q, k, v, None, one, 128, 0, sel_block=32, block_m=32, block_n=16)
    c = annsa_attention(q, k, v, None, two, 128, 0, sel_block=32, block_m=32, block_n=16)
    assert (a - c).abs().max().item() > 1e-3


def _engine_checks() -> None:
    """Through AnnSelfAttention (the engine's path, caches of tests/test_flex_sparse.py):
    at full density the triton kernel equals dense attention, below it the flex kernel
    (the same selection, density and recall)."""
    from test_flex_sparse import N, chunk, filled

    from runtime.attention import CachedSelfAttention
    from runtime.sparse import AnnSelfAttention, AttentionConfig, AttentionRuntime
    tri = dict(kernel="triton", flex_block=2 * N, triton_tiles=dict(block_m=16, block_n=16))
    for policy in ("dense", "tempcache"):
        for merged in (False, True):
            (rt, _), (cache, dense), g = filled(policy, 6, seed=1, **tri)
            (q, k, v), commit = chunk(g, merged)
            out = AnnSelfAttention(rt, cache, commit, sparse=True)(0, q, k, v, k)
            assert rt.sa_stats.summary()["density"] == 1.0
            assert torch.allclose(out, CachedSelfAttention(dense, commit)(0, q, k, v, k), atol=1e-5), (policy, merged)
            kw = dict(density=0.3, max_density=0.9, recent_frames=1, select="pooled", stats_recall=True)
            (rt_t, _), (cache_t, dense_t), g = filled(policy, 10, seed=2, **tri, **kw)
            (_, _), (cache_f, _), _ = filled(policy, 10, seed=2, **tri, **kw)
            rt_f = AttentionRuntime(AttentionConfig(**{**rt_t.cfg.__dict__, "kernel": "flex"}))
            (q, k, v), commit = chunk(g, merged)
            out_t = AnnSelfAttention(rt_t, cache_t, commit, sparse=True)(0, q, k, v, k)
            out_f = AnnSelfAttention(rt_f, cache_f, commit, sparse=True)(0, q, k, v, k)
            st, sf = rt_t.sa_stats.summary(), rt_f.sa_stats.summary()
            assert st["density"] == pytest.approx(sf["density"]) and st["density"] < 0.7, (st, sf)
            assert st["recall"] == pytest.approx(sf["recall"], abs=1e-5) and st["recall"] < 1
            assert torch.allclose(out_t, out_f, atol=1e-5), (policy, merged)
            assert not torch.allclose(out_t, CachedSelfAttention(dense_t, commit)(0, q, k, v, k), atol=1e-3)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernel_matches_masked_dense_attention_under_the_interpreter():
    assert "kernel matches" in run_interpreted(__file__, "cpu")


def test_reference_mask_states_the_computed_set():
    sel = torch.tensor([[[[1], [0]]]])  # two query blocks of 2, cache of 3 blocks of 2 (+1 ragged)
    mask = reference_mask(4, sel, 7, 2, 2)
    assert mask.shape == (1, 1, 4, 11)
    first = [0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0]  # block 1, ragged tail, clean frame; not the noisy frame
    last = [1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert mask[0, 0, 0].int().tolist() == first and mask[0, 0, 1].int().tolist() == first
    assert mask[0, 0, 2].int().tolist() == last and mask[0, 0, 3].int().tolist() == last


def test_the_functions_defaults_are_the_default_tiles():
    """The engine passes DEFAULT_TILES; a bare call must run the same kernel."""
    import inspect

    from runtime.sparse_kernel import DEFAULT_TILES
    params = inspect.signature(annsa_attention).parameters
    assert {k: params[k].default for k in DEFAULT_TILES} == DEFAULT_TILES


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_tiles_that_do_not_fit_the_gpu_shrink_with_a_warning(monkeypatch):
    """A GPU with less shared memory than an H100 (the default tiles need about 224 KB):
    one stage fewer, then half the keys per tile, remembered for the next call."""
    from triton.runtime.errors import OutOfResources

    from runtime import sparse_kernel
    calls = []

    class SmallGpu:  # stands in for the compiled kernel: only small tiles fit
        def __getitem__(self, grid):
            def launch(*args, BLOCK_N, num_stages, **kw):
                calls.append((BLOCK_N, num_stages))
                if BLOCK_N > 64 or num_stages > 2:
                    raise OutOfResources(229376, 166912, "shared memory")
            return launch

    monkeypatch.setattr(sparse_kernel, "_annsa_fwd", SmallGpu())
    monkeypatch.setattr(sparse_kernel, "_FITTED", {})
    q, k, v = torch.zeros(1, 1, 128, 32), torch.zeros(1, 1, 400, 32), torch.zeros(1, 1, 400, 32)
    sel = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    with pytest.warns(RuntimeWarning, match="do not fit this GPU"):
        annsa_attention(q, k, v, None, sel, 256, 0, splits=1)
    assert calls == [(128, 3), (128, 2), (64, 3), (64, 2)]
    calls.clear()
    annsa_attention(q, k, v, None, sel, 256, 0, splits=1)
    assert calls == [(64, 2)]


@pytest.mark.parametrize("change, message", [
    (dict(block_m=48), "block_m=48 must be a power of two"),
    (dict(block_n=128), "must be a multiple of block_m=32 and block_n=128"),
    (dict(sel_shape=(1, 1, 3, 1)), r"sel \(1, 1, 3, 1\) must be \(B, H, 1, kept\)"),
    (dict(cached=200), "fewer than cached \\+ q_len = 264"),
    (dict(splits=0), "splits=0 must be >= 1"),
])
def test_bad_arguments_fail_clearly(change, message):
    q = torch.zeros(1, 1, 64, 32)
    k = v = torch.zeros(1, 1, 200, 32)
    sel = torch.zeros(change.pop("sel_shape", (1, 1, 1, 1)), dtype=torch.long)
    cached = change.pop("cached", 128)
    tiles = dict(sel_block=64, block_m=32, block_n=32)
    tiles.update(change)
    with pytest.raises(ValueError, match=message):
        annsa_attention(q, k, v, None, sel, cached, 0, **tiles)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA and Triton")
def test_kernel_matches_on_the_gpu():
    _checks("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA and Triton")
def test_bf16_at_the_wan_shape_agrees_with_flex():
    """bf16, 12 heads x 128, 3120 queries (the merged pass) over a 21-frame cache with a
    log-count bias: as close to the float32 reference as the flex kernel is."""
    from runtime.flex_sparse import FlexBlockSparse
    g = torch.Generator().manual_seed(1)
    b, h, m, d, cached, blk, commit = 1, 12, 3120, 128, 21 * 1560, 128, 1560
    buf = cached + m + 200
    q, k, v, bias = _inputs(g, b, h, m, d, cached, buf, torch.bfloat16, "cuda", bias=True)
    sel = _selection(g, b, h, m, cached, blk, 64, "cuda")
    ref = _reference(q, k, v, bias, sel, cached, commit, blk)
    out = annsa_attention(q, k, v, bias, sel, cached, commit, sel_block=blk)
    flex = FlexBlockSparse(blk, blk)
    fo = flex(q, k.contiguous(), v.contiguous(), bias.contiguous(),
              flex.plan(sel, m, commit, cached, cached + m, buf))
    err, flex_err = (out.float() - ref).abs().max().item(), (fo.float() - ref).abs().max().item()
    assert err <= max(2 * flex_err, 1e-2), (err, flex_err)


if __name__ == "__main__":
    _checks(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    _engine_checks()
    print("kernel matches")
