"""Controllers: script grammar, held-key logic, replay files, the factory."""
from __future__ import annotations

import json

import pytest
from conftest import compose

from controllers import build_controller
from controllers.keyboard import KeyboardConfig, KeyboardController
from controllers.keymap import Keymap, check_disjoint
from controllers.replay import ReplayConfig, ReplayController
from controllers.scripted import ScriptedConfig, ScriptedController, parse_script
from worlds.actions import ACTIONS, DOWN, IDLE, LEFT, PLACE, RIGHT, UP


def test_script_grammar():
    assert parse_script("R*3 D U*2") == [RIGHT] * 3 + [DOWN] + [UP] * 2
    assert parse_script("  l*2\tP  i ") == [LEFT, LEFT, PLACE, IDLE]
    assert parse_script("") == []


@pytest.mark.parametrize("script, token", [
    ("R*3 X*2", "X*2"), ("R*0", "R*0"), ("R*x", "R*x"), ("RR", "RR"), ("R**2", "R**2"),
    ("R*-1", "R*-1"), ("R*", "R*"), ("*3", "*3"), ("right*3", "right*3"),
])
def test_script_errors_name_the_token(script, token):
    with pytest.raises(ValueError, match=f"'{token.replace('*', '[*]')}'"):
        parse_script(script)


def test_scripted_idles_after_the_end_or_loops():
    c = ScriptedController(ScriptedConfig(script="R*2 U"))
    assert c.actions(2) == [RIGHT, RIGHT]
    assert c.actions(3) == [UP, IDLE, IDLE]
    c.reset()
    assert c.actions(1) == [RIGHT]
    looped = ScriptedController(ScriptedConfig(script="R D", loop=True))
    assert looped.actions(5) == [RIGHT, DOWN, RIGHT, DOWN, RIGHT]


def test_keyboard_most_recent_held_direction_wins():
    c = KeyboardController()
    assert c.actions(2) == [IDLE, IDLE]
    c.press("right")
    assert c.actions(2) == [RIGHT, RIGHT]
    c.press("w")  # up, pressed later, wins while both are held
    assert c.actions(1) == [UP]
    c.release("w")
    assert c.actions(1) == [RIGHT]
    c.release("right")
    assert c.actions(1) == [IDLE]


def test_keyboard_place_fires_once_per_press_and_taps_are_not_lost():
    c = KeyboardController()
    c.press("right")
    c.press("space")
    assert c.actions(3) == [PLACE, RIGHT, RIGHT]
    assert c.actions(1) == [RIGHT]  # still held, place does not repeat
    c.release("space")
    c.release("right")
    c.press("a")
    c.release("a")  # a tap shorter than a frame still moves once
    assert c.actions(2) == [LEFT, IDLE]
    assert c.actions(1) == [IDLE]
    c.press("left")
    c.release_all()
    assert c.actions(1) == [IDLE]


def test_keymap_errors():
    with pytest.raises(ValueError, match="'jump'"):
        KeyboardController(KeyboardConfig(keymap={"jump": ["space"]}))
    with pytest.raises(ValueError, match="controller.keymap.up: unknown key name 'esc'"):
        Keymap({"up": ["esc"]}, allowed=["up"], where="controller.keymap")
    assert Keymap({"up": ["escape", "left shift", "?"]}, allowed=["up"], where="w").lookup("escape") == "up"
    one = build_controller(compose(["controller=keyboard", "controller.keymap.place=return"]))  # one key, a string
    assert one.keymap.lookup("return") == "place"
    with pytest.raises(ValueError, match=r"controller.keymap.place must be a list \(each item a string\) or a string, got 5"):
        build_controller(compose(["controller=keyboard", "controller.keymap.place=5"]))
    keypad = Keymap({"up": "keypad 1"}, allowed=["up"], where="w")  # pygame's own name for it
    assert keypad.lookup("[1]") == "up" and keypad.keys == {"[1]"}
    with pytest.raises(ValueError, match="'w'.*both"):
        Keymap({"up": ["w"], "down": ["w"]}, allowed=["up", "down"], where="controller.keymap")
    moves = Keymap({"up": ["w"]}, allowed=["up"], where="controller.keymap")
    window = Keymap({"quit": ["w", "q"]}, allowed=["quit"], where="window.keys")
    with pytest.raises(ValueError, match="'w'"):
        check_disjoint(moves, "controller.keymap", window, "window.keys")


def test_default_keymaps_do_not_clash():
    from runtime.window import WindowConfig, COMMANDS

    moves = KeyboardController().keymap
    check_disjoint(moves, "controller.keymap", Keymap(WindowConfig().keys, COMMANDS, "window.keys"),
                   "window.keys")
    assert moves.lookup("d") == "right" and moves.lookup("space") == "place"


