"""One frame of a rollout as a CUDA graph: captured once, replayed for every later frame.

On a GPU a small model's frame is a few hundred short kernels, and the host's Python
and launch cost per kernel is most of the frame's time (BENCHMARKS.md, profile). Once
the KV cache has stopped changing shape (`KVCache.graph_ready()`: a full window, a
TempCache budget in use) every frame runs the same kernels on the same buffers, so the
whole frame (sampler steps, the merged clean pass, the cache's merge and eviction, the
conversion to uint8) is captured into one CUDA graph and replayed.

What a frame reads and the next frame needs lives in static buffers that the graph
updates in place: the pending clean frame (written into the cache by the next frame's
first pass), the stack of previous frames, their actions and frame indices. What changes from
frame to frame outside the graph is copied in before each replay: the action and the
noise, drawn from the rollout's generator exactly as the eager path draws it, so a seed
replays the same frames either way (checked on a GPU by `python -m runtime.graphs`).

Counters the caches and the statistics keep on the host (commits, frames seen, density
sums) are not part of the graph: the changes one frame made to them during the capture
are recorded and applied again after every replay. Counters on the device (commit
stamps, ring positions, merge totals) are updated by the graph itself.
"""
from __future__ import annotations

import copy

import torch

from runtime.engine import to_uint8, to_unit
from runtime.model import push_frame

HOST_COUNTERS = ("commits", "new_tokens", "frames_seen")
# everything a frame may change on the host side of a cache (put back if a capture fails)
SAVED_STATE = HOST_COUNTERS + ("staged", "length", "last_merge_rate", "_pending", "_exact_prefix")


class FrameGraph:
    WARMUP_FRAMES = 2  # eager frames with static shapes before the capture (plans, compiled kernels)

    def __init__(self, rollout, capture: bool = True):
        """capture=False runs the same frame on the same buffers eagerly, without a graph
        (any device): what the tests compare with the plain eager rollout."""
        ro = self.ro = rollout
        clean, prev_of_clean, act, index = ro.pending
        dev = ro.device
        # the state one frame reads and leaves for the next, updated in place by the graph
        self.pend_clean, self.pend_prev, self.pend_act = clean.clone(), prev_of_clean.clone(), act.clone()
        self.prev_eager = ro.prev
        self.prev = ro.prev.clone()
        self.idx = torch.tensor([index, ro.frame_index + 1], device=dev)
        # per-frame inputs, written before every replay
        self.act = torch.zeros_like(act)
        self.noise = torch.zeros(ro.noise_shape, device=dev, dtype=torch.float32)
        # constant inputs, built outside the capture (a host-to-device copy cannot be captured)
        times = ro.sampler.times
        self.t_merged = torch.tensor([0.0, times[0]], device=dev, dtype=torch.float32)
        self.t_single = [torch.tensor([t], device=dev, dtype=torch.float32) for t in times]
        ro.pending, ro.prev = (self.pend_clean, self.pend_prev, self.pend_act, index), self.prev

        self.graph = None
        if not capture:
            return
        cache, stats = ro.cache, self._stats()
        counters = self._counters()
        saved = {k: copy.copy(getattr(cache, k)) for k in SAVED_STATE if hasattr(cache, k)}
        sums = [copy.deepcopy(s.sums) for s in stats]
        for s in stats:
            s.log = []
        torch.cuda.synchronize(dev)
        graph = torch.cuda.CUDAGraph()
        try:
            # a call that waits for the device cannot be captured: make it an error that
            # names the call instead of a capture that fails at its end
            torch.cuda.set_sync_debug_mode("error")
            with torch.cuda.graph(graph):
                self.x0, self.frame_u8 = self._frame()
        except Exception:
            # nothing ran on the device: putting the host-side state back undoes the frame
            for k, v in saved.items():
                setattr(cache, k, v)
            for s, before in zip(stats, sums):
                s.log, s.sums = None, before
            ro.pending, ro.prev = (clean, prev_of_clean, act, index), self.prev_eager
            raise
        finally:
            torch.cuda.set_sync_debug_mode("default")
        self.graph = graph
        # the capture ran the frame's Python once without computing it: keep what it did to
        # the host counters as the per-frame change, and put the counters back
        after = self._counters()
        self.delta = {k: _diff(after[k], counters[k]) for k in counters}
        for k, v in counters.items():
            setattr(cache, k, v)
        self.logs = []
        for s, before in zip(stats, sums):
            self.logs.append(s.log)
            s.log = None
            s.sums = before

    def _stats(self) -> list:
        att = self.ro.attention
        return [] if att is None else [att.sa_stats, att.ca_stats]

    def _counters(self) -> dict:
        cache = self.ro.cache
        return {k: copy.copy(getattr(cache, k)) for k in HOST_COUNTERS if hasattr(cache, k)}

    def _frame(self):
        """The eager frame (`Rollout.step` with a pending clean frame) on the static buffers."""
        ro = self.ro
        a = self.act[:, None]

        def denoise(x, t, i):
            if i == 0:  # the merged pass: the pending clean frame rides along and is committed
                return ro.merged_pass(self.pend_clean, self.pend_prev, self.pend_act, x, a, self.t_merged, self.idx, i)
            return ro._forward(x, self.prev, self.t_single[i], a, self.idx[1:], 0, i)

        x0 = ro.sampler.sample(denoise, self.noise.to(ro.dtype))
        frame_u8 = to_uint8(x0[:, 0])
        clean = to_unit(frame_u8)[:, None].to(ro.dtype)
        self.pend_clean.copy_(clean)
        self.pend_prev.copy_(self.prev)
        self.pend_act.copy_(self.act)
        self.prev.copy_(push_frame(self.prev, clean))
        self.idx.add_(1)
        return x0, frame_u8

    @torch.no_grad()
    def step(self, actions: torch.Tensor) -> torch.Tensor:
        ro = self.ro
        self.act.copy_(actions)
        self.noise.copy_(ro.draw_noise())
        ro.frame_index += 1
        if self.graph is None:  # not captured: the frame's Python runs, and counts, as it goes
            self.x0, self.frame_u8 = self._frame()
        else:
            self.graph.replay()
            cache = ro.cache
            for k, d in self.delta.items():
                setattr(cache, k, _add(getattr(cache, k), d))
            for s, log in zip(self._stats(), self.logs):
                for call in log:
                    s.add(*call)
        ro.pending = (self.pend_clean, self.pend_prev, self.pend_act, ro.frame_index)
        ro.check_finite(self.x0)
        return self.frame_u8.clone()

    def release(self) -> None:
        """Hand the state back to the eager rollout as tensors of its own."""
        ro = self.ro
        if ro.pending is not None and ro.pending[0] is self.pend_clean:
            ro.pending = (self.pend_clean.clone(), self.pend_prev.clone(), self.pend_act.clone(), ro.pending[3])
        if ro.prev is self.prev:
            ro.prev = self.prev.clone()
        self.graph = None


