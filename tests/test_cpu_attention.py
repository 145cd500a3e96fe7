"""The CPU's attention kernel for bf16 inference (`engine.cpu_attention`): two
matmuls and a softmax per head in place of PyTorch's fused CPU kernel, where shapes repeat."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import runtime.attention as attention
from conftest import compose
from runtime.attention import dense_cross_attn, matmul_attention, set_cpu_attention, staged_attention, uses_matmul_attention
from runtime.cache import CacheSpec, WindowCache
from runtime.engine import Rollout, to_unit
from runtime.sampler import FlowSampler, SamplerConfig
from test_model import TINY, random_clip, random_model


@pytest.fixture(autouse=True)
def restore_kernel():
    before = attention._cpu_attention
    yield
    set_cpu_attention(before)


def qkv(b=2, h=3, m=5, n=40, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, L, d, generator=g) for L in (m, n, n))
    return q.to(dtype), k.to(dtype), v.to(dtype), g


@pytest.mark.parametrize("bias_shape", [None, "keys", "full"])
def test_matmul_attention_is_attention(bias_shape):
    q, k, v, g = qkv()
    bias = {None: None, "keys": torch.randn(2, 1, 1, 40, generator=g),
            "full": torch.randn(2, 3, 5, 40, generator=g)}[bias_shape]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert torch.allclose(matmul_attention(q, k, v, bias), want, atol=1e-5)


def test_a_prefix_hides_the_last_keys_from_the_first_queries():
    # the merged pass: the first 2 queries (the clean frame) see the first 34 keys only
    q, k, v, g = qkv(m=6)
    bias = torch.randn(2, 1, 1, 40, generator=g)
    got = matmul_attention(q, k, v, bias, prefix=(2, 34))
    first = F.scaled_dot_product_attention(q[:, :, :2], k[:, :, :34], v[:, :, :34], attn_mask=bias[..., :34])
    rest = F.scaled_dot_product_attention(q[:, :, 2:], k, v, attn_mask=bias)
    assert torch.allclose(got, torch.cat([first, rest], 2), atol=1e-5)


def test_keys_from_a_strided_cache_prefix_give_the_contiguous_result():
    q, k, v, _ = qkv(n=64)
    got = matmul_attention(q, k[:, :, :40], v[:, :, :40])  # views into larger buffers, as a cache stages them
    assert torch.allclose(got, matmul_attention(q, k[:, :, :40].contiguous(), v[:, :, :40].contiguous()), atol=0)


def test_staged_attention_in_bf16_takes_the_chosen_kernel(monkeypatch):
    q, k, v, g = qkv(m=6, dtype=torch.bfloat16)
    bias = torch.randn(2, 1, 1, 40, generator=g)
    exact = staged_attention(q.float(), k.float(), v.float(), bias, commit=2)
    fused = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: fused.append(1) or real(*a, **kw))
    set_cpu_attention("matmul")
    with torch.no_grad():
        assert uses_matmul_attention(q) and not uses_matmul_attention(q.float()) and not uses_matmul_attention(q.half())
        by_matmul = staged_attention(q, k, v, bias, commit=2)
    assert not fused  # the fused kernel was not called
    set_cpu_attention("sdpa")
    by_sdpa = staged_attention(q, k, v, bias, commit=2)
    assert len(fused) == 2  # the two prefix calls
    # both within bf16 rounding of the float32 result
    assert (by_matmul.float() - exact).abs().max() < 2e-2
    assert (by_sdpa.float() - exact).abs().max() < 2e-2


def test_a_cache_whose_length_changes_keeps_the_fused_kernel(monkeypatch):
    # new shapes every frame would make the matmul library keep state for each of them
    q, k, v, g = qkv(m=6, dtype=torch.bfloat16)
    fused = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: fused.append(1) or real(*a, **kw))
    set_cpu_attention("matmul")
    with torch.no_grad():
        staged_attention(q, k, v, None, commit=2, static=False)
        assert len(fused) == 2
        staged_attention(q, k, v, None, commit=2, static=True)
        assert len(fused) == 2


def predictions(model, dtype, frames, actions, prompt, noisy):
    """Next-frame predictions from true context (as `cached_predictions`), in `dtype`, with
    a window of 2 frames and a sink: full from the fourth frame, when its shapes repeat."""
    spec = CacheSpec(TINY.depth, 1, TINY.heads, TINY.head_dim, TINY.tokens_per_frame, torch.device("cpu"), dtype)
    r = Rollout(model.to(dtype), FlowSampler(SamplerConfig(steps=1)), WindowCache(spec, sink_frames=1, window_frames=2))
    r.reset(frames[:, 0], prompt.to(dtype), seed=0)
    x = to_unit(frames).to(dtype)
    outs = []
    with torch.no_grad():
        for j in range(1, frames.shape[1]):
            r.frame_index = j
            outs.append(r.predict(noisy[:, j - 1 : j].to(dtype), 0.6, actions[:, j]).float())
            r.append(x[:, j : j + 1], actions[:, j])
    return torch.cat(outs, dim=1)


def test_a_bf16_model_predicts_the_same_frames_with_either_kernel(monkeypatch):
    model = random_model(3)
    frames, actions, prompt = random_clip(8)
    noisy = torch.randn(1, 7, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    exact = predictions(model, torch.float32, frames, actions, prompt, noisy)
    merged_passes = []
    real = attention.matmul_attention
    monkeypatch.setattr(attention, "matmul_attention",
                        lambda *a, **kw: merged_passes.append(kw.get("prefix")) or real(*a, **kw))
    preds = {}
    for kernel in ("matmul", "sdpa"):
        set_cpu_attention(kernel)
        preds[kernel] = predictions(model, torch.bfloat16, frames, actions, prompt, noisy)
    assert any(p is not None for p in merged_passes)  # self-attention ran as matmuls once the window was full
    assert not torch.equal(preds["matmul"], preds["sdpa"])  # really two kernels
    err_matmul = (preds["matmul"] - exact).abs().mean()
    err_sdpa = (preds["sdpa"] - exact).abs().mean()
    assert err_matmul < 1.5 * err_sdpa + 1e-3, (err_matmul, err_sdpa)


def test_training_in_bf16_on_the_cpu_keeps_the_fused_kernel_and_its_gradients():
    set_cpu_attention("matmul")
    q, k, v, _ = qkv(dtype=torch.bfloat16)
    q.requires_grad_(True)
    assert not uses_matmul_attention(q)  # gradients are on: the in-place kernel is not used
    dense_cross_attn(0, q, k, v).float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_an_unknown_kernel_fails_with_its_name():
    with pytest.raises(ValueError, match=r"engine.cpu_attention='fused'; expected one of \['matmul', 'sdpa'\]"):
        set_cpu_attention("fused")


def test_the_engine_config_chooses_the_kernel():
    from runtime.factory import load_model

    cfg = compose(["device=cpu", "engine.cpu_attention=sdpa"])
    load_model(cfg, cfg.world)
    assert attention._cpu_attention == "sdpa"
    cfg = compose(["device=cpu", "engine.cpu_attention=fast"])
    with pytest.raises(ValueError, match="engine.cpu_attention='fast'"):
        load_model(cfg, cfg.world)
