"""Long-rollout benchmark: `python -m runtime.bench [key=value ...] out=DIR` (conf/bench.yaml).

Headless rollouts of `bench.frames` frames with a fixed action script, for each attention
config in `bench.attentions`, one after another in one process (comparable). Per chunk:
end-to-end latency (sampling, cache update, frame conversion to uint8 on the host), FPS,
cache tokens per layer, and memory (CUDA max allocated on GPU; resident set size on
CPU, with the peak reset between configs). The first `bench.warmup` chunks of each config
are excluded from the summary. With `bench.lockstep: true` the configs instead advance
one chunk each in turn, so that a machine whose speed drifts slows all of them alike
(memory is then the process's peak, shared by all), and bench.json's `lockstep_ratios`
gives each pair's latency ratio in the same frames. A config stops early when one chunk takes longer than
`bench.max_chunk_ms` (median of the last 5 chunks, so one stall does not count) or memory
runs out; the frame where it stopped is recorded.

`bench.source: random` (conf/bench_wan.yaml) runs a model of random weights built from
`model` (the Wan2.1-1.3B-shaped configuration) on random latents and a random prompt of
its shapes: cost only, no pictures. "Frame conversion" is then the latent's conversion
to uint8 on the host (there is no VAE decoder).

Writes DIR/bench.json (`device`, `configs`: per config `rows`, a list of {frame,
latency_ms, fps, cache_tokens, peak_mem_mb}, with the config's `total_s` and `stopped_at`
(the frame and reason where it stopped); `summary` per config; `total_s` of the run; also
the dtype, `compile`, `cuda_graph`, `cpu_attention` (the CPU's attention kernel, on a CPU)
and the commit) and DIR/fps.png, DIR/memory.png, DIR/cache_tokens.png (one line per
config). Bad settings and a missing or corrupt checkpoint are reported before anything
runs, as one line on stderr (exit status 2).
"""
from __future__ import annotations

import gc
import json
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from controllers.scripted import parse_script
from runtime.attention import cpu_attention_kernel
from runtime.cli import cli_errors, interruptible, storage_errors
from runtime.configs import check_config_files, check_creatable, check_engine, check_type, config_int
from runtime.evaluate import attention_cfg, check_attention
from runtime.factory import (apply_cpu_settings, build_rollout, engine_flag, load_model, resolve_device, resolve_dtype,
                             sampler_record)
from runtime.model import ModelConfig, WorldModel
from worlds import build_world


def status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status ('VmRSS', 'VmHWM') in MB; None if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 resets the peak resident set size (VmHWM)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = status_mb("VmHWM")
    if peak is None:
        peak = status_mb("VmRSS")
    return float("nan") if peak is None else peak


def commit_id() -> str:
    """The commit of this source tree, or "unknown" when it is not a git checkout of its own
    (an exported copy inside another repository must not report that repository's HEAD);
    "+changes" after it when tracked files differ from that commit (the figures are then
    not that commit's alone)."""
    root = Path(__file__).resolve().parent.parent
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True).stdout.strip()
        if not top or Path(top).resolve() != root:
            return "unknown"
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                 capture_output=True, text=True).stdout.strip()
        return f"{head}+changes" if head and changed else head
    except OSError:
        return "unknown"


