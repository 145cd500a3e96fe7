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

from runtime import merge_kernel
from runtime.ann import AnnBackend, build_ann, mass_recall
from runtime.cache import CacheSpec, KVCache, flat_rows, take_rows


FILLS = ("auto", "prefix", "budget")
MATCH_DTYPES = ("auto", "cache", "float32")


def static_fill(fill: str, device: torch.device) -> bool:
    """Whether attention spans the whole budget while it fills (`fill`, see TempCache)."""
    if fill not in FILLS:
        raise ValueError(f"tempcache fill={fill!r}; expected one of {list(FILLS)}")
    return fill == "budget" or (fill == "auto" and device.type == "cuda")


def match_key_dtype(match_dtype: str, device: torch.device, cache_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the stored match keys (`match_dtype`, see TempCache)."""
    if match_dtype not in MATCH_DTYPES:
        raise ValueError(f"tempcache match_dtype={match_dtype!r}; expected one of {list(MATCH_DTYPES)}")
    cache = match_dtype == "cache" or (match_dtype == "auto" and device.type == "cuda")
    return cache_dtype if cache else torch.float32


class TempCache(KVCache):
    policy = "tempcache"

    def __init__(self, spec: CacheSpec, budget_frames: int = 16, sink_frames: int = 1, threshold: float = 0.9,
                 match: str = "post", representative: str = "recent", ann: AnnBackend | None = None,
                 radius: int = 1, match_frames: int = 0, merge_target: float | None = None,
                 track_history: bool = False, merge_when: str = "always", fill: str = "auto",
                 match_dtype: str = "auto"):
        if budget_frames <= sink_frames:
            raise ValueError(f"tempcache budget_frames={budget_frames} must exceed sink_frames={sink_frames}")
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"tempcache threshold={threshold} must be a cosine similarity in [-1, 1]")
        if match not in ("pre", "post", "local"):
            raise ValueError(f"tempcache match={match!r}; expected 'pre', 'post' or 'local'")
        if radius < 0:
            raise ValueError(f"tempcache radius={radius} must be >= 0")
        self.radius = radius
        if match_frames < 0:
            raise ValueError(f"tempcache match_frames={match_frames} must be >= 0 (0: search every group)")
        self.match_frames = match_frames
        if merge_target is not None and not 0.0 <= merge_target <= 1.0:
            raise ValueError(f"tempcache merge_target={merge_target} must be a fraction in [0, 1] (or null)")
        self.merge_target = merge_target
        if merge_when not in ("always", "full"):
            raise ValueError(f"tempcache merge_when={merge_when!r}; expected 'always' or 'full'")
        # full: while a head has free slots for the whole frame, append without merging:
        # exact (= dense) until the budget is reached; merging, which is lossy, starts then
        self.merge_when = merge_when
        # how attention reads the budget while it fills (merge_when full):
        #   prefix  over the filled prefix without a bias: the dense computation exactly,
        #           at a key length that grows every frame
        #   budget  over the whole budget from the first frame, empty slots hidden by their
        #           -inf log-count: the same result up to rounding, at one static shape, so
        #           a GPU builds its attention plans once at start-up (not in the middle of
        #           play when the budget fills) and a CUDA graph captures from the third frame
        #   auto    budget on CUDA, prefix elsewhere (on a CPU the short prefix is cheaper)
        self.static_fill = static_fill(fill, spec.device)
        # the dtype of the stored match keys (similarities are computed in float32 either way):
        #   cache    the cache's dtype: bf16 keys take half the bytes of float32 ones, which
        #            doubled the bytes of every cached key (3 GB at the Wan shape)
        #   float32  no conversion when candidates are compared: on a CPU converting them
        #            cost more time than the memory saved is worth (17 MB for the shipped model)
        #   auto     cache on CUDA, float32 elsewhere
        self._mkey_dtype = match_key_dtype(match_dtype, spec.device, spec.dtype)
        # evaluation only: keep every committed key to measure what the cache still
        # represents (history_recall); memory grows with the rollout
        self.track_history = track_history
        # how mean values (and mean keys) take their new members: adding every member's
        # share with index_add_ (the CPU path: in order, deterministic), or sorting the
        # members by group and writing each group's new mean once (on CUDA, where
        # index_add_ with repeated groups is atomic and its rounding changes from run to
        # run, so the same seed would not give the same frames)
        self.sorted_means = spec.device.type == "cuda"
        self.grid = int(round(spec.tokens_per_frame ** 0.5))
        if representative not in ("recent", "mean"):
            raise ValueError(f"tempcache representative={representative!r}; expected 'recent' or 'mean'")
        self.sink_frames = sink_frames
        self.threshold = threshold
        self.match = match
        self.representative = representative
        # match keys are unit vectors, so their inner product is the cosine
        self.ann = ann or build_ann("exact", metric="ip")
        super().__init__(spec, budget_frames * spec.tokens_per_frame)

    def reset(self) -> None:
        super().reset()
        s, cap = self.spec, self._capacity
        full = cap + 2 * s.tokens_per_frame
        lbh = (s.num_layers, s.batch, s.heads)
        dev = s.device
        self._count = torch.zeros(lbh + (full,), device=dev, dtype=torch.float32)
        self._logc = self._logc_of(self._count)
        # unit match keys, one per group plus the scratch slot (dtype: match_dtype)
        self._mkey = torch.zeros(lbh + (cap + 1, s.head_dim), device=dev, dtype=self._mkey_dtype)
        # commit that last updated each group (-1 empty, -2 sink); the extra slot is scratch
        self._stamp = torch.full(lbh + (cap + 1,), -1, device=dev, dtype=torch.long)
        # screen position (row * grid + col) of each group's representative; -1: none
        self._pos = torch.full(lbh + (cap + 1,), -1, device=dev, dtype=torch.long)
        # staged pre-RoPE keys of the committing tokens (match pre / local)
        self._pre = torch.zeros(lbh + (2 * s.tokens_per_frame, s.head_dim), device=dev, dtype=s.dtype)
        self.count, self.logc = list(self._count.unbind(0)), list(self._logc.unbind(0))
        self.mkey, self.stamp, self.pos = list(self._mkey.unbind(0)), list(self._stamp.unbind(0)), list(self._pos.unbind(0))
        self._pending: dict[int, int] = {}  # layer -> tokens committed but not merged yet
        # merge_when full: while nothing can have merged or been evicted, the filled slots
        # are a prefix [0, n) holding every committed token once (count 1). Attention then
        # runs over that prefix without a bias: the dense computation exactly (None: no longer)
        prefix = self.merge_when == "full" and not self.static_fill
        self._exact_prefix: list[int | None] = [0 if prefix else None] * s.num_layers
        # history tracking (track_history): how often each slot was (re)assigned, and per
        # layer every committed key with the slot and assignment it went to
        self._gen = torch.zeros(lbh + (cap + 1,), device=dev, dtype=torch.long)
        # local matching: the group each screen position's token went to in each of the last
        # match_frames commits (-1: none; the extra column is the "no neighbour" sentinel)
        self._trail = torch.full(lbh + (max(1, self.match_frames), s.tokens_per_frame + 1), -1, device=dev, dtype=torch.long)
        self._history: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in range(s.num_layers)]
        self.recall_sums: dict[int, list] = {}
        self._merged_acc = torch.zeros(s.num_layers, device=dev)  # merged tokens per layer (for the merge rate)
        if merge_kernel.available(self._count):  # compile the kernels now: not at the first merge in play
            merge_kernel.warm_up(s.dtype, dev, full, cap, s.tokens_per_frame, s.head_dim, self._mkey_dtype)
        self.new_tokens = [0] * s.num_layers
        self.last_merge_rate = [0.0] * s.num_layers

    def pretend_full(self) -> None:
        """The static path from the next stage on: attention over the whole budget with the
        log-count bias (see KVCache.pretend_full)."""
        self._exact_prefix = [None] * self.spec.num_layers

    def _allocate_kv(self, shape):
        """Every buffer holds all layers in one tensor (layer first); the per-layer lists are
        views of it. Attention stages and reads layer by layer, while the merge of a clean
        frame runs once for all layers when the last layer commits: one set of kernels per
        frame instead of one per layer (the per-kernel overhead dominated on CPU)."""
        s = self.spec
        self._k = torch.zeros((s.num_layers,) + tuple(shape), device=s.device, dtype=s.dtype)
        self._v = torch.zeros_like(self._k)
        return list(self._k.unbind(0)), list(self._v.unbind(0))

    @staticmethod
    def _logc_of(count: torch.Tensor) -> torch.Tensor:
        return torch.where(count > 0, count.clamp_min(1e-30).log(), torch.full_like(count, float("-inf")))

    # --- verbs
    def stage(self, layer: int, k, v, k_pre=None):
        if layer in self._pending:
            raise RuntimeError(f"tempcache layer {layer} staged again before every layer committed its frame")
        cap, m = self._capacity, k.shape[2]
        self.k[layer][:, :, cap : cap + m] = k
        self.v[layer][:, :, cap : cap + m] = v
        self.logc[layer][:, :, cap : cap + m] = 0.0
        self.staged[layer] = m
        if self.match in ("pre", "local") and k_pre is not None:
            self._pre[layer][:, :, :m] = k_pre
        n = self._exact_prefix[layer]
        if n is not None and n + m <= cap:
            # nothing merged yet: the chunk also goes right after the prefix (free slots;
            # commit still reads it at `cap`), and attention is dense over [prefix | chunk]
            self.k[layer][:, :, n : n + m] = k
            self.v[layer][:, :, n : n + m] = v
            self.static_shape = False
            return self.k[layer][:, :, : n + m], self.v[layer][:, :, : n + m], None
        self.static_shape = True  # the whole budget every frame
        bias = self.logc[layer][:, :, None, : cap + m]  # (B, H, 1, cap + m)
        return self.k[layer][:, :, : cap + m], self.v[layer][:, :, : cap + m], bias

    def commit(self, layer: int, count: int | None = None) -> None:
        """Keep the first `count` staged tokens. The merge runs when the last layer commits
        (for all pending layers at once); until then the layer's groups are unchanged."""
        self._pending[layer] = self.staged[layer] if count is None else count
        if layer == self.spec.num_layers - 1:
            self.flush()

    def flush(self) -> None:
        """Merge the pending clean tokens of every layer that committed."""
        if not self._pending:
            return
        layers = sorted(self._pending)
        c, step = self._pending[layers[0]], self.commits[layers[0]]
        together = (layers == list(range(layers[0], layers[-1] + 1))
                    and all(self._pending[l] == c and self.commits[l] == step for l in layers))
        groups = [(layers[0], layers[-1] + 1, c, step)] if together else [
            (l, l + 1, self._pending[l], self.commits[l]) for l in layers]
        for lo, hi, cc, st in groups:
            self._commit_layers(lo, hi, cc, st)
        self._pending.clear()

    def _commit_layers(self, lo: int, hi: int, c: int, step: int) -> None:
        cap, s = self._capacity, self.spec
        nl = hi - lo
        lb, h, d = nl * s.batch, s.heads, s.head_dim
        full = self._k.shape[3]
        st = {  # views of layers [lo, hi) with layers and batch folded: (L*B, H, ...)
            "k": self._k[lo:hi].view(lb, h, full, d), "v": self._v[lo:hi].view(lb, h, full, d),
            "count": self._count[lo:hi].view(lb, h, full), "logc": self._logc[lo:hi].view(lb, h, full),
            "mkey": self._mkey[lo:hi].view(lb, h, cap + 1, d), "stamp": self._stamp[lo:hi].view(lb, h, cap + 1),
            "pos": self._pos[lo:hi].view(lb, h, cap + 1),
            "trail": self._trail[lo:hi].view(lb, h, *self._trail.shape[3:])}
        # copies: the scratch slot `cap` (where writes of merged tokens go) is the first
        # staged slot, so views of the staged tokens would change under the writes below
        k_new = st["k"][:, :, cap : cap + c].clone()
        v_new = st["v"][:, :, cap : cap + c].clone()
        src = self._pre[lo:hi].view(lb, h, -1, d) if self.match in ("pre", "local") else st["k"][:, :, cap:]
        if merge_kernel.available(src):  # one pass instead of a strided copy to float32, a norm and a division
            m_new = merge_kernel.unit_rows(src, c)
        else:
            m_new = F.normalize(src[:, :, :c].float(), dim=-1)
        k_kept = k_new if self.track_history else None
        # the commit number as a device scalar: what the stamps record, so a captured CUDA
        # graph that replays this commit keeps counting (runtime/graphs.py)
        step_t = self._steps_t[lo]
        if step < self.sink_frames:
            merged = torch.zeros(k_new.shape[:3], dtype=torch.bool, device=k_new.device)
            idx = torch.zeros_like(merged, dtype=torch.long)
            dst = self._append(st, k_new, v_new, None, merged, step, sink=True, now=step_t)
        else:
            merged, idx = self._merge(st, k_new, v_new, m_new, step_t)
            dst = self._append(st, k_new, v_new, m_new, merged, step_t, sink=False, now=step_t)
        # the slot each token went to: the group it joined, else where it was appended. These
        # are the slots whose count changed (merged tokens' `dst` is the scratch slot, whose
        # log-count `stage` sets again)
        went = torch.where(merged, idx, dst)
        if self.track_history:
            self._record_history(lo, hi, k_kept, went, merged)
        if self._uses_trail(c):
            slots = went if step >= self.sink_frames else torch.full_like(dst, -1)
            at = (self._steps_t[lo] % self._trail.shape[3]).view(1)  # this commit's row of the trail
            st["trail"][..., :c].index_copy_(2, at, slots[:, :, None, :])
        st["logc"].scatter_(2, went, self._logc_of(torch.gather(st["count"], 2, went)))
        # statistics stay on the device (no host sync in the hot loop); read them lazily
        rates = merged.view(nl, -1).float().mean(-1)
        self._merged_acc[lo:hi].add_(rates * c)  # in place: also right when a CUDA graph replays it
        self._steps_t[lo:hi].add_(1)
        for i, layer in enumerate(range(lo, hi)):
            n = self._exact_prefix[layer]
            # a frame that fits the free slots appends in slot order without merging
            self._exact_prefix[layer] = n + c if n is not None and n + c <= cap else None
            self.new_tokens[layer] += c
            self.last_merge_rate[layer] = rates[i]
            self.staged[layer] = 0
            self.commits[layer] += 1
            if layer == s.num_layers - 1:
                self.frames_seen += 1

    def _merge(self, st, k_new, v_new, m_new, step) -> torch.Tensor:
        """Merge tokens whose best group passes the threshold; returns which merged (LB, H, c)."""
        b, h, c, d = k_new.shape
        cap = self._capacity
        groups = st["mkey"][:, :, :cap]  # sinks and empty slots hold zero vectors
        pos = st["pos"][:, :, :cap]
        cand = None
        if self._uses_trail(c):
            sim, idx = self._local_trail_top1(st, m_new, step)
            pick = torch.where(torch.isfinite(sim), 0, -1)
        else:
            if self.match_frames and self.match_frames * c < cap:
                # search only the groups updated by the last `match_frames` commits (at most
                # match_frames * c of them): where a token's content was a moment ago
                r = self.match_frames * c
                cand = st["stamp"][:, :, :cap].topk(r, dim=-1).indices  # (LB, H, r) newest stamps first
                fresh = torch.gather(st["stamp"], 2, cand) >= step - self.match_frames
                groups = take_rows(st["mkey"], cand).float() * fresh[..., None]
                pos = torch.where(fresh, torch.gather(pos, 2, cand), -1)
            if self.match == "local":
                sim, pick = self._local_top1(pos, m_new, groups)
            else:
                res = self.ann.topk(m_new.reshape(b * h, c, d), groups.float().reshape(b * h, groups.shape[2], d), 1)
                sim = res.scores[..., 0].view(b, h, c)
                pick = res.indices[..., 0].view(b, h, c)
            idx = pick.clamp_min(0) if cand is None else torch.gather(cand, 2, pick.clamp_min(0))
        merged = (sim >= self.threshold) & (pick >= 0)
        # only real groups take members (sinks and empty slots hold zero match keys)
        sim = torch.where(torch.gather(st["stamp"], 2, idx) >= 0, sim, float("-inf"))
        merged = merged & torch.isfinite(sim)
        if self.merge_target is not None:
            # fixed merge rate (benchmarks with random weights): the best-matching
            # round(target * c) tokens of each head merge, whatever their similarity
            n = round(self.merge_target * c)
            rank = torch.zeros_like(sim).scatter_(2, sim.topk(n, dim=-1).indices, 1.0) if n else torch.zeros_like(sim)
            merged = (rank > 0) & torch.isfinite(sim)
        if self.merge_when == "full":  # applies to either rule: no merging while there is room
            room = (st["count"][:, :, :cap] == 0).sum(-1, keepdim=True) >= c  # (LB, H, 1)
            merged = merged & ~room
        w = merged.to(torch.float32)  # (LB, H, c)
        # Work on the c merging tokens, not on the whole budget. Counts are whole numbers in
        # float32: adding the members in any order gives the same count.
        count = st["count"]
        n_was = torch.gather(count, 2, idx)  # each token's group count before this frame
        count.scatter_add_(2, idx, w)
        # Every token that joins group j moves j's mean value by (v_t - v_j) / n_j(new);
        # summed over the tokens joining j this gives (v_j * n_old + sum v_t) / n_new, the
        # mean of all members.
        n_grp = torch.gather(count, 2, idx)[..., None]
        mean_keys = self.representative == "mean"
        if self.sorted_means:  # one writer per group: no atomic adds (see _sorted_means)
            # values and (for mean representatives) keys share one sort of the members
            stores, xs = (["v", "k"], [v_new, k_new]) if mean_keys else (["v"], [v_new])
            if merge_kernel.available(v_new):  # one Triton kernel per store (runtime/merge_kernel.py)
                order, group, start = merge_kernel.group_runs(idx, merged, cap)
                for name, x in zip(stores, xs):
                    merge_kernel.group_means_(st[name], x, order, group, start, n_was, n_grp[..., 0], cap)
            else:
                dst, rows = _sorted_means([st[n] for n in stores], idx, merged, xs, n_was, n_grp[..., 0], cap)
                for name, r in zip(stores, rows):
                    _put(st[name], dst, r.to(self.spec.dtype))
        else:
            v_grp = take_rows(st["v"], idx).float()  # (LB, H, c, D) current group means
            delta = (v_new.float() - v_grp) / n_grp.clamp_min(1) * w[..., None]
            _put(st["v"], idx, delta.to(self.spec.dtype), add=True)
        if self.representative == "recent":
            # the newest merging token of each group represents it: the highest token index
            order = torch.where(merged, torch.arange(c, device=k_new.device).expand(b, h, c), torch.full_like(idx, -1))
            last = torch.full((b, h, cap), -1, device=k_new.device, dtype=torch.long).scatter_reduce_(2, idx, order, "amax")
            is_rep = merged & (torch.gather(last, 2, idx) == torch.arange(c, device=k_new.device))
            dst = torch.where(is_rep, idx, torch.full_like(idx, cap))  # slot `cap` is scratch
            _put(st["k"], dst, k_new, skip=cap)
            _put(st["mkey"], dst, m_new, skip=cap)
            st["pos"].scatter_(2, dst, self._token_pos(c, k_new.device).expand(b, h, c))
        else:  # the mean key, updated like the mean value: work on the merging tokens only
            if not self.sorted_means:  # (sorted: written with the values above)
                k_grp = take_rows(st["k"], idx).float()
                kd = (k_new.float() - k_grp) / n_grp.clamp_min(1) * w[..., None]
                _put(st["k"], idx, kd.to(self.spec.dtype), add=True)
            if self.match == "post":  # match keys follow the mean (rewriting an unchanged group is a no-op)
                _put(st["mkey"], idx, F.normalize(take_rows(st["k"], idx).float(), dim=-1).to(st["mkey"].dtype))
        # the groups that took members are fresh; tokens that merged nowhere stamp the scratch slot
        st["stamp"].scatter_(2, torch.where(merged, idx, torch.full_like(idx, cap)), step.expand(idx.shape))
        return merged, idx

    def _uses_trail(self, c: int) -> bool:
        """Local matching over recent commits looks up its candidates by screen position."""
        return self.match == "local" and self.match_frames > 0 and c == self.spec.tokens_per_frame

    def _local_trail_top1(self, st, m_new, step):
        """Local matching through the trail: the candidates are the groups that the last
        `match_frames` commits' tokens went to (at most match_frames x c), and a token may
        only take one that a token within `radius` patches of its position went to. One
        product of the tokens with those candidates per head, masked by a static table.
        Returns the best cosine (-inf: none) and its group, (LB, H, c) each."""
        lb, h, c, d = m_new.shape
        if self.radius == 0 and merge_kernel.available(m_new):  # the lookup below in one kernel
            return merge_kernel.same_position_top1(m_new, st["mkey"], st["trail"], st["stamp"], step,
                                                   self.match_frames)
        if self.radius == 0:  # the same screen position only: a direct lookup, no table
            slot = st["trail"][:, :, :, :c].transpose(2, 3)  # (LB, H, c, T)
            ok = slot >= 0
            slot = slot.clamp_min(0)
            flat = slot.reshape(lb, h, -1)
            ok &= (torch.gather(st["stamp"], 2, flat) >= step - self.match_frames).view(slot.shape)
            keys = take_rows(st["mkey"], flat).view(lb, h, c, -1, d).float()
            sim = torch.linalg.vecdot(keys, m_new[..., None, :]).masked_fill_(~ok, float("-inf"))  # (LB, H, c, T)
            best, which = sim.max(dim=-1)
            return best, torch.gather(slot, 3, which[..., None]).squeeze(-1)
        slots = st["trail"][:, :, :, :c].reshape(lb, h, -1)  # (LB, H, T*c): commit t, position p
        ok = slots >= 0
        slot = slots.clamp_min(0)
        ok &= torch.gather(st["stamp"], 2, slot) >= step - self.match_frames
        keys = take_rows(st["mkey"], slot).float()  # (LB, H, T*c, D)
        sim = m_new @ keys.transpose(-1, -2)  # (LB, H, c, T*c)
        near = self._trail_near(slots.shape[-1] // c, m_new.device)  # (c, T*c)
        sim.masked_fill_(~near | ~ok[:, :, None, :], float("-inf"))
        best, which = sim.max(dim=-1)
        return best, torch.gather(slot, 2, which)

    def _trail_near(self, frames: int, device) -> torch.Tensor:
        """(N, frames * N) bool: may the token at position i take the trail entry (t, p)."""
        table = getattr(self, "_tnear", None)
        if table is None or table.device != device or table.shape[1] != frames * self.spec.tokens_per_frame:
            table = self._tnear = self._near_table(device)[:, :-1].repeat(1, frames)
        return table

    def _near_table(self, device) -> torch.Tensor:
        """(N, N + 1) bool: screen positions within `radius` patches of each other; the
        last column (no position) is never near. Built once."""
        table = getattr(self, "_near", None)
        if table is None or table.device != device:
            n, g = self.spec.tokens_per_frame, self.grid
            p = torch.arange(n, device=device)
            dr = (p // g)[:, None] - (p // g)[None, :]
            dc = (p % g)[:, None] - (p % g)[None, :]
            near = (dr.abs() <= self.radius) & (dc.abs() <= self.radius)
            table = self._near = torch.cat([near, torch.zeros(n, 1, dtype=torch.bool, device=device)], 1)
        return table

    def _token_pos(self, c: int, device) -> torch.Tensor:
        """Screen positions of the c tokens of one frame (row-major)."""
        return (torch.arange(c, device=device) % self.spec.tokens_per_frame)[None, None]

    def _local_top1(self, pos, m_new, groups):
        """Best of the groups (LB, H, K, D) at screen positions pos (LB, H, K; -1: none)
        within `radius` patches of each new token (cosine)."""
        c = m_new.shape[2]
        s = torch.einsum("bhcd,bhkd->bhck", m_new.float(), groups.float())  # (LB, H, c, K)
        table = self._near_table(m_new.device)
        tok = self._token_pos(c, m_new.device)[0, 0]
        near = table[tok[None, None, :, None], torch.where(pos >= 0, pos, table.shape[1] - 1)[:, :, None, :]]
        s.masked_fill_(~near, float("-inf"))
        return s.max(dim=-1)

    def _append(self, st, k_new, v_new, m_new, merged, step, sink: bool, now: torch.Tensor) -> torch.Tensor:
        """Put unmerged tokens into free slots, else over the least recently updated groups.
        Returns each token's destination slot (the scratch slot for merged tokens). now:
        this commit's number, a device scalar."""
        b, h, c, d = k_new.shape
        cap = self._capacity
        # eviction order: empty slots first (in slot order), then the oldest stamp; never sinks
        if merge_kernel.available(k_new):
            prio = merge_kernel.eviction_priority(st["count"], st["stamp"], now, cap)
        else:
            prio = eviction_priority_reference(st["count"], st["stamp"], now, cap)
        order = prio.topk(c, dim=-1, largest=False).indices  # (LB, H, c) candidate slots, best first
        rank = (~merged).long().cumsum(-1) - 1  # the i-th unmerged token takes order[i]
        dest = torch.gather(order, 2, rank.clamp_min(0))
        keep = ~merged
        # tokens that merged write nowhere: send them to their own destination unchanged
        dst = torch.where(keep, dest, torch.full_like(dest, cap))  # slot `cap` = scratch
        _put(st["k"], dst, k_new, skip=cap)
        _put(st["v"], dst, v_new, skip=cap)
        mvals = torch.zeros_like(k_new, dtype=st["mkey"].dtype) if sink else m_new
        _put(st["mkey"], dst, mvals, skip=cap)
        st["count"].scatter_(2, dst, keep.to(torch.float32))
        tok = torch.full_like(dst, -1) if sink else self._token_pos(c, k_new.device).expand(b, h, c)
        st["pos"].scatter_(2, dst, torch.where(keep, tok, st["pos"][:, :, cap:cap + 1].expand(b, h, c)))
        st["stamp"].scatter_(2, dst, torch.full_like(dst, -2) if sink else step.expand(dst.shape))
        return dst

    # --- history (evaluation only)
    def _record_history(self, lo: int, hi: int, keys, slots, merged) -> None:
        """Appended tokens start a new assignment of their slot; every token remembers the
        slot and assignment that now represents it."""
        s = self.spec
        gen = self._gen[lo:hi].view(-1, s.heads, self._capacity + 1)
        appended = torch.where(merged, torch.full_like(slots, self._capacity), slots)  # merged -> scratch
        gen.scatter_add_(2, appended, (~merged).long())
        token_gen = torch.gather(gen, 2, slots)
        shape = (hi - lo, s.batch, s.heads, -1)
        for i, layer in enumerate(range(lo, hi)):
            self._history[layer].append((keys.view(*shape, s.head_dim)[i], slots.view(shape)[i], token_gen.view(shape)[i]))

    def history_recall(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Fraction of the dense attention mass of queries q (B, H, M, D) over every key
        ever committed to this layer that falls on keys the cache still represents (kept,
        merged into a group that is still there, or a sink). 1.0 before any commit."""
        hist = self._history[layer]
        if not hist:
            return torch.ones((), device=q.device)
        keys = torch.cat([h[0] for h in hist], 2).float()
        slots = torch.cat([h[1] for h in hist], 2)
        gens = torch.cat([h[2] for h in hist], 2)
        alive = torch.gather(self._gen[layer], 2, slots) == gens  # (B, H, T)
        recall = mass_recall(q, keys, None, alive[:, :, None, :])
        sums = self.recall_sums.setdefault(layer, [0.0, 0])
        sums[0] = sums[0] + recall
        sums[1] += 1
        return recall

    def recall_summary(self) -> float | None:
        """Mean history recall over layers and calls (a host sync); None if never measured."""
        per = [float(v[0]) / v[1] for v in self.recall_sums.values() if v[1]]
        return sum(per) / len(per) if per else None


    # --- facts
    def recent_slots(self, layer: int, frames: int) -> torch.Tensor:
        """(B, H, cap) True for groups updated within the last `frames` commits, and sinks;
        never for empty slots (stamp -1, which the first commits would otherwise count as
        recent: with `fill: budget` attention spans them while the budget fills)."""
        st = self.stamp[layer][:, :, : self._capacity]
        return ((st >= 0) & (st >= self._steps_t[layer] - frames)) | (st == -2)

    def graph_ready(self) -> bool:
        """Every commit from now on has the same shapes and Python-side control flow (the
        budget is in use, the sinks are written, no history kept): a CUDA graph may
        capture it."""
        return (not self.track_history and all(n is None for n in self._exact_prefix)
                and min(self.commits) >= self.sink_frames)

    def merge_rate(self) -> float:
        """Fraction of committed tokens (after the sinks) that merged into a group."""
        new = sum(self.new_tokens) - self.sink_frames * self.spec.tokens_per_frame * self.spec.num_layers
        return float(self._merged_acc.sum()) / max(1, new)

    def last_merge_rates(self) -> list[float]:
        return [float(r) for r in self.last_merge_rate]

    def num_tokens(self, layer: int = 0) -> int:
        """Occupied groups per head (the largest over heads): a host sync, for statistics."""
        return int((self.count[layer][:, :, : self._capacity] > 0).sum(-1).max())


def _sorted_means(stores, idx, merged, xs, n_was, n_now, cap: int):
    """New means of the groups that take members this frame, one write per group.

    stores: (B, H, S, D) tensors of current means (values, and keys with mean
    representatives), xs: the joining tokens for each, (B, H, c, D); idx (B, H, c) each
    token's group, merged (B, H, c) whether it joins it; n_was / n_now (B, H, c) its
    group's count before / after this frame. The tokens are sorted by group once (a stable
    sort), the members' sum of each group is a difference of running sums, and the last
    member of each group writes (mean * n_was + sum) / n_now. Returns (slots, rows per
    store) for `_put`; non-writers go to the scratch slot `cap`. Deterministic: no atomic
    adds."""
    b, h, c = idx.shape
    order, group, start = merge_kernel.group_runs(idx, merged, cap)
    last = torch.ones_like(group, dtype=torch.bool)
    last[..., :-1] = group[..., 1:] != group[..., :-1]
    was = torch.gather(n_was, 2, order)[..., None]
    now = torch.gather(n_now, 2, order)[..., None].clamp_min(1)
    before = (start - 1).clamp_min(0)
    rows = []
    for store, x in zip(stores, xs):
        d = x.shape[-1]
        # running sums over the sorted tokens, laid out (B, H, D, c) so that the scan runs
        # along contiguous memory (a scan over a strided dimension is several times slower)
        run = torch.gather(x, 2, order[..., None].expand(b, h, c, d)).transpose(2, 3)
        run = run.to(torch.float32, memory_format=torch.contiguous_format).cumsum(-1)
        # the sum of the members before this group's first: run[start - 1], or 0 at the start
        prior = torch.gather(run, 3, before[:, :, None, :].expand(b, h, d, c)) * (start > 0)[:, :, None, :]
        rows.append((take_rows(store, group).float() * was + (run - prior).transpose(2, 3)) / now)
    return torch.where(last & (group < cap), group, torch.full_like(group, cap)), rows


def eviction_priority_reference(count: torch.Tensor, stamp: torch.Tensor, now: torch.Tensor, cap: int) -> torch.Tensor:
    """PyTorch form of `merge_kernel.eviction_priority` (the same int32 priorities): empty
    slots first in slot order, then the oldest stamp (ages capped), ties in slot order;
    sinks last."""
    count, stamp = count[:, :, :cap], stamp[:, :, :cap]
    top = merge_kernel.age_cap(cap)
    slot = torch.arange(cap, device=count.device)
    age = (now - stamp).clamp_max(top)
    prio = torch.where(count > 0, (top - age) * cap + slot + cap, slot - cap)
    prio = torch.where(stamp == -2, torch.full_like(prio, 2**31 - 1), prio)
    return prio.to(torch.int32)


def _put(store: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, add: bool = False, skip: int = -1) -> None:
    """store[b, h, slots[b, h, i]] = rows[b, h, i] (or +=; cast to store's dtype), in place.
    store (B, H, S, D) is contiguous; slots (B, H, c). Rows are copied by index along one
    flat dimension: on CPU scatter_ with an index expanded over D copied the whole store on
    every call. skip: a slot (the scratch slot) that need not be written: the Triton kernel
    (CUDA) leaves it alone; index_copy_ writes it."""
    if not add and merge_kernel.available(store):
        merge_kernel.put_rows_(store, slots, rows.contiguous(), skip)
        return
    b, h, s, d = store.shape
    flat = flat_rows(store, slots)
    view = store.view(b * h * s, d)
    rows = rows.to(store.dtype)  # the kernel casts as it writes: a float32 copy of the rows is not made on CUDA
    if add:
        view.index_add_(0, flat, rows.reshape(-1, d))
    else:
        view.index_copy_(0, flat, rows.reshape(-1, d))


class HistoryProbe:
    """Wraps a self-attention callable: measures the cache's history recall of each
    layer's queries before attending (evaluation only; see TempCache.history_recall)."""

    def __init__(self, inner, cache: TempCache):
        self.inner, self.cache = inner, cache

    def __call__(self, layer: int, q, k, v, k_pre=None):
        self.cache.history_recall(layer, q)
        return self.inner(layer, q, k, v, k_pre)
