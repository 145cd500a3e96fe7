"""Actions from the keyboard: held keys, tracked from key-down / key-up events.

The window forwards every key event to `handle_event`; the frame producer (another
thread) asks for `actions(n)` when it starts a chunk. Rules:
- the most recently pressed direction that is still held wins; nothing held = idle;
- a direction tapped and released between two chunks still moves one frame, so short
  taps are never lost;
- place fires once per press, on the first frame of the next chunk.
Bindings come from the keymap in `conf/controller/keyboard.yaml`, not from code.
Keys are tracked from events, not from `pygame.key.get_pressed`, so the state is exact
even when events arrive faster than frames.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from controllers.keymap import Keymap
from worlds.actions import ACTIONS, IDLE, NAMES, PLACE

DIRECTIONS = ("up", "down", "left", "right")


def _default_keymap() -> dict[str, list[str]]:
    return {"up": ["up", "w"], "down": ["down", "s"], "left": ["left", "a"],
            "right": ["right", "d"], "place": ["space"]}


@dataclass
class KeyboardConfig:
    kind: str = "keyboard"
    keymap: dict[str, list[str] | str] = field(default_factory=_default_keymap)


class KeyboardController:
    """Turns held keys into one action per frame."""

    needs_window = True
    num_frames: int | None = None  # never runs out

    def __init__(self, cfg: KeyboardConfig | None = None):
        self.cfg = cfg or KeyboardConfig()
        self.keymap = Keymap(self.cfg.keymap, allowed=ACTIONS, where="controller.keymap")
        self._lock = threading.Lock()
        self._held: list[str] = []  # held keys bound to directions, oldest first
        self._tapped: int | None = None  # direction pressed since the last chunk
        self._place_pending = False

    def reset(self) -> None:
        """A new play-through: forget pending presses (keys still held stay held)."""
        with self._lock:
            self._tapped = None
            self._place_pending = False

    def release_all(self) -> None:
        """Forget every held key (the window lost focus, so key-ups will not arrive)."""
        with self._lock:
            self._held.clear()
            self._tapped = None
            self._place_pending = False

    def handle_event(self, event: Any) -> bool:
        """Consume a pygame KEYDOWN / KEYUP event; returns True if it was a bound key."""
        import pygame

        if event.type not in (pygame.KEYDOWN, pygame.KEYUP):
            return False
        name = pygame.key.name(event.key)
        char = getattr(event, "unicode", "") if event.type == pygame.KEYDOWN else ""
        if event.type == pygame.KEYDOWN:
            return self.press(name, char)
        return self.release(name)

    def press(self, key: str, char: str = "") -> bool:
        binding = self.keymap.lookup(key, char)
        if binding is None:
            return False
        with self._lock:
            if binding == "place":
                self._place_pending = True
            elif binding in DIRECTIONS:
                if key in self._held:
                    self._held.remove(key)  # key repeat: keep one entry, now most recent
                self._held.append(key)
                self._tapped = NAMES[binding]
        return True

    def release(self, key: str) -> bool:
        if self.keymap.lookup(key) is None:
            return False
        with self._lock:
            if key in self._held:
                self._held.remove(key)
        return True

    def held_action(self) -> int:
        """The direction of the most recently pressed key still held, else idle."""
        with self._lock:
            return self._direction_locked()

    def _direction_locked(self) -> int:
        if self._held:
            return NAMES[self.keymap.lookup(self._held[-1])]
        return IDLE

    def actions(self, n: int) -> list[int]:
        if n < 1:
            raise ValueError(f"actions(n) needs n >= 1, got {n}")
        with self._lock:
            move = self._direction_locked()
            first = move
            if self._place_pending:
                first = PLACE
            elif move == IDLE and self._tapped is not None:
                first = self._tapped
            self._place_pending = False
            self._tapped = None
        return [first] + [move] * (n - 1)
