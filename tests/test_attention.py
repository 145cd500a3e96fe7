"""TempCache, AnnSA and AnnCA: exact where they should be, bounded where they must be."""
from __future__ import annotations

import pytest
import torch

from runtime.ann import build_ann
from runtime.attention import CachedSelfAttention, sdpa
from runtime.cache import CacheSpec, DenseCache, WindowCache
from runtime.sparse import AnnCrossAttention, AnnSelfAttention, AttentionConfig, AttentionRuntime, dedupe_tokens
from runtime.tempcache import TempCache

H, N, D = 2, 8, 16


def spec(layers: int = 1) -> CacheSpec:
    return CacheSpec(layers, 1, H, D, N, torch.device("cpu"), torch.float32)


def commit_frame(cache, k, v):
    cache.stage(0, k, v, k)
    cache.commit(0)


def attend(cache, q, k, v):
    keys, values, bias = cache.stage(0, k, v, k)
    return sdpa(q, keys, values, bias)


@pytest.mark.parametrize("ann", ["exact", "lsh", "quant", "faiss"])
@pytest.mark.parametrize("match", ["pre", "post", "local"])
def test_tempcache_with_duplicated_keys_equals_dense(ann, match):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, H, N, D, generator=g)
    dense = DenseCache(spec(), initial_frames=2)
    temp = TempCache(spec(), budget_frames=4, sink_frames=1, threshold=0.99, match=match, ann=build_ann(ann, metric="cosine"))
    for f in range(6):  # the same keys every frame, different values
        v = torch.randn(1, H, N, D, generator=g)
        commit_frame(dense, base, v)
        commit_frame(temp, base, v)
    assert temp.merge_rate() == pytest.approx(0.8)  # frame 1 starts the groups, frames 2..5 merge
    assert int((temp.count[0] > 0).sum()) == 2 * H * N  # sink frame + one group per token
    q, k, v = (torch.randn(1, H, N, D, generator=g) for _ in range(3))
    out_dense, out_temp = attend(dense, q, k, v), attend(temp, q, k, v)
    assert torch.allclose(out_temp, out_dense, atol=1e-5), (out_temp - out_dense).abs().max()


def test_same_position_lookup_merges_duplicates_exactly():
    """match=local with radius 0 looks up the group of the same screen position in the
    last commit's trail: static content merges and attention stays exact."""
    g = torch.Generator().manual_seed(18)
    base = torch.randn(1, H, N, D, generator=g)
    dense = DenseCache(spec(), initial_frames=2)
    temp = TempCache(spec(), budget_frames=4, sink_frames=1, threshold=0.99, match="local", radius=0, match_frames=1)
    for f in range(6):
        v = torch.randn(1, H, N, D, generator=g)
        commit_frame(dense, base, v)
        commit_frame(temp, base, v)
    assert temp.merge_rate() == pytest.approx(0.8)
    q, k, v = (torch.randn(1, H, N, D, generator=g) for _ in range(3))
    assert torch.allclose(attend(temp, q, k, v), attend(dense, q, k, v), atol=1e-5)
    shifted = base.roll(1, dims=2)  # every token moves to another position: no same-position match
    commit_frame(temp, shifted, torch.randn(1, H, N, D, generator=g))
    assert float(temp.last_merge_rate[0]) == 0.0


@pytest.mark.parametrize("match", ["pre", "post"])
def test_tempcache_recent_group_search_equals_full_search_on_duplicates(match):
    """match_frames=1 searches only the groups the last frame updated: with content that
    repeats every frame it finds the same groups as the search over every group."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(1, H, N, D, generator=g)
    full = TempCache(spec(), budget_frames=4, sink_frames=1, threshold=0.99, match=match)
    recent = TempCache(spec(), budget_frames=4, sink_frames=1, threshold=0.99, match=match, match_frames=1)
    for f in range(7):
        v = torch.randn(1, H, N, D, generator=g)
        commit_frame(full, base, v)
        commit_frame(recent, base, v)
    assert recent.merge_rate() == full.merge_rate() == pytest.approx(5 / 6)
    for a, b in ((full.k[0], recent.k[0]), (full.v[0], recent.v[0]), (full.count[0], recent.count[0])):
        assert torch.equal(a, b)


def test_tempcache_merge_target_fixes_the_merge_rate_of_unrelated_keys():
    g = torch.Generator().manual_seed(14)
    temp = TempCache(spec(), budget_frames=4, sink_frames=1, merge_target=0.25)
    for f in range(12):  # random keys: nothing would pass the default threshold
        commit_frame(temp, torch.randn(1, H, N, D, generator=g), torch.randn(1, H, N, D, generator=g))
        if f == 1:  # only the sink frame is cached: sinks never take members
            assert float(temp.last_merge_rate[0]) == 0.0
        if f >= 2:
            assert float(temp.last_merge_rate[0]) == pytest.approx(0.25)
    assert int((temp.count[0] > 0).sum(-1).max()) <= 4 * N  # the whole buffer, staging slots included
    with pytest.raises(ValueError, match="merge_target=1.5"):
        TempCache(spec(), budget_frames=4, merge_target=1.5)


def test_tempcache_merge_of_all_layers_at_once_equals_layer_by_layer():
    """The merge runs once for every layer when the last layer commits; flushing after
    each layer's commit instead gives the same cache."""
    g = torch.Generator().manual_seed(12)
    sp = spec(layers=3)
    together = TempCache(sp, budget_frames=3, sink_frames=1, threshold=0.8)
    apart = TempCache(sp, budget_frames=3, sink_frames=1, threshold=0.8)
    base = torch.randn(3, 1, H, N, D, generator=g)
    for f in range(9):  # partly repeating content, over the budget: merges and evictions
        ks = base + 0.3 * torch.randn(3, 1, H, N, D, generator=g) * (f % 2)
        vs = torch.randn(3, 1, H, N, D, generator=g)
        for layer in range(3):
            for cache in (together, apart):
                cache.stage(layer, ks[layer], vs[layer], ks[layer])
            together.commit(layer)
            apart.commit(layer)
            apart.flush()
    assert together.merge_rate() > 0
    for layer in range(3):
        for name in ("k", "v", "count", "stamp"):
            assert torch.equal(getattr(together, name)[layer], getattr(apart, name)[layer]), (name, layer)
    assert together.frames_seen == apart.frames_seen == 9


