"""TempCache's merge on CUDA in Triton kernels: group means (no atomic adds, one writer
per group), row copies that skip the scratch slot, and int32 eviction priorities.

When tokens of a frame join groups, each group's mean value (and mean key) becomes

    mean_new = (mean_old * n_old + sum of the joining tokens) / n_new

`_sorted_means` in runtime/tempcache.py computes this with PyTorch operators: a stable sort
of the joining tokens by group, running sums in float32 over the sorted tokens, a
difference of running sums per group, and an indexed copy of the new rows. At the Wan shape
(30 layers x 12 heads x 1600 tokens x 128) those are a dozen passes over 0.3-0.6 GB
float32 temporaries per store. This kernel reads each joining token once and each touched
group row once, adds the members of a group in sorted (= token) order in float32, and
writes the group's row in place: the group's last member in sorted order is its only
writer, so the result does not depend on scheduling and a CUDA graph replays it exactly.

The sort itself (small: one int64 per token) stays in PyTorch (`group_runs`). `put_rows_`
copies appended rows into their slots, skipping the scratch slot; `eviction_priority` makes
the eviction order's keys in one pass (the same order as TempCache's PyTorch reference).
Triton is optional: without it (or on the CPU) the caller keeps the PyTorch paths. The
kernels also run on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`), which the
tests use.
"""
from __future__ import annotations

import os

import torch

try:  # Triton ships with PyTorch's CUDA builds on Linux; the CPU build may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None


ENABLED = True  # False: always the PyTorch paths (tests compare the two)
# Triton reads TRITON_INTERPRET when it is imported: CPU tensors run under its interpreter
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def available(t: torch.Tensor) -> bool:
    """Can the kernels run on this tensor (CUDA with Triton, or Triton's CPU interpreter)?
    Asked several times per commit: no more than attribute reads."""
    return triton is not None and ENABLED and (t.is_cuda or INTERPRETED)


def group_runs(idx: torch.Tensor, merged: torch.Tensor, cap: int):
    """Sort the tokens of each (B, H) row by the group they join (stable: token order
    within a group). Returns (order, group, start), each (B, H, c): the token at each sorted
    position, its group (`cap` for tokens that join none, which sort last), and the sorted
    position where its group's run starts."""
    b, h, c = idx.shape
    key = torch.where(merged, idx, torch.full_like(idx, cap))
    group, order = torch.sort(key, dim=-1, stable=True)
    pos = torch.arange(c, device=idx.device).expand(b, h, c)
    first = torch.ones_like(group, dtype=torch.bool)
    first[..., 1:] = group[..., 1:] != group[..., :-1]
    start = torch.where(first, pos, torch.zeros_like(pos)).cummax(dim=-1).values
    return order, group, start


