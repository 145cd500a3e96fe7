"""Recordings: the headless contract, replay, and recordings that survive Ctrl-C and errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, compose, read_video, run_play

from runtime.recorder import Recorder
from worlds.actions import ACTIONS, DOWN, LEFT, RIGHT, UP

SCRIPT = "R*30 D*30 L*30 U*30"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "actions.jsonl").read_text().splitlines()]


def _simulated_frames(actions: list[int], seed: int) -> np.ndarray:
    from worlds import build_world

    world = build_world(compose().world)
    world.reset(seed)
    return np.stack([world.step(a) for a in actions])


@pytest.mark.parametrize("engine", ["simulator", "neural"])
def test_headless_scripted_recording_then_replay(tmp_path: Path, engine: str):
    rec, rec2 = tmp_path / "rec", tmp_path / "rec2"
    result = run_play([f"engine={engine}", "window=headless", "controller=scripted", f"controller.script={SCRIPT}",
                       "max_frames=120", f"record.path={rec}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    frames = read_video(rec / "video.mp4")
    lines = _lines(rec)
    assert len(frames) == 120 and len(lines) == 120
    expected = [RIGHT] * 30 + [DOWN] * 30 + [LEFT] * 30 + [UP] * 30
    assert [row["frame"] for row in lines] == list(range(120))
    assert [row["action_id"] for row in lines] == expected
    assert [row["action"] for row in lines] == [ACTIONS[a] for a in expected]

    meta = json.loads((rec / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["num_frames"] == 120 and meta["complete"]
    assert meta["config"]["controller"]["script"] == SCRIPT
    assert "checkpoint_sha256" in meta and meta["chunk_size"] >= 1
    assert meta["frame_shape"] == list(frames[0].shape)

    if engine == "simulator":
        # frame i is the frame made by action i (the reset frame is not recorded)
        truth = _simulated_frames(expected, seed=0)
        errors = np.abs(np.stack(frames).astype(float) - truth).mean(axis=(1, 2, 3))
        assert errors.max() < 4.0, errors.max()
    else:
        assert meta["engine"]["kind"] == "neural" and len(meta["checkpoint_sha256"]) == 64
        # the sampler that ran on this device, resolved (sampler.steps null: the device's own)
        assert meta["engine"]["sampler_steps"] == 1 and meta["engine"]["sampler_times"] == [1.0]

    result = run_play([f"engine={engine}", "window=headless", "controller=replay", f"controller.path={rec}",
                       f"record.path={rec2}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "note:" not in result.stderr  # the same engine: nothing to say
    replayed = read_video(rec2 / "video.mp4")
    assert len(replayed) == 120
    assert all(np.array_equal(a, b) for a, b in zip(frames, replayed))
    assert _lines(rec2) == lines
    assert json.loads((rec2 / "meta.json").read_text())["seed"] == 0


def test_replay_uses_the_recorded_seed(tmp_path: Path):
    import play

    rec, rec2 = tmp_path / "rec", tmp_path / "rec2"
    play.play(compose(["window=headless", "controller=scripted", "controller.script=R*5 D*5",
                       "max_frames=12", "seed=5", f"record.path={rec}"]))
    play.play(compose(["window=headless", "controller=replay", f"controller.path={rec}",
                       f"record.path={rec2}"]))
    assert json.loads((rec2 / "meta.json").read_text())["seed"] == 5
    a, b = read_video(rec / "video.mp4"), read_video(rec2 / "video.mp4")
    assert len(a) == len(b) == 12
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("sig, group", [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=["sigint", "sigterm"])
def test_a_stop_signal_leaves_a_playable_recording(tmp_path: Path, sig, group):
    """Ctrl-C in a terminal (SIGINT to the whole process group) and `kill` / `timeout`
    (SIGTERM to the process): the run stops between frames, closes its recording and exits
    with the shell's code for the signal."""
    rec = tmp_path / "rec"
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "play.py"), "window=headless", "controller=scripted",
         f"controller.script={SCRIPT}", "controller.loop=true", "max_frames=1000000",
         f"record.path={rec}"],
        cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (rec / "actions.jsonl").exists() and len(_lines_raw(rec)) >= 40:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + sig, err
    lines = _lines(rec)
    frames = read_video(rec / "video.mp4")
    assert len(lines) >= 40
    assert len(frames) == len(lines)
    meta = json.loads((rec / "meta.json").read_text())
    assert meta["num_frames"] == len(lines) and meta["complete"] is True