def test_tempcache_refuses_a_layer_staged_twice_before_the_frame_is_merged():
    sp = spec(layers=2)
    cache = TempCache(sp, budget_frames=3, sink_frames=1)
    k = torch.randn(1, H, N, D)
    cache.stage(0, k, k, k)
    cache.commit(0)  # layer 1 has not committed: the merge waits for it
    with pytest.raises(RuntimeError, match="layer 0 staged again"):
        cache.stage(0, k, k, k)


def test_history_recall_is_one_when_duplicates_merge_and_nothing_is_evicted():
    g = torch.Generator().manual_seed(15)
    base = torch.randn(1, H, N, D, generator=g)
    temp = TempCache(spec(), budget_frames=3, sink_frames=1, threshold=0.99, track_history=True)
    for f in range(8):  # eight frames in a three-frame budget: only merging keeps them all
        commit_frame(temp, base, torch.randn(1, H, N, D, generator=g))
    q = torch.randn(1, H, N, D, generator=g)
    assert float(temp.history_recall(0, q)) == pytest.approx(1.0)
    assert temp.recall_summary() == pytest.approx(1.0)


def test_history_recall_is_the_dense_mass_on_the_frames_still_cached():
    g = torch.Generator().manual_seed(16)
    temp = TempCache(spec(), budget_frames=4, sink_frames=1, threshold=0.999, track_history=True)
    frames = [torch.randn(1, H, N, D, generator=g) for _ in range(10)]
    for k in frames:  # unrelated keys: nothing merges; LRU keeps the sink and the last 3 frames
        commit_frame(temp, k, torch.randn(1, H, N, D, generator=g))
    q = torch.randn(1, H, N, D, generator=g)
    p = torch.softmax(q @ torch.cat(frames, 2).transpose(-1, -2) / D ** 0.5, dim=-1)  # (1, H, N, 10 N)
    kept = torch.zeros(10 * N, dtype=torch.bool)
    for f in (0, 7, 8, 9):
        kept[f * N : (f + 1) * N] = True
    expected = (p * kept).sum(-1).mean()
    assert float(temp.history_recall(0, q)) == pytest.approx(float(expected), abs=1e-6)
    assert float(expected) < 0.6  # most of the history is gone: the test can tell


