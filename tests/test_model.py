"""The model and its cache: cached generation equals the uncached causal forward."""
from __future__ import annotations

import conftest
import pytest
import torch

from runtime.attention import MaskedSelfAttention, dense_cross_attn, teacher_forcing_mask
from runtime.cache import CacheSpec, DenseCache, WindowCache
from runtime.engine import Rollout, to_unit
from runtime.model import ModelConfig, WorldModel
from runtime.sampler import FlowSampler, SamplerConfig

TINY = ModelConfig(width=64, depth=2, heads=2, mlp_ratio=2.0, rope_frame_dims=8)


def random_model(seed: int = 0, cfg: ModelConfig = TINY) -> WorldModel:
    return conftest.random_model(cfg, seed)


def make_cache(cfg: ModelConfig, kind: str = "dense", **kw):
    spec = CacheSpec(cfg.depth, 1, cfg.heads, cfg.head_dim, cfg.tokens_per_frame, torch.device("cpu"), torch.float32)
    return DenseCache(spec, initial_frames=2) if kind == "dense" else WindowCache(spec, **kw)


def random_clip(num_frames: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (1, num_frames, 64, 64, 3), generator=g, dtype=torch.uint8)
    actions = torch.randint(0, 6, (1, num_frames), generator=g)
    prompt = torch.randn(1, 256, 12, generator=g)
    return frames, actions, prompt


def uncached_predictions(model, frames, actions, prompt, noisy_targets, t):
    """The training-style forward over [clean 0..F-1 | noisy 1..F-1] with the mask."""
    x = to_unit(frames)  # (1, F, 3, S, S)
    f = x.shape[1]
    noisy = torch.cat([x, noisy_targets], dim=1)
    prev = torch.cat([x[:, :1], x[:, :-1], x[:, :-1]], dim=1)  # frame 0's previous frame is itself
    acts = actions.clone()
    acts[:, 0] = 0  # frame 0 comes from reset: idle
    tt = torch.cat([torch.zeros(1, f), torch.full((1, f - 1), t)], dim=1)
    act = torch.cat([acts, acts[:, 1:]], dim=1)
    fi = torch.cat([torch.arange(f), torch.arange(1, f)])
    mask = teacher_forcing_mask(f, model.cfg.tokens_per_frame)
    with torch.no_grad():
        out = model(noisy, prev, tt, act, fi, MaskedSelfAttention(mask), dense_cross_attn, prompt)
    return out[:, f:]


def cached_predictions(model, cache, frames, actions, prompt, noisy_targets, t, merged=True):
    """Next-frame predictions from true context. `merged`: clean passes ride along with the
    next frame's denoising pass (the engine's default); otherwise each runs on its own."""
    r = Rollout(model, FlowSampler(SamplerConfig(steps=1)), cache)
    r.reset(frames[:, 0], prompt, seed=0)
    x = to_unit(frames)
    outs = []
    for j in range(1, frames.shape[1]):
        if not merged:
            r.flush()
        r.frame_index = j
        outs.append(r.predict(noisy_targets[:, j - 1 : j], t, actions[:, j]))
        r.append(x[:, j : j + 1], actions[:, j])
    r.flush()
    return torch.cat(outs, dim=1)


def test_cached_generation_equals_uncached_forward():
    model = random_model()
    frames, actions, prompt = random_clip(6)
    noisy = torch.randn(1, 5, 3, 64, 64)
    ref = uncached_predictions(model, frames, actions, prompt, noisy, 0.7)
    for merged in (True, False):
        got = cached_predictions(model, make_cache(TINY), frames, actions, prompt, noisy, 0.7, merged=merged)
        assert torch.allclose(got, ref, atol=1e-5), (merged, (got - ref).abs().max())


