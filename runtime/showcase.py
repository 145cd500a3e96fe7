"""A picture of the model restyling the world: `python -m runtime.showcase [key=value ...]`.

For each world config in `showcase.worlds` (same seed, same action script), the simulator's
frames and the neural engine's frames side by side at a few frame indices; rows are worlds.
The model is the same checkpoint for every row: only the world's tile set (the prompt, and
the first frame drawn with it) changes. Writes `out` (PNG).
"""
from __future__ import annotations

from pathlib import Path

import hydra
import imageio.v2 as imageio
import numpy as np
from omegaconf import DictConfig, OmegaConf

from controllers.scripted import parse_script
from runtime.checkpoint import read_metadata
from runtime.cli import cli_errors
from runtime.configs import CONF, check_type, config_int
from runtime.engine import build_engine
from runtime.factory import resolve_path
from worlds import build_world
from worlds.overworld import load_config


WORLDS = CONF / "world"


def check(cfg: DictConfig) -> None:
    """The picture's settings, before anything runs: ValueError naming the bad one."""
    sc = cfg.showcase
    actions = parse_script(str(sc.script))
    shots = check_type(sc.frames, list[int], "showcase.frames")
    if not shots or min(shots) < 0 or max(shots) > len(actions):
        raise ValueError(f"showcase.frames={shots!r}; expected frame indices from 0 to the script's length "
                         f"({len(actions)} actions)")
    for name in check_type(sc.worlds, list[str], "showcase.worlds"):
        load_config(WORLDS / f"{name}.yaml")  # as render reads it: a preset's name
    config_int(sc.scale, "showcase.scale", minimum=1)
    config_int(cfg.seed, "seed")


def render(cfg: DictConfig, checked: bool = False) -> np.ndarray:
    """The picture (`checked`: `check` already passed, as in main)."""
    if not checked:
        check(cfg)
    sc = cfg.showcase
    actions = parse_script(str(sc.script))
    shots = [int(i) for i in sc.frames]
    rows = []
    for name in sc.worlds:
        world_cfg = OmegaConf.load(WORLDS / f"{name}.yaml")
        sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        sub.world = world_cfg
        sim = build_world(world_cfg)
        engine = build_engine(sub, build_world(world_cfg))
        truth = [sim.reset(int(cfg.seed))]
        gen = [engine.reset(int(cfg.seed))]
        for a in actions[: max(shots)]:  # one chunk per action: the simulator steps as often
            for _ in range(engine.chunk_size):
                frame = sim.step(a)
            truth.append(frame)
            gen.append(engine.step([a] * engine.chunk_size)[-1])
        pad = np.full((truth[0].shape[0], 4, 3), 255, np.uint8)
        cells = [np.concatenate([truth[i], pad, gen[i]], axis=1) for i in shots]
        gap = np.full((truth[0].shape[0], 12, 3), 255, np.uint8)
        rows.append(np.concatenate(sum(([c, gap] for c in cells), [])[:-1], axis=1))
        rows.append(np.full((8, rows[-1].shape[1], 3), 255, np.uint8))
    img = np.concatenate(rows[:-1], axis=0)
    return np.repeat(np.repeat(img, int(sc.scale), 0), int(sc.scale), 1)


@hydra.main(config_path="../conf", config_name="showcase", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with cli_errors("runtime.showcase"):  # bad settings, a missing checkpoint: one line, exit 2
        check(cfg)
        if cfg.engine.kind == "neural":  # the checkpoint is there and readable
            read_metadata(resolve_path(str(cfg.engine.checkpoint)))
    img = render(cfg, checked=True)
    Path(str(cfg.out)).parent.mkdir(parents=True, exist_ok=True)
    imageio.imwrite(str(cfg.out), img)
    print(f"wrote {cfg.out} ({img.shape[1]}x{img.shape[0]})")


if __name__ == "__main__":
    main()