if triton is not None:

    @triton.jit
    def _group_means_kernel(store, x, order, group, start, n_was, n_now, cap, slots, c, D,
                            BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)  # one (batch, head) row of `slots` groups
        p = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # sorted positions
        inside = p < c
        base = row.to(tl.int64) * c
        g = tl.load(group + base + p, mask=inside, other=cap)
        g_next = tl.load(group + base + p + 1, mask=p + 1 < c, other=-1)
        writer = inside & (g < cap) & (g != g_next)  # the last member of its group's run
        s0 = tl.load(start + base + p, mask=writer, other=0)
        length = tl.where(writer, p - s0 + 1, 0)
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        longest = tl.max(length)
        t = 0
        while t < longest:  # the members, in sorted (token) order
            live = t < length
            tok = tl.load(order + base + s0 + t, mask=live, other=0)
            xr = tl.load(x + (base + tok)[:, None] * D + d[None, :], mask=live[:, None] & dm[None, :], other=0.0)
            acc += xr.to(tl.float32)
            t += 1
        me = tl.load(order + base + p, mask=writer, other=0)  # n_was / n_now are per token
        was = tl.load(n_was + base + me, mask=writer, other=0.0)
        now = tl.maximum(tl.load(n_now + base + me, mask=writer, other=1.0), 1.0)
        at = (row.to(tl.int64) * slots + g)[:, None] * D + d[None, :]
        wm = writer[:, None] & dm[None, :]
        old = tl.load(store + at, mask=wm, other=0.0).to(tl.float32)
        new = (old * was[:, None] + acc) / now[:, None]
        tl.store(store + at, new.to(store.dtype.element_ty), mask=wm)


    @triton.jit
    def _put_rows_kernel(store, slots, rows, skip, slots_per_row, c, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        p = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        base = row.to(tl.int64) * c
        sl = tl.load(slots + base + p, mask=p < c, other=skip)
        w = (p < c) & (sl != skip)
        d = tl.arange(0, BLOCK_D)
        m = w[:, None] & (d < D)[None, :]
        x = tl.load(rows + (base + p)[:, None] * D + d[None, :], mask=m, other=0.0)
        at = (row.to(tl.int64) * slots_per_row + sl)[:, None] * D + d[None, :]
        tl.store(store + at, x.to(store.dtype.element_ty), mask=m)

    @triton.jit
    def _eviction_priority_kernel(count, stamp, now, prio, cap, count_row, stamp_row, age_cap, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        s = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = s < cap
        n = tl.load(count + row.to(tl.int64) * count_row + s, mask=inside, other=0.0)
        st = tl.load(stamp + row.to(tl.int64) * stamp_row + s, mask=inside, other=0)
        age = tl.minimum(tl.load(now) - st, age_cap)
        p = tl.where(n > 0, (age_cap - age) * cap + s + cap, s - cap)
        p = tl.where(st == -2, 2147483647, p)
        tl.store(prio + row.to(tl.int64) * cap + s, p.to(tl.int32), mask=inside)


    @triton.jit
    def _unit_rows_kernel(src, out, H, c, s0, s1, s2, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)  # one (batch, head) row
        p = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        m = (p < c)[:, None] & (d < D)[None, :]
        b = row // H
        at = b.to(tl.int64) * s0 + (row % H).to(tl.int64) * s1 + p.to(tl.int64)[:, None] * s2 + d[None, :]
        x = tl.load(src + at, mask=m, other=0.0).to(tl.float32)
        norm = tl.maximum(tl.sqrt(tl.sum(x * x, 1)), 1e-12)
        tl.store(out + (row.to(tl.int64) * c + p)[:, None] * D + d[None, :], x / norm[:, None], mask=m)

    @triton.jit
    def _same_position_kernel(m_new, mkey, trail, stamp, step, best, pick, c, T, trail_t, trail_row, slots,
                              frames, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        p = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        inside = p < c
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        r64 = row.to(tl.int64)
        x = tl.load(m_new + (r64 * c + p)[:, None] * D + d[None, :], mask=inside[:, None] & dm[None, :], other=0.0)
        oldest = tl.load(step) - frames
        top = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
        which = tl.zeros([BLOCK_T], dtype=tl.int64)
        for t in range(T):  # the commits of the trail, in its row order (the first best wins)
            sl = tl.load(trail + r64 * trail_row + t * trail_t + p, mask=inside, other=-1)
            s = tl.maximum(sl, 0)
            ok = inside & (sl >= 0)
            ok = ok & (tl.load(stamp + r64 * slots + s, mask=inside, other=-1) >= oldest)
            k = tl.load(mkey + (r64 * slots + s)[:, None] * D + d[None, :], mask=ok[:, None] & dm[None, :], other=0.0)
            sim = tl.where(ok, tl.sum(k.to(tl.float32) * x, 1), float("-inf"))
            which = tl.where(t == 0, s, which)
            better = sim > top
            which = tl.where(better, s, which)
            top = tl.where(better, sim, top)
        tl.store(best + r64 * c + p, top, mask=inside)
        tl.store(pick + r64 * c + p, which, mask=inside)


def age_cap(cap: int) -> int:
    """Ages (in commits) above this count as this old in the eviction order, so that
    (age_cap - age) * cap + slot + cap fits int32 (a top-k over int32 keys is about twice
    as fast as over int64): 63910 commits for 33600 slots, 524284 for 4096."""
    return (2**31 - 1) // cap - 3


def eviction_priority(count: torch.Tensor, stamp: torch.Tensor, now: torch.Tensor, cap: int) -> torch.Tensor:
    """int32 (B, H, cap) eviction priorities, smallest first: empty slots in slot order,
    then groups from the oldest stamp (ages capped at `age_cap`, ties in slot order); sinks
    (stamp -2) never. count (B, H, >= cap) float, stamp (B, H, >= cap) int64, now the
    current commit (a 0-d int64 tensor, >= every stamp). The same order as
    `runtime.tempcache.eviction_priority_reference`."""
    b, h = count.shape[:2]
    if not (count.stride(-1) == 1 and stamp.stride(-1) == 1 and count.stride(0) == h * count.stride(1)
            and stamp.stride(0) == h * stamp.stride(1)):
        raise ValueError("eviction_priority: count and stamp need rows of contiguous slots")
    prio = torch.empty((b, h, cap), device=count.device, dtype=torch.int32)
    block = 1024
    _eviction_priority_kernel[(b * h, triton.cdiv(cap, block))](
        count, stamp, now, prio, cap, count.stride(1), stamp.stride(1), age_cap(cap), BLOCK=block)
    return prio


def put_rows_(store: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, skip: int = -1) -> None:
    """store[b, h, slots[b, h, i]] = rows[b, h, i] (cast to store's dtype), in place, except
    where the slot is `skip` (the scratch slot: nothing is written there). store (B, H, S,
    D) and rows (B, H, c, D) contiguous; slots (B, H, c). A slot named more than once
    (apart from `skip`) must come with the same row each time (TempCache's post-RoPE
    match keys: every token of a group writes the group's normalised mean key), since
    which of the writes lands is not defined."""
    b, h, s, d = store.shape
    c = slots.shape[2]
    if not (store.is_contiguous() and rows.is_contiguous() and rows.shape == (b, h, c, d)):
        raise ValueError(f"put_rows_: store {tuple(store.shape)} and rows {tuple(rows.shape)} must be contiguous "
                         "(B, H, S, D) and (B, H, c, D)")
    block_t = 16
    _put_rows_kernel[(b * h, triton.cdiv(c, block_t))](store, slots.contiguous(), rows, skip, s, c, d,
                                                       BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(d))


def group_means_(store: torch.Tensor, x: torch.Tensor, order: torch.Tensor, group: torch.Tensor,
                 start: torch.Tensor, n_was: torch.Tensor, n_now: torch.Tensor, cap: int) -> None:
    """In place: for every group that takes members, store[b, h, g] = (store[b, h, g] *
    n_was + sum of its members' rows of x) / n_now.

    store (B, H, S, D) contiguous, groups in slots [0, cap); x (B, H, c, D) contiguous, the
    joining tokens (a separate tensor: the kernel reads x while writing store); order,
    group, start (B, H, c) from `group_runs`; n_was, n_now (B, H, c) float32, per token, the
    count of its group before and after this frame."""
    b, h, s, d = store.shape
    c = x.shape[2]
    if not (store.is_contiguous() and x.is_contiguous() and x.shape[:2] == (b, h) and x.shape[3] == d):
        raise ValueError(f"group_means_: store {tuple(store.shape)} and x {tuple(x.shape)} must be contiguous "
                         "(B, H, S, D) and (B, H, c, D)")
    block_t = 16
    grid = (b * h, triton.cdiv(c, block_t))
    _group_means_kernel[grid](store, x, order.contiguous(), group.contiguous(), start.contiguous(),
                              n_was.float().contiguous(), n_now.float().contiguous(), cap, s, c, d,
                              BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(d))


def unit_rows(src: torch.Tensor, c: int) -> torch.Tensor:
    """The first c rows of src (B, H, >= c, D; any strides but a contiguous last dimension)
    as float32 unit vectors, (B, H, c, D) contiguous: F.normalize(src[:, :, :c].float(),
    dim=-1) in one pass (that is a strided copy to float32, a norm and a division)."""
    b, h, n, d = src.shape
    if src.stride(3) != 1 or n < c:
        raise ValueError(f"unit_rows: src {tuple(src.shape)} strides {src.stride()} must hold >= {c} rows "
                         "with a contiguous last dimension")
    out = torch.empty((b, h, c, d), device=src.device, dtype=torch.float32)
    block_t = 16
    _unit_rows_kernel[(b * h, triton.cdiv(c, block_t))](src, out, h, c, *src.stride()[:3], d, BLOCK_T=block_t,
                                                         BLOCK_D=triton.next_power_of_2(d))
    return out


def same_position_top1(m_new: torch.Tensor, mkey: torch.Tensor, trail: torch.Tensor, stamp: torch.Tensor,
                       step: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TempCache's same-position lookup (local matching, radius 0): for each new token, the
    groups its screen position went to in the trail's commits, those stamped within `frames`
    commits of `step`; the best cosine with its unit match key. m_new (B, H, c, D) float32
    contiguous; mkey (B, H, slots, D) contiguous; trail (B, H, T, >= c) int64 slots (-1:
    none) with a contiguous last dimension; stamp (B, H, slots) int64 contiguous; step a
    device scalar. Returns (best (B, H, c) float32, -inf where there is no candidate; its
    slot (B, H, c) int64, the first commit's slot clamped at 0 where there is none), as
    the PyTorch lookup gives them (ties: the earlier trail row)."""
    b, h, c, d = m_new.shape
    slots = mkey.shape[2]
    if not (m_new.is_contiguous() and mkey.is_contiguous() and stamp.is_contiguous() and trail.stride(3) == 1
            and stamp.shape == (b, h, slots) and trail.stride(0) == h * trail.stride(1)):
        raise ValueError("same_position_top1: m_new, mkey and stamp must be contiguous and trail's slots contiguous")
    best = torch.empty((b, h, c), device=m_new.device, dtype=torch.float32)
    pick = torch.empty((b, h, c), device=m_new.device, dtype=torch.long)
    block_t = 16
    _same_position_kernel[(b * h, triton.cdiv(c, block_t))](
        m_new, mkey, trail, stamp, step, best, pick, c, trail.shape[2], trail.stride(2), trail.stride(1), slots,
        frames, d, BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(d))
    return best, pick


def warm_up(dtype: torch.dtype, device: torch.device, slots: int, cap: int, c: int, d: int,
            match_dtype: torch.dtype | None = None) -> None:
    """Compile every kernel for a cache of these sizes now, on one row of scratch data,
    instead of at the first merge in play (Triton compiles a kernel on its first call for
    each specialization of its sizes; it keeps them in memory and on disk). slots: the
    width of the key and value stores (cap + staged), cap: the groups, c: tokens per
    commit, d: head dimension, match_dtype: the dtype of the match keys (default: dtype)."""
    kv = torch.zeros(1, 1, slots, d, device=device, dtype=dtype)
    x = torch.zeros(1, 1, c, d, device=device, dtype=dtype)
    idx = torch.zeros(1, 1, c, device=device, dtype=torch.long)
    ones = torch.ones(1, 1, c, device=device)
    group_means_(kv, x, *group_runs(idx, torch.ones_like(idx, dtype=torch.bool), cap), ones, ones, cap)
    scratch = torch.full_like(idx, cap)
    put_rows_(kv, scratch, x, cap)
    mkey = torch.zeros(1, 1, cap + 1, d, device=device, dtype=match_dtype or dtype)
    for skip in (cap, -1):  # appends skip the scratch slot; post-RoPE match keys skip nothing
        put_rows_(mkey, scratch, x.to(mkey.dtype), skip)
    unit = unit_rows(kv[:, :, cap:], c)  # the staged keys: match keys of post-RoPE matching
    trail = torch.full((1, 1, 1, c + 1), -1, device=device, dtype=torch.long)
    same_position_top1(unit, mkey, trail, torch.full((1, 1, cap + 1), -1, device=device, dtype=torch.long),
                       torch.zeros((), device=device, dtype=torch.long), 1)
    count = torch.zeros(1, 1, slots, device=device)
    stamp = torch.full((1, 1, cap + 1), -1, device=device, dtype=torch.long)
    steps = torch.zeros(2, device=device, dtype=torch.long)
    for now in steps.unbind():  # the commit counter of layer 0 and of an odd layer (another alignment)
        eviction_priority(count, stamp, now, cap)