def _lines_raw(rec: Path) -> list[str]:
    return [line for line in (rec / "actions.jsonl").read_text().splitlines() if line.endswith("}")]


def test_an_exception_still_closes_the_recording(tmp_path: Path):
    frame = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(RuntimeError, match="boom"):
        with Recorder(tmp_path / "rec", fps=30, meta={"seed": 1}) as recorder:
            for i in range(7):
                frame[:, :, 0] = i * 30
                recorder.write(RIGHT, frame)
            raise RuntimeError("boom")
    assert len(read_video(tmp_path / "rec" / "video.mp4")) == 7
    assert len(_lines(tmp_path / "rec")) == 7
    meta = json.loads((tmp_path / "rec" / "meta.json").read_text())
    assert meta["num_frames"] == 7 and meta["seed"] == 1


def test_chunked_engine_gives_the_same_frames():
    from controllers import build_controller
    from runtime.engine import build_engine
    from runtime.loop import run_headless
    from worlds import build_world

    def rollout(chunk: int) -> list:
        cfg = compose(["engine=simulator", f"engine.chunk_size={chunk}", "controller=scripted"])
        engine = build_engine(cfg, build_world(cfg.world))
        out: list = []
        count = run_headless(engine, build_controller(cfg), 0, 10, lambda i, a, f: out.append((i, a, f.copy())))
        assert count == 10
        return out

    one, four = rollout(1), rollout(4)  # 4 does not divide 10: the last chunk is cut
    assert [(i, a) for i, a, _ in one] == [(i, a) for i, a, _ in four] == [(i, RIGHT) for i in range(10)]
    assert all(np.array_equal(x, y) for (_, _, x), (_, _, y) in zip(one, four))


@pytest.mark.parametrize("engine", ["simulator", "neural"])
def test_engines_take_one_action_per_frame_of_their_chunk(engine: str):
    from runtime.engine import build_engine
    from worlds import build_world

    cfg = compose([f"engine={engine}", "engine.chunk_size=2", "controller=scripted"])
    eng = build_engine(cfg, build_world(cfg.world))
    eng.reset(0)
    for actions in ([RIGHT], [RIGHT, RIGHT, RIGHT]):
        with pytest.raises(ValueError, match=f"expected 2 actions, got {len(actions)}"):
            eng.step(actions)
    assert eng.step([RIGHT, DOWN]).shape == (2, *eng.frame_shape)
    cfg = compose([f"engine={engine}", "engine.chunk_size=0", "controller=scripted"])
    with pytest.raises(ValueError, match="engine.chunk_size must be"):
        build_engine(cfg, build_world(cfg.world))


def test_headless_runs_without_pygame(tmp_path: Path):
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['play.py', 'window=headless', 'controller=scripted', 'max_frames=3']\n"
        f"runpy.run_path({str(REPO / 'play.py')!r}, run_name='__main__')\n"
        "assert 'pygame' not in sys.modules, 'pygame was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    assert "generated 3 frames" in result.stdout