class RandomLatents:
    """Stands in for a world when the model has random weights: a random first frame
    (uint8, H x W x channels) and a random prompt of the model's shapes."""

    def __init__(self, mcfg: ModelConfig):
        self.mcfg = mcfg
        self.prompt = None

    def reset(self, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        m = self.mcfg
        self.prompt = rng.standard_normal((m.prompt_tokens, m.prompt_dim)).astype(np.float32)
        return rng.integers(0, 256, (m.frame_size, m.frame_size, m.channels), dtype=np.uint8)


CPU_RANDOM_LIMIT = 300e6  # random-weight models larger than this run only on a GPU (the Wan shape: about 850M)


def build_source(cfg):
    """(world, model, device, dtype) for `bench.source`."""
    source = str(cfg.bench.get("source", "checkpoint"))
    if source == "checkpoint":
        world = build_world(cfg.world)
        loaded = load_model(cfg, world.cfg)
        return world, loaded.model, loaded.device, loaded.dtype
    if source == "random":
        mcfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
        device, dtype = resolve_device(str(cfg.device)), resolve_dtype(str(cfg.engine.dtype))
        blocks = 12 * mcfg.depth * mcfg.width ** 2  # about the blocks' parameters
        if device.type == "cpu" and blocks > CPU_RANDOM_LIMIT:
            raise ValueError(f"bench.source=random with a model of about {blocks / 1e6:.0f}M parameters (width "
                             f"{mcfg.width}, depth {mcfg.depth}) needs a GPU: on a CPU a frame takes tens of seconds; "
                             "pass model=tiny for a run on the CPU")
        apply_cpu_settings(cfg.engine, device)
        torch.manual_seed(int(cfg.seed))
        model = WorldModel(mcfg).to(device=device, dtype=dtype).eval().requires_grad_(False)
        return RandomLatents(mcfg), model, device, dtype
    raise ValueError(f"bench.source={source!r}; expected 'checkpoint' or 'random'")


def world_start(world, seed: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The world's first frame (B, H, W, 3) uint8 and its prompt (B, T, E), for
    `Rollout.reset`; a batch repeats the same world."""
    first = torch.from_numpy(world.reset(seed))[None].expand(batch, -1, -1, -1)
    prompt = torch.from_numpy(np.asarray(world.prompt, dtype=np.float32))[None].expand(batch, -1, -1)
    return first, prompt


class ConfigRun:
    """One attention config's rollout, advanced one chunk at a time; records a row per
    chunk and stops on a sustained slow chunk or when memory runs out. `total_s` is the
    config's own time: its reset and its chunks (in lockstep the others' chunks run in
    between)."""

    def __init__(self, model, cfg, name: str, world, device, oom_note: str = ""):
        self.cfg, self.name, self.device, self.oom_note = cfg, name, device, oom_note
        self.rollout = build_rollout(model, cfg, batch=1, attention=attention_cfg(name))
        self.first, self.prompt = world_start(world, int(cfg.seed))
        self.rows: list[dict] = []
        self.stopped: dict | None = None
        self.busy_s = 0.0

    @property
    def active(self) -> bool:
        return self.stopped is None

    def _stop(self, frame: int, reason: str) -> None:
        self.stopped = {"frame": frame, "reason": reason}
        self.rollout = None  # its caches go now, not at the end of a lockstep run

    def start(self) -> None:
        t0 = time.perf_counter()
        try:  # a preallocated cache may not fit at all: that is a result too (frame 0)
            self.rollout.reset(self.first, self.prompt, int(self.cfg.seed))
        except torch.OutOfMemoryError:
            self._stop(0, "out of memory at reset" + self.oom_note)
        self.busy_s += time.perf_counter() - t0

    def step(self, i: int, action: int) -> None:
        """Frame i + 1 with `action`."""
        b = self.cfg.bench
        t0 = time.perf_counter()
        try:
            frame = self.rollout.step(torch.tensor([action]))
            frame.cpu().numpy()  # frame conversion to the host is part of the cost (and waits for the device)
        except torch.OutOfMemoryError:
            self.busy_s += time.perf_counter() - t0
            self._stop(i + 1, "out of memory" + self.oom_note)
            return
        ms = (time.perf_counter() - t0) * 1e3
        self.busy_s += ms / 1e3
        self.rows.append({"frame": i + 1, "latency_ms": round(ms, 3), "fps": round(1e3 / ms, 2),
                          "cache_tokens": self.rollout.cache.num_tokens(0), "peak_mem_mb": round(peak_mb(self.device), 1)})
        recent = float(np.median([x["latency_ms"] for x in self.rows[-5:]]))
        if i >= int(b.warmup) and recent > float(b.max_chunk_ms):  # sustained, not one stall
            self._stop(i + 1, f"median of the last 5 chunks {recent:.0f} ms > bench.max_chunk_ms={b.max_chunk_ms}")

    def finish(self) -> dict:
        self.rollout = None  # the caches go with it
        return {"rows": self.rows, "total_s": round(self.busy_s, 2), "stopped_at": self.stopped}


def release(device) -> None:
    """Free what earlier configs left before the next is measured: a rollout that played
    from a CUDA graph is a reference cycle (rollout <-> graph), which only the cycle
    collector frees, and until then its caches and the graph's memory pool stay allocated
    and count in the next config's peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_configs(model, cfg, names: list[str], world, actions: list[int], device, on_progress=None) -> dict:
    """The configs `names` over the action script, advancing one chunk each in turn; the
    bench runs them one name at a time, or all together with `bench.lockstep`. Together, a
    machine whose speed changes from minute to minute slows every config alike, so their
    ratios at any frame compare the same moments; the order rotates from frame to frame, so
    no config always runs first (or right after the same other one). Memory is then the
    process's (all configs at once): its peak is shared, per-config memory is not
    separated, and running out of it is everyone's doing. A config that stops frees its
    caches at once. `on_progress(name, rows, stopped)` every 200 frames, so a run that is
    killed keeps what it measured."""
    release(device)
    shared = " (lockstep: every config's memory together)" if len(names) > 1 else ""
    runs = {n: ConfigRun(model, cfg, n, world, device, oom_note=shared) for n in names}
    reset_peak(device)
    for r in runs.values():
        r.start()
    from tqdm import tqdm

    desc = names[0] if len(names) == 1 else "lockstep"
    bar = tqdm(total=len(actions), desc=desc, dynamic_ncols=True, disable=not bool(cfg.bench.progress), leave=False)
    try:
        for i, a in enumerate(actions):
            live = [r for r in runs.values() if r.active]
            if not live:
                break
            turn = i % len(live)
            for r in live[turn:] + live[:turn]:
                r.step(i, a)
                if not r.active:
                    release(device)
            bar.update(1)
            if on_progress is not None and (i + 1) % 200 == 0:
                for n, r in runs.items():
                    on_progress(n, r.rows, r.stopped)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep what was measured, then stop
        bar.close()
        if on_progress is not None:
            for n, r in runs.items():
                if r.rows:
                    on_progress(n, r.rows, r.stopped or {"frame": r.rows[-1]["frame"], "reason": "interrupted"})
        raise
    bar.close()
    return {n: r.finish() for n, r in runs.items()}


def summarize(rows: list[dict], warmup: int) -> dict:
    r = rows[warmup:]
    if not r:
        return {}

    def window(center: int, half: int = 25):
        sel = [x for x in r if abs(x["frame"] - center) <= half]
        return float(np.median([x["fps"] for x in sel])) if sel else None

    last = r[-1]["frame"]
    return {"frames": last, "median_fps": float(np.median([x["fps"] for x in r])),
            "fps_at_100": window(100), "fps_at_end": window(last - 25),
            "latency_ms_at_end": float(np.median([x["latency_ms"] for x in r[-50:]])),
            "mem_mb_at_100": next((x["peak_mem_mb"] for x in r if x["frame"] >= 100), None),
            "mem_mb_at_end": r[-1]["peak_mem_mb"], "cache_tokens_at_end": r[-1]["cache_tokens"]}


def lockstep_ratios(result: dict) -> dict:
    """For each pair of configs (a before b in the run): the median of a's chunk latency over
    b's in the same frames, over frames 75-125, over the last 150 frames, and the lowest
    and highest median of 300-frame spans. In lockstep both saw the same moments of the
    machine, so these ratios show what a config's own cost does while the machine's speed
    moves."""
    configs = result["configs"]
    names = list(configs)
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            la = {r["frame"]: r["latency_ms"] for r in configs[a]["rows"]}
            lb = {r["frame"]: r["latency_ms"] for r in configs[b]["rows"]}
            frames = sorted(set(la) & set(lb))
            if not frames:
                continue

            def med(lo: int, hi: int, need: int = 1):
                vals = [la[f] / lb[f] for f in frames if lo <= f <= hi]
                return round(float(np.median(vals)), 4) if len(vals) >= need else None

            last = frames[-1]
            spans = [m for m in (med(s, s + 299, need=150) for s in range(1, last + 1, 300)) if m is not None]
            out[f"{a} / {b}"] = {"frames": last, "at_100": med(75, 125), "at_end": med(last - 149, last),
                                 "span_300_min": min(spans, default=None), "span_300_max": max(spans, default=None)}
    return out


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label_of = {"fps": "frames per second", "peak_mem_mb": "peak memory (MB)", "cache_tokens": "cache tokens per layer"}
    for key, fname in (("fps", "fps.png"), ("peak_mem_mb", "memory.png"), ("cache_tokens", "cache_tokens.png")):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, c in result["configs"].items():
            rows = c["rows"]
            if not rows:
                continue
            ys = np.array([x[key] for x in rows], dtype=float)
            if key == "fps" and len(ys) > 20:  # a running median keeps the lines readable
                ys = np.array([np.median(ys[max(0, i - 10) : i + 11]) for i in range(len(ys))])
            stop = c.get("stopped_at") or {}
            if stop.get("reason") and stop["reason"] != "in progress":
                name += f" (stopped at {stop['frame']}: {stop['reason'].split(' >')[0]})"
            # long variant specs ("fastar:a=1;b=2;...") wrap at their separators
            label = "\n  ".join(textwrap.wrap(name.replace(";", "; "), 60))
            ax.plot([x["frame"] for x in rows], ys, label=label)
        ax.set_xlabel("frame")
        ax.set_ylabel(label_of[key])
        ax.set_title(f"{label_of[key]} vs frames\n{result['device_name']}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1, frameon=False)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110, bbox_inches="tight")
        plt.close(fig)


def check(cfg: DictConfig) -> None:
    """The bench's settings, checked before anything runs (a bad attention name must not
    wait for the configs before it): ValueError naming the bad one."""
    b = cfg.bench
    check_engine(cfg)
    config_int(cfg.seed, "seed")
    for key in ("progress", "lockstep"):
        check_type(b.get(key, False), bool, f"bench.{key}")
    check_creatable(str(cfg.out), "out")
    config_int(b.frames, "bench.frames", minimum=1)
    config_int(b.warmup, "bench.warmup", minimum=0)
    check_type(b.max_chunk_ms, float, "bench.max_chunk_ms")
    for name in check_type(b.attentions, list[str], "bench.attentions"):
        check_attention(name, "bench.attentions")
    parse_script(str(b.script))


def run(cfg: DictConfig, out: Path | None = None, source: tuple | None = None) -> dict:
    """The bench. `source`: what `build_source` gives, built after `check` passed (as main
    does); without it, both are done here."""
    b = cfg.bench
    if source is None:
        check(cfg)
        source = build_source(cfg)
    world, model, device, dtype = source
    script = parse_script(str(b.script))
    actions = [script[i % len(script)] for i in range(int(b.frames))]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    result = {"device": str(device), "device_name": name, "dtype": str(dtype).replace("torch.", ""),
              "torch": torch.__version__, "commit": commit_id(), "compile": engine_flag(cfg, "compile"),
              "cuda_graph": device.type == "cuda" and engine_flag(cfg, "cuda_graph"),
              "cpu_attention": cpu_attention_kernel() if device.type == "cpu" else None,
              "frames": int(b.frames), "lockstep": bool(b.get("lockstep", False)),
              **sampler_record(cfg, device), "source": str(b.get("source", "checkpoint")),
              "world": str(cfg.world.get("name")) if "world" in cfg else None, "seed": int(cfg.seed),
              "checkpoint": str(cfg.engine.checkpoint) if str(b.get("source", "checkpoint")) == "checkpoint" else None,
              "model": model.cfg.to_dict(), "params_m": round(model.num_params() / 1e6, 2), "configs": {}, "summary": {}}
    t0 = time.time()
    partial: dict[str, dict] = {}  # configs still running, as far as they got

    def save(data: dict) -> None:
        if out is not None:
            (out / "bench.json").write_text(json.dumps(data) + "\n")

    def save_partial(name: str, rows: list[dict], stopped: dict | None = None) -> None:
        if rows:
            partial[name] = {"rows": rows, "total_s": None,
                             "stopped_at": stopped or {"frame": rows[-1]["frame"], "reason": "in progress"}}
            running = {k: v for k, v in partial.items() if k not in result["configs"]}
            save({**result, "configs": {**result["configs"], **running}})

    names = [str(a) for a in b.attentions]
    lockstep = bool(b.get("lockstep", False))
    for group in ([names] if lockstep else [[n] for n in names]):
        for name, c in run_configs(model, cfg, group, world, actions, device, on_progress=save_partial).items():
            result["configs"][name] = c
            result["summary"][name] = {**summarize(c["rows"], int(b.warmup)), "stopped_at": c["stopped_at"],
                                       "total_s": c["total_s"]}
            print(json.dumps({name: result["summary"][name]}), flush=True)
        result["total_s"] = round(time.time() - t0, 1)
        if lockstep:
            result["lockstep_ratios"] = lockstep_ratios(result)
            print(json.dumps({"lockstep_ratios": result["lockstep_ratios"]}), flush=True)
        save(result)  # after every config, so an interrupted run keeps what it measured
    return result


def read_bench(path: str) -> dict:
    """An earlier bench.json (for `bench.plot_from`): ValueError naming the file if it is
    not one."""
    try:
        result = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"bench.plot_from {path!r} is not JSON ({err})") from None
    except OSError as err:
        raise ValueError(f"bench.plot_from {path!r} cannot be read: {err.strerror or err}") from None
    if not isinstance(result, dict) or not isinstance(result.get("configs"), dict):
        raise ValueError(f"bench.plot_from {path!r} is not a bench.json (it has no 'configs')")
    return result


@hydra.main(config_path="../conf", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out = Path(str(cfg.out))
    started = time.time()

    def saved() -> str:  # where an interrupted run left what it measured, if it wrote anything
        path = out / "bench.json"
        fresh = not cfg.bench.plot_from and path.is_file() and path.stat().st_mtime >= started
        return f" (what was measured is in {path})" if fresh else ""

    with interruptible("runtime.bench", saved), storage_errors("runtime.bench"):
        if cfg.bench.plot_from:  # re-draw the plots of an earlier bench.json (and its lockstep ratios)
            with cli_errors("runtime.bench"):
                result = read_bench(str(cfg.bench.plot_from))
                check_creatable(str(out), "out")
            if result.get("lockstep"):
                print(json.dumps({"lockstep_ratios": lockstep_ratios(result)}), flush=True)
            out.mkdir(parents=True, exist_ok=True)
        else:
            with cli_errors("runtime.bench"):  # bad settings, a missing or corrupt checkpoint: one line, exit 2
                check(cfg)
                source = build_source(cfg)
            out.mkdir(parents=True, exist_ok=True)
            result = run(cfg, out, source)
        plot(result, out)
    print(f"wrote plots{'' if cfg.bench.plot_from else ' and bench.json'} to {out}")


if __name__ == "__main__":
    check_config_files("runtime.bench", sys.argv[1:])
    main()