def test_tempcache_never_exceeds_its_budget_and_keeps_its_sinks():
    g = torch.Generator().manual_seed(1)
    temp = TempCache(spec(), budget_frames=4, sink_frames=1, threshold=0.9)
    sink_k = torch.randn(1, H, N, D, generator=g)
    commit_frame(temp, sink_k, torch.randn(1, H, N, D, generator=g))
    shapes = (temp.k[0].shape, temp.count[0].shape)
    prev = sink_k
    for f in range(200):
        k = torch.randn(1, H, N, D, generator=g)
        if f % 3 == 0:  # some frames partly repeat the previous frame: those tokens merge
            k[:, :, : N // 2] = prev[:, :, : N // 2]
        commit_frame(temp, k, torch.randn(1, H, N, D, generator=g))
        prev = k
        groups = (temp.count[0] > 0).sum(-1)  # over the whole buffer, staging slots included
        assert int(groups.max()) <= 4 * N
        assert not bool((temp.count[0][:, :, 4 * N :] > 0).any())  # nothing lives past the budget
        assert (temp.k[0].shape, temp.count[0].shape) == shapes
    assert temp.merge_rate() > 0
    # the sink frame's keys are still there, unmerged
    assert torch.equal(temp.k[0][:, :, :N], sink_k)
    assert torch.all(temp.count[0][:, :, :N] == 1)


def test_tempcache_merges_similar_and_appends_dissimilar():
    g = torch.Generator().manual_seed(2)
    temp = TempCache(spec(), budget_frames=8, sink_frames=0 + 1, threshold=0.9)
    commit_frame(temp, torch.randn(1, H, N, D, generator=g), torch.randn(1, H, N, D, generator=g))  # sink
    a = torch.randn(1, H, N, D, generator=g)
    commit_frame(temp, a, torch.randn(1, H, N, D, generator=g))
    near = a + 0.01 * torch.randn(1, H, N, D, generator=g)
    commit_frame(temp, near, torch.randn(1, H, N, D, generator=g))
    assert temp.last_merge_rate[0] == 1.0
    assert torch.equal(temp.k[0][:, :, N : 2 * N], near)  # the newest key represents the group
    far = torch.randn(1, H, N, D, generator=g)
    commit_frame(temp, far, torch.randn(1, H, N, D, generator=g))
    assert temp.last_merge_rate[0] == 0.0


@pytest.mark.parametrize("match", ["post", "local"])
def test_mean_representative_keeps_the_mean_key_and_value_of_each_group(match):
    """representative=mean: after several near-duplicate frames merge, each group's key
    and value are the means of its members', and its count is the number of members."""
    g = torch.Generator().manual_seed(5)
    temp = TempCache(spec(), budget_frames=8, sink_frames=1, threshold=0.9, match=match, radius=0, match_frames=1,
                     representative="mean")
    commit_frame(temp, torch.randn(1, H, N, D, generator=g), torch.randn(1, H, N, D, generator=g))  # sink
    base = torch.randn(1, H, N, D, generator=g)
    keys, values = [], []
    for _ in range(4):  # the same content, slightly perturbed each frame: one group per token
        k, v = base + 0.01 * torch.randn(1, H, N, D, generator=g), torch.randn(1, H, N, D, generator=g)
        commit_frame(temp, k, v)
        keys.append(k)
        values.append(v)
    assert temp.merge_rate() == pytest.approx(3 / 4)  # the first commit after the sink starts the groups
    group = slice(N, 2 * N)  # the slots right after the sink
    assert torch.equal(temp.count[0][:, :, group], torch.full((1, H, N), 4.0))
    assert torch.allclose(temp.k[0][:, :, group], torch.stack(keys).mean(0), atol=1e-5)
    assert torch.allclose(temp.v[0][:, :, group], torch.stack(values).mean(0), atol=1e-5)


@pytest.mark.parametrize("match_frames", [0, 1, 2])
def test_local_matching_follows_content_that_moves_one_patch(match_frames):
    """A frame whose tokens are the previous frame shifted one column right merges into the
    neighbouring groups with match=local: every moved token finds its content one patch away."""
    g = torch.Generator().manual_seed(7)
    grid = 3  # N = 9 tokens: a 3x3 frame

    def shifted(keys):  # content moves one column to the right; a new column enters
        k = keys.view(1, H, grid, grid, D).roll(1, dims=3).clone()
        k[:, :, :, 0] = torch.randn(1, H, grid, D, generator=g)
        return k.view(1, H, grid * grid, D)

    sp = CacheSpec(1, 1, H, D, grid * grid, torch.device("cpu"), torch.float32)
    local = TempCache(sp, budget_frames=6, sink_frames=1, threshold=0.99, match="local", radius=1,
                      match_frames=match_frames)
    commit_frame(local, torch.randn(1, H, 9, D, generator=g), torch.randn(1, H, 9, D, generator=g))  # sink
    a = torch.randn(1, H, 9, D, generator=g)
    commit_frame(local, a, torch.randn(1, H, 9, D, generator=g))
    commit_frame(local, shifted(a), torch.randn(1, H, 9, D, generator=g))
    assert float(local.last_merge_rate[0]) == pytest.approx(6 / 9)  # two columns moved, one is new


def make_runtime(**kw) -> AttentionRuntime:
    rt = AttentionRuntime(AttentionConfig(**kw))
    return rt


@pytest.mark.parametrize("policy", ["dense", "tempcache"])
@pytest.mark.parametrize("merged_pass", [False, True])
def test_annsa_at_full_density_equals_dense(policy, merged_pass):
    g = torch.Generator().manual_seed(3)
    kw = dict(policy=policy, annsa=True, ann="quant", block=N, density=1.0, max_density=1.0, dense_fraction=0.0,
              budget_frames=6, threshold=0.95, initial_frames=4, min_blocks=1)
    rt_sparse, rt_dense = make_runtime(**kw), make_runtime(**{**kw, "annsa": False})
    caches = [rt.build_cache(spec()) for rt in (rt_sparse, rt_dense)]
    for f in range(9):
        k, v = torch.randn(1, H, N, D, generator=g), torch.randn(1, H, N, D, generator=g)
        for c in caches:
            commit_frame(c, k, v)
    m = 2 * N if merged_pass else N
    commit = N if merged_pass else 0
    q, k, v = (torch.randn(1, H, m, D, generator=g) for _ in range(3))
    out_sparse = AnnSelfAttention(rt_sparse, caches[0], commit, sparse=True)(0, q, k, v, k)
    out_dense = CachedSelfAttention(caches[1], commit)(0, q, k, v, k)
    assert rt_sparse.sa_stats.summary()["density"] == 1.0
    assert torch.allclose(out_sparse, out_dense, atol=1e-5)


def test_annsa_below_full_density_computes_fewer_pairs_and_reports_recall():
    g = torch.Generator().manual_seed(4)
    rt = make_runtime(policy="tempcache", annsa=True, ann="exact", block=N, density=0.25, max_density=0.9,
                      budget_frames=8, recent_frames=1, stats_recall=True, min_blocks=1)
    cache = rt.build_cache(spec())
    for f in range(12):
        commit_frame(cache, torch.randn(1, H, N, D, generator=g), torch.randn(1, H, N, D, generator=g))
    q, k, v = (torch.randn(1, H, N, D, generator=g) for _ in range(3))
    AnnSelfAttention(rt, cache, 0, sparse=True)(0, q, k, v, k)
    s = rt.sa_stats.summary()
    assert s["density"] < 0.5 and 0 < s["recall"] <= 1


@pytest.mark.parametrize("ann", ["exact", "quant", "lsh"])
def test_annca_keeping_all_tokens_equals_dense(ann):
    g = torch.Generator().manual_seed(5)
    t = 32
    opts = {"mask_k": t} if ann != "lsh" else {"num_bits": 1, "num_tables": 4, "probes": 1}
    rt = make_runtime(annca=True, ann=ann, ann_options=opts)
    rt.tokens_per_frame = N
    pk, pv = torch.randn(1, H, t, D, generator=g), torch.randn(1, H, t, D, generator=g)
    kv = rt.prepare_prompt([(pk, pv)])
    q = torch.randn(1, H, 2 * N, D, generator=g)
    out = AnnCrossAttention(rt, N)(0, q, *kv[0])
    assert rt.ca_stats.summary()["density"] == pytest.approx(1.0)
    assert torch.allclose(out, sdpa(q, pk, pv), atol=1e-5)


def test_annca_below_its_minimum_prompt_size_runs_dense():
    g = torch.Generator().manual_seed(13)
    t = 32
    rt = make_runtime(annca=True, ann="quant", ann_options={"mask_k": 1}, annca_min_tokens=t + 1)
    rt.tokens_per_frame = N
    pk, pv = torch.randn(1, H, t, D, generator=g), torch.randn(1, H, t, D, generator=g)
    kv = rt.prepare_prompt([(pk, pv)])
    q = torch.randn(1, H, 2 * N, D, generator=g)
    out = AnnCrossAttention(rt, N)(0, q, *kv[0])
    assert rt.ca_stats.summary()["density"] == 1.0  # mask_k=1 would keep few tokens if it selected
    assert torch.allclose(out, sdpa(q, pk, pv), atol=1e-5)


def test_a_prompt_without_repeated_tokens_is_used_as_it_is():
    g = torch.Generator().manual_seed(7)
    pk, pv = torch.randn(1, H, 16, D, generator=g), torch.randn(1, H, 16, D, generator=g)
    k2, v2, logc = dedupe_tokens(pk, pv)
    assert k2 is pk and v2 is pv and logc is None
    rt = make_runtime(annca=True, ann="quant", ann_options={"mask_k": 16})
    rt.tokens_per_frame = N
    kv = rt.prepare_prompt([(pk, pv)])
    q = torch.randn(1, H, N, D, generator=g)
    assert rt.prompt_logc == [] and torch.equal(AnnCrossAttention(rt, N)(0, q, *kv[0]), sdpa(q, pk, pv))


def test_identical_prompt_tokens_merge_exactly():
    g = torch.Generator().manual_seed(6)
    pk, pv = torch.randn(1, H, 4, D, generator=g), torch.randn(1, H, 4, D, generator=g)
    idx = torch.tensor([0, 1, 1, 2, 3, 3, 3, 0])
    pk, pv = pk[:, :, idx], pv[:, :, idx]  # 8 tokens, 4 distinct
    k2, v2, logc = dedupe_tokens(pk, pv)
    assert k2.shape[2] == 4
    q = torch.randn(1, H, N, D, generator=g)
    assert torch.allclose(sdpa(q, k2, v2, logc), sdpa(q, pk, pv), atol=1e-5)


def test_attention_config_rejects_bad_values():
    with pytest.raises(ValueError, match="policy"):
        AttentionConfig(policy="sliding")
    with pytest.raises(ValueError, match="density"):
        AttentionConfig(density=0.0)
    with pytest.raises(ValueError, match="unknown attention config keys"):
        AttentionConfig.from_dict({"treshold": 0.5})
    with pytest.raises(ValueError, match="budget_frames"):
        TempCache(spec(), budget_frames=1, sink_frames=1)


@pytest.mark.parametrize("name", ["dense", "window", "tempcache", "annsa", "annca", "fastar"])
def test_every_attention_preset_plays_and_reports(name):
    """Each preset builds the neural engine, generates frames and feeds the HUD line."""
    from conftest import compose

    from runtime.engine import build_engine
    from runtime.hud import HudValues, hud_lines
    from worlds import build_world

    cfg = compose(["engine=neural", f"attention={name}", "engine.dtype=float32"])
    engine = build_engine(cfg, build_world(cfg.world))
    for seed in (1, 0):  # a reset replaces the cache's buffers; the memory shown follows
        engine.reset(seed)
        assert engine.stats.memory_mb == engine.rollout.cache.memory_bytes() / 2**20
        for a in (4, 4, 2):
            frames = engine.step([a] * engine.chunk_size)
            assert engine.stats.memory_mb == engine.rollout.cache.memory_bytes() / 2**20
    assert frames.dtype.name == "uint8" and frames.shape[1:] == engine.frame_shape
    line = engine.stats.extra["hud"]
    assert line.startswith(name)
    if name in ("tempcache", "fastar"):
        assert "merge" in line
    if name in ("annca", "fastar"):
        assert "ca " in line
    values = HudValues(30.0, 30.0, 1.0, 3, engine.stats.cache_tokens, engine.stats.memory_mb, 0, 0, False, None,
                       attention=line)
    assert line in hud_lines(values)


def test_engine_memory_follows_a_growing_dense_cache():
    """The engine counts its cache's memory only when the cache's length changes: a dense
    cache that grows past its first allocation is seen at its new size."""
    from conftest import compose

    from runtime.engine import build_engine
    from worlds import build_world

    cfg = compose(["engine=neural", "attention=dense", "attention.initial_frames=2", "engine.dtype=float32"])
    engine = build_engine(cfg, build_world(cfg.world))
    engine.reset(0)
    seen = {engine.stats.memory_mb}
    for _ in range(4):
        engine.step([4] * engine.chunk_size)
        assert engine.stats.memory_mb == engine.rollout.cache.memory_bytes() / 2**20
        seen.add(engine.stats.memory_mb)
    assert len(seen) > 1  # it grew


@pytest.mark.parametrize("policy", ["dense", "window"])
def test_annsa_always_keeps_the_most_recent_frame(policy):
    """With room for one cached block, AnnSA attends to the newest frame whatever the ANN
    ranks highest: the result equals attention over [newest frame | chunk] (and the sink)."""
    g = torch.Generator().manual_seed(8)
    rt = make_runtime(policy=policy, annsa=True, ann="exact", block=N, density=0.01, max_density=1.0,
                      recent_frames=1, min_blocks=1, sink_frames=0, window_frames=8, initial_frames=16)
    cache = rt.build_cache(spec())
    frames = [(torch.randn(1, H, N, D, generator=g), torch.randn(1, H, N, D, generator=g)) for _ in range(12)]
    for k, v in frames:
        commit_frame(cache, k, v)
    recent = cache.recent_slots(0, 1)[0, 0, : cache.num_tokens(0)]
    assert int(recent.sum()) == N
    q, k, v = (torch.randn(1, H, N, D, generator=g) for _ in range(3))
    out = AnnSelfAttention(rt, cache, 0, sparse=True)(0, q, k, v, k)
    last_k, last_v = frames[-1]
    ref = sdpa(q, torch.cat([last_k, k], 2), torch.cat([last_v, v], 2))
    assert torch.allclose(out, ref, atol=1e-5)


def test_merge_when_full_appends_exactly_until_the_budget_is_reached():
    g = torch.Generator().manual_seed(17)
    base = torch.randn(1, H, N, D, generator=g)
    dense = DenseCache(spec(), initial_frames=8)
    lazy = TempCache(spec(), budget_frames=4, sink_frames=1, threshold=0.9, merge_when="full")
    for f in range(4):  # identical keys would merge at once with merge_when=always
        v = torch.randn(1, H, N, D, generator=g)
        commit_frame(dense, base, v)
        commit_frame(lazy, base, v)
    assert lazy.merge_rate() == 0.0
    q, k, v = (torch.randn(1, H, N, D, generator=g) for _ in range(3))
    assert torch.allclose(attend(lazy, q, k, v), attend(dense, q, k, v), atol=1e-5)
    commit_frame(lazy, base, torch.randn(1, H, N, D, generator=g))  # full: now it merges
    assert float(lazy.last_merge_rate[0]) == 1.0
    with pytest.raises(ValueError, match="merge_when='later'"):
        TempCache(spec(), budget_frames=4, merge_when="later")


def test_merge_when_full_is_the_dense_computation_bit_for_bit_until_the_budget_fills():
    """While no frame could have merged, attention runs over the filled prefix without a
    bias: the same keys in the same order as dense, so the outputs are identical (not
    merely close), in the merged pass too ([clean | noisy], the clean frame committed)."""
    g = torch.Generator().manual_seed(23)
    dense = DenseCache(spec(), initial_frames=8)
    lazy = TempCache(spec(), budget_frames=4, sink_frames=1, threshold=0.9, merge_when="full")
    base = torch.randn(1, H, N, D, generator=g)  # identical keys: merge_when=always would merge them
    for f in range(6):
        q, v, noisy = (torch.randn(1, H, 2 * N, D, generator=g) for _ in range(3))
        k = torch.cat([base, noisy[:, :, :N]], 2)
        _, _, bias = lazy.stage(0, k, v, k)
        lazy.staged[0] = 0  # look only: the pass below stages again
        outs = [CachedSelfAttention(c, commit=N)(0, q, k, v, k) for c in (dense, lazy)]
        if (f + 2) * N <= 4 * N:  # the f committed frames + [clean | noisy] fit the budget
            assert bias is None and torch.equal(outs[0], outs[1]), f
        else:  # the budget is reached: groups carry their log-count bias from here on
            assert bias is not None, f
    assert lazy.merge_rate() > 0  # frames 4 and 5 found no room and merged


def test_fill_budget_attends_over_the_whole_budget_from_the_first_frame_and_equals_dense():
    """fill=budget: every stage returns the whole budget with the log-count bias (empty
    slots -inf), a shape that never changes; the result equals dense attention while
    the budget fills, in the merged pass too, and once full the cache holds the same
    groups as fill=prefix (the same slots, counts and keys)."""
    g = torch.Generator().manual_seed(41)
    dense = DenseCache(spec(), initial_frames=8)
    caches = {fill: TempCache(spec(), budget_frames=4, sink_frames=1, threshold=0.9, merge_when="full", fill=fill)
              for fill in ("prefix", "budget")}
    assert caches["budget"].graph_ready() is False  # the sink is not written yet
    base = torch.randn(1, H, N, D, generator=g)  # identical keys: they merge once the budget is full
    shapes = []
    for f in range(6):
        q, v, noisy = (torch.randn(1, H, 2 * N, D, generator=g) for _ in range(3))
        k = torch.cat([base, noisy[:, :, :N]], 2)
        keys, _, bias = caches["budget"].stage(0, k, v, k)
        caches["budget"].staged[0] = 0  # look only: the pass below stages again
        shapes.append((tuple(keys.shape), caches["budget"].static_shape, bias is not None))
        outs = {name: CachedSelfAttention(c, commit=N)(0, q, k, v, k) for name, c in [("dense", dense), *caches.items()]}
        if (f + 2) * N <= 4 * N:  # before the budget is reached: all three are dense attention
            assert torch.allclose(outs["budget"], outs["dense"], atol=1e-5), f
        assert torch.allclose(outs["budget"], outs["prefix"], atol=1e-5), f
        assert caches["budget"].graph_ready() is True, f  # static from the first committed frame on
    assert set(shapes) == {((1, H, 4 * N + 2 * N, D), True, True)}
    for name in ("count", "stamp", "pos"):
        assert torch.equal(getattr(caches["budget"], name)[0], getattr(caches["prefix"], name)[0]), name
    assert torch.allclose(caches["budget"].k[0][:, :, : 4 * N], caches["prefix"].k[0][:, :, : 4 * N])
    assert caches["budget"].merge_rate() == caches["prefix"].merge_rate() > 0


@pytest.mark.parametrize("match", ["local", "pre", "post"])
def test_match_keys_in_the_cache_dtype_give_the_float32_merges(match):
    """match_dtype=cache stores the unit match keys in the cache's dtype (bf16 here, half
    the bytes of float32); similarities are still float32, so tokens whose cosine is
    clearly on one side of the threshold, each with one clear best group, merge exactly as
    with float32 keys: the same slots, counts and cached keys and values."""
    g = torch.Generator().manual_seed(43)
    bf16 = CacheSpec(1, 1, H, D, N, torch.device("cpu"), torch.bfloat16)
    caches = {dt: TempCache(bf16, budget_frames=3, sink_frames=1, threshold=0.9, match=match, representative="mean",
                            match_frames=2, match_dtype=dt) for dt in ("cache", "float32")}
    assert caches["cache"].mkey[0].dtype == torch.bfloat16 and caches["float32"].mkey[0].dtype == torch.float32
    base = torch.randn(1, H, N, D, generator=g)
    for f in range(8):  # half the tokens repeat (cosine ~1), half are new (cosine ~0)
        k = torch.where(torch.arange(N)[:, None] % 2 == 0, base + 1e-3 * torch.randn(1, H, N, D, generator=g),
                        torch.randn(1, H, N, D, generator=g)).to(torch.bfloat16)
        v = torch.randn(1, H, N, D, generator=g).to(torch.bfloat16)
        for c in caches.values():
            commit_frame(c, k, v)
    a, b = caches["cache"], caches["float32"]
    assert a.merge_rate() == b.merge_rate() > 0
    for name in ("count", "stamp", "pos", "k", "v"):
        assert torch.equal(getattr(a, name)[0], getattr(b, name)[0]), name
    assert torch.allclose(a.mkey[0].float(), b.mkey[0], atol=1e-2)


def test_match_dtype_auto_is_float32_on_cpu_and_bad_values_fail():
    bf16 = CacheSpec(1, 1, H, D, N, torch.device("cpu"), torch.bfloat16)
    assert TempCache(bf16, budget_frames=4).mkey[0].dtype == torch.float32
    with pytest.raises(ValueError, match="match_dtype='half'"):
        TempCache(bf16, budget_frames=4, match_dtype="half")


def test_reset_lets_go_of_the_old_buffers_before_allocating_new_ones():
    """A reset allocates a whole new set of buffers; holding the old set meanwhile would
    need twice the cache's memory (tens of GB at the Wan shape)."""
    def tensors_in(v) -> bool:  # at any depth of lists, tuples and dicts
        if isinstance(v, dict):
            v = list(v.values())
        return isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and any(tensors_in(x) for x in v))

    def held(cache):
        return sorted(n for n, v in vars(cache).items() if tensors_in(v))

    g = torch.Generator().manual_seed(47)
    for cache in (WindowCache(spec(), sink_frames=1, window_frames=2), DenseCache(spec(), initial_frames=2),
                  TempCache(spec(), budget_frames=3, sink_frames=1, match="local", merge_when="full"),
                  TempCache(spec(), budget_frames=3, sink_frames=1, match="local", track_history=True)):
        for _ in range(4):
            commit_frame(cache, *(torch.randn(1, H, N, D, generator=g) for _ in range(2)))
        before = held(cache)
        if getattr(cache, "track_history", False):
            assert "_history" in before  # the committed keys, in lists of tuples
        seen = []
        allocate = cache._allocate_kv

        def spy(shape, cache=cache, allocate=allocate, seen=seen):
            seen.append(held(cache))
            return allocate(shape)
        cache._allocate_kv = spy
        cache.reset()
        assert seen == [[]], (cache.policy, seen)
        # the buffers come back (lazily built tables such as the neighbourhood may wait for use)
        assert {"k", "v", "slot_frame"} <= set(held(cache)) <= set(before), cache.policy
        assert cache.num_tokens(0) == 0, cache.policy


