"""Where a frame's time goes: `python -m runtime.profile_step [--config bench|bench_wan]
[--attentions "SPEC|SPEC"] [--frames 60] [--profile 4] [--interleave N] [--out FILE.json] [OVERRIDES...]`.

For each attention spec (as in `bench.attentions`, separated by `|`): runs `--frames`
frames of the bench's source (the checkpoint, or random weights for `bench_wan`), then
profiles `--profile` more with torch.profiler and prints the median latency of the last 40
frames, the kernels (CUDA) or operators (CPU) that took the most time per frame, and the
host's own time per frame under the profiler (operators and runtime calls, self time)
with the number of calls that make the host wait for the device.
With `--interleave N` the specs' rollouts run side by side instead, one frame each in
turn, and N rounds each profile `--profile` frames of every spec (the order rotating),
added up per spec: on a machine whose speed drifts (a shared CPU) the specs are then
compared under the same conditions, as `bench.lockstep=true` does for speed.
OVERRIDES are Hydra overrides of the chosen config (e.g. `device=cpu`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from runtime.bench import build_source, world_start
from runtime.configs import compose_config
from runtime.evaluate import attention_cfg
from runtime.factory import build_rollout



def activities(cuda: bool) -> list:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])


def summarize(prof, n: int, cuda: bool, top: int, unit: str) -> dict:
    """What `n` profiled frames or steps (`unit`) spent: on a GPU the kernels by device time,
    on a CPU the operators by their own time (self, so nested calls do not count twice);
    the host's own time (every operator and runtime call, self time) and the calls that
    make the host wait for the device, all per `unit`."""
    events = prof.key_averages()
    if cuda:  # the device's own events (kernels, copies) only: an operator, an autograd node or
        # a kernel's launcher on the host carries its kernels' device time too, and would
        # count it again; so would the device-side ranges of annotations
        rows = [(e.key, e.device_time_total, e.count) for e in events
                if e.device_type == DeviceType.CUDA and e.device_time_total > 0
                and not getattr(e, "is_user_annotation", False) and not e.key.startswith(("Torch-Compiled", "## Call"))]
    else:
        rows = [(e.key, e.self_cpu_time_total, e.count) for e in events if e.self_cpu_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    host = sum(e.self_cpu_time_total for e in events) / n / 1e3
    waits = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                      "cudaEventSynchronize")) / n
    return {f"profiled_ms_per_{unit}": sum(r[1] for r in rows) / n / 1e3,
            f"host_ms_per_{unit}": host, f"host_waits_per_{unit}": waits,
            "top": [{"name": k[:160], f"ms_per_{unit}": t / n / 1e3, f"calls_per_{unit}": c / n}
                    for k, t, c in rows[:top]]}


def timed_step(rollout, action: int) -> float:
    """One frame of `rollout` with `action`, to the host; its latency in ms."""
    t0 = time.perf_counter()
    rollout.step(torch.tensor([action])).cpu()
    return (time.perf_counter() - t0) * 1e3


def latency_summary(lat: list[float]) -> dict:
    """Median and 90th percentile of the last 40 frames' latencies (ms)."""
    tail = lat[-40:]
    return {"median_ms": float(np.median(tail)), "p90_ms": float(np.percentile(tail, 90))}


def merged_profile(event_lists) -> SimpleNamespace:
    """Several profiles' `key_averages()` added up per (name, device type), in a form
    `summarize` reads (an object with `key_averages()`)."""
    acc: dict = {}
    for events in event_lists:
        for e in events:
            a = acc.setdefault((e.key, e.device_type), SimpleNamespace(
                key=e.key, device_type=e.device_type, device_time_total=0.0, self_cpu_time_total=0.0, count=0,
                is_user_annotation=getattr(e, "is_user_annotation", False)))
            a.device_time_total += e.device_time_total
            a.self_cpu_time_total += e.self_cpu_time_total
            a.count += e.count
    merged = list(acc.values())
    return SimpleNamespace(key_averages=lambda: merged)


