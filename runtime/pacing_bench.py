"""Pacing benchmark: how steadily the real presenter shows frames (not a test).

    python -m runtime.pacing_bench [seconds=10] [warmup=1] [engine=simulator window.fps=30 ...]

Runs the pygame window (SDL's dummy video driver unless SDL_VIDEODRIVER is set) with
the producer thread and engine as configured, for `seconds` after `warmup` seconds, and
prints the presented frame rate and the frame-interval jitter: p50 / p99 of the time
between presented frames and their ratio (1.0 is perfectly even). Other arguments
are Hydra overrides of conf/config.yaml; the controller defaults to a looping script
so the world keeps moving.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

CONF = Path(__file__).resolve().parents[1] / "conf"
DEFAULTS = ["controller=scripted", "controller.script=R*20 D*20 L*20 U*20 P", "controller.loop=true"]


def parse_args(argv: list[str]) -> tuple[float, float, list[str]]:
    """Split `seconds=` and `warmup=` off the Hydra overrides."""
    seconds, warmup, overrides = 10.0, 1.0, []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in ("seconds", "warmup"):
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"{key} must be a number of seconds, got {value!r}") from None
            if number < 0 or (key == "seconds" and number == 0):
                raise ValueError(f"{key} must be positive, got {value!r}")
            seconds, warmup = (number, warmup) if key == "seconds" else (seconds, number)
        else:
            overrides.append(arg)
    return seconds, warmup, overrides


def main(argv: list[str]) -> dict[str, float]:
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    from hydra import compose, initialize_config_dir

    from controllers import build_controller
    from runtime.configs import strict_dataclass
    from runtime.engine import build_engine
    from runtime.window import Window, WindowConfig
    from worlds import build_world

    seconds, warmup, overrides = parse_args(argv)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=DEFAULTS + overrides)
    if cfg.window.kind != "pygame":
        raise ValueError(f"the pacing benchmark needs window=pygame, got window.kind={cfg.window.kind!r}")
    window_cfg = strict_dataclass(WindowConfig, cfg.window, "window (pygame)")
    engine = build_engine(cfg, build_world(cfg.world))
    controller = build_controller(cfg)

    times: list[float] = []
    window = Window(window_cfg, engine, controller, int(cfg.seed), recording=None,
                    on_present=times.append)
    start = time.perf_counter()
    stalls_at_warmup: list[int] = []

    def should_stop() -> bool:
        now = time.perf_counter()
        if not stalls_at_warmup and now - start >= warmup:
            stalls_at_warmup.append(window.stalls)
        return now - start >= warmup + seconds

    window.run(should_stop)
    measured = np.array([t for t in times if t - start >= warmup])
    intervals_ms = np.diff(measured) * 1e3
    p50, p99 = np.percentile(intervals_ms, [50, 99])
    result = {
        "target_fps": float(window_cfg.fps),
        "presented_fps": (len(measured) - 1) / (measured[-1] - measured[0]),
        "interval_p50_ms": float(p50),
        "interval_p99_ms": float(p99),
        "interval_max_ms": float(intervals_ms.max()),
        "p99_over_p50": float(p99 / p50),
        "stalls": window.stalls - (stalls_at_warmup[0] if stalls_at_warmup else 0),
        "frames": len(measured),
        "last_latency_ms": float(engine.stats.latency_ms),
    }
    print(f"pacing: {platform.processor() or platform.machine()}, SDL video driver "
          f"{os.environ['SDL_VIDEODRIVER']}, engine {cfg.engine.kind} (chunk {engine.chunk_size}), "
          f"{seconds:g} s after {warmup:g} s warm-up")
    for key, value in result.items():
        print(f"  {key:18s} {value:10.3f}" if isinstance(value, float) else f"  {key:18s} {value:10d}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
