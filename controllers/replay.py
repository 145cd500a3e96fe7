"""Actions from a recording: replays DIR/actions.jsonl written by `runtime.recorder`.

The recording's seed (from DIR/meta.json) is exposed as `seed`; play.py resets the
engine with it so that, with the same engine and device, the frames come out identical.
The recording's length is exposed as `num_frames`: the run stops there. Anything
missing, unreadable or corrupt raises ValueError naming the file and line, and so do an
empty action log and one whose length disagrees with a closed recording's meta.json (a
recording cut off by a crash, never closed, replays the actions it has).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controllers.scripted import ActionSequence
from worlds.actions import ACTIONS, NUM_ACTIONS


@dataclass
class ReplayConfig:
    kind: str = "replay"
    path: str | None = None


def read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ValueError(f"recording {str(path)!r} has no meta.json (expected {meta_path})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {meta_path}: {err}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def read_actions(path: Path) -> list[int]:
    """The action id of every recorded frame, in order."""
    actions_path = path / "actions.jsonl"
    try:
        lines = actions_path.read_text().splitlines()
    except FileNotFoundError:
        raise ValueError(f"recording {str(path)!r} has no actions.jsonl (expected {actions_path})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {actions_path}: {err}") from None
    actions = []
    for number, line in enumerate(lines, start=1):
        where = f"{actions_path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not a JSON object ({err}): {line[:80]!r}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {line[:80]!r}")
        if row.get("frame") != len(actions):
            raise ValueError(f"{where}: expected frame {len(actions)}, got {row.get('frame')!r}")
        action_id = row.get("action_id")
        if action_id is None and row.get("action") in ACTIONS:
            action_id = ACTIONS.index(row["action"])
        if not isinstance(action_id, int) or not 0 <= action_id < NUM_ACTIONS:
            raise ValueError(f"{where}: expected action_id in 0..{NUM_ACTIONS - 1} or an action "
                             f"name in {list(ACTIONS)}, got {line[:80]!r}")
        actions.append(action_id)
    return actions


class ReplayController(ActionSequence):
    """Yields the recorded actions, then idles; `num_frames` says where to stop."""

    def __init__(self, cfg: ReplayConfig):
        if not cfg.path:
            raise ValueError("controller=replay needs controller.path=DIR (a directory written by record.path)")
        path = Path(cfg.path)
        if not path.is_dir():
            raise ValueError(f"controller.path {cfg.path!r} is not a directory with a recording")
        self.cfg = cfg
        self.meta = read_meta(path)
        self.script = read_actions(path)
        if not self.script:
            raise ValueError(f"recording {cfg.path!r} has no actions ({path / 'actions.jsonl'} is empty)")
        recorded = self.meta.get("num_frames")
        if self.meta.get("complete") is True and recorded != len(self.script):
            raise ValueError(f"{path / 'actions.jsonl'} holds {len(self.script)} actions, but {path / 'meta.json'} "
                             f"says the recording has {recorded!r} frames: one of the files was cut short or changed")
        seed = self.meta.get("seed")
        if not isinstance(seed, int):
            raise ValueError(f"{path / 'meta.json'}: expected an integer 'seed', got {seed!r}")
        self.seed: int = seed
        self.num_frames: int | None = len(self.script)
        self.reset()