def profile_interleaved(model, cfg, world, device, specs: list[str], frames: int, n_prof: int, rounds: int,
                        top: int) -> dict:
    """Every spec's rollout, advanced one frame each in turn for `frames` frames, then
    `rounds` rounds that profile `n_prof` frames of each spec, the order rotating from
    round to round; per spec the profiles are added up (`rounds * n_prof` frames)."""
    cuda = device.type == "cuda"
    first, prompt = world_start(world, int(cfg.seed))
    runs, lat, events = {}, {s: [] for s in specs}, {s: [] for s in specs}
    for spec in specs:
        runs[spec] = build_rollout(model, cfg, batch=1, attention=attention_cfg(spec))
        runs[spec].reset(first, prompt, int(cfg.seed))
    done = dict.fromkeys(specs, 0)

    def advance(spec: str) -> float:
        done[spec] += 1
        return timed_step(runs[spec], (done[spec] - 1) % 6)

    def in_turn(i: int) -> list[str]:
        k = i % len(specs)
        return specs[k:] + specs[:k]

    for i in range(frames):
        for spec in in_turn(i):
            lat[spec].append(advance(spec))
    for r in range(rounds):
        for spec in in_turn(r):
            with profile(activities=activities(cuda)) as prof:
                for _ in range(n_prof):
                    advance(spec)
            events[spec].append(prof.key_averages())
    out = {}
    for spec in specs:
        out[spec] = {**latency_summary(lat[spec]), "cache_tokens": runs[spec].cache.num_tokens(0),
                     **summarize(merged_profile(events[spec]), rounds * n_prof, cuda, top, "frame")}
    return out


def profile_spec(model, cfg, world, device, spec: str, frames: int, n_prof: int, top: int) -> dict:
    rollout = build_rollout(model, cfg, batch=1, attention=attention_cfg(spec))
    first, prompt = world_start(world, int(cfg.seed))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rollout.reset(first, prompt, int(cfg.seed))
    lat = [timed_step(rollout, i % 6) for i in range(frames)]
    with profile(activities=activities(cuda)) as prof:
        for i in range(n_prof):
            rollout.step(torch.tensor([i % 6])).cpu()
    out = {**latency_summary(lat), "cache_tokens": rollout.cache.num_tokens(0), **summarize(prof, n_prof, cuda, top, "frame")}
    if cuda:
        out["peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="bench", choices=["bench", "bench_wan"])
    ap.add_argument("--attentions", default="fastar|window", help="attention specs separated by |")
    ap.add_argument("--frames", type=int, default=60, help="frames before profiling")
    ap.add_argument("--profile", type=int, default=4, help="frames profiled")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--interleave", type=int, default=0,
                    help="run the specs side by side and profile this many rounds of --profile frames each (0: one after another)")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.interleave < 0:
        ap.error(f"--interleave {args.interleave}: expected a number of rounds >= 0")
    cfg = compose_config(args.config, args.overrides)
    world, model, device, _ = build_source(cfg)
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "torch": torch.__version__, "config": args.config,
           "overrides": args.overrides, "frames": args.frames, "profiled": args.profile,
           "interleave": args.interleave, "specs": {}}
    specs = args.attentions.split("|")
    together = (profile_interleaved(model, cfg, world, device, specs, args.frames, args.profile, args.interleave, args.top)
                if args.interleave else None)
    for spec in specs:  # one after another, each printed as soon as it is measured
        r = together[spec] if together else profile_spec(model, cfg, world, device, spec, args.frames, args.profile, args.top)
        res["specs"][spec] = r
        print(f"== {spec}: median {r['median_ms']:.1f} ms (p90 {r['p90_ms']:.1f}); profiled "
              f"{r['profiled_ms_per_frame']:.1f} ms per frame; host {r['host_ms_per_frame']:.1f} ms, "
              f"{r['host_waits_per_frame']:.1f} waits per frame", flush=True)
        for t in r["top"]:
            print(f"   {t['ms_per_frame']:8.2f} ms  x{t['calls_per_frame']:<7.1f} {t['name'][:100]}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