def _diff(after, before):
    if isinstance(after, list):
        return [a - b for a, b in zip(after, before)]
    return after - before


def _add(value, delta):
    if isinstance(value, list):
        return [v + d for v, d in zip(value, delta)]
    return value + delta


def main() -> None:
    """`python -m runtime.graphs [--frames 150] [--attentions fastar,window] [--out FILE.json] [OVERRIDES...]`
    (CUDA): the shipped model's frames with and without CUDA graphs, same seed and actions,
    must be identical; prints both speeds."""
    import argparse
    import json
    import time

    import numpy as np
    from runtime.bench import build_source, world_start
    from runtime.configs import compose_config
    from runtime.evaluate import attention_cfg
    from runtime.factory import build_rollout

    ap = argparse.ArgumentParser(description="CUDA graph frames against eager frames")
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--attentions", default="fastar,window")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of conf/bench.yaml, e.g. engine.compile=true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("runtime.graphs needs CUDA")
    cfg = compose_config("bench", args.overrides)
    world, model, device, _ = build_source(cfg)
    rng = np.random.default_rng(0)
    actions = torch.from_numpy(rng.integers(0, 6, (args.frames, args.batch)))
    res = {"device": torch.cuda.get_device_name(device), "frames": args.frames, "batch": args.batch,
           "overrides": args.overrides, "configs": {}}
    for name in args.attentions.split(","):
        runs = {}
        for graph in (False, True, None):  # None: eager again (is eager itself deterministic here?)
            ro = build_rollout(model, cfg, batch=args.batch, attention=attention_cfg(name), cuda_graph=bool(graph))
            ro.reset(*world_start(world, 0, args.batch), 0)
            frames, lat = [], []
            for a in actions:
                t0 = time.perf_counter()
                frames.append(ro.step(a).cpu())
                lat.append((time.perf_counter() - t0) * 1e3)
            runs[graph] = (torch.stack(frames), lat, ro.graph is not None, ro.cache.merge_rate() if hasattr(ro.cache, "merge_rate") else None)
        (fe, le, _, me), (fg, lg, used, mg), (f2, _, _, _) = runs[False], runs[True], runs[None]
        first_diff = next((i for i in range(len(fe)) if not torch.equal(fe[i], fg[i])), None)
        eager_diff = next((i for i in range(len(fe)) if not torch.equal(fe[i], f2[i])), None)
        row = {"identical": first_diff is None, "first_differing_frame": first_diff,
               "eager_runs_identical": eager_diff is None, "eager_runs_first_differing_frame": eager_diff,
               "max_abs_diff": int((fe.int() - fg.int()).abs().max()), "graph_in_use_at_end": used,
               "merge_rate_eager": me, "merge_rate_graph": mg,
               "eager_ms_last_50": float(np.median(le[-50:])), "graph_ms_last_50": float(np.median(lg[-50:]))}
        res["configs"][name] = row
        print(name, json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
