"""The pygame window under SDL's dummy driver, and once for real under Xvfb + xdotool."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, compose, read_video

pygame = pytest.importorskip("pygame")

from controllers import build_controller  # noqa: E402
from runtime.engine import build_engine  # noqa: E402
from runtime.recorder import Recording  # noqa: E402
from runtime.window import COMMANDS, Window, WindowConfig  # noqa: E402
from worlds import build_world  # noqa: E402
from worlds.actions import IDLE, RIGHT  # noqa: E402


def make_window(tmp_path: Path, controller: str = "keyboard", **window_kwargs) -> Window:
    cfg = compose(["engine=simulator", f"controller={controller}"])
    engine = build_engine(cfg, build_world(cfg.world))
    recording = Recording(30, lambda: {"seed": 0}, root=tmp_path / "recordings")
    return Window(WindowConfig(**window_kwargs), engine, build_controller(cfg), seed=0, recording=recording)


def tick_until(window: Window, done, max_ticks: int = 20000) -> None:
    """Tick (no pacing) until done(); the producer thread fills the queue meanwhile."""
    for _ in range(max_ticks):
        if done():
            return
        window.tick()
        time.sleep(0.0005)
    raise AssertionError("the window never got there")


def key(kind: int, code: int, char: str = "") -> None:
    pygame.event.post(pygame.event.Event(kind, key=code, mod=0, unicode=char, scancode=0))


def frames_after(window: Window, count: int) -> None:
    target = window.num_presented + count
    tick_until(window, lambda: window.num_presented >= target)


def test_held_key_moves_the_player(tmp_path):
    window = make_window(tmp_path).start()
    try:
        world = window.engine.world
        frames_after(window, 3)
        key(pygame.KEYDOWN, pygame.K_RIGHT)
        window.command("record")  # records from a fresh reset, so moves start from the spawn
        frames_after(window, 24)
        key(pygame.KEYUP, pygame.K_RIGHT)
        frames_after(window, 8)
        path = window.recording.recorder.path
        window.command("record")
    finally:
        window.close()
    actions = [json.loads(line)["action_id"] for line in (path / "actions.jsonl").read_text().splitlines()]
    assert actions.count(RIGHT) >= 20 and actions[-1] == IDLE
    # the recorded frames are the world's answer to those actions: the player went right
    world.reset(0)
    start = world.player_pos.copy()
    truth = [world.step(a) for a in actions]
    assert world.player_pos[1] > start[1] and world.player_pos[0] == start[0]
    video = read_video(path / "video.mp4")
    assert len(video) == len(actions)
    assert np.abs(video[-1].astype(float) - truth[-1]).mean() < 4.0


def test_pause_step_reset_and_toggles(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    window = make_window(tmp_path, controller="scripted").start()
    try:
        frames_after(window, 5)
        key(pygame.KEYDOWN, pygame.K_p)
        window.tick()
        assert window.paused
        shown = window.num_presented
        for _ in range(30):
            window.tick()
            time.sleep(0.001)
        assert window.num_presented == shown  # paused: nothing new is shown
        key(pygame.KEYDOWN, pygame.K_n)
        tick_until(window, lambda: window.num_presented == shown + 1)
        for _ in range(30):
            window.tick()
        assert window.num_presented == shown + 1  # exactly one frame per N
        key(pygame.KEYDOWN, pygame.K_p)
        frames_after(window, 3)

        index = window.current.index
        key(pygame.KEYDOWN, pygame.K_r)
        tick_until(window, lambda: window.current.epoch == 1 and window.current.index >= 0)
        assert window.current.index < index

        key(pygame.KEYDOWN, pygame.K_t)  # screenshot into the current directory
        window.tick()
        shots = list(tmp_path.glob("screenshot-*.png"))
        assert len(shots) == 1
        assert pygame.image.load(str(shots[0])).get_size() == window.size

        hud = window.show_hud
        key(pygame.KEYDOWN, pygame.K_h)
        key(pygame.KEYDOWN, pygame.K_SLASH, "?")  # '?' is typed, not a key of its own
        window.tick()
        assert window.show_hud != hud and window.show_help
        text = "\n".join(window.help_lines())
        assert all(description in text for description in COMMANDS.values())
        key(pygame.KEYDOWN, pygame.K_F1)
        key(pygame.KEYDOWN, pygame.K_q)
        assert window.tick() is False and not window.show_help
    finally:
        window.close()


def test_recording_from_the_window(tmp_path):
    window = make_window(tmp_path, controller="scripted").start()
    try:
        frames_after(window, 4)
        key(pygame.KEYDOWN, pygame.K_F5)
        window.tick()
        assert window.recording.active
        path = window.recording.recorder.path
        frames_after(window, 12)
        key(pygame.KEYDOWN, pygame.K_c)
        window.tick()
        assert not window.recording.active
    finally:
        window.close()
    rows = [json.loads(line) for line in (path / "actions.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in rows] == list(range(len(rows))) and len(rows) >= 12
    assert len(read_video(path / "video.mp4")) == len(rows)
    script = build_controller(compose(["controller=scripted"]))
    assert [r["action_id"] for r in rows] == script.actions(len(rows))  # from a fresh reset


def test_a_recording_or_screenshot_that_cannot_be_written_is_said_and_play_goes_on(tmp_path, monkeypatch):
    """F5 where the recordings' place cannot be written (a file stands there), and F12 when
    the picture cannot be saved: the window says so, and frames keep coming."""
    window = make_window(tmp_path, controller="scripted")
    (tmp_path / "recordings").write_text("a file where the recordings would go")
    window.start()
    try:
        frames_after(window, 3)
        epoch = window.producer.epoch
        window.command("record")
        assert not window.recording.active and window.message.startswith("cannot record: ")
        assert window.producer.epoch == epoch  # nothing was reset for a recording that did not start

        def refuse(surface, path):
            raise pygame.error(f"Couldn't open {path}")

        monkeypatch.setattr(pygame.image, "save", refuse)
        assert window.screenshot() is None and window.message.startswith("screenshot not saved: Couldn't open")
        frames_after(window, 3)
    finally:
        window.close()


def test_max_frames_stops_the_window(tmp_path):
    window = make_window(tmp_path, controller="scripted", fps=1000)
    window.max_frames = 10
    assert window.run() == 10


def _free_display() -> int:
    for number in range(90, 200):
        if not Path(f"/tmp/.X{number}-lock").exists() and not Path(f"/tmp/.X11-unix/X{number}").exists():
            return number
    raise RuntimeError("no free X display number")


@pytest.mark.skipif(not (shutil.which("Xvfb") and shutil.which("xdotool")), reason="needs Xvfb and xdotool")
def test_real_window_under_xvfb(tmp_path):
    number = _free_display()
    display = f":{number}"
    xvfb = subprocess.Popen(["Xvfb", display, "-screen", "0", "800x600x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {k: v for k, v in os.environ.items() if k not in ("SDL_VIDEODRIVER", "SDL_AUDIODRIVER")}
    env.update(DISPLAY=display, SDL_AUDIODRIVER="dummy")
    title = f"xvfb-test-{os.getpid()}"
    rec = tmp_path / "rec"
    play = None

    def xdotool(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["xdotool", *args], env=env, capture_output=True, text=True, timeout=30)

    def lines() -> list[dict]:
        if not (rec / "actions.jsonl").exists():
            return []
        return [json.loads(s) for s in (rec / "actions.jsonl").read_text().splitlines() if s.endswith("}")]

    def wait_for(condition, what: str, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if condition():
                return
            assert play is None or play.poll() is None, play.communicate()
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    try:
        wait_for(lambda: Path(f"/tmp/.X11-unix/X{number}").exists(), "Xvfb")
        play = subprocess.Popen(
            [sys.executable, str(REPO / "play.py"), "engine=simulator", "controller=keyboard",
             "window.fps=30", f"window.title={title}", "max_frames=3000", f"record.path={rec}"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        window_ids: list[str] = []

        def found() -> bool:
            # `search --name` misses SDL's UTF-8 title on some xdotool builds: list and compare
            candidates = xdotool("search", "--class", ".").stdout.split()
            window_ids[:] = [w for w in candidates if xdotool("getwindowname", w).stdout.strip() == title]
            return bool(window_ids)

        wait_for(found, "the game window")
        wait_for(lambda: len(lines()) >= 5, "the first frames")
        xdotool("windowfocus", "--sync", window_ids[0])
        xdotool("keydown", "Right")
        wait_for(lambda: sum(r["action"] == "right" for r in lines()) >= 15, "'right' actions")
        xdotool("keyup", "Right")
        wait_for(lambda: lines()[-1]["action"] == "idle", "the key release")
        xdotool("key", "q")
        out, err = play.communicate(timeout=60)
        assert play.returncode == 0, err
    finally:
        if play is not None and play.poll() is None:
            play.kill()
        xvfb.terminate()
        xvfb.wait(10)
    rows = lines()
    assert len(read_video(rec / "video.mp4")) == len(rows)
    world = build_world(compose().world)
    world.reset(0)
    start = world.player_pos.copy()
    for row in rows:
        world.step(row["action_id"])
    assert world.player_pos[1] > start[1]  # the held key moved the player right


def test_a_frame_is_scaled_once_however_many_ticks_show_it(tmp_path, monkeypatch):
    window = make_window(tmp_path, controller="scripted").start()
    scaled = []
    real_scale = pygame.transform.scale

    def counting_scale(surface, size):
        scaled.append(size)
        return real_scale(surface, size)

    monkeypatch.setattr(pygame.transform, "scale", counting_scale)
    try:
        frames_after(window, 2)
        window.command("pause")
        shown = window.current
        before = len(scaled)
        for _ in range(5):  # paused: the same frame on every tick
            window.tick()
        assert window.current is shown and len(scaled) == before
        window.command("step")
        tick_until(window, lambda: window.current is not shown)
        window.tick()
        assert len(scaled) == before + 1  # the next frame is scaled once
        assert window.screen.get_at((0, 0))[:3] == tuple(window.current.frame[0, 0])
    finally:
        window.close()


@pytest.mark.parametrize("window, off_main", [("pygame", True), ("headless", False)])
def test_play_builds_the_engine_on_the_thread_pool_it_will_run_on(monkeypatch, window, off_main):
    """With a window, the producer thread runs the engine: play builds it on a thread that
    exits, so the main thread never owns a torch thread pool (runtime.loop.build_off_main_thread).
    Headless play runs it on the main thread, and builds it there."""
    import threading

    import play

    threads = []
    real_build = play.build_engine

    def build_engine(cfg, world):
        threads.append(threading.current_thread())
        return real_build(cfg, world)

    monkeypatch.setattr(play, "build_engine", build_engine)
    session = play.build(compose(["engine=simulator", f"window={window}", "controller=scripted"]))
    if session.window is not None:
        session.window.close()
    assert len(threads) == 1
    assert (threads[0] is not threading.main_thread()) == off_main
