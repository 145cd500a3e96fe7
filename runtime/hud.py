"""Heads-up display: the numbers drawn over the game, and the help overlay.

Knows pygame surfaces and fonts, nothing of engines or threads: the window hands it
plain values (`HudValues`) each tick. Rendering text every tick cost the producer thread
frames (it runs on the presenter's core and holds the GIL), so the HUD box is composed
again only when its text changes, and its numbers at most every `refresh_s` seconds;
state lines (pause, recording, messages) show at once. Every tick blits the kept box.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass


@dataclass
class HudValues:
    presented_fps: float
    target_fps: float
    latency_ms: float
    frame_index: int
    cache_tokens: int | None
    memory_mb: float | None
    stalls: int
    queued: int
    paused: bool
    recording: str | None  # the recording directory, when recording
    message: str = ""  # a transient note ("screenshot saved to ...")
    attention: str | None = None  # density / merge statistics of the attention runtime


class FpsMeter:
    """Presented frames per second over a sliding window of recent ticks."""

    def __init__(self, window: int = 60):
        self.times: collections.deque[float] = collections.deque(maxlen=window)

    def tick(self, t: float) -> None:
        self.times.append(t)

    @property
    def fps(self) -> float:
        if len(self.times) < 2 or self.times[-1] <= self.times[0]:
            return 0.0
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def hud_lines(v: HudValues) -> list[str]:
    lines = [
        f"fps {v.presented_fps:5.1f} / {v.target_fps:g}",
        f"gen {v.latency_ms:6.1f} ms",
        f"frame {v.frame_index}",
        f"stalls {v.stalls}  queue {v.queued}",
    ]
    if v.cache_tokens is not None:
        lines.append(f"cache {v.cache_tokens} tok")
    if v.memory_mb is not None:
        lines.append(f"mem {v.memory_mb:.0f} MB")
    if v.attention:
        lines.append(v.attention)
    if v.paused:
        lines.append("PAUSED (N: step)")
    if v.recording:
        lines.append(f"REC {v.recording}")
    if v.message:
        lines.append(v.message)
    return lines


class Hud:
    """Draws the HUD box (top-left) and the help overlay (centred)."""

    def __init__(self, font_size: int = 16, refresh_s: float = 0.25):
        import pygame

        if not refresh_s >= 0:
            raise ValueError(f"window.hud_refresh_s must be >= 0 seconds, got {refresh_s!r}")
        pygame.font.init()
        self.font = pygame.font.Font(None, font_size)
        self.line_h = self.font.get_linesize()
        self.refresh_s = refresh_s
        self.renders = 0  # boxes composed (text rendered), for tests and profiling
        self._hud: tuple[list[str], tuple, float, object] | None = None  # lines, state, time, box
        self._help: tuple[list[str], object] | None = None

    def _compose(self, lines: list[str], alpha: int):
        import pygame

        self.renders += 1
        rendered = [self.font.render(line, True, (255, 255, 255)) for line in lines]
        width = max((r.get_width() for r in rendered), default=0) + 8
        height = self.line_h * len(rendered) + 6
        box = pygame.Surface((width, height), pygame.SRCALPHA)
        box.fill((0, 0, 0, alpha))
        for i, r in enumerate(rendered):
            box.blit(r, (4, 3 + i * self.line_h))
        return box

    def draw(self, surface, values: HudValues, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        lines = hud_lines(values)
        state = (values.paused, values.recording, values.message)
        kept = self._hud
        if kept is None or (lines != kept[0] and (state != kept[1] or now - kept[2] >= self.refresh_s)):
            kept = self._hud = (lines, state, now, self._compose(lines, alpha=150))
        surface.blit(kept[3], (4, 4))

    def draw_help(self, surface, lines: list[str]) -> None:
        if self._help is None or self._help[0] != lines:
            self._help = (list(lines), self._compose(lines, alpha=200))
        box = self._help[1]
        x = max(0, (surface.get_width() - box.get_width()) // 2)
        y = max(0, (surface.get_height() - box.get_height()) // 2)
        surface.blit(box, (x, y))