@pytest.mark.parametrize("k,r", [(1, 0), (3, 0), (1, 2)])
def test_cached_generation_equals_the_training_forward_with_k_previous_frames(k, r):
    """The engine's stack of previous frames (the reset frame repeated, then each committed
    frame pushed in front) is the one training builds from a window (runtime.train.build_inputs):
    cached next-frame predictions equal the training-style forward over the same clip
    (also with motion weights, r > 0)."""
    from runtime.train import build_inputs

    cfg = ModelConfig(width=64, depth=2, heads=2, mlp_ratio=2.0, rope_frame_dims=8, prev_frames=k, motion_radius=r)
    model = random_model(cfg=cfg)
    frames, actions, prompt = random_clip(6)
    f = frames.shape[1]
    noisy = torch.randn(1, f - 1, 3, 64, 64)
    idle = torch.zeros(1, 1, dtype=torch.long)
    window = {"frames": torch.cat([frames[:, :1]] * k + [frames], dim=1),  # x_{-K} .. x_{-1}: the reset frame
              "actions": torch.cat([idle, idle, actions[:, 1:]], dim=1)}  # x_0 comes from reset: idle
    x_noisy, prev, tt, act, fi, _ = build_inputs(window, None, torch.full((1, f - 1), 0.7), None, "cpu", noisy_targets=noisy)
    assert prev.shape == (1, 2 * f - 1, 3 * k, 64, 64)
    with torch.no_grad():
        ref = model(x_noisy, prev, tt, act, fi, MaskedSelfAttention(teacher_forcing_mask(f, cfg.tokens_per_frame)),
                    dense_cross_attn, prompt)[:, f:]
    got = cached_predictions(model, make_cache(cfg), frames, actions, prompt, noisy, 0.7)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    if k > 1:  # the older frames are really used
        other = window | {"frames": window["frames"].clone()}
        other["frames"][:, 0] = 255 - other["frames"][:, 0]
        x2, prev2, *_ = build_inputs(other, None, torch.full((1, f - 1), 0.7), None, "cpu", noisy_targets=noisy)
        with torch.no_grad():
            out2 = model(x2, prev2, tt, act, fi, MaskedSelfAttention(teacher_forcing_mask(f, cfg.tokens_per_frame)),
                         dense_cross_attn, prompt)[:, f:]
        assert not torch.allclose(out2, ref, atol=1e-3)


def test_the_motion_mix_of_a_bf16_model_is_summed_in_float32():
    """In bf16 the mix's terms (which cancel on still pixels) are summed in float32 and
    rounded once: the bf16 model's estimate is the float32 computation from the same
    bf16 features, rounded (summed in bf16 it differs)."""
    cfg = ModelConfig(**{**TINY.__dict__, "motion_radius": 2})
    model = random_model(5, cfg).to(torch.bfloat16)
    frames, actions, prompt = random_clip(3)
    x = to_unit(frames).to(torch.bfloat16)
    seen = {}
    model.motion.register_forward_hook(lambda m, i, o: seen.update(w=o))
    model.out.register_forward_hook(lambda m, i, o: seen.update(r=o))
    with torch.no_grad():
        out = model(x, torch.cat([x[:, :1], x[:, :1], x[:, :1]], 1), torch.tensor([[0.0, 0.0, 0.6]]), actions,
                    torch.tensor([0, 1, 1]), MaskedSelfAttention(teacher_forcing_mask(2, TINY.tokens_per_frame)),
                    dense_cross_attn, prompt.to(torch.bfloat16), outputs=1)
    from runtime.model import motion_mix, unpatchify

    prev = x[:, :1].float()
    w = unpatchify(seen["w"], cfg.patch, len(cfg.motion_offsets)).float()
    want = prev + unpatchify(seen["r"], cfg.patch, 3).float() + motion_mix(prev, w, cfg.motion_offsets)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want.to(torch.bfloat16))
    in_bf16 = x[:, :1] + unpatchify(seen["r"], cfg.patch, 3) + motion_mix(x[:, :1], w.to(torch.bfloat16), cfg.motion_offsets)
    assert not torch.equal(out, in_bf16)