def test_annsa_over_a_budget_that_fills_keeps_the_sink_and_equals_dense():
    """fill=budget: attention spans the whole budget while it fills, most of it empty.
    Empty slots are never "recent", so AnnSA's forced blocks are the sink and the frames
    really committed; with room for them in the kept blocks the result is dense attention
    (an empty slot counted as recent in the first commits tied with the sink, and the
    selection could drop the sink)."""
    g = torch.Generator().manual_seed(53)
    rt = make_runtime(policy="tempcache", annsa=True, ann="exact", block=N, density=0.25, max_density=1.0,
                      recent_frames=2, min_blocks=4, sink_frames=1, budget_frames=16, merge_when="full",
                      fill="budget", threshold=0.99)
    cache = rt.build_cache(spec())
    dense = DenseCache(spec(), initial_frames=32)
    for f in range(4):
        q, k, v = (torch.randn(1, H, N, D, generator=g) for _ in range(3))
        out = AnnSelfAttention(rt, cache, N, sparse=True)(0, q, k, v, k)
        ref = CachedSelfAttention(dense, N)(0, q, k, v, k)
        assert torch.allclose(out, ref, atol=1e-5), f
        if f:  # the sink and the committed frames are forced in
            recent = cache.recent_slots(0, 2)[0, 0, : 16 * N]
            assert recent[:N].all() and not recent[(f + 1) * N :].any(), f
    assert rt.sa_stats.summary()["density"] < 1.0  # the sparse path ran


