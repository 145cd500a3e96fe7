"""Play, record and replay a world: the Hydra entry point (DESIGN.md section 5).

    python play.py                                     # keyboard, pygame window
    python play.py window=headless controller=scripted controller.script="R*30 D*30" \
        max_frames=60 record.path=DIR                  # no window; writes a recording
    python play.py window=headless controller=replay controller.path=DIR record.path=DIR2

A thin composer: build world -> engine -> controller -> (recording) -> window or
headless loop, then run. Each part validates its own config and raises ValueError
naming the bad value at start-up.
"""
from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import hydra
from omegaconf import DictConfig, OmegaConf

from controllers import build_controller, strict_dataclass
from runtime.engine import build_engine
from runtime.loop import GracefulInterrupt, run_headless
from runtime.recorder import Recording
from worlds import build_world
from worlds.actions import ACTIONS

WINDOW_KINDS = ("pygame", "headless")


def run_meta(cfg: DictConfig, engine: Any, seed: int) -> dict[str, Any]:
    """What meta.json says about a recording (besides its start time and length)."""
    info = dict(engine.info)
    return {
        "seed": seed,
        "world": cfg.world.get("name"),
        "engine": info,
        "checkpoint_sha256": info.get("checkpoint_sha256"),
        "frame_shape": list(engine.frame_shape),
        "chunk_size": int(engine.chunk_size),
        "fps": cfg.record.fps,
        "actions": list(ACTIONS),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def frame_limit(cfg: DictConfig, controller: Any) -> int | None:
    """max_frames, capped by what the controller has to give (a replay's length)."""
    limit = cfg.max_frames
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"max_frames must be null or an integer >= 0, got {limit!r}")
    if controller.num_frames is not None:
        limit = controller.num_frames if limit is None else min(limit, controller.num_frames)
    return limit


def play(cfg: DictConfig) -> int:
    """Run one session as configured; returns the number of generated frames shown."""
    window_kind = cfg.window.get("kind")
    if window_kind not in WINDOW_KINDS:
        raise ValueError(f"unknown window.kind {window_kind!r}; expected one of {list(WINDOW_KINDS)}")
    if window_kind == "pygame":
        from runtime.window import WindowConfig

        window_cfg = strict_dataclass(WindowConfig, cfg.window, "window (pygame)")
    else:
        from runtime.loop import HeadlessConfig

        strict_dataclass(HeadlessConfig, cfg.window, "window (headless)")
    controller = build_controller(cfg)
    if window_kind == "headless" and controller.needs_window:
        raise ValueError(f"controller={cfg.controller.kind} needs a window; use window=pygame or "
                         "controller=scripted|random|replay with window=headless")

    world = build_world(cfg.world)
    engine = build_engine(cfg, world)
    seed = int(getattr(controller, "seed", cfg.seed))  # a replay brings its recorded seed
    limit = frame_limit(cfg, controller)
    recording = Recording(cfg.record.fps, lambda: run_meta(cfg, engine, seed), root=cfg.record.dir)

    with GracefulInterrupt() as interrupt:
        try:
            if cfg.record.path:
                recording.start(cfg.record.path)
            if window_kind == "headless":
                shown = run_headless(engine, controller, seed, limit,
                                     lambda index, action, frame: recording.on_frame(action, frame),
                                     should_stop=interrupt)
            else:
                from runtime.window import Window

                window = Window(window_cfg, engine, controller, seed, recording, limit)
                shown = window.run(should_stop=interrupt)
        finally:
            path = recording.recorder.path if recording.active else None
            count = recording.stop()
            if path is not None:
                print(f"recorded {count} frames to {path}", flush=True)
    if interrupt.requested:
        print(f"interrupted after {shown} frames", flush=True)
        raise SystemExit(130)  # the shell's code for Ctrl-C; the recording is complete
    return shown


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    play(cfg)


if __name__ == "__main__":
    main()