@pytest.mark.parametrize("grow", ["prev_frames", "motion_radius"])
def test_a_grown_model_plays_the_same_frames(grow):
    """widen_prev_frames gives the added frames zero weight and add_motion_head starts the
    motion head at zero: the grown model generates exactly the original's frames until
    training changes it. Weights are not widened backwards, nor given a second head."""
    from runtime.model import add_motion_head, widen_prev_frames

    small = random_model()
    big = WorldModel(ModelConfig(**{**TINY.__dict__, grow: 3})).eval()
    if grow == "prev_frames":
        big.load_state_dict(widen_prev_frames(small.state_dict(), big.cfg))
        again, refusal = (lambda: widen_prev_frames(big.state_dict(), TINY)), "cannot be widened"
    else:
        big.load_state_dict(add_motion_head(small.state_dict(), big.cfg))
        again, refusal = (lambda: add_motion_head(big.state_dict(), big.cfg)), "already have a motion head"
    frames, actions, prompt = random_clip(7)
    outs = []
    for model in (small, big):
        r = Rollout(model, FlowSampler(SamplerConfig(steps=1)), make_cache(model.cfg))
        r.reset(frames[:, 0], prompt, seed=3)
        outs.append(torch.stack([r.step(actions[:, j]) for j in range(1, 7)], 1))
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match=refusal):
        again()