def test_tempcache_dtype_and_fill_choices_resolve_per_device():
    from runtime.tempcache import match_key_dtype, static_fill

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert static_fill("auto", cuda) and not static_fill("auto", cpu)
    assert static_fill("budget", cpu) and not static_fill("prefix", cuda)
    assert match_key_dtype("auto", cuda, torch.bfloat16) == torch.bfloat16
    assert match_key_dtype("auto", cpu, torch.bfloat16) == torch.float32
    assert match_key_dtype("cache", cpu, torch.bfloat16) == torch.bfloat16
    assert match_key_dtype("float32", cuda, torch.bfloat16) == torch.float32
    assert TempCache(spec(), budget_frames=4, merge_when="full").static_fill is False  # a CPU cache: auto
    assert TempCache(spec(), budget_frames=4, merge_when="full", fill="budget").static_fill is True
    with pytest.raises(ValueError, match="fill='static'"):
        TempCache(spec(), budget_frames=4, fill="static")
    for bad in ({"fill": "static"}, {"match_dtype": "half"}):
        with pytest.raises(ValueError, match=repr(next(iter(bad.values())))):
            AttentionConfig(**bad)


def test_caches_report_whether_their_attention_shapes_repeat():
    """`static_shape` after each stage: dense never (it grows), window once full, TempCache
    once its budget is in use (before, it attends over its growing filled prefix). GPU
    attention keeps plan-building kernels for shapes that repeat (runtime/attention.py)."""
    g = torch.Generator().manual_seed(29)
    caches = {"dense": DenseCache(spec(), initial_frames=2), "window": WindowCache(spec(), sink_frames=1, window_frames=2),
              "tempcache": TempCache(spec(), budget_frames=3, sink_frames=1, merge_when="full")}
    seen = {name: [] for name in caches}
    for f in range(6):
        k, v = (torch.randn(1, H, N, D, generator=g) for _ in range(2))
        for name, cache in caches.items():
            cache.stage(0, k, v, k)
            seen[name].append(cache.static_shape)
            cache.commit(0)
    assert seen["dense"] == [False] * 6
    assert seen["window"] == [False, False, False, True, True, True]  # 3 frames fill it
    assert seen["tempcache"] == [False, False, False, True, True, True]  # the 3-frame budget fills


