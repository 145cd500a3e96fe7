"""Actions from a script: `R*30 D*30 P L*4 I*10`. The script grammar is in the README.

Tokens are separated by whitespace; each is one action letter (I idle, U up, D down,
L left, R right, P place), optionally followed by `*COUNT` (default 1). When the script
ends the controller idles, or starts over if `loop` is set.
"""
from __future__ import annotations

from dataclasses import dataclass

from worlds.actions import IDLE, LETTERS


@dataclass
class ScriptedConfig:
    kind: str = "scripted"
    script: str = "R*30 D*30 L*30 U*30"
    loop: bool = False


def parse_script(script: str) -> list[int]:
    """Expand a script into one action id per frame; ValueError names a bad token."""
    if not isinstance(script, str):
        raise ValueError(f"controller.script must be a string like 'R*30 D*30', got {script!r}")
    actions: list[int] = []
    for token in script.split():
        letter, star, count_text = token.partition("*")
        if letter.upper() not in LETTERS or len(letter) != 1:
            raise ValueError(
                f"bad script token {token!r}: expected ACTION or ACTION*COUNT with ACTION one of "
                f"{' '.join(LETTERS)}"
            )
        count = 1
        if star:
            if not count_text.isdigit() or int(count_text) < 1:
                raise ValueError(f"bad script token {token!r}: COUNT must be a positive integer")
            count = int(count_text)
        actions.extend([LETTERS[letter.upper()]] * count)
    return actions


class ActionSequence:
    """Hands out a fixed list of actions in order, then idles (or starts over if `loop`)."""

    needs_window = False
    script: list[int]
    loop: bool = False

    def reset(self) -> None:
        self._pos = 0

    def actions(self, n: int) -> list[int]:
        if n < 1:
            raise ValueError(f"actions(n) needs n >= 1, got {n}")
        out = []
        for _ in range(n):
            if self._pos >= len(self.script) and self.loop:
                self._pos = 0
            out.append(self.script[self._pos] if self._pos < len(self.script) else IDLE)
            self._pos += 1
        return out


class ScriptedController(ActionSequence):
    """Plays a fixed action script, then idles (or loops)."""

    num_frames: int | None = None  # idles (or loops) forever after the script

    def __init__(self, cfg: ScriptedConfig | None = None):
        self.cfg = cfg or ScriptedConfig()
        self.script = parse_script(self.cfg.script)
        self.loop = bool(self.cfg.loop)
        if self.loop and not self.script:
            raise ValueError("controller.loop=true needs a non-empty controller.script")
        self.reset()
