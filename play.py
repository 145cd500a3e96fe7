"""Play, record and replay a world: the Hydra entry point.

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
import signal
import sys

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    # Ctrl-C while the modules load (torch takes seconds): a quiet exit, code 130
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(128 + signum))
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import hydra
from omegaconf import DictConfig, OmegaConf

from controllers import build_controller
from runtime.cli import cli_errors, interruptible, storage_errors
from runtime.configs import check_config_files, check_creatable, config_int, strict_dataclass
from runtime.engine import build_engine
from runtime.loop import GracefulInterrupt, build_off_main_thread, run_headless
from runtime.recorder import Recording
from worlds import build_world, world_settings
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


# what must match for a replay to give the recording's frames (besides the seed it brings)
REPLAY_KEYS = ("kind", "checkpoint_sha256", "device", "dtype", "attention", "sampler_steps", "sampler_times")


def replay_mismatches(recorded: dict[str, Any], info: dict[str, Any]) -> list[str]:
    """The engine settings of a recording (meta.json's `engine`) that this run's engine
    does not share, as "KEY: recorded X, now Y" (keys either side lacks are not compared)."""
    return [f"{key}: recorded {recorded[key]!r}, now {info[key]!r}" for key in REPLAY_KEYS
            if key in recorded and key in info and recorded[key] != info[key]]


def config_mismatches(recorded: dict[str, Any], cfg: DictConfig) -> list[str]:
    """The settings that decide a replay's frames (the world's; for the neural engine also
    the attention's) where the recording's config (meta.json's `config`) and this run's
    differ, as "KEY: recorded X, now Y" (a key only one side has included). The names of
    both and the sampler that ran are compared by `replay_mismatches` and the world check."""
    now = OmegaConf.to_container(cfg, resolve=True)
    groups = ["world"] + (["attention"] if cfg.engine.get("kind") == "neural" else [])
    out: list[str] = []
    for group in groups:
        then, current = recorded.get(group), now.get(group)
        if isinstance(then, dict):
            if group == "world" and isinstance(current, dict):  # keys left out, as the world reads them
                then, current = world_settings(then), world_settings(current)
            out += [f"{key}: recorded {a!r}, now {b!r}" for key, a, b in differences(then, current, group)
                    if key not in ("world.name", "attention.name")]  # said on their own
    return out


def differences(a: Any, b: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    """(dotted key, a's value, b's value) wherever two nested mappings differ (None for a
    key one side lacks)."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [(prefix, a, b)]
    return [d for key in sorted(set(a) | set(b), key=str) for d in differences(a.get(key), b.get(key), f"{prefix}.{key}")]


def check_record_path(path: str | None, overwrite: Any, replaying: str | None) -> None:
    """record.path must be a new or empty directory (or record.overwrite=true), and never
    the recording being replayed: a recording is not lost to a mistyped command."""
    if not isinstance(overwrite, bool):
        raise ValueError(f"record.overwrite must be true or false, got {overwrite!r}")
    if path is None:
        return
    if not isinstance(path, str) or not path:
        raise ValueError(f"record.path must be null or a directory path, got {path!r}")
    p = Path(path)
    if replaying is not None and p.exists() and p.resolve() == Path(replaying).resolve():
        raise ValueError(f"record.path {path!r} is the recording being replayed (controller.path): recording there "
                         "would overwrite it; choose another directory")
    check_creatable(path, "record.path")  # not a file, nor under one, and writable
    if p.is_dir() and not overwrite and (held := sorted(q.name for q in p.iterdir())):
        raise ValueError(f"record.path {path!r} is not empty (it holds {held[:5]}); choose a new directory, or "
                         "pass record.overwrite=true to replace what is there")


def check_record_dir(root: Any, writable: bool) -> None:
    """record.dir (where the window's recordings go) must be a directory or creatable as one,
    and writable where F5 can record (`writable`): found at start-up, not when F5 is pressed
    in the middle of a game."""
    if not isinstance(root, str) or not root:
        raise ValueError(f"record.dir must be a directory path, got {root!r}")
    check_creatable(root, "record.dir", writable)


def seed_given() -> Any:
    """The seed given on the command line (`seed=N`), or None if none was."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    given = [o.split("=", 1)[1] for o in HydraConfig.get().overrides.task if o.split("=", 1)[0].lstrip("+~") == "seed"]
    return given[-1] if given else None


def frame_limit(cfg: DictConfig, controller: Any) -> int | None:
    """max_frames, capped by what the controller has to give (a replay's length)."""
    limit = config_int(cfg.max_frames, "max_frames", minimum=0, optional=True)
    if controller.num_frames is not None:
        limit = controller.num_frames if limit is None else min(limit, controller.num_frames)
    return limit


@dataclass
class Session:
    """Everything a run needs, built and validated before anything is shown or written."""

    cfg: DictConfig
    engine: Any
    controller: Any
    seed: int
    limit: int | None
    recording: Recording
    window: Any  # runtime.window.Window (open, not yet running), or None for window=headless


def build(cfg: DictConfig) -> Session:
    """Validate the config and build world, engine and controller; ValueError on mistakes."""
    window_kind = cfg.window.get("kind")
    if window_kind not in WINDOW_KINDS:
        raise ValueError(f"unknown window.kind {window_kind!r}; expected one of {list(WINDOW_KINDS)}")
    window_cfg = None
    if window_kind == "pygame":
        from controllers.keymap import Keymap, check_disjoint
        from runtime.window import COMMANDS, WindowConfig

        window_cfg = strict_dataclass(WindowConfig, cfg.window, "window (pygame)")
        window_keys = Keymap(window_cfg.keys, allowed=COMMANDS, where="window.keys")
    else:
        from runtime.loop import HeadlessConfig

        strict_dataclass(HeadlessConfig, cfg.window, "window (headless)")
    if isinstance(cfg.record.fps, bool) or not isinstance(cfg.record.fps, (int, float)) or cfg.record.fps <= 0:
        raise ValueError(f"record.fps must be a number > 0, got {cfg.record.fps!r}")
    asked_seed = config_int(cfg.seed, "seed")
    controller = build_controller(cfg)
    check_record_path(cfg.record.path, cfg.record.get("overwrite", False),
                      cfg.controller.get("path") if cfg.controller.get("kind") == "replay" else None)
    check_record_dir(cfg.record.dir, writable=window_cfg is not None)
    if window_cfg is None and controller.needs_window:
        raise ValueError(f"controller={cfg.controller.kind} needs a window; use window=pygame or "
                         "controller=scripted|random|replay with window=headless")
    if window_cfg is not None and getattr(controller, "keymap", None) is not None:
        check_disjoint(controller.keymap, "controller.keymap", window_keys, "window.keys")
    limit = frame_limit(cfg, controller)

    world = build_world(cfg.world)
    if window_cfg is None:
        engine = build_engine(cfg, world)
    else:  # the window's producer thread runs it: keep torch's threads its own
        engine = build_off_main_thread(lambda: build_engine(cfg, world))
    seed = int(getattr(controller, "seed", cfg.seed))  # a replay brings its recorded seed
    meta = getattr(controller, "meta", {})
    recorded = meta.get("engine")
    differ = replay_mismatches(recorded, engine.info) if isinstance(recorded, dict) else []
    if "world" in meta and meta["world"] != cfg.world.get("name"):
        differ.insert(0, f"world: recorded {meta['world']!r}, now {cfg.world.get('name')!r}")
    if isinstance(meta.get("config"), dict):
        more = config_mismatches(meta["config"], cfg)
        differ += more[:8] + ([f"and {len(more) - 8} more settings"] if len(more) > 8 else [])
    given = seed_given()
    if meta and given is not None and asked_seed != seed:  # as numbers: seed=+4 asks for 4
        print(f"play.py: note: seed={given} is not used: a replay plays the recording's seed, {seed}",
              file=sys.stderr, flush=True)
    if differ:
        print(f"play.py: note: the replay runs another world or engine than the recording's, so its frames will "
              f"differ (the actions and seed are the recording's): {'; '.join(differ)}", file=sys.stderr, flush=True)
    recording = Recording(cfg.record.fps, lambda: run_meta(cfg, engine, seed), root=cfg.record.dir)
    window = None
    if window_cfg is not None:
        from runtime.window import Window

        window = Window(window_cfg, engine, controller, seed, recording, limit)
    return Session(cfg, engine, controller, seed, limit, recording, window)


def run(s: Session) -> int:
    """Play until max_frames, the end of a replay, quit or Ctrl-C; returns frames generated."""
    window = s.window
    with GracefulInterrupt() as interrupt:
        try:
            if s.cfg.record.path:
                s.recording.start(s.cfg.record.path)
            if window is None:
                shown = run_headless(s.engine, s.controller, s.seed, s.limit,
                                     lambda index, action, frame: s.recording.on_frame(action, frame),
                                     should_stop=interrupt)
                print(f"generated {shown} frames", flush=True)
            else:
                shown = window.run(should_stop=interrupt)
        finally:
            path = s.recording.recorder.path if s.recording.active else None
            count = s.recording.stop()
            if path is not None:
                print(f"recorded {count} frames to {path}", flush=True)
    if interrupt.requested:
        print(f"interrupted after {shown} frames", flush=True)
        raise SystemExit(128 + interrupt.signum)  # the shell's code for that signal; the recording is complete
    return shown


def play(cfg: DictConfig) -> int:
    """Build and run one session; returns the number of generated frames shown."""
    return run(build(cfg))


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # a mistake in the config or the command line, a missing or unwritable file: one line,
    # exit 2; the disk filling up or turning read-only while playing: one line, the
    # recording closed (Ctrl-C or SIGTERM while starting: `interruptible` around main;
    # once playing, `run` stops cleanly)
    with cli_errors("play.py"):
        session = build(cfg)
    with storage_errors("play.py"):
        run(session)


if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: Ctrl-C is KeyboardInterrupt again
    check_config_files("play.py", sys.argv[1:])
    with interruptible("play.py"):  # from Hydra's compose on
        main()
