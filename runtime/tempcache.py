"""TempCache: a KV cache that merges near-duplicate keys across frames, with a hard budget.

Each layer holds at most `budget_frames * N` groups per head (N tokens per frame). A
group is (representative key, mean value, count); attention adds log(count) to the
group's logit, which is exact when the group's keys are identical:

    sum_i e^{q.k} v_i / Z  =  e^{q.k + log m} * mean(v) / Z     (m identical keys)

Commit of a clean frame, per head, for each new token:
  1. find its corresponding group: ANN top-1 over the groups' match keys (cosine);
  2. similarity >= `threshold`: merge (count += 1, value mean updated, the representative
     becomes the newest key by default, `representative: mean` keeps the mean key);
  3. otherwise append it to a free slot; when none is free (the budget is reached) it
     replaces the least recently updated group (LRU). Groups that keep absorbing new
     tokens stay fresh; content not seen for the longest time goes first.
The first `sink_frames` frames are sinks: appended unmerged, never matched, never
evicted (attention sinks anchor long rollouts).

Three ways to match (`match`), measured in docs/attention.md:
  post   post-RoPE keys: the same content at the same place in consecutive frames. RoPE
         turns part of each key by the frame index, so only near-static content merges.
  pre    pre-RoPE keys anywhere on screen: content wherever it moved, but also any other
         patch that looks alike (grass is grass), which loses the layout.
  local  pre-RoPE keys within `radius` patches of the new token's position: follows
         content that scrolls by a fraction of a patch without merging far look-alikes.
The stored representative is the post-RoPE key of the newest member, i.e. the content
at its latest position (and, for `local`, its latest screen position).

Memory layout per layer (static after reset; S sink slots, G group slots, C staged):
    [ S S | G G G G G G G G G G | C C ]      count 0 = empty slot, bias -inf
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.ann import AnnBackend, build_ann
from runtime.cache import CacheSpec, KVCache


class TempCache(KVCache):
    policy = "tempcache"

    def __init__(self, spec: CacheSpec, budget_frames: int = 16, sink_frames: int = 1, threshold: float = 0.9,
                 match: str = "post", representative: str = "recent", ann: AnnBackend | None = None,
                 radius: int = 1):
        if budget_frames <= sink_frames:
            raise ValueError(f"tempcache budget_frames={budget_frames} must exceed sink_frames={sink_frames}")
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"tempcache threshold={threshold} must be a cosine similarity in [-1, 1]")
        if match not in ("pre", "post", "local"):
            raise ValueError(f"tempcache match={match!r}; expected 'pre', 'post' or 'local'")
        if radius < 0:
            raise ValueError(f"tempcache radius={radius} must be >= 0")
        self.radius = radius
        self.grid = int(round(spec.tokens_per_frame ** 0.5))
        if representative not in ("recent", "mean"):
            raise ValueError(f"tempcache representative={representative!r}; expected 'recent' or 'mean'")
        self.sink_frames = sink_frames
        self.threshold = threshold
        self.match = match
        self.representative = representative
        self.ann = ann or build_ann("exact", metric="cosine")
        super().__init__(spec, budget_frames * spec.tokens_per_frame)

    def reset(self) -> None:
        super().reset()
        s, cap = self.spec, self._capacity
        full = cap + 2 * s.tokens_per_frame
        shape = (s.batch, s.heads, full)
        self.count = [torch.zeros(shape, device=s.device, dtype=torch.float32) for _ in range(s.num_layers)]
        self.logc = [self._logc(c) for c in self.count]
        self.mkey = [torch.zeros(shape + (s.head_dim,), device=s.device, dtype=s.dtype) for _ in range(s.num_layers)]
        # commit that last updated each group (-1 empty, -2 sink); the extra slot is scratch
        self.stamp = [torch.full(shape[:2] + (cap + 1,), -1, device=s.device, dtype=torch.long) for _ in range(s.num_layers)]
        self.staged_match = [None] * s.num_layers
        # screen position (row * grid + col) of each group's representative; -1: none
        self.pos = [torch.full(shape[:2] + (cap + 1,), -1, device=s.device, dtype=torch.long) for _ in range(s.num_layers)]
        self.merged_tokens = [0.0] * s.num_layers  # running totals (for the merge rate)
        self.new_tokens = [0] * s.num_layers
        self.last_merge_rate = [0.0] * s.num_layers

    def _logc(self, count: torch.Tensor) -> torch.Tensor:
        return torch.where(count > 0, count.clamp_min(1e-30).log(), torch.full_like(count, float("-inf")))

    # --- verbs
    def stage(self, layer: int, k, v, k_pre=None):
        cap, m = self._capacity, k.shape[2]
        self.k[layer][:, :, cap : cap + m] = k
        self.v[layer][:, :, cap : cap + m] = v
        self.logc[layer][:, :, cap : cap + m] = 0.0
        self.staged[layer] = m
        src = k_pre if (self.match in ("pre", "local") and k_pre is not None) else k
        self.staged_match[layer] = src
        bias = self.logc[layer][:, :, None, : cap + m]  # (B, H, 1, cap + m)
        return self.k[layer][:, :, : cap + m], self.v[layer][:, :, : cap + m], bias

    def commit(self, layer: int, count: int | None = None) -> None:
        cap = self._capacity
        c = self.staged[layer] if count is None else count
        k_new = self.k[layer][:, :, cap : cap + c]
        v_new = self.v[layer][:, :, cap : cap + c]
        m_new = F.normalize(self.staged_match[layer][:, :, :c].float(), dim=-1).to(self.spec.dtype)
        step = self.commits[layer]
        if step < self.sink_frames:
            merged = torch.zeros(k_new.shape[:3], dtype=torch.bool, device=k_new.device)
            self._append(layer, k_new, v_new, None, merged, step, sink=True)
        else:
            merged = self._merge(layer, k_new, v_new, m_new, step)
            self._append(layer, k_new, v_new, m_new, merged, step, sink=False)
        self.logc[layer][:, :, :cap] = self._logc(self.count[layer][:, :, :cap])
        self.staged[layer] = 0
        self.commits[layer] += 1
        # statistics stay on the device (no host sync in the hot loop); read them lazily
        rate = merged.float().mean()
        self.merged_tokens[layer] = self.merged_tokens[layer] + rate * c
        self.new_tokens[layer] += c
        self.last_merge_rate[layer] = rate
        if layer == self.spec.num_layers - 1:
            self.frames_seen += 1

    def _merge(self, layer, k_new, v_new, m_new, step) -> torch.Tensor:
        """Merge tokens whose best group passes the threshold; returns which merged (B, H, c)."""
        b, h, c, d = k_new.shape
        cap = self._capacity
        groups = self.mkey[layer][:, :, :cap]  # sinks and empty slots hold zero vectors
        if self.match == "local":
            sim, idx = self._local_top1(layer, m_new, groups)
            merged = sim >= self.threshold
        else:
            res = self.ann.topk(m_new.reshape(b * h, c, d), groups.reshape(b * h, cap, d), 1)
            sim = res.scores[..., 0].view(b, h, c)
            idx = res.indices[..., 0].view(b, h, c).clamp_min(0)
            merged = (sim >= self.threshold) & (res.indices[..., 0].view(b, h, c) >= 0)
        w = merged.to(torch.float32)  # (B, H, c)
        count = self.count[layer]
        old = count[:, :, :cap]
        add = torch.zeros_like(old).scatter_add_(2, idx, w)
        new_count = old + add  # (B, H, cap)
        touched = add > 0
        # Work on the c merging tokens, not on the whole budget. Every token that joins
        # group j moves j's mean value by (v_t - v_j) / n_j(new); summed over the tokens
        # joining j this gives (v_j * n_old + sum v_t) / n_new, the mean of all members.
        e = idx[..., None].expand(-1, -1, -1, d)
        v_grp = torch.gather(self.v[layer], 2, e).float()  # (B, H, c, D) current group means
        n_grp = torch.gather(new_count, 2, idx)[..., None]
        delta = (v_new.float() - v_grp) / n_grp.clamp_min(1) * w[..., None]
        self.v[layer][:, :, :cap].scatter_add_(2, e, delta.to(self.spec.dtype))
        if self.representative == "recent":
            # the newest merging token of each group represents it: the highest token index
            order = torch.where(merged, torch.arange(c, device=k_new.device).expand(b, h, c), torch.full_like(idx, -1))
            last = torch.full((b, h, cap), -1, device=k_new.device, dtype=torch.long).scatter_reduce_(2, idx, order, "amax")
            is_rep = merged & (torch.gather(last, 2, idx) == torch.arange(c, device=k_new.device))
            dst = torch.where(is_rep, idx, torch.full_like(idx, cap))  # slot `cap` is scratch
            de = dst[..., None].expand(-1, -1, -1, d)
            self.k[layer].scatter_(2, de, k_new.clone())
            self.mkey[layer].scatter_(2, de, m_new)
            self.pos[layer].scatter_(2, dst, self._token_pos(c, k_new.device).expand(b, h, c))
        else:
            k_grp = torch.gather(self.k[layer], 2, e).float()
            kd = (k_new.float() - k_grp) / n_grp.clamp_min(1) * w[..., None]
            kf = self.k[layer][:, :, :cap].float().scatter_add_(2, e, kd)
            self.k[layer][:, :, :cap] = kf.to(self.spec.dtype)
            if self.match == "post":
                self.mkey[layer][:, :, :cap] = torch.where(
                    touched[..., None], F.normalize(kf, dim=-1).to(self.spec.dtype), self.mkey[layer][:, :, :cap])
        count[:, :, :cap] = new_count
        self.stamp[layer][:, :, :cap].masked_fill_(touched, step)
        return merged

    def _token_pos(self, c: int, device) -> torch.Tensor:
        """Screen positions of the c tokens of one frame (row-major)."""
        return (torch.arange(c, device=device) % self.spec.tokens_per_frame)[None, None]

    def _local_top1(self, layer, m_new, groups):
        """Best group among those within `radius` patches of each new token (cosine)."""
        g, cap = self.grid, self._capacity
        c = m_new.shape[2]
        s = torch.einsum("bhcd,bhkd->bhck", m_new.float(), groups.float())  # (B, H, c, cap)
        tok = self._token_pos(c, m_new.device)[0, 0]
        pos = self.pos[layer][:, :, :cap]
        dr = (tok // g)[:, None] - (pos // g)[:, :, None, :]
        dc = (tok % g)[:, None] - (pos % g)[:, :, None, :]
        near = (dr.abs() <= self.radius) & (dc.abs() <= self.radius) & (pos >= 0)[:, :, None, :]
        s = s.masked_fill(~near, float("-inf"))
        return s.max(dim=-1)

    def _append(self, layer, k_new, v_new, m_new, merged, step, sink: bool) -> None:
        """Put unmerged tokens into free slots, else over the least recently updated groups."""
        b, h, c, d = k_new.shape
        cap = self._capacity
        count = self.count[layer][:, :, :cap]
        stamp = self.stamp[layer][:, :, :cap]
        is_sink = stamp == -2
        # eviction order: empty slots first (in slot order), then the oldest stamp; never sinks
        big = torch.iinfo(torch.long).max // 4
        slot = torch.arange(cap, device=k_new.device)
        prio = torch.where(count > 0, stamp * cap + slot + cap, slot - cap)  # empties sort first
        prio = torch.where(is_sink, torch.full_like(prio, big), prio)
        order = prio.argsort(dim=-1)[:, :, :c]  # (B, H, c) candidate slots
        rank = (~merged).long().cumsum(-1) - 1  # the i-th unmerged token takes order[i]
        dest = torch.gather(order, 2, rank.clamp_min(0))
        keep = ~merged
        # tokens that merged write nowhere: send them to their own destination unchanged
        dst = torch.where(keep, dest, torch.full_like(dest, cap))  # slot `cap` = scratch
        e = dst[..., None].expand(-1, -1, -1, d)
        # k_new/v_new view the staged region that the scratch slot belongs to: copy first
        self.k[layer].scatter_(2, e, k_new.clone())
        self.v[layer].scatter_(2, e, v_new.clone())
        mvals = torch.zeros_like(k_new) if sink else m_new
        self.mkey[layer].scatter_(2, e, mvals)
        self.count[layer].scatter_(2, dst, keep.to(torch.float32))
        tok = torch.full_like(dst, -1) if sink else self._token_pos(c, k_new.device).expand(b, h, c)
        self.pos[layer].scatter_(2, dst, torch.where(keep, tok, self.pos[layer][:, :, cap:cap + 1].expand(b, h, c)))
        self.stamp[layer].scatter_(2, dst, torch.full_like(dst, -2 if sink else step))
        self.count[layer][:, :, cap:] = 0.0
        self.mkey[layer][:, :, cap:] = 0.0

    # --- facts
    def recent_slots(self, layer: int, frames: int) -> torch.Tensor:
        """(B, H, cap) True for groups updated within the last `frames` commits, and sinks."""
        st = self.stamp[layer][:, :, : self._capacity]
        return (st >= self.commits[layer] - frames) | (st == -2)

    def merge_rate(self) -> float:
        """Fraction of committed tokens (after the sinks) that merged into a group."""
        new = sum(self.new_tokens) - self.sink_frames * self.spec.tokens_per_frame * self.spec.num_layers
        return float(sum(self.merged_tokens)) / max(1, new)

    def last_merge_rates(self) -> list[float]:
        return [float(r) for r in self.last_merge_rate]

    def num_tokens(self, layer: int = 0) -> int:
        """Occupied groups per head (the largest over heads): a host sync, for statistics."""
        return int((self.count[layer][:, :, : self._capacity] > 0).sum(-1).max())