def test_motion_offsets_cover_a_scroll_plus_a_one_pixel_step():
    offsets = ModelConfig(motion_radius=3).motion_offsets
    assert len(offsets) == len(set(offsets)) == 32 and (0, 0) not in offsets
    scrolls = [(0, 0), (2, 0), (-2, 0), (0, 2), (0, -2)]
    steps = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]
    assert {(a + c, b + d) for a, b in scrolls for c, d in steps} - {(0, 0)} <= set(offsets)
    assert ModelConfig(motion_radius=1).motion_offsets == [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    assert ModelConfig().motion_offsets == []


def test_motion_mix_displaces_the_previous_frame():
    """Weight 1 on one offset everywhere gives exactly the displaced frame (the edge pixel
    repeated beyond the border); weights split between two offsets give their blend."""
    from runtime.model import motion_mix

    prev = torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    offsets = ModelConfig(frame_size=16, motion_radius=2).motion_offsets
    for i, (dy, dx) in enumerate(offsets):
        w = torch.zeros(2, 3, len(offsets), 16, 16)
        w[:, :, i] = 1
        ys = (torch.arange(16) + dy).clamp(0, 15)
        xs = (torch.arange(16) + dx).clamp(0, 15)
        want = prev[..., ys, :][..., xs]
        assert torch.allclose(prev + motion_mix(prev, w, offsets), want, atol=1e-6), (dy, dx)
    a, b = offsets.index((0, 1)), offsets.index((1, 0))
    w = torch.zeros(2, 3, len(offsets), 16, 16)
    w[:, :, a], w[:, :, b] = 0.25, 0.75
    got = prev + motion_mix(prev, w, offsets)
    assert torch.allclose(got[..., :15, :15], 0.25 * prev[..., :15, 1:16] + 0.75 * prev[..., 1:16, :15], atol=1e-6)


def test_the_motion_head_can_move_what_the_model_draws():
    """A model whose motion head puts weight 1 on one offset (and whose residual is zero)
    returns the previous frame displaced by it: the head really reaches the output."""
    cfg = ModelConfig(**{**TINY.__dict__, "motion_radius": 1})
    model = random_model(2, cfg)
    i = cfg.motion_offsets.index((0, -1))
    p2 = cfg.patch * cfg.patch
    with torch.no_grad():
        for head in (model.out, model.motion):
            head.weight.zero_()
            head.bias.zero_()
        model.motion.bias[i * p2 : (i + 1) * p2] = 1
    frames, actions, prompt = random_clip(3)
    x = to_unit(frames)
    out = uncached_predictions(model, frames, actions, prompt, torch.randn(1, 2, 3, 64, 64), 0.5)
    prev = x[:, :2]
    assert torch.allclose(out[..., 1:], prev[..., :-1], atol=1e-6)
    assert torch.allclose(out[..., 0], prev[..., 0], atol=1e-6)


def test_outputs_estimates_only_the_last_frames():
    """`outputs=n` returns the last n frames of the full estimate (up to the rounding of
    matrix products of another size)."""
    for r in (0, 1):
        model = random_model(4, ModelConfig(**{**TINY.__dict__, "motion_radius": r}))
        frames, actions, prompt = random_clip(3)
        x = to_unit(frames)  # the doubled sequence of two frames: clean 0, 1 | noisy 1
        prev = torch.cat([x[:, :1], x[:, :1], torch.rand_like(x[:, :1])], 1)  # each frame its own: a wrong slice shows
        args = (x, prev, torch.tensor([[0.0, 0.0, 0.6]]), actions,
                torch.tensor([0, 1, 1]), MaskedSelfAttention(teacher_forcing_mask(2, TINY.tokens_per_frame)),
                dense_cross_attn, prompt)
        with torch.no_grad():
            full = model(*args)
            assert torch.allclose(model(*args, outputs=2), full[:, 1:], atol=1e-6)
            assert torch.allclose(model(*args, outputs=1), full[:, 2:], atol=1e-6)
            for bad in (0, 4):
                with pytest.raises(ValueError, match=f"outputs={bad}; expected 1..3"):
                    model(*args, outputs=bad)


def test_window_cache_equals_dense_until_full_then_differs():
    model = random_model()
    frames, actions, prompt = random_clip(8)
    noisy = torch.randn(1, 7, 3, 64, 64)
    dense = cached_predictions(model, make_cache(TINY), frames, actions, prompt, noisy, 0.5)
    # sink 1 + window 4 holds frames 0..4: predictions of frames 1..5 see everything
    window = cached_predictions(model, make_cache(TINY, "window", sink_frames=1, window_frames=4), frames, actions, prompt, noisy, 0.5)
    assert torch.allclose(window[:, :5], dense[:, :5], atol=1e-5)
    assert not torch.allclose(window[:, 5:], dense[:, 5:], atol=1e-4)


def test_window_cache_memory_is_bounded():
    cache = make_cache(TINY, "window", sink_frames=1, window_frames=3)
    model = random_model()
    frames, actions, prompt = random_clip(10)
    cached_predictions(model, cache, frames, actions, prompt, torch.randn(1, 9, 3, 64, 64), 0.5)
    assert cache.num_tokens(0) == 4 * TINY.tokens_per_frame
    assert cache.frames_seen == 10


def test_dense_cache_grows_in_large_steps():
    cache = make_cache(TINY)
    model = random_model()
    frames, actions, prompt = random_clip(9)
    cached_predictions(model, cache, frames, actions, prompt, torch.randn(1, 8, 3, 64, 64), 0.5)
    assert cache.num_tokens(0) == 9 * TINY.tokens_per_frame
    capacity = cache.k[0].shape[2]
    assert capacity >= 9 * TINY.tokens_per_frame and capacity % TINY.tokens_per_frame == 0


def test_same_seed_same_frames_and_prompt_matters():
    model = random_model()
    frames, actions, prompt = random_clip(1)

    def run(seed, p):
        r = Rollout(model, FlowSampler(SamplerConfig(steps=2)), make_cache(TINY))
        r.reset(frames[:, 0], p, seed=seed)
        return torch.stack([r.step(torch.tensor([a])) for a in (1, 1, 4, 5)])

    a, b = run(3, prompt), run(3, prompt)
    assert torch.equal(a, b)
    assert not torch.equal(a, run(4, prompt))
    assert not torch.equal(a, run(3, prompt.flip(1)))


def test_model_config_rejects_bad_values():
    import pytest

    with pytest.raises(ValueError, match="frame_size"):
        ModelConfig(frame_size=60, patch=8)
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"widht": 3})
    with pytest.raises(ValueError, match=r"model.prev_frames=0; expected an integer >= 1"):
        ModelConfig(prev_frames=0)
    with pytest.raises(ValueError, match=r"model.motion_radius=-1; expected an integer in \[0, 31\]"):
        ModelConfig(motion_radius=-1)


