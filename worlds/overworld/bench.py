"""Benchmark: frames per second of batched overworld data generation on one core.

    python -m worlds.overworld.bench [--batch 256 --frames 20000 --episode 128 --world overworld]

Generates `--frames` frames in total: `--batch` worlds stepped together with the
random exploring agent, new seeds (and random tile sets) every `--episode` steps.
Prints the overall rate (map generation included) and the stepping-only rate.
Pinned to one CPU core unless --all-cores is given.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from controllers.random_agent import explore_actions
from worlds.overworld.batch import BatchOverworld
from worlds.overworld.config import load_config
from worlds.overworld.tileset import random_tileset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--frames", type=int, default=20000)
    parser.add_argument("--episode", type=int, default=128, help="steps per episode before new seeds")
    parser.add_argument("--world", default="overworld", help="conf/world preset name or a YAML path")
    parser.add_argument("--all-cores", action="store_true", help="do not pin to one core")
    args = parser.parse_args()
    if args.batch < 1 or args.frames < 1 or args.episode < 1:
        raise ValueError("--batch, --frames and --episode must be >= 1")
    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    world = BatchOverworld(load_config(args.world), args.batch)
    rng = np.random.default_rng(0)
    world.reset(list(range(args.batch)))
    world.step(np.zeros(args.batch, dtype=np.int64))  # warm-up

    frames = reset_s = step_s = 0.0
    episode = 0
    checksum = 0
    start = time.perf_counter()
    while frames < args.frames:
        t0 = time.perf_counter()
        seeds = range(episode * args.batch, (episode + 1) * args.batch)
        atlases = np.stack([random_tileset(rng) for _ in range(args.batch)])
        world.reset(seeds, atlases)
        actions = explore_actions(rng, args.batch, args.episode)  # (B, L)
        t1 = time.perf_counter()
        steps = min(args.episode, -(-int(args.frames - frames) // args.batch))
        for i in range(steps):
            out = world.step(actions[:, i])
        checksum += int(out[:, 0, 0, 0].sum())
        t2 = time.perf_counter()
        reset_s += t1 - t0
        step_s += t2 - t1
        frames += steps * args.batch
        episode += 1
    total_s = time.perf_counter() - start

    print(f"world={world.cfg.name} batch={args.batch} episode={args.episode} frames={int(frames)} "
          f"view={world.cfg.view} cores={'all' if args.all_cores else 1}")
    print(f"overall:  {frames / total_s:10.0f} frames/s  "
          f"(resets with map generation + random tile sets: {reset_s:.2f} s)")
    print(f"stepping: {frames / step_s:10.0f} frames/s  ({step_s:.2f} s)")


if __name__ == "__main__":
    main()
