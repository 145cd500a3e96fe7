"""Heads-up display: the numbers drawn over the game, and the help overlay.

Knows pygame surfaces and fonts, nothing of engines or threads: the window hands it
plain values (`HudValues`) each tick.
"""
from __future__ import annotations

import collections
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

    def __init__(self, font_size: int = 16):
        import pygame

        pygame.font.init()
        self.font = pygame.font.Font(None, font_size)
        self.line_h = self.font.get_linesize()

    def _box(self, surface, lines: list[str], topleft: tuple[int, int], alpha: int) -> None:
        import pygame

        rendered = [self.font.render(line, True, (255, 255, 255)) for line in lines]
        width = max((r.get_width() for r in rendered), default=0) + 8
        height = self.line_h * len(rendered) + 6
        box = pygame.Surface((width, height), pygame.SRCALPHA)
        box.fill((0, 0, 0, alpha))
        for i, r in enumerate(rendered):
            box.blit(r, (4, 3 + i * self.line_h))
        surface.blit(box, topleft)

    def draw(self, surface, values: HudValues) -> None:
        self._box(surface, hud_lines(values), (4, 4), alpha=150)

    def draw_help(self, surface, lines: list[str]) -> None:
        rendered_w = max(self.font.size(line)[0] for line in lines) + 8
        rendered_h = self.line_h * len(lines) + 6
        x = max(0, (surface.get_width() - rendered_w) // 2)
        y = max(0, (surface.get_height() - rendered_h) // 2)
        self._box(surface, lines, (x, y), alpha=200)
