"""Pacing benchmark: how steadily the real presenter shows frames (not a test).

    python -m runtime.pacing_bench [seconds=10] [warmup=1] [alone=10] [engine=simulator window.fps=30 ...]

Runs the pygame window (SDL's dummy video driver unless SDL_VIDEODRIVER is set) with the
producer thread and engine as configured, for `seconds` after `warmup` seconds, and
prints the presented frame rate, how many of the presented frames were new (`new_fps`;
the others re-showed the previous frame: stalls), the engine's own frame rate inside
play (from its median step latency), and the frame-interval jitter: p50 / p99 of the
time between presented frames and their ratio (1.0 is perfectly even). Then, for
comparison, the same play-through goes on with the engine alone on the main thread for
`alone` seconds (0: skip): `engine_fps_alone`, with the cache in the same state as play
left it. Other arguments are Hydra overrides of conf/config.yaml; the controller
defaults to a looping script so the world keeps moving.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np

DEFAULTS = ["controller=scripted", "controller.script=R*20 D*20 L*20 U*20 P", "controller.loop=true"]


@dataclass
class BenchArgs:
    seconds: float = 10.0  # measured play time
    warmup: float = 1.0  # play time before the measurement
    alone: float = 10.0  # then the engine alone on the main thread (0: skip)
    overrides: list[str] = field(default_factory=list)  # Hydra overrides of conf/config.yaml


def parse_args(argv: list[str]) -> BenchArgs:
    """Split `seconds=`, `warmup=` and `alone=` off the Hydra overrides."""
    args = BenchArgs()
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in ("seconds", "warmup", "alone"):
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"{key} must be a number of seconds, got {value!r}") from None
            if number < 0 or (key == "seconds" and number == 0):
                raise ValueError(f"{key} must be positive, got {value!r}")
            setattr(args, key, number)
        else:
            args.overrides.append(arg)
    return args


def engine_alone(engine, controller, seconds: float) -> float:
    """Frames per second of `engine.step` on this thread with nothing else running,
    continuing the engine's current play-through."""
    frames, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        engine.step(controller.actions(engine.chunk_size))
        frames += engine.chunk_size
    return frames / (time.perf_counter() - start)


def main(argv: list[str]) -> dict[str, float]:
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    from controllers import build_controller
    from runtime.cli import cli_errors
    from runtime.configs import compose_config, strict_dataclass
    from runtime.engine import build_engine
    from runtime.loop import build_off_main_thread
    from runtime.window import Window, WindowConfig
    from worlds import build_world

    with cli_errors("runtime.pacing_bench"):  # bad arguments or settings, a missing checkpoint: one line, exit 2
        args = parse_args(argv)
        seconds, warmup = args.seconds, args.warmup
        cfg = compose_config("config", DEFAULTS + args.overrides)
        if cfg.window.kind != "pygame":
            raise ValueError(f"the pacing benchmark needs window=pygame, got window.kind={cfg.window.kind!r}")
        window_cfg = strict_dataclass(WindowConfig, cfg.window, "window (pygame)")
        engine = build_off_main_thread(lambda: build_engine(cfg, build_world(cfg.world)))  # as play.py does
        controller = build_controller(cfg)

    times: list[float] = []  # when each tick was presented
    new_frames: list[tuple[float, float]] = []  # (when, step latency ms) of each newly shown generated frame
    window = Window(window_cfg, engine, controller, int(cfg.seed), recording=None)
    shown: list = [None]  # the FrameItem of the previous tick

    def on_present(now: float) -> None:
        times.append(now)
        item = window.current
        if item is not None and item is not shown[0] and item.index >= 0:
            new_frames.append((now, item.latency_ms))
        shown[0] = item

    window.on_present = on_present
    start = time.perf_counter()
    stalls_at_warmup: list[int] = []

    def should_stop() -> bool:
        now = time.perf_counter()
        if not stalls_at_warmup and now - start >= warmup:
            stalls_at_warmup.append(window.stalls)
        return now - start >= warmup + seconds

    window.run(should_stop)
    window.producer.stop(timeout=None)  # the engine is this thread's from here on
    last_latency_ms = float(engine.stats.latency_ms)
    alone = engine_alone(engine, controller, args.alone) if args.alone > 0 else None
    measured = np.array([t for t in times if t - start >= warmup])
    span = measured[-1] - measured[0]
    intervals_ms = np.diff(measured) * 1e3
    p50, p99 = np.percentile(intervals_ms, [50, 99])
    new = [ms for t, ms in new_frames if measured[0] < t <= measured[-1]]
    step_ms = float(np.median(new)) if new else float("nan")
    result = {
        "target_fps": float(window_cfg.fps),
        "presented_fps": (len(measured) - 1) / span,
        "new_fps": len(new) / span,
        "engine_fps_in_play": engine.chunk_size * 1e3 / step_ms,
        "step_p50_ms": step_ms,
        "interval_p50_ms": float(p50),
        "interval_p99_ms": float(p99),
        "interval_max_ms": float(intervals_ms.max()),
        "p99_over_p50": float(p99 / p50),
        "stalls": window.stalls - (stalls_at_warmup[0] if stalls_at_warmup else 0),
        "frames": len(measured),
        "last_latency_ms": last_latency_ms,
    }
    if alone is not None:
        result["engine_fps_alone"] = alone
    print(f"pacing: {platform.processor() or platform.machine()}, SDL video driver "
          f"{os.environ['SDL_VIDEODRIVER']}, engine {cfg.engine.kind} (chunk {engine.chunk_size}), "
          f"{seconds:g} s after {warmup:g} s warm-up"
          + (f", then the engine alone {args.alone:g} s" if args.alone > 0 else ""))
    print(f"setup: {setup_line(cfg, engine)}")
    for key, value in result.items():
        print(f"  {key:18s} {value:10.3f}" if isinstance(value, float) else f"  {key:18s} {value:10d}")
    return result


def setup_line(cfg, engine) -> str:
    """What was measured, for a report that travels without its command: the commit, and for
    the neural engine its checkpoint (with the start of its sha256) and attention config."""
    from runtime.bench import commit_id

    parts = [f"commit {commit_id()}"]
    if cfg.engine.kind == "neural":
        info = getattr(engine, "info", {})
        parts.append(f"checkpoint {cfg.engine.checkpoint} (sha256 {str(info.get('checkpoint_sha256', ''))[:12]})")
        att = cfg.attention
        size = {"window": f"window_frames {att.get('window_frames')}", "tempcache": f"budget_frames {att.get('budget_frames')}"}
        parts.append(f"attention {att.name}" + (f" ({size[att.policy]})" if att.get("policy") in size else ""))
    return "; ".join(parts)


if __name__ == "__main__":
    main(sys.argv[1:])
