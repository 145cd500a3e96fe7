"""The pygame window: shows frames at a steady rate, draws the HUD, handles window keys.

The window is the presenter half of `runtime.loop`: a `Producer` thread generates
frames into a bounded queue and the window takes one per tick of a `FixedClock`
(re-showing the last frame, and counting a stall, when none is ready). Frames are
scaled up by an integer factor with nearest-neighbour sampling, so pixels stay crisp.

Window commands are bound by the keymap in `conf/window/pygame.yaml`; movement keys
belong to the keyboard controller, which gets every key event the window does not use.
A recording started from the window (F5 / C) starts a fresh play-through from the seed,
so that it can be replayed; reset (R) ends the open recording first.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from controllers.keymap import Keymap, check_disjoint
from runtime.hud import FpsMeter, Hud, HudValues
from runtime.loop import FixedClock, FrameItem, Producer
from runtime.recorder import Recording

COMMANDS: dict[str, str] = {
    "pause": "pause / resume",
    "step": "next frame (while paused)",
    "reset": "reset the world (ends a recording)",
    "screenshot": "save a PNG (cwd, or the recording dir)",
    "record": "start (from a fresh reset) / stop recording",
    "hud": "show / hide the HUD",
    "help": "show / hide this help",
    "quit": "quit",
}


def _default_keys() -> dict[str, list[str]]:
    return {"pause": ["p"], "step": ["n"], "reset": ["r"], "screenshot": ["f12", "t"],
            "record": ["f5", "c"], "hud": ["h"], "help": ["f1", "?"], "quit": ["q", "escape"]}


@dataclass
class WindowConfig:
    kind: str = "pygame"
    fps: float = 30.0  # presented frames per second
    scale: int = 8  # integer nearest-neighbour upscale (64x64 -> 512x512)
    queue_size: int = 3  # frames between producer and presenter (at least one chunk)
    hud: bool = True
    title: str = "neural game engine"
    keys: dict[str, list[str] | str] = field(default_factory=_default_keys)

    def __post_init__(self) -> None:
        if not isinstance(self.scale, int) or self.scale < 1:
            raise ValueError(f"window.scale must be an integer >= 1, got {self.scale!r}")
        if not self.fps or self.fps <= 0:
            raise ValueError(f"window.fps must be > 0, got {self.fps!r}")


class Window:
    """Presents a producer's frames; `run()` until quit, or drive it with `tick()`."""

    def __init__(self, cfg: WindowConfig, engine: Any, controller: Any, seed: int,
                 recording: Recording | None = None, max_frames: int | None = None,
                 on_present: Callable[[float], None] | None = None):
        import pygame

        self.pg = pygame
        self.cfg = cfg
        self.keys = Keymap(cfg.keys, allowed=COMMANDS, where="window.keys")
        if getattr(controller, "keymap", None) is not None:
            check_disjoint(controller.keymap, "controller.keymap", self.keys, "window.keys")
        self.engine = engine
        self.controller = controller
        self.recording = recording
        self.max_frames = max_frames
        self.on_present = on_present
        self.producer = Producer(engine, controller, seed, cfg.queue_size)

        height, width, _ = engine.frame_shape
        self.size = (width * cfg.scale, height * cfg.scale)
        # Let the presenter thread take the GIL back promptly from a Python-heavy producer.
        sys.setswitchinterval(0.0005)
        pygame.display.init()
        driver = pygame.display.get_driver()
        if driver in ("offscreen", "dummy") and os.environ.get("SDL_VIDEODRIVER") != driver:
            pygame.display.quit()
            raise ValueError(
                f"window=pygame needs a display, but SDL found none (it fell back to the {driver!r} "
                "driver; is DISPLAY set?); run with window=headless, or set SDL_VIDEODRIVER=dummy "
                "to draw off-screen on purpose")
        self.screen = pygame.display.set_mode(self.size)
        pygame.display.set_caption(cfg.title)
        self.hud = Hud()
        self.meter = FpsMeter()

        self.current: FrameItem | None = None
        self._scaled_item: FrameItem | None = None  # the item `_scaled` shows, scaled to the window
        self._scaled = None
        self.show_hud = cfg.hud
        self.show_help = False
        self.paused = False
        self.step_requests = 0
        self.stalls = 0
        self.num_presented = 0  # generated frames shown (all play-throughs)
        self.quit_requested = False
        self.message = ""
        self._message_until = 0.0

    # ---- input -------------------------------------------------------------------
    def handle_events(self) -> None:
        pg = self.pg
        for event in pg.event.get():
            if event.type == pg.QUIT:
                self.quit_requested = True
            elif event.type == pg.WINDOWFOCUSLOST and hasattr(self.controller, "release_all"):
                self.controller.release_all()  # key-ups will not arrive while unfocused
            elif event.type == pg.KEYDOWN:
                command = self.keys.lookup(pg.key.name(event.key), getattr(event, "unicode", ""))
                if command is not None:
                    self.command(command)
                elif self.controller.needs_window:
                    self.controller.handle_event(event)
            elif event.type == pg.KEYUP and self.controller.needs_window:
                self.controller.handle_event(event)

    def command(self, name: str) -> None:
        """Carry out one window command (the names of `COMMANDS`)."""
        if name == "pause":
            self.paused = not self.paused
            self.step_requests = 0
        elif name == "step":
            if self.paused:
                self.step_requests += 1
        elif name == "reset":
            self._stop_recording()
            self.producer.request_reset()
            self.say("reset")
        elif name == "screenshot":
            self.screenshot()
        elif name == "record":
            if self.recording is None:
                self.say("recording is not available")
            elif self.recording.active:
                self._stop_recording()
            else:
                try:
                    path = self.recording.start()
                except OSError as err:  # record.dir became unwritable, or the disk is full: play on
                    self.say(f"cannot record: {err}", seconds=5.0)
                else:
                    self.producer.request_reset()  # a recording is a play-through from the seed
                    self.say(f"recording to {path}")
        elif name == "hud":
            self.show_hud = not self.show_hud
        elif name == "help":
            self.show_help = not self.show_help
        elif name == "quit":
            self.quit_requested = True

    def _stop_recording(self) -> None:
        if self.recording is not None and self.recording.active:
            path = self.recording.recorder.path
            count = self.recording.stop()
            self.say(f"recorded {count} frames to {path}")

    def say(self, message: str, seconds: float = 3.0) -> None:
        self.message = message
        self._message_until = time.perf_counter() + seconds
        print(message, flush=True)

    # ---- frames ------------------------------------------------------------------
    def take_frame(self) -> None:
        """Take the next frame from the producer if this tick shows a new one."""
        stale = self.current is None or self.current.epoch != self.producer.epoch
        if self.paused and not stale and self.step_requests == 0:
            return
        item = self.producer.get()
        if item is None:
            if not self.paused and not stale:
                self.stalls += 1
            return
        self.current = item
        if item.index < 0:
            return  # the reset frame: shown, neither recorded nor counted
        if self.paused:
            self.step_requests -= 1
        self.num_presented += 1
        if self.recording is not None:
            self.recording.on_frame(item.action, item.frame)

    def draw(self) -> None:
        pg = self.pg
        if self.current is None:
            self.screen.fill((0, 0, 0))
        else:
            if self._scaled_item is not self.current:  # scale each frame once, not on every tick that shows it
                frame = np.ascontiguousarray(self.current.frame)
                height, width, _ = frame.shape
                small = pg.image.frombuffer(frame.tobytes(), (width, height), "RGB")
                self._scaled = pg.transform.scale(small, self.size)  # nearest neighbour
                self._scaled_item = self.current
            self.screen.blit(self._scaled, (0, 0))
        if self.message and time.perf_counter() > self._message_until:
            self.message = ""
        if self.show_hud:
            self.hud.draw(self.screen, self.hud_values())
        elif self.message:
            self.hud.draw_help(self.screen, [self.message])
        if self.show_help:
            self.hud.draw_help(self.screen, self.help_lines())

    def hud_values(self) -> HudValues:
        item = self.current
        recording = None
        if self.recording is not None and self.recording.active:
            recording = str(self.recording.recorder.path)
        return HudValues(
            presented_fps=self.meter.fps, target_fps=self.cfg.fps,
            latency_ms=item.latency_ms if item else 0.0,
            frame_index=max(item.index, 0) if item else 0,
            cache_tokens=item.cache_tokens if item else None,
            memory_mb=item.memory_mb if item else None,
            stalls=self.stalls, queued=self.producer.queue.qsize(), paused=self.paused,
            recording=recording, message=self.message, attention=item.attention if item else None,
        )

    def help_lines(self) -> list[str]:
        lines = ["keys"]
        controller_keys = getattr(self.controller, "keymap", None)
        if controller_keys is not None:
            for action in controller_keys.bindings:
                lines.append(f"{controller_keys.describe(action):>14}  {action}")
        for name, text in COMMANDS.items():
            lines.append(f"{self.keys.describe(name):>14}  {text}")
        return lines

    def screenshot(self) -> Path | None:
        if self.current is None:
            return None
        folder = Path.cwd()
        if self.recording is not None and self.recording.active:
            folder = self.recording.recorder.path
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = folder / f"screenshot-{stamp}-frame{max(self.current.index, 0):06d}.png"
        frame = np.repeat(np.repeat(self.current.frame, self.cfg.scale, 0), self.cfg.scale, 1)
        surface = self.pg.image.frombuffer(np.ascontiguousarray(frame).tobytes(), self.size, "RGB")
        try:
            self.pg.image.save(surface, os.fspath(path))
        except (OSError, self.pg.error) as err:  # a read-only or full place: say so and play on
            self.say(f"screenshot not saved: {err}", seconds=5.0)
            return None
        self.say(f"screenshot saved to {path}")
        return path

    # ---- the loop ----------------------------------------------------------------
    def prepare(self) -> bool:
        """Input, take a frame, draw it off-screen. False: stop."""
        self.handle_events()
        if self.quit_requested:
            return False
        self.take_frame()
        self.draw()
        return True

    def present(self) -> bool:
        """Show what `prepare` drew. False: max_frames reached."""
        self.pg.display.flip()
        now = time.perf_counter()
        self.meter.tick(now)
        if self.on_present is not None:
            self.on_present(now)
        return self.max_frames is None or self.num_presented < self.max_frames

    def tick(self) -> bool:
        """One presenter tick with no waiting (tests drive the window with this)."""
        return self.prepare() and self.present()

    def start(self) -> "Window":
        self.producer.start()
        return self

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> int:
        """Present at `fps` until quit, `max_frames` or `should_stop()`; returns frames shown."""
        self.start()
        clock = FixedClock(self.cfg.fps)
        try:
            # prepare the next picture, then flip it exactly on the clock's deadline
            while not should_stop() and self.prepare():
                clock.wait()
                if not self.present():
                    break
        finally:
            self.close()
        return self.num_presented

    def close(self) -> None:
        self.producer.stop()
        self._stop_recording()
        self.pg.display.quit()
