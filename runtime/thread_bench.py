"""Where play builds its engine, and what that costs a step (a benchmark, not a test).

    python -m runtime.thread_bench [rounds=6] [steps=60] [warmup=20] [preset=fast ...]

In play the window's producer thread runs the engine (runtime.loop). This measures the
engine's step on such a thread in two set-ups, each in a fresh process, the processes
alternating round by round so that a machine whose speed drifts treats both alike:
- `main`: the engine built on the main thread, as play did before
  `runtime.loop.build_off_main_thread` (the main thread keeps a torch thread pool);
- `off_main`: the engine built on a thread that exits, as play does now.
Each process builds the engine, resets it, makes `warmup` steps on a new thread and times
the next `steps` there; the report is each round's median step and the ratio of the two.
Other arguments are Hydra overrides of conf/config.yaml (the pacing benchmark's looping
script drives the world).
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np

MODES = ("main", "off_main")
COUNTS = {"rounds": 6, "steps": 60, "warmup": 20}


def parse_args(argv: list[str]) -> tuple[dict[str, int], list[str]]:
    """Split `rounds=`, `steps=` and `warmup=` off the Hydra overrides."""
    counts, overrides = dict(COUNTS), []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in counts:
            if not value.isdigit() or (int(value) < 1 and key != "warmup"):
                raise ValueError(f"{key} must be a whole number{'' if key == 'warmup' else ' >= 1'}, got {value!r}")
            counts[key] = int(value)
        else:
            overrides.append(arg)
    return counts, overrides


def child(mode: str, steps: int, warmup: int, overrides: list[str]) -> float:
    """One process's measurement: the median step in milliseconds on a producer-like thread."""
    from controllers import build_controller
    from runtime.configs import compose_config
    from runtime.engine import build_engine
    from runtime.loop import build_off_main_thread
    from runtime.pacing_bench import DEFAULTS
    from worlds import build_world

    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    cfg = compose_config("config", DEFAULTS + overrides)

    def build():
        engine = build_engine(cfg, build_world(cfg.world))
        engine.reset(int(cfg.seed))
        return engine

    engine = build() if mode == "main" else build_off_main_thread(build)
    controller = build_controller(cfg)
    controller.reset()
    times: list[float] = []

    def produce() -> None:
        for i in range(warmup + steps):
            start = time.perf_counter()
            engine.step(controller.actions(engine.chunk_size))
            if i >= warmup:
                times.append(time.perf_counter() - start)

    thread = threading.Thread(target=produce, name="producer")
    thread.start()
    thread.join()
    return float(np.median(times)) * 1e3


def main(argv: list[str]) -> dict[str, list[float]]:
    if argv[:1] == ["--child"]:
        mode, steps, warmup = argv[1], int(argv[2]), int(argv[3])
        print(f"median_ms {child(mode, steps, warmup, argv[4:]):.4f}", flush=True)
        return {}
    counts, overrides = parse_args(argv)
    from runtime.bench import commit_id

    print(f"thread_bench: commit {commit_id()}; {counts['rounds']} rounds of {counts['steps']} steps after "
          f"{counts['warmup']} on a producer thread, one process per set-up and round; overrides {overrides}", flush=True)
    medians: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(counts["rounds"]):
        for mode in MODES:
            out = subprocess.run([sys.executable, "-m", "runtime.thread_bench", "--child", mode,
                                  str(counts["steps"]), str(counts["warmup"]), *overrides],
                                 capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("median_ms ")]
            if out.returncode != 0 or not lines:
                raise RuntimeError(f"the {mode} process failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
            medians[mode].append(float(lines[-1].split()[1]))
        print(f"round {r + 1}: built on the main thread {medians['main'][-1]:7.2f} ms, off it "
              f"{medians['off_main'][-1]:7.2f} ms, ratio {medians['main'][-1] / medians['off_main'][-1]:.3f}", flush=True)
    ratios = np.array(medians["main"]) / np.array(medians["off_main"])
    print(f"median step: built on the main thread {np.median(medians['main']):.2f} ms, off it "
          f"{np.median(medians['off_main']):.2f} ms; ratio per round median {np.median(ratios):.3f} "
          f"(min {ratios.min():.3f}, max {ratios.max():.3f}); off_main faster in "
          f"{int((ratios > 1).sum())} of {len(ratios)} rounds", flush=True)
    return medians


if __name__ == "__main__":
    main(sys.argv[1:])