def _write_recording(path, actions, seed=7):
    path.mkdir()
    (path / "meta.json").write_text(json.dumps({"seed": seed, "num_frames": len(actions)}))
    lines = [json.dumps({"frame": i, "action": ACTIONS[a], "action_id": a}) for i, a in enumerate(actions)]
    (path / "actions.jsonl").write_text("\n".join(lines) + "\n")


def test_replay_yields_recorded_actions_and_seed(tmp_path):
    _write_recording(tmp_path / "rec", [RIGHT, RIGHT, UP])
    c = ReplayController(ReplayConfig(path=str(tmp_path / "rec")))
    assert c.seed == 7 and c.num_frames == 3
    assert c.actions(2) == [RIGHT, RIGHT]
    assert c.actions(2) == [UP, IDLE]


def test_replay_errors_name_path_and_line(tmp_path):
    with pytest.raises(ValueError, match="controller.path"):
        ReplayController(ReplayConfig(path=None))
    with pytest.raises(ValueError, match="missing"):
        ReplayController(ReplayConfig(path=str(tmp_path / "missing")))
    rec = tmp_path / "rec"
    _write_recording(rec, [RIGHT, UP])
    (rec / "actions.jsonl").write_text('{"frame": 0, "action_id": 4}\n{"frame": 1, "act\n{"frame": 2, "action_id": 4}\n')
    with pytest.raises(ValueError, match=r"actions\.jsonl:2"):  # cut in the middle (a cut last line: below)
        ReplayController(ReplayConfig(path=str(rec)))
    (rec / "actions.jsonl").write_text('{"frame": 0, "action_id": 4}\n{"frame": 5, "action_id": 4}\n')
    with pytest.raises(ValueError, match=r"actions\.jsonl:2.*expected frame 1"):
        ReplayController(ReplayConfig(path=str(rec)))
    (rec / "actions.jsonl").write_text('{"frame": 0, "action_id": 99}\n')
    with pytest.raises(ValueError, match=r"actions\.jsonl:1"):
        ReplayController(ReplayConfig(path=str(rec)))
    (rec / "actions.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"no actions.*actions\.jsonl is empty"):
        ReplayController(ReplayConfig(path=str(rec)))
    # a closed recording whose action log is shorter than its meta.json says
    (rec / "meta.json").write_text(json.dumps({"seed": 7, "num_frames": 2, "complete": True}))
    (rec / "actions.jsonl").write_text('{"frame": 0, "action_id": 4}\n')
    with pytest.raises(ValueError, match=r"holds 1 actions, but .*meta\.json says the recording has 2 frames"):
        ReplayController(ReplayConfig(path=str(rec)))
    # one a crash left open (complete: false) replays what it has
    (rec / "meta.json").write_text(json.dumps({"seed": 7, "num_frames": 0, "complete": False}))
    assert ReplayController(ReplayConfig(path=str(rec))).num_frames == 1
    (rec / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"meta\.json"):
        ReplayController(ReplayConfig(path=str(rec)))
    (rec / "meta.json").unlink()
    with pytest.raises(ValueError, match=r"meta\.json"):
        ReplayController(ReplayConfig(path=str(rec)))


def _replay_rows(tmp_path, *rows):
    """A two-frame recording whose action log is `rows` (JSON text, one a line); the controller."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rec = tmp_path / "rec"
    _write_recording(rec, [RIGHT, UP])
    (rec / "actions.jsonl").write_text("".join(row + "\n" for row in rows))
    return ReplayController(ReplayConfig(path=str(rec)))


def test_replay_rejects_a_name_and_id_that_disagree(tmp_path):
    with pytest.raises(ValueError, match=r"actions\.jsonl:2: action 'down' and action_id 1 disagree"):
        _replay_rows(tmp_path, '{"frame": 0, "action": "right", "action_id": 4}',
                     '{"frame": 1, "action": "down", "action_id": 1}')


@pytest.mark.parametrize("row", ['{"frame": 0, "action": "jump", "action_id": 1}', '{"frame": 0, "action": "jump"}',
                                 '{"frame": 0, "action": 2, "action_id": 2}'])
def test_replay_rejects_an_unknown_action_name(tmp_path, row):
    bad = repr(json.loads(row)["action"])
    with pytest.raises(ValueError, match=rf"actions\.jsonl:1: unknown action name {bad}; expected one of "
                                         rf"\['idle', 'up', 'down', 'left', 'right', 'place'\]"):
        _replay_rows(tmp_path, row)


@pytest.mark.parametrize("rows, message", [
    (['{"frame": 0, "action_id": true}'], r"actions\.jsonl:1: action_id must be an integer in 0\.\.5, got True"),
    (['{"frame": 0, "action_id": false}'], r"actions\.jsonl:1: action_id must be an integer in 0\.\.5, got False"),
    (['{"frame": 0, "action_id": 1.0}'], r"actions\.jsonl:1: action_id must be an integer in 0\.\.5, got 1\.0"),
    (['{"frame": 0, "action_id": 4}', '{"frame": true, "action_id": 1}'], r"actions\.jsonl:2: expected frame 1, got True"),
])
def test_replay_rejects_bools_as_integers(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        _replay_rows(tmp_path, *rows)


def test_replay_skips_blank_lines(tmp_path):
    # trailing blank lines (an editor's), whitespace-only ones and blank lines between rows are skipped
    c = _replay_rows(tmp_path, '', '{"frame": 0, "action_id": 4}', '  \t', '{"frame": 1, "action": "up"}', '', '   ')
    assert c.num_frames == 2 and c.actions(3) == [RIGHT, UP, IDLE]
    # line numbers stay those of the file, and a missing row is still caught by its frame number
    with pytest.raises(ValueError, match=r"actions\.jsonl:3: expected frame 1, got 2"):
        _replay_rows(tmp_path / "gap", '{"frame": 0, "action_id": 4}', '', '{"frame": 2, "action_id": 1}')
    with pytest.raises(ValueError, match=r"no actions.*actions\.jsonl is empty or blank"):
        _replay_rows(tmp_path / "blank", '', '  ')


@pytest.mark.parametrize("meta, message", [
    ({"seed": 7, "num_frames": "lots", "complete": True}, r"'num_frames' must be an integer >= 0, got 'lots'"),
    ({"seed": 7, "num_frames": -2, "complete": True}, r"'num_frames' must be an integer >= 0, got -2"),
    ({"seed": 7, "num_frames": True, "complete": True}, r"'num_frames' must be an integer >= 0, got True"),
    ({"seed": 7, "num_frames": 2.0, "complete": True}, r"'num_frames' must be an integer >= 0, got 2\.0"),
    ({"seed": 7, "num_frames": "lots", "complete": False}, r"'num_frames' must be an integer >= 0, got 'lots'"),
    ({"seed": 7, "complete": True}, r"'num_frames' must be an integer >= 0 .*got nothing"),
    ({"seed": "7", "num_frames": 2}, r"'seed' must be an integer, got '7'"),
    ({"seed": True, "num_frames": 2}, r"'seed' must be an integer, got True"),
    ({"num_frames": 2}, r"'seed' must be an integer, got nothing"),
    ({"seed": 7, "num_frames": 2, "complete": "yes"}, r"'complete' must be true or false, got 'yes'"),
    ({"seed": 7, "num_frames": 2, "complete": 1}, r"'complete' must be true or false, got 1"),
])
def test_replay_checks_meta_fields(tmp_path, meta, message):
    rec = tmp_path / "rec"
    _write_recording(rec, [RIGHT, UP])
    (rec / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"rec[/\\]meta\.json: " + message):
        ReplayController(ReplayConfig(path=str(rec)))


def test_build_controller_from_every_preset(tmp_path):
    _write_recording(tmp_path / "rec", [LEFT])
    assert isinstance(build_controller(compose(["controller=keyboard"])), KeyboardController)
    scripted = build_controller(compose(["controller=scripted", "controller.script=P*2"]))
    assert scripted.actions(3) == [PLACE, PLACE, IDLE]
    replay = build_controller(compose(["controller=replay", f"controller.path={tmp_path / 'rec'}"]))
    assert replay.actions(1) == [LEFT]


def test_random_controller_is_seeded():
    pytest.importorskip("controllers.random_agent")
    a = build_controller(compose(["controller=random", "seed=3"]))
    b = build_controller(compose(["controller=random", "seed=3"]))
    first = a.actions(16)
    assert first == b.actions(16)
    assert all(0 <= x <= PLACE for x in first)
    a.reset()
    assert a.actions(16) == first


def test_build_controller_rejects_unknown_keys_and_kinds():
    with pytest.raises(ValueError, match="'scirpt'"):
        build_controller(compose(["controller=scripted", "+controller.scirpt=R"]))
    with pytest.raises(ValueError, match="'joystick'"):
        build_controller(compose(["controller=scripted", "controller.kind=joystick"]))
    with pytest.raises(ValueError, match="'Q[*]2'"):
        build_controller(compose(["controller=scripted", "controller.script=R Q*2"]))