@pytest.mark.parametrize("sorted_means", [False, True])
def test_many_tokens_of_one_frame_joining_one_group_leave_the_mean_of_all_members(sorted_means):
    """Both ways of updating group means (index_add_ of each member's share, the CPU path;
    one write per group after sorting the members, the CUDA path, which must not depend on
    the order of atomic adds) give the mean key and value of every member."""
    g = torch.Generator().manual_seed(31)
    temp = TempCache(spec(), budget_frames=8, sink_frames=1, threshold=0.9, match="pre", representative="mean")
    temp.sorted_means = sorted_means
    commit_frame(temp, torch.randn(1, H, N, D, generator=g), torch.randn(1, H, N, D, generator=g))  # sink
    base = torch.randn(1, H, N, D, generator=g)
    commit_frame(temp, base, torch.randn(1, H, N, D, generator=g))  # N groups
    members_k = [base[:, :, :1]]
    members_v = [temp.v[0][:, :, N : N + 1].clone()]
    for _ in range(2):  # every token of the frame is group 0's content: N members join it at once
        k = base[:, :, :1] + 1e-3 * torch.randn(1, H, N, D, generator=g)
        v = torch.randn(1, H, N, D, generator=g)
        commit_frame(temp, k, v)
        members_k.append(k)
        members_v.append(v)
    group = slice(N, N + 1)  # group 0: the first slot after the sink
    assert torch.equal(temp.count[0][:, :, group], torch.full((1, H, 1), 1.0 + 2 * N))
    assert torch.allclose(temp.k[0][:, :, group], torch.cat(members_k, 2).mean(2, keepdim=True), atol=1e-5)
    assert torch.allclose(temp.v[0][:, :, group], torch.cat(members_v, 2).mean(2, keepdim=True), atol=1e-5)


