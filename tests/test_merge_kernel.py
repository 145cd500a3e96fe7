"""TempCache's Triton kernels (runtime/merge_kernel.py) against the PyTorch code they replace.

On a machine without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1,
set before Triton is imported, so in a child process). Where Triton is not installed those
tests are skipped; the GPU run of the same checks is `pytest -m gpu tests/test_merge_kernel.py`
on a CUDA machine.
"""
from __future__ import annotations

import importlib.util
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import run_interpreted
from runtime import merge_kernel
from runtime.cache import CacheSpec
from runtime.tempcache import TempCache, _put, _sorted_means, eviction_priority_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(autouse=True)
def kernels_back_on():
    """Tests switch the kernels off to compare against the PyTorch paths; they are back
    on after each test, whether it passed or not."""
    yield
    merge_kernel.ENABLED = True


def test_eviction_order_is_the_stamp_order_in_int32():
    """Empty slots first in slot order, then the oldest stamp, ties by slot, sinks never:
    the order of the former int64 key stamp * cap + slot, now in int32 with capped ages."""
    g = torch.Generator().manual_seed(3)
    cap = 50
    count = (torch.rand(2, 3, cap + 7, generator=g) < 0.8).float() * 3
    stamp = torch.randint(0, 40, (2, 3, cap + 1), generator=g)
    stamp[..., :2] = -2  # sinks
    stamp[count[..., : cap + 1] == 0] = -1
    now = torch.tensor(41)
    prio = eviction_priority_reference(count, stamp, now, cap)
    assert prio.dtype == torch.int32
    slot = torch.arange(cap)
    old = torch.where(count[..., :cap] > 0, stamp[..., :cap] * cap + slot + cap, slot - cap)
    old = torch.where(stamp[..., :cap] == -2, torch.full_like(old, 1 << 40), old)
    k = cap - 2  # every slot but the sinks
    assert torch.equal(prio.topk(k, largest=False).indices, old.topk(k, largest=False).indices)
    # ages beyond the cap count as the cap: the oldest go first, in slot order
    top = merge_kernel.age_cap(cap)
    stamp2 = torch.full((1, 1, cap + 1), 5)
    stamp2[..., 10] = 4
    far = eviction_priority_reference(torch.ones(1, 1, cap), stamp2, torch.tensor(5 + top + 100), cap)
    assert far.topk(3, largest=False).indices.tolist() == [[[0, 1, 2]]]
    near = eviction_priority_reference(torch.ones(1, 1, cap), stamp2, torch.tensor(6), cap)
    assert near.topk(3, largest=False).indices.tolist() == [[[10, 0, 1]]]