def test_replay_on_another_engine_says_what_differs(tmp_path: Path):
    """A replay whose engine is not the recording's (another checkpoint, device, sampler...)
    still plays the recorded actions and seed, and says on stderr which settings differ."""
    rec = tmp_path / "rec"
    assert run_play(["engine=simulator", "window=headless", "controller=scripted", "controller.script=R*5",
                     "max_frames=5", f"record.path={rec}"], cwd=tmp_path).returncode == 0
    meta = json.loads((rec / "meta.json").read_text())
    meta["engine"].update(kind="neural", checkpoint_sha256="0" * 64, sampler_steps=2)
    meta["world"] = "overworld_snow"
    (rec / "meta.json").write_text(json.dumps(meta))
    result = run_play(["engine=simulator", "window=headless", "controller=replay", f"controller.path={rec}"],
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "note: the replay runs another world or engine" in result.stderr
    assert "world: recorded 'overworld_snow', now 'overworld'" in result.stderr
    assert "kind: recorded 'neural', now 'simulator'" in result.stderr
    assert "checkpoint_sha256: recorded '" + "0" * 64 + "', now None" in result.stderr
    assert "sampler_steps" not in result.stderr  # the simulator has no sampler: not compared


def test_replay_names_the_world_settings_that_differ_and_a_seed_it_does_not_use(tmp_path: Path):
    """The same world name with other settings (here fewer creatures and another grass
    colour) is named key by key; a seed given with a replay is said to be unused, unless
    it is the recording's (written another way)."""
    rec = tmp_path / "rec"
    base = ["engine=simulator", "window=headless"]
    assert run_play([*base, "controller=scripted", "controller.script=R*3", "max_frames=3", "seed=4",
                     "world.num_creatures=0", 'world.tileset.grass.base="#000000"', f"record.path={rec}"],
                    cwd=tmp_path).returncode == 0
    result = run_play([*base, "controller=replay", f"controller.path={rec}", "seed=5"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "world.num_creatures: recorded 0, now 4" in result.stderr
    assert "world.tileset.grass.base: recorded '#000000', now '#5aa83c'" in result.stderr
    assert "world: recorded" not in result.stderr  # the same name
    assert "seed=5 is not used: a replay plays the recording's seed, 4" in result.stderr
    quiet = run_play([*base, "controller=replay", f"controller.path={rec}", "world.num_creatures=0",
                      'world.tileset.grass.base="#000000"', "seed=+4"], cwd=tmp_path)  # the recording's seed
    assert quiet.returncode == 0 and "note:" not in quiet.stderr, quiet.stderr


def test_a_recording_from_before_creatures_faced_their_heading_says_so(tmp_path: Path):
    """A recording whose world config has no creature_facing (made before the key existed)
    was played without it: replayed in today's world, that is named as the difference, and
    replaying with world.creature_facing=false is quiet and gives the recorded frames."""
    import json

    import imageio.v3 as iio

    rec, again = tmp_path / "rec", tmp_path / "again"
    base = ["engine=simulator", "window=headless"]
    assert run_play([*base, "controller=scripted", "controller.script=R*4", "max_frames=8", "seed=3",
                     "world.creature_facing=false", f"record.path={rec}"], cwd=tmp_path).returncode == 0
    meta = json.loads((rec / "meta.json").read_text())
    del meta["config"]["world"]["creature_facing"]
    (rec / "meta.json").write_text(json.dumps(meta))
    result = run_play([*base, "controller=replay", f"controller.path={rec}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "world.creature_facing: recorded False, now True" in result.stderr
    quiet = run_play([*base, "controller=replay", f"controller.path={rec}", "world.creature_facing=false",
                      f"record.path={again}"], cwd=tmp_path)
    assert quiet.returncode == 0 and "note:" not in quiet.stderr, quiet.stderr
    assert (iio.imread(rec / "video.mp4") == iio.imread(again / "video.mp4")).all()
    left_out = run_play([*base, "controller=replay", f"controller.path={rec}", "~world.creature_facing"], cwd=tmp_path)
    assert left_out.returncode == 0 and "note:" not in left_out.stderr, left_out.stderr  # the same world


def test_a_link_to_nowhere_or_a_file_in_the_way_is_refused_at_start_up(tmp_path: Path):
    """A record.path or record.dir that is (or lies under) a link to nowhere, or under a
    file, is one line and exit code 2 before anything runs (and no traceback)."""
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "x")
    (tmp_path / "file").write_text("x")
    base = ["engine=simulator", "window=headless", "controller=scripted", "max_frames=2"]
    for arg, needle in [(f"record.path={tmp_path / 'dangling'}", "is a link to"),
                        (f"record.path={tmp_path / 'dangling' / 'rec'}", "is a link to"),
                        (f"record.dir={tmp_path / 'dangling'}", "is a link to"),
                        (f"record.dir={tmp_path / 'file' / 'recs'}", "is a file")]:
        result = run_play([*base, arg], cwd=tmp_path)
        assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_replay_mismatches_compare_what_both_sides_name():
    from play import replay_mismatches

    recorded = {"kind": "neural", "device": "cuda:0", "sampler_steps": 2, "sampler_times": [1.0, 0.25], "extra": 1}
    now = {"kind": "neural", "device": "cpu", "sampler_steps": 1, "sampler_times": [1.0]}
    assert replay_mismatches(recorded, now) == ["device: recorded 'cuda:0', now 'cpu'", "sampler_steps: recorded 2, now 1",
                                                "sampler_times: recorded [1.0, 0.25], now [1.0]"]
    assert replay_mismatches(recorded, dict(recorded)) == []


def test_a_recording_is_never_overwritten_by_mistake(tmp_path: Path):
    """record.path must be new or empty: not the recording being replayed, not a file, not
    another recording (unless record.overwrite=true), and a refused run leaves it intact."""
    rec = tmp_path / "rec"
    base = ["engine=simulator", "window=headless", "controller=scripted", "controller.script=R*4", "max_frames=4"]
    assert run_play([*base, f"record.path={rec}"], cwd=tmp_path).returncode == 0
    before = {p.name: p.read_bytes() for p in rec.iterdir()}
    for args, needle in [
        (["controller=replay", f"controller.path={rec}", f"record.path={rec}"], "is the recording being replayed"),
        (["controller=replay", f"controller.path={rec}", f"record.path={rec}", "record.overwrite=true"],
         "is the recording being replayed"),
        ([*base, f"record.path={rec}"], "is not empty"),
        ([*base, f"record.path={rec / 'meta.json'}"], "is a file"),
    ]:
        result = run_play(["engine=simulator", "window=headless", *args], cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert needle in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
        assert {p.name: p.read_bytes() for p in rec.iterdir()} == before
    result = run_play([*base, "controller.script=L*4", f"record.path={rec}", "record.overwrite=true"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["action"] for line in (rec / "actions.jsonl").read_text().splitlines()] == ["left"] * 4


def test_meta_that_cannot_be_written_leaves_the_last_one_and_no_half_file(tmp_path: Path, monkeypatch):
    """A full disk while meta.json is rewritten: the error goes up, the meta.json written
    before stays as it was, and no meta.json.tmp is left behind."""
    rec = Recorder(tmp_path / "rec", 30, {"seed": 1})
    before = (tmp_path / "rec" / "meta.json").read_text()
    real = Path.write_text

    def full(self, text, *args, **kwargs):
        if self.name == "meta.json.tmp":
            real(self, text[: len(text) // 2])
            raise OSError(28, "No space left on device")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match="No space left on device"):
        rec.close()
    assert (tmp_path / "rec" / "meta.json").read_text() == before
    assert not (tmp_path / "rec" / "meta.json.tmp").exists()


def test_a_place_that_cannot_be_written_is_refused_where_it_would_be_written(tmp_path: Path, monkeypatch):
    """An unwritable record.path is refused; record.dir only where F5 can record into it
    (a window), not for a headless run that never writes there."""
    import play

    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)  # tmp_path read-only
    with pytest.raises(ValueError, match=f"record.path '{tmp_path / 'rec'}' cannot be written: '{tmp_path}' is not writable"):
        play.check_record_path(str(tmp_path / "rec"), False, None)
    with pytest.raises(ValueError, match="record.dir .* cannot be written"):
        play.check_record_dir(str(tmp_path / "recs"), writable=True)
    play.check_record_dir(str(tmp_path / "recs"), writable=False)


def test_a_recording_left_by_a_full_disk_replays_without_its_cut_last_line(tmp_path: Path):
    """Never closed (complete: false), with its last line cut in the middle: the rows before
    it replay. Closed (complete: true), the same cut is an error."""
    from controllers.replay import ReplayConfig, ReplayController

    rec = tmp_path / "rec"
    rec.mkdir()
    rows = [json.dumps({"frame": i, "action": "right", "action_id": RIGHT}) for i in range(3)]
    (rec / "actions.jsonl").write_text("\n".join(rows) + '\n{"frame": 3, "act')
    (rec / "meta.json").write_text(json.dumps({"seed": 2, "num_frames": 0, "complete": False}))
    assert ReplayController(ReplayConfig(path=str(rec))).num_frames == 3
    (rec / "meta.json").write_text(json.dumps({"seed": 2, "num_frames": 3, "complete": True}))
    with pytest.raises(ValueError, match="actions.jsonl:4: not a JSON object"):
        ReplayController(ReplayConfig(path=str(rec)))