def test_cache_memory_counts_every_tensor_a_policy_holds_once():
    """memory_bytes (the HUD's and the evaluation's cache memory): keys and values for
    dense and window; TempCache adds its match keys and bookkeeping. Views are not
    counted twice."""
    s = spec(layers=2)
    kv_bytes_per_slot = 2 * s.num_layers * s.batch * s.heads * s.head_dim * 4  # float32 keys + values
    window = WindowCache(s, sink_frames=1, window_frames=3)
    kv = sum(t.numel() * t.element_size() for t in window.k + window.v)
    assert kv == kv_bytes_per_slot * window.k[0].shape[2]
    slots = sum(t.numel() * 8 for t in window.slot_frame) + 2 * s.num_layers * 8  # each slot's frame, two step counters
    assert window.memory_bytes() == kv + slots
    temp = TempCache(s, budget_frames=4, sink_frames=1, threshold=0.99, match="local", match_frames=1)
    kv = sum(t.numel() * t.element_size() for t in temp.k + temp.v)
    assert kv == kv_bytes_per_slot * temp.k[0].shape[2]
    mkey = temp._mkey.numel() * temp._mkey.element_size()  # float32 unit match keys on the CPU
    books = sum(t.numel() * t.element_size() for t in (temp._count, temp._logc, temp._stamp, temp._pos))
    assert mkey == s.num_layers * s.heads * (4 * N + 1) * D * 4
    assert temp.memory_bytes() >= kv + mkey + books
    extra = temp.memory_bytes() - (kv + mkey + books)
    small = sum(t.numel() * t.element_size() for t in (temp._pre, temp._gen, temp._trail, temp._merged_acc))
    small += sum(t.numel() * 8 for t in temp.slot_frame) + s.num_layers * 8  # as the window's (one step counter)
    assert extra == small
