"""Actions from a recording: replays DIR/actions.jsonl written by `runtime.recorder`.

The recording's seed (from DIR/meta.json) is exposed as `seed`; play.py resets the
engine with it so that, with the same engine and device, the frames come out identical.
The recording's length is exposed as `num_frames`: the run stops there. Anything
missing, unreadable or corrupt raises ValueError naming the file and line, and so do an
empty action log and one whose length disagrees with a closed recording's meta.json (a
recording cut off by a crash, never closed, replays the actions it has).

actions.jsonl holds one JSON object a line, {"frame": N, "action": NAME, "action_id": ID}
with frames 0, 1, 2... in order; a row may give the name, the id or both (both must
agree). Blank (whitespace-only) lines are skipped wherever they are, so an editor's
trailing newline does no harm; the frame numbers still catch a row that went missing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controllers.scripted import ActionSequence
from runtime.configs import is_int
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
    # the fields replay relies on: the seed, whether the recording was closed, its length
    seed = meta.get("seed")
    if not is_int(seed):
        got = "nothing" if "seed" not in meta else repr(seed)
        raise ValueError(f"{meta_path}: 'seed' must be an integer, got {got}")
    if "complete" in meta and not isinstance(meta["complete"], bool):
        raise ValueError(f"{meta_path}: 'complete' must be true or false, got {meta['complete']!r}")
    if "num_frames" in meta:
        num_frames = meta["num_frames"]
        if not is_int(num_frames) or num_frames < 0:
            raise ValueError(f"{meta_path}: 'num_frames' must be an integer >= 0, got {num_frames!r}")
    elif meta.get("complete") is True:
        raise ValueError(f"{meta_path}: 'num_frames' must be an integer >= 0 (the length of a closed "
                         f"recording, complete: true), got nothing")
    return meta


def read_actions(path: Path, cut_tail_ok: bool = False) -> list[int]:
    """The action id of every recorded frame, in order. Blank lines are skipped; a row
    must give its frame number in sequence and an action name, an action_id or both,
    agreeing (ValueError naming the file and line otherwise). With `cut_tail_ok` (a
    recording that was never closed: a crash, a full disk) a last line cut off in the
    middle is dropped rather than an error."""
    actions_path = path / "actions.jsonl"
    try:
        lines = actions_path.read_text().splitlines()
    except FileNotFoundError:
        raise ValueError(f"recording {str(path)!r} has no actions.jsonl (expected {actions_path})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {actions_path}: {err}") from None
    actions = []
    last = max((n for n, line in enumerate(lines, start=1) if line.strip()), default=0)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{actions_path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if cut_tail_ok and number == last:
                break
            raise ValueError(f"{where}: not a JSON object ({err}): {line[:80]!r}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {line[:80]!r}")
        frame = row.get("frame")
        if not is_int(frame) or frame != len(actions):
            raise ValueError(f"{where}: expected frame {len(actions)}, got {frame!r}")
        if "action" not in row and "action_id" not in row:
            raise ValueError(f"{where}: expected an action_id in 0..{NUM_ACTIONS - 1} or an action "
                             f"name in {list(ACTIONS)}, got {line[:80]!r}")
        action_id = row.get("action_id")
        if "action_id" in row and (not is_int(action_id) or not 0 <= action_id < NUM_ACTIONS):
            raise ValueError(f"{where}: action_id must be an integer in 0..{NUM_ACTIONS - 1}, got {action_id!r}")
        name = row.get("action")
        if "action" in row and name not in ACTIONS:
            raise ValueError(f"{where}: unknown action name {name!r}; expected one of {list(ACTIONS)}")
        if "action" in row:
            if "action_id" in row and action_id != ACTIONS.index(name):
                raise ValueError(f"{where}: action {name!r} and action_id {action_id} disagree ({name!r} is "
                                 f"action_id {ACTIONS.index(name)}, {action_id} is {ACTIONS[action_id]!r})")
            action_id = ACTIONS.index(name)
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
        self.script = read_actions(path, cut_tail_ok=self.meta.get("complete") is not True)
        if not self.script:
            raise ValueError(f"recording {cfg.path!r} has no actions ({path / 'actions.jsonl'} is empty or blank)")
        # read_meta checked the types: seed an integer, num_frames one >= 0 (present when complete is true)
        recorded = self.meta.get("num_frames")
        if self.meta.get("complete") is True and recorded != len(self.script):
            raise ValueError(f"{path / 'actions.jsonl'} holds {len(self.script)} actions, but {path / 'meta.json'} "
                             f"says the recording has {recorded!r} frames: one of the files was cut short or changed")
        self.seed: int = self.meta["seed"]
        self.num_frames: int | None = len(self.script)
        self.reset()