def _checks(device: str) -> None:
    """Every kernel against its PyTorch counterpart (run under the interpreter on the CPU)."""
    g = torch.Generator(device=device).manual_seed(5)
    B, H, c, D, cap = 2, 3, 24, 64, 30
    S = cap + 2 * c
    for dt in (torch.float32, torch.bfloat16):
        # group means: many tokens per group, and a few groups of one
        store = torch.randn(B, H, S, D, generator=g, device=device).to(dt)
        x = torch.randn(B, H, c, D, generator=g, device=device).to(dt)
        idx = torch.randint(0, 6, (B, H, c), generator=g, device=device)
        idx[..., -3:] = torch.tensor([20, 21, 22], device=device)
        merged = torch.rand(B, H, c, generator=g, device=device) < 0.7
        members = torch.zeros(B, H, cap, device=device).scatter_add_(2, idx, merged.float())
        n_was = torch.gather(torch.randint(1, 5, (B, H, cap), generator=g, device=device).float(), 2, idx)
        n_now = n_was + torch.gather(members, 2, idx)
        ref = store.clone()
        dst, rows = _sorted_means([ref], idx, merged, [x], n_was, n_now, cap)
        ref.view(-1, D)[(torch.arange(B * H, device=device).view(B, H, 1) * S + dst).reshape(-1)] = \
            rows[0].to(dt).reshape(-1, D)
        out = store.clone()
        merge_kernel.group_means_(out, x, *merge_kernel.group_runs(idx, merged, cap), n_was, n_now, cap)
        tol = 1e-5 if dt == torch.float32 else 2e-2  # summation order: running sums vs direct
        assert torch.allclose(out[:, :, :cap].float(), ref[:, :, :cap].float(), atol=tol, rtol=tol), dt
        assert torch.equal(out[:, :, cap:], store[:, :, cap:]), "the kernel writes only group slots"
        touched = torch.zeros(B, H, S, dtype=torch.bool, device=device).scatter_(2, torch.where(merged, idx, cap), True)
        touched[:, :, cap] = False
        assert torch.equal((out != store).any(-1), touched)

        # row puts: unique slots, the scratch slot skipped
        slots = torch.stack([torch.randperm(cap, generator=g, device=device)[:c] for _ in range(B * H)]).view(B, H, c)
        slots[..., ::4] = cap
        rows = torch.randn(B, H, c, D, generator=g, device=device).to(dt)  # as the cache puts them: no cast
        want = store.clone()
        keep = slots != cap
        flat = (torch.arange(B * H, device=device).view(B, H, 1) * S + slots)[keep]
        want.view(-1, D)[flat] = rows[keep]
        got = store.clone()
        merge_kernel.put_rows_(got, slots, rows, skip=cap)
        assert torch.equal(got, want)

        # unit rows of a strided view (the staged keys inside the cache's buffer)
        buf = torch.randn(B, H, S, D, generator=g, device=device).to(dt)
        buf[0, 0, cap + 1] = 0  # a zero row stays zero
        got = merge_kernel.unit_rows(buf[:, :, cap:], c)
        assert got.dtype == torch.float32 and got.shape == (B, H, c, D)
        assert torch.allclose(got, F.normalize(buf[:, :, cap : cap + c].float(), dim=-1), atol=1e-6), dt

    # the same-position lookup (local matching, radius 0) against the PyTorch one
    T = 3
    m_new = F.normalize(torch.randn(B, H, c, D, generator=g, device=device), dim=-1)
    for mdt in (torch.float32, torch.bfloat16):
        mkey = F.normalize(torch.randn(B, H, cap + 1, D, generator=g, device=device), dim=-1).to(mdt)
        trail = torch.randint(-1, cap, (B, H, T, c + 1), generator=g, device=device)
        trail[0, 0, :, 0] = -1  # a token with no candidate at all
        stamp = torch.randint(-2, 12, (B, H, cap + 1), generator=g, device=device)
        st = {"mkey": mkey, "trail": trail, "stamp": stamp}
        step = torch.tensor(12, device=device)
        lookup = SimpleNamespace(radius=0, match_frames=2)
        merge_kernel.ENABLED = False
        want = TempCache._local_trail_top1(lookup, st, m_new, step)
        merge_kernel.ENABLED = True
        got = merge_kernel.same_position_top1(m_new, mkey, trail, stamp, step, 2)
        assert torch.equal(got[0].isinf(), want[0].isinf()) and want[0].isinf().any() and want[0].isfinite().any()
        assert torch.allclose(got[0], want[0], atol=1e-5), mdt
        assert torch.equal(got[1], want[1]), mdt

    # eviction priorities: exactly the reference's
    count = (torch.rand(B, H, S, generator=g, device=device) < 0.7).float()
    stamp = torch.randint(0, 30, (B, H, cap + 1), generator=g, device=device)
    stamp[..., :3] = -2
    stamp[count[..., : cap + 1] == 0] = -1
    for now in (30, 30 + merge_kernel.age_cap(cap) + 9):
        t = torch.tensor(now, device=device)
        assert torch.equal(merge_kernel.eviction_priority(count, stamp, t, cap),
                           eviction_priority_reference(count, stamp, t, cap))

    # TempCache rollouts with the kernels against the PyTorch paths: matching anywhere
    # with mean representatives, and the same-position lookup over two commits
    for cfg in (dict(match="pre", representative="mean"), dict(match="local", radius=0, match_frames=2)):
        _rollouts_match(device, cfg)


def _rollouts_match(device: str, cfg: dict) -> None:
    spec = CacheSpec(2, 1, 2, 16, 16, torch.device(device), torch.float32)
    caches = []
    for kernels in (True, False):
        cache = TempCache(spec, budget_frames=4, sink_frames=1, threshold=0.8, merge_when="always", **cfg)
        cache.sorted_means = True
        caches.append(cache)
    gen = torch.Generator(device=device).manual_seed(9)
    base = torch.randn(1, 2, 16, 16, generator=gen, device=device)
    for f in range(12):
        k = base + 0.5 * torch.randn(1, 2, 16, 16, generator=gen, device=device)
        v = torch.randn(1, 2, 16, 16, generator=gen, device=device)
        for i, cache in enumerate(caches):
            merge_kernel.ENABLED = i == 0
            count, stamp = cache._count.clone(), cache._stamp.clone()
            for layer in range(2):
                cache.stage(layer, k, v, k)
                cache.commit(layer)
            # every slot's log-count follows its count (they are now updated only where
            # tokens went), and every group that took members carries this commit's stamp
            c = cache._capacity
            assert torch.equal(cache._logc[..., :c], cache._logc_of(cache._count[..., :c])), f
            if f < 1:  # the sink frame: stamped as sinks
                continue
            grew = cache._count[..., :c] > count[..., :c]
            assert torch.equal(cache._stamp[..., :c][grew], torch.full_like(cache._stamp[..., :c][grew], f)), f
            assert torch.equal(cache._stamp[..., :c][~grew & (cache._stamp[..., :c] != stamp[..., :c])],
                               torch.full_like(cache._stamp[..., :c][~grew & (cache._stamp[..., :c] != stamp[..., :c])], f))
    merge_kernel.ENABLED = True
    a, b = caches
    assert a.merge_rate() == b.merge_rate() and 0.1 < a.merge_rate() < 0.9, (cfg, a.merge_rate())
    for name in ("_count", "_stamp", "_pos", "_logc"):
        assert torch.equal(getattr(a, name), getattr(b, name)), (cfg, name)
    cap = a._capacity
    for name in ("_k", "_v", "_mkey"):
        assert torch.allclose(getattr(a, name)[:, :, :, :cap], getattr(b, name)[:, :, :, :cap], atol=1e-5), (cfg, name)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernels_match_pytorch_under_the_interpreter():
    assert "kernels match" in run_interpreted(__file__, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA and Triton")
def test_kernels_match_pytorch_on_the_gpu():
    _checks("cuda")


if __name__ == "__main__":
    _checks(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    print("kernels match")