@pytest.mark.parametrize("k,r", [(1, 0), (3, 0), (1, 2)])
def test_the_frame_a_cuda_graph_captures_gives_the_eager_frames(k, r):
    """runtime/graphs.py runs a frame on static buffers that the frame itself updates
    (pending clean frame, previous frames, actions, frame indices); a CUDA graph captures
    exactly that. Run without capture here (CPU), it must give the frames of the plain
    rollout, with the caches' counters and the rollout's frame index moving alike."""
    from runtime.graphs import FrameGraph
    from runtime.tempcache import TempCache

    model = random_model(7, ModelConfig(**{**TINY.__dict__, "prev_frames": k, "motion_radius": r}))
    _, _, prompt = random_clip(1)
    first = torch.randint(0, 256, (2, 64, 64, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    actions = torch.randint(0, 6, (14, 2), generator=torch.Generator().manual_seed(4))
    spec = CacheSpec(TINY.depth, 2, TINY.heads, TINY.head_dim, TINY.tokens_per_frame, torch.device("cpu"), torch.float32)
    for steps in (1, 2):
        for make in (lambda: WindowCache(spec, sink_frames=1, window_frames=3),
                     lambda: TempCache(spec, budget_frames=4, sink_frames=1, threshold=0.5, match="local",
                                       match_frames=2, representative="mean", merge_when="full"),
                     # static from the first frame: the captured frame also runs while the budget fills
                     lambda: TempCache(spec, budget_frames=6, sink_frames=1, threshold=0.5, match="local",
                                       match_frames=2, representative="mean", merge_when="full", fill="budget")):
            runs = []
            for static in (False, True):
                r = Rollout(model, FlowSampler(SamplerConfig(steps=steps)), make())
                r.reset(first, prompt.expand(2, -1, -1), seed=5)
                frames, start = [], None
                for i, a in enumerate(actions):
                    if static and r.graph is None and r.cache.graph_ready():
                        r.graph = FrameGraph(r, capture=False)  # from here on, the captured frame's code
                        start = i
                    frames.append(r.step(a))
                runs.append((torch.stack(frames), r.frame_index, list(r.cache.commits), start))
            (eager, fi_e, commits_e, _), (static_frames, fi_s, commits_s, start) = runs
            assert start is not None, "the cache never reached static shapes"
            if getattr(r.cache, "static_fill", False):
                assert start == 1  # the sink frame committed, the budget far from full
            assert torch.equal(eager, static_frames) and fi_e == fi_s and commits_e == commits_s


@pytest.mark.parametrize("k,r", [(1, 0), (3, 0), (1, 2)])
def test_a_rehearsal_at_reset_reaches_the_full_shape_and_leaves_the_frames_unchanged(k, r):
    """Rollout.rehearse (on at every reset on a GPU: `engine.rehearse`) runs one throwaway
    pass over a cache that pretends to be full, so that the shape play keeps once the cache
    is full is staged at start-up, then starts from a fresh cache: the frames that follow
    are identical to a rollout without it, and the cache starts empty. Dense has no such
    shape and is left alone."""
    from runtime.cache import DenseCache
    from runtime.tempcache import TempCache

    model = random_model(9, ModelConfig(**{**TINY.__dict__, "prev_frames": k, "motion_radius": r}))
    _, _, prompt = random_clip(1)
    first = torch.randint(0, 256, (2, 64, 64, 3), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    actions = torch.randint(0, 6, (10, 2), generator=torch.Generator().manual_seed(6))
    spec = CacheSpec(TINY.depth, 2, TINY.heads, TINY.head_dim, TINY.tokens_per_frame, torch.device("cpu"), torch.float32)
    makes = {"window": lambda: WindowCache(spec, sink_frames=1, window_frames=4),
             "tempcache": lambda: TempCache(spec, budget_frames=5, sink_frames=1, threshold=0.5, match="local",
                                            match_frames=2, representative="mean", merge_when="full"),
             "dense": lambda: DenseCache(spec, initial_frames=4)}
    for name, make in makes.items():
        runs = []
        for rehearse in (False, True):
            r = Rollout(model, FlowSampler(SamplerConfig(steps=1)), make(), rehearse=rehearse)
            staged = []
            stage = r.cache.stage

            def spy(layer, k, v, k_pre=None, stage=stage, staged=staged, cache=r.cache):
                out = stage(layer, k, v, k_pre)
                staged.append((out[0].shape[2], cache.static_shape))
                return out
            r.cache.stage = spy
            r.reset(first, prompt.expand(2, -1, -1), seed=5)
            assert r.cache.commits == [0] * TINY.depth and r.cache.num_tokens(0) == 0, name
            rehearsed = list(staged)
            runs.append((torch.stack([r.step(a) for a in actions]), list(r.cache.commits), rehearsed))
        (plain, commits_p, none), (frames, commits_r, rehearsed) = runs
        assert none == [], name  # a reset alone stages nothing
        assert torch.equal(plain, frames) and commits_p == commits_r, name
        if name == "dense":
            assert rehearsed == [], name
        else:  # every layer staged [full cache | clean | noisy] once, as a static shape
            full = r.cache._capacity + 2 * TINY.tokens_per_frame
            assert rehearsed == [(full, True)] * TINY.depth, (name, rehearsed)


@pytest.mark.parametrize("steps", [1, 2])
def test_a_rehearsal_with_the_attention_runtime_leaves_frames_and_statistics_unchanged(steps):
    """The same through the attention runtime (`fastar`-style: TempCache with AnnSA and
    AnnCA, the budget static from the start), with one and two sampler steps: identical
    frames, and the rehearsal's own attention calls are not in the statistics."""
    from runtime.sparse import AttentionConfig, AttentionRuntime

    model = random_model(11)
    _, _, prompt = random_clip(1)
    first = torch.randint(0, 256, (1, 64, 64, 3), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    actions = torch.randint(0, 6, (8, 1), generator=torch.Generator().manual_seed(8))
    spec = CacheSpec(TINY.depth, 1, TINY.heads, TINY.head_dim, TINY.tokens_per_frame, torch.device("cpu"), torch.float32)
    cfg = dict(policy="tempcache", budget_frames=4, sink_frames=1, threshold=0.5, match="local", match_frames=2,
               representative="mean", merge_when="full", fill="budget", annsa=True, annca=True, ann="exact",
               block=TINY.tokens_per_frame, density=0.5, max_density=1.0, min_blocks=2, dense_fraction=0.0)
    runs = []
    for rehearse in (False, True):
        rt = AttentionRuntime(AttentionConfig(**cfg))
        r = Rollout(model, FlowSampler(SamplerConfig(steps=steps)), rt.build_cache(spec), attention=rt,
                    rehearse=rehearse)
        r.reset(first, prompt, seed=3)
        assert rt.sa_stats.sums == {} and rt.ca_stats.sums == {}
        frames = torch.stack([r.step(a) for a in actions])
        runs.append((frames, rt.summary()["self_attn"]["density"], r.cache.merge_rate()))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1:] == runs[1][1:]


def test_compiled_blocks_give_the_eager_predictions():
    # engine.compile: the blocks' dense parts through torch.compile, the cached attention
    # eager; the cached predictions match the uncached forward of the eager model
    from torch._dynamo.utils import counters

    model = random_model()
    frames, actions, prompt = random_clip(4)
    noisy = torch.randn(1, 3, 3, 64, 64)
    ref = uncached_predictions(model, frames, actions, prompt, noisy, 0.6)
    compiled_before = counters["stats"]["unique_graphs"]
    model.compile_blocks(True)
    try:
        got = cached_predictions(model, make_cache(TINY), frames, actions, prompt, noisy, 0.6)
    finally:
        model.compile_blocks(False)
    assert model.compiled is False
    assert counters["stats"]["unique_graphs"] > compiled_before  # the blocks really ran compiled
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_rotates_each_pair_exactly_as_the_pairwise_formula(dtype):
    # apply_rope computes x * cos + (-x1, x0) * sin: per element the same rounded products
    # and sum as (x0 c - x1 s, x0 s + x1 c), so the rewrite leaves every output unchanged
    from runtime.model import apply_rope, rope_tables

    g = torch.Generator().manual_seed(11)
    ang = torch.randn(50, 16, generator=g) * 5
    x = torch.randn(2, 3, 50, 32, generator=g).to(dtype)
    c, s = torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    pairwise = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    assert torch.equal(apply_rope(x, *rope_tables(ang)), pairwise)
