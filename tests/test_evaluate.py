"""Evaluation: the metrics, a tiny checkpoint through `run`, and the command line."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, compose
from omegaconf import OmegaConf

from runtime.checkpoint import save_checkpoint
from runtime.engine import to_unit
from runtime.evaluate import psnr_u8, run, splice, ssim_u8
from worlds.actions import IDLE
from runtime.model import ModelConfig, WorldModel

TINY = ModelConfig.from_dict(OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml")))
SMALL_EVAL = ["device=cpu", "engine.dtype=float32", "eval.sequences=2", "eval.horizons=[4,8]", "eval.next_frames=3",
              "eval.revisit_steps=3", "eval.walk_frames=6"]
KEYS = ["next_psnr", "next_ssim", "copy_last_next_psnr", "rollout_psnr_4", "rollout_psnr_8", "rollout_psnr_mean_4",
        "rollout_ssim_8", "copy_last_psnr_4", "copy_last_psnr_8", "revisit_psnr", "sim_revisit_psnr",
        "revisit_vs_truth_psnr", "idle_next_psnr_creatures_move", "idle_next_psnr_creatures_still",
        "copy_last_idle_psnr_creatures_move", "copy_last_idle_psnr_creatures_still", "unseen_fraction_4",
        "oracle_directions_psnr_8", "oracle_directions_psnr_mean_8", "walk_stall_fraction", "walk_tile_psnr",
        "sim_walk_tile_psnr", "walk_psnr", "rollout_psnr_seen_8", "oracle_directions_psnr_seen_8",
        "rollout_psnr_oracle_seen_8", "rollout_psnr_oracle_seen_mean_8", "rollout_psnr_oracle_unseen_8",
        "rollout_psnr_oracle_unseen_mean_8", "map_blind_psnr_unseen_8", "oracle_directions_expected_psnr_8",
        "sampled_directions_psnr_8", "sampled_directions_psnr_mean_8", "rollout_psnr_sampled_seen_8",
        "rollout_psnr_pooled_8", "oracle_directions_psnr_pooled_8", "faithful_bound_psnr_pooled_8",
        "oracle_directions_expected_psnr_pooled_8", "rollout_psnr_unseen_near_8", "rollout_psnr_unseen_far_8",
        "rollout_psnr_seen_creatures_8", "rollout_psnr_seen_other_8", "rollout_error_share_unseen_8"]


pytestmark = pytest.mark.usefixtures("one_thread")


def compose_eval(overrides: list[str]):
    return compose(overrides, config_name="evaluate")


def tiny_checkpoint(path, randomise: bool, seed: int = 0):
    """randomise=False keeps the zero-initialised output layer: the model predicts x0 = previous frame."""
    torch.manual_seed(seed)
    model = WorldModel(TINY)
    if randomise:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(path, model, {"world_family": "overworld"})
    return path


def random_frames(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


# ----------------------------------------------------------------------------- metrics


def test_psnr_of_identical_frames_is_the_cap():
    a = random_frames((2, 3, 16, 16, 3))
    p = psnr_u8(a, a.clone())
    assert p.shape == (2, 3)
    assert torch.all(p == 60.0)
    assert torch.all(psnr_u8(a, a, cap=45.0) == 45.0)


@pytest.mark.parametrize("level", [1, 17, 51, 128, 255])
def test_psnr_of_a_known_mse(level):
    a = torch.zeros(4, 8, 8, 3, dtype=torch.uint8)
    b = torch.full((4, 8, 8, 3), level, dtype=torch.uint8)
    mse = (level / 255.0) ** 2
    want = 10 * math.log10(1.0 / mse)
    assert psnr_u8(a, b) == pytest.approx(torch.full((4,), want), abs=1e-4)
    assert psnr_u8(b, a) == pytest.approx(torch.full((4,), want), abs=1e-4)


def test_psnr_averages_the_error_over_the_whole_frame():
    a = torch.zeros(1, 10, 10, 3, dtype=torch.uint8)
    b = a.clone()
    b[0, 0, 0, 0] = 255  # one value of 300 off by the full range: mse = 1/300
    assert float(psnr_u8(a, b)[0]) == pytest.approx(10 * math.log10(300), abs=1e-4)


def test_psnr_matches_the_training_metric():
    from runtime.train import psnr

    a, b = random_frames((3, 32, 32, 3), 1), random_frames((3, 32, 32, 3), 2)
    assert psnr(to_unit(a), to_unit(b)) == pytest.approx(psnr_u8(a, b), abs=1e-3)


def test_ssim_of_identical_frames_is_one():
    a = random_frames((2, 2, 32, 32, 3))
    s = ssim_u8(a, a.clone())
    assert s.shape == (2, 2)
    assert s == pytest.approx(torch.ones(2, 2), abs=1e-4)
    flat = torch.full((1, 32, 32, 3), 90, dtype=torch.uint8)
    assert float(ssim_u8(flat, flat)[0]) == pytest.approx(1.0, abs=1e-6)


def test_ssim_drops_for_different_frames_and_is_symmetric():
    a, b = random_frames((2, 32, 32, 3), 3), random_frames((2, 32, 32, 3), 4)
    s_ab, s_ba = ssim_u8(a, b), ssim_u8(b, a)
    assert torch.allclose(s_ab, s_ba, atol=1e-6)
    assert torch.all(s_ab < 0.1)  # independent noise images share no structure
    noisy = (a.int() + random_frames((2, 32, 32, 3), 5).int() % 16 - 8).clamp(0, 255).to(torch.uint8)
    s_noisy = ssim_u8(a, noisy)
    assert torch.all((s_noisy > s_ab) & (s_noisy < 1))


# ----------------------------------------------------------------------------- evaluate a checkpoint


def test_per_seed_scores_and_the_standard_error_of_their_mean():
    from runtime.evaluate import per_seed

    res = per_seed("x", torch.tensor([30.0, 32.0, 37.0]))
    assert res["x_per_seed"] == [30.0, 32.0, 37.0]
    assert res["x_sem"] == pytest.approx(np.std([30.0, 32.0, 37.0], ddof=1) / np.sqrt(3))
    assert per_seed("x", torch.tensor([31.5])) == {"x_per_seed": [31.5], "x_sem": None}  # one score: no spread


def test_run_on_a_tiny_random_checkpoint(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors", randomise=True)
    # a world whose frames hide the creatures' heading, where the oracle is a mean over ways
    res = run(compose_eval([f"engine.checkpoint={ckpt}", *SMALL_EVAL, "world.creature_facing=false"]))
    for key in KEYS:
        assert key in res, key
        assert isinstance(res[key], float) and math.isfinite(res[key]), (key, res[key])
    assert res["sequences"] == 2 and res["world"] == "overworld" and res["device"] == "cpu"
    assert res["dtype"] == "float32" and res["revisit_steps"] == 3
    assert len(res["rollout_psnr_curve"]) == 8
    assert res["rollout_psnr_4"] == pytest.approx(res["rollout_psnr_curve"][3], abs=1e-3)
    # the oracle's seen part is the best guess there: spliced in, the frame scores higher
    assert res["oracle_directions_psnr_seen_8"] > res["rollout_psnr_seen_8"]
    assert res["rollout_psnr_oracle_seen_8"] > res["rollout_psnr_8"]
    assert res["rollout_psnr_oracle_seen_mean_8"] > res["rollout_psnr_mean_8"]
    # and so is its guess of the new places (the oracle knows the map)
    assert res["rollout_psnr_oracle_unseen_8"] > res["rollout_psnr_8"]
    assert res["rollout_psnr_oracle_unseen_mean_8"] > res["rollout_psnr_mean_8"]
    # so is a faithful draw's (the world's own frames, creatures walking some way)
    assert res["rollout_psnr_sampled_seen_8"] > res["rollout_psnr_8"]
    assert res["rollout_psnr_8"] < res["sampled_directions_psnr_8"] <= 60
    # twice the oracle's expected error: 10*log10(2) dB below its PSNR, pooled
    assert res["faithful_bound_psnr_pooled_8"] == pytest.approx(
        res["oracle_directions_expected_psnr_pooled_8"] - 10 * math.log10(2), abs=1e-4)
    assert 0 < res["next_psnr"] <= 60 and -1 <= res["next_ssim"] <= 1
    assert res["next_psnr"] != res["copy_last_next_psnr"]  # the random model changes the frames
    for key in ("next_psnr", "rollout_psnr_4", "rollout_psnr_mean_8"):  # one score per seed, their mean the key
        seeds = res[f"{key}_per_seed"]
        assert len(seeds) == 2 and seeds[0] != seeds[1], seeds
        assert np.mean(seeds) == pytest.approx(res[key], abs=1e-3)
        assert res[f"{key}_sem"] == pytest.approx(np.std(seeds, ddof=1) / np.sqrt(2), abs=1e-3)
    assert 0 < res["rollout_error_share_unseen_8"] < 1
    json.dumps(res)  # the CLI writes it as JSON


def test_a_model_that_repeats_the_last_frame_scores_the_copy_baseline(tmp_path):
    # An untrained model's output layer is zero: x0 = the previous frame, exactly the
    # copy-last baseline, so every model metric must equal its baseline counterpart.
    ckpt = tiny_checkpoint(tmp_path / "copy.safetensors", randomise=False)
    res = run(compose_eval([f"engine.checkpoint={ckpt}", *SMALL_EVAL, "eval.revisit_pause=4"]))
    assert res["next_psnr"] == pytest.approx(res["copy_last_next_psnr"], abs=1e-5)
    for h in (4, 8):
        assert res[f"rollout_psnr_{h}"] == pytest.approx(res[f"copy_last_psnr_{h}"], abs=1e-5)
        assert res[f"rollout_psnr_mean_{h}"] == pytest.approx(res[f"copy_last_psnr_mean_{h}"], abs=1e-5)
    for name in ("move", "still"):
        assert res[f"idle_next_psnr_creatures_{name}"] == pytest.approx(res[f"copy_last_idle_psnr_creatures_{name}"], abs=1e-5)
    # standing still, nothing but the creatures and the water changes, and creatures only
    # on their move frames: the copy baseline is exact on the other frames
    assert res["copy_last_idle_psnr_creatures_still"] == 60.0
    assert res["copy_last_idle_psnr_creatures_move"] < 60.0
    assert res["revisit_psnr"] == 60.0  # every generated frame is the first one
    assert res["revisit_vs_truth_psnr"] == pytest.approx(res["sim_revisit_psnr"], abs=1e-5)
    assert res["pause_revisit_psnr"] == 60.0 and res["pause_revisit_frames"] == 4
    assert res["pause_revisit_vs_truth_psnr"] == pytest.approx(res["sim_pause_revisit_psnr"], abs=1e-5)
    # on the walks the generated view never scrolls: every frame where the world's did is a stall
    assert res["walk_stall_fraction"] == 1.0 and res["walk_stall_fraction_per_seed"] == [1.0, 1.0]
    assert set(res["walk_stall_curve"]) == {1.0}
    assert res["walk_ground_stall_fraction"] == 1.0 and res["walk_ground_stall_fraction_per_seed"] == [1.0, 1.0]
    assert res["walk_ground_scroll_match"] == 0.0


def test_next_frames_may_reach_past_the_longest_horizon(tmp_path):
    """eval.next_frames longer than every horizon: the walk is simulated that long, the
    free-running scores still stop at the longest horizon."""
    ckpt = tiny_checkpoint(tmp_path / "copy.safetensors", randomise=False)
    res = run(compose_eval([f"engine.checkpoint={ckpt}", "device=cpu", "engine.dtype=float32", "eval.sequences=2",
                            "eval.horizons=[3]", "eval.next_frames=5", "eval.revisit_steps=2"]))
    assert len(res["rollout_psnr_curve"]) == 3
    assert res["next_psnr"] == pytest.approx(res["copy_last_next_psnr"], abs=1e-5)  # the copy model, as above
    assert res["rollout_psnr_3"] == pytest.approx(res["copy_last_psnr_3"], abs=1e-5)


def test_run_is_reproducible(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors", randomise=True, seed=1)
    cfg = compose_eval([f"engine.checkpoint={ckpt}", "device=cpu", "engine.dtype=float32", "eval.sequences=1",
                        "eval.horizons=[2]", "eval.next_frames=2", "eval.revisit_steps=1"])
    a, b = run(cfg), run(cfg)
    for key in ("next_psnr", "rollout_psnr_2", "revisit_psnr", "rollout_psnr_curve"):
        assert a[key] == b[key]


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        run(compose_eval([f"engine.checkpoint={tmp_path / 'missing.safetensors'}", *SMALL_EVAL]))


def test_checkpoint_for_another_world_is_rejected(tmp_path):
    """Evaluation checks the checkpoint against the world as play does."""
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, WorldModel(TINY), {"world_family": "platformer"})
    with pytest.raises(ValueError, match="world family 'platformer'"):
        run(compose_eval([f"engine.checkpoint={other}", *SMALL_EVAL]))
    small = tmp_path / "small.safetensors"
    save_checkpoint(small, WorldModel(ModelConfig(**{**TINY.to_dict(), "frame_size": 32})), {"world_family": "overworld"})
    with pytest.raises(ValueError, match="expects 32x32"):
        run(compose_eval([f"engine.checkpoint={small}", *SMALL_EVAL]))


@pytest.mark.parametrize("override, needle", [
    ("eval.sequences=0", "eval.sequences must be an integer >= 1, got 0"),
    ("eval.horizons=[16,0]", "eval.horizons must be a non-empty list of integers >= 1, got [16, 0]"),
    ("eval.horizons=[a]", "eval.horizons must be a list (each item an integer), got ['a']"),
    ("eval.walk_frames=-1", "eval.walk_frames must be an integer >= 0, got -1"),
    ("eval.direction_draws=-2", "eval.direction_draws must be an integer >= 0, got -2"),
    ("eval.quality=maybe", "eval.quality must be true or false, got 'maybe'"),
    ("engine=simulator", "engine=simulator has no model to measure here; expected engine=neural"),
    ("out=README.md/e.json", "out's directory 'README.md' cannot be a directory: 'README.md' is a file"),
    ("out=docs", "out 'docs' is a directory; expected a file path"),
    ("eval.attentions=[fastr]", "unknown attention config 'fastr'"),
    ("seed=x", "seed must be an integer, got 'x'"),
])
def test_bad_settings_fail_before_anything_runs(override, needle):
    from runtime.evaluate import check

    with pytest.raises(ValueError) as err:
        check(compose_eval([override]))
    assert needle in str(err.value)


def test_command_line_reports_a_missing_checkpoint_in_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "runtime.evaluate", "engine.checkpoint=missing.safetensors"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "runtime.evaluate: error: checkpoint 'missing.safetensors' does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_command_line_writes_the_json(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors", randomise=True)
    out = tmp_path / "results" / "e.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.evaluate", f"engine.checkpoint={ckpt}", *SMALL_EVAL, f"out={out}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    for key in KEYS:
        assert math.isfinite(res[key]), key
    assert res["checkpoint"] == str(ckpt)
    assert isinstance(res["rollout_psnr_curve"], list)
    assert '"next_psnr"' in proc.stdout  # a summary is printed too


def test_motion_split_reports_merge_rate_and_history_recall_for_idle_and_moving_play(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors", randomise=True)
    res = run(compose_eval([f"engine.checkpoint={ckpt}", *SMALL_EVAL, "eval.quality=false", "eval.compare_frames=0",
                            "eval.motion_frames=6", "eval.attentions=['tempcache:budget_frames=3',window]"]))
    split = res["motion_split"]
    for kind in ("idle", "moving"):
        temp = split["tempcache:budget_frames=3"][kind]
        assert 0.0 < temp["history_recall"] <= 1.0 and 0.0 <= temp["merge_rate"] <= 1.0
        assert split["window"][kind]["history_recall"] is None  # only TempCache tracks its history


def test_creature_step_weights_name_the_place_a_patch_shows():
    """The renders of simulate_creature_places reproduce the true frame at the true place:
    fitting the true frames puts all weight on the true step; fitting the previous frames
    (the repeat-last baseline) puts it on staying; a patch drawn with the creature one step
    back, or gone, puts it there."""
    from runtime.evaluate import ABSENT, simulate_creature_places, step_weights
    from worlds.overworld import load_config

    truth, _, places = simulate_creature_places(load_config("overworld"), [0, 1, 2], 12)
    assert truth.shape == (3, 13, 64, 64, 3)
    exact = step_weights(truth[:, 1:], places)
    assert exact["creature_step_count"] > 5
    want = {"true": 1.0, "back": 0.0, "sides": 0.0, "stay": 0.0, "absent": 0.0}
    for name, v in want.items():
        assert exact[f"creature_step_weight_{name}"] == pytest.approx(v, abs=1e-6), name
    assert exact["creature_step_fit_r2"] == pytest.approx(1.0, abs=1e-9)
    copy = step_weights(truth[:, :-1], places)
    assert copy["creature_step_count"] == exact["creature_step_count"]
    assert copy["creature_step_weight_stay"] == pytest.approx(1.0, abs=0.05)
    assert copy["creature_step_weight_true"] == pytest.approx(0.0, abs=0.05)
    assert copy["creature_step_fit_r2"] > 0.95
    for b, t, (y0, y1, x0, x1), renders, true in places[:6]:
        for index, name in (((true + 2) % 4, "back"), (ABSENT, "absent")):
            gen = truth[:, 1:].clone()
            gen[b, t, y0:y1, x0:x1] = torch.from_numpy(renders[index])
            res = step_weights(gen, [(b, t, (y0, y1, x0, x1), renders, true)])
            assert res[f"creature_step_weight_{name}"] == pytest.approx(1.0, abs=1e-6), name
            assert res["creature_step_weight_true"] == pytest.approx(0.0, abs=1e-6)


def test_splice_takes_the_named_part_from_the_guess():
    frames = torch.zeros(1, 1, 2, 2, 3, dtype=torch.uint8)
    guess = torch.full((1, 1, 2, 2, 3), 200.0)
    seen = torch.tensor([[[[True, False], [False, False]]]])
    assert splice(frames, guess, seen, "seen")[0, 0, :, :, 0].tolist() == [[200.0, 0.0], [0.0, 0.0]]
    assert splice(frames, guess, seen, "unseen")[0, 0, :, :, 0].tolist() == [[0.0, 200.0], [200.0, 200.0]]
    with pytest.raises(ValueError, match="part='both'"):
        splice(frames, guess, seen, "both")


def test_unseen_fraction_counts_what_the_first_frame_never_showed():
    """Two steps right by 2 pixels show 2, then 4 new columns of 16; standing still, none."""
    from runtime.evaluate import unseen_fraction

    pos = np.zeros((2, 3, 2), dtype=np.int64)
    pos[0, 1:, 1] = [2, 4]  # sequence 0: two steps right; sequence 1 stands still
    assert unseen_fraction(pos, 16).tolist() == pytest.approx([0.5 * 2 / 16, 0.5 * 4 / 16])
    pos[1, 1:, 0] = [-2, -4]  # sequence 1 walks up: as many new rows
    assert unseen_fraction(pos, 16).tolist() == pytest.approx([2 / 16, 4 / 16])
    pos[1, 2, 1] = 2  # and right at the end: rows and columns overlap in a corner
    assert unseen_fraction(pos, 16)[1] == pytest.approx(0.5 * (4 / 16) + 0.5 * (1 - (12 / 16) * (14 / 16)))


def test_the_seen_mask_and_region_psnr_split_a_frame_into_shown_and_new_places():
    """A step right by 2 pixels shows 2 new columns on the right; a step down, new rows at
    the bottom. PSNR within a part sees only that part's error; a part with no pixels is NaN."""
    from runtime.evaluate import region_psnr, seen_mask

    pos = np.zeros((2, 2, 2), dtype=np.int64)
    pos[0, 1, 1] = 2
    pos[1, 1, 0] = 3
    seen = seen_mask(pos, 8)
    assert seen.shape == (2, 1, 8, 8)
    assert not seen[0, 0, :, 6:].any() and seen[0, 0, :, :6].all()
    assert not seen[1, 0, 5:, :].any() and seen[1, 0, :5, :].all()
    truth = random_frames((2, 1, 8, 8, 3))
    gen = truth.clone()
    gen[~seen] = 255 - gen[~seen]  # wrong only where frame 0 never looked
    on_seen, on_unseen = region_psnr(gen, truth, seen), region_psnr(gen, truth, ~seen)
    assert on_seen.tolist() == [[60.0], [60.0]]
    expect = [float(psnr_u8(gen[b][~seen[b]][None, :, None], truth[b][~seen[b]][None, :, None])) for b in range(2)]
    assert on_unseen[:, 0].tolist() == pytest.approx(expect, abs=1e-4)
    assert on_unseen.max() < 20
    pos[:, 1] = 0  # standing still: nothing is new
    assert torch.isnan(region_psnr(gen, truth, ~seen_mask(pos, 8))).all()


def test_distance_from_counts_chessboard_steps_to_the_nearest_marked_pixel():
    from runtime.evaluate import distance_from

    mask = torch.zeros(2, 1, 7, 7, dtype=torch.bool)
    mask[0, 0, 3, 1] = True  # the second frame has nothing marked
    dist = distance_from(mask, 3)
    assert dist.shape == mask.shape
    want = torch.tensor([[max(abs(r - 3), abs(c - 1)) for c in range(7)] for r in range(7)]).clamp(max=4)
    assert torch.equal(dist[0, 0], want)
    assert (dist[1] == 4).all()
    assert torch.equal(distance_from(mask, 0), torch.where(mask, 0, 1))


def test_creature_cover_is_where_the_frames_of_a_standing_player_change():
    """The player stands and the water keeps its phase: between two frames only the
    creatures move, so every changed pixel lies under a creature in one of them."""
    from dataclasses import replace

    from runtime.evaluate import creature_cover, simulate
    from worlds.overworld import load_config

    world = load_config("overworld")
    idle = np.full((2, world.water_period - 1), IDLE)
    frames = simulate(world, [1, 2], idle)[0][:, 1:]
    cover = creature_cover(world, [1, 2], idle)
    assert cover.shape == frames.shape[:-1] and cover.any()
    changed = (frames[:, 1:] != frames[:, :-1]).any(-1)
    assert changed.any()
    assert not (changed & ~(cover[:, 1:] | cover[:, :-1])).any()
    assert not creature_cover(replace(world, num_creatures=0), [1, 2], idle).any()


def test_the_map_blind_guess_knows_the_walk_and_not_the_map():
    """The guess moves its view as the walk's view moved, on other maps: two sequences with
    the same positions get the same guess whatever their own maps; another walk, another
    guess; one other map, standing still, is that map's own frames."""
    from dataclasses import replace

    from runtime.evaluate import BLIND_SEED, blind_frames, simulate
    from worlds.overworld import load_config

    world = replace(load_config("overworld"), num_creatures=0)
    pos = np.zeros((2, 4, 2), dtype=np.int64)
    pos[:, 1:, 1] = [2, 4, 6]  # both walk right, 2 pixels a frame
    guess = blind_frames(world, pos, 3)
    assert guess.shape == (2, 3, world.view, world.view, 3) and torch.equal(guess[0], guess[1])
    other = pos.copy()
    other[1, 1:, 1] = 0
    assert not torch.equal(blind_frames(world, other, 3)[1], guess[1])
    still = np.zeros((1, 4, 2), dtype=np.int64)
    idle = np.full((1, 3), IDLE)
    assert torch.equal(blind_frames(world, still, 1), simulate(world, [BLIND_SEED], idle)[0][:, 1:])


def test_a_moved_view_shows_the_map_shifted():
    """render_view_moved: a view moved one tile right shows the ground one tile further on
    (away from the player's sprite), and leaves the world's state alone."""
    from dataclasses import replace

    from worlds.overworld import BatchOverworld, load_config

    world = replace(load_config("overworld"), num_creatures=0)
    w = BatchOverworld(world, 1)
    frame = w.reset([5])
    t, v = world.tile, world.view
    moved = w.render_view_moved(np.array([[0, t]]))
    assert np.array_equal(moved[0, :t, : v - t], frame[0, :t, t:])  # the top row of tiles, shifted
    assert not np.array_equal(moved, frame)
    assert np.array_equal(w.render(), frame)
    far = w.render_view_moved(np.array([[10**6, -(10**6)]]))  # kept on the map: at its corner
    assert far.shape == frame.shape
    assert np.array_equal(far, w.render_view_moved(np.array([[2 * 10**6, -2 * 10**6]])))


def test_the_direction_oracle_knows_all_but_the_creatures_first_directions():
    """Without creatures nothing is unknown: the oracle is exact. With them, it is exact
    until the first move tick (frame 2) and not after; pointing the creatures moves them."""
    from dataclasses import replace

    from controllers.random_agent import explore_actions
    from runtime.evaluate import direction_oracle, simulate
    from worlds.overworld import load_config

    world = replace(load_config("overworld"), creature_facing=False)  # a world whose frames hide the heading
    actions = explore_actions(np.random.default_rng(0), 2, 6)
    for creatures in (0, 4):
        wc = replace(world, num_creatures=creatures)
        truth, _, _ = simulate(wc, [0, 1], actions)
        oracle = direction_oracle(wc, [0, 1], actions)
        score = psnr_u8(oracle.frames, truth[:, 1:]).mean(0)
        if creatures == 0:
            assert score.tolist() == [60.0] * 6 and oracle.spread.abs().max() == 0
        else:
            assert score[0] == 60.0 and (score[1:] < 60).all()
            assert (oracle.spread[:, 0] == 0).all() and (oracle.spread[:, 1:] > 0).all()
    ways = [simulate(world, [0], actions[:1], creature_direction=d)[0] for d in range(4)]
    assert all(not torch.equal(ways[i][:, 2:], ways[j][:, 2:]) for i in range(4) for j in range(i))
    with pytest.raises(ValueError, match="direction=4; expected 0, 1, 2 or 3"):
        simulate(world, [0], actions[:1], creature_direction=4)
    with pytest.raises(ValueError, match=r"direction has shape \(3,\); expected one, \(4,\) or \(1, 4\)"):
        simulate(world, [0], actions[:1], creature_direction=np.array([0, 1, 2]))


def test_where_creatures_face_their_heading_the_oracle_is_the_simulation():
    """Frame 0 shows every creature's heading: one way, the seed's, so the oracle's frames
    are the truth, its spread is zero and a faithful draw is the truth too."""
    from controllers.random_agent import explore_actions
    from runtime.evaluate import direction_oracle, simulate
    from worlds.overworld import load_config

    world = load_config("overworld")
    assert world.creature_facing
    actions = explore_actions(np.random.default_rng(0), 2, 6)
    truth, _, _ = simulate(world, [0, 1], actions)

    def score(t, frames):  # (D, B, H, W, 3) -> (1, D, B)
        return psnr_u8(frames, truth[:, t + 1].expand_as(frames))[None]

    oracle = direction_oracle(world, [0, 1], actions, draws=3, score=score)
    assert torch.equal(oracle.frames, truth[:, 1:].float())
    assert oracle.spread.abs().max() == 0
    assert (oracle.sampled == 60.0).all() and oracle.sampled.shape == (1, 3, 2, 6)


def test_the_layers_compose_to_the_frames():
    """Ground, creatures one by one and the player, drawn in order, are render's frames;
    each creature covers its own box only."""
    from controllers.random_agent import explore_actions
    from worlds.overworld import BatchOverworld, load_config

    world = load_config("overworld")
    w = BatchOverworld(world, 3)
    w.reset([0, 1, 2])
    actions = explore_actions(np.random.default_rng(1), 3, 12)
    shown = 0
    for t in range(12):
        frames = w.step(actions[:, t])
        layers = w.render_layers()
        assert np.array_equal(layers.compose(), frames)
        for b in range(3):
            for k in range(world.num_creatures):
                ys, xs = np.nonzero(layers.creature_cover[b, k])
                if len(ys):
                    shown += 1
                    top = w.creature_view_pos[b, k]
                    assert ys.min() >= top[0] and ys.max() < top[0] + world.tile
                    assert xs.min() >= top[1] and xs.max() < top[1] + world.tile
    assert shown > 0  # the box check ran


def test_the_direction_oracle_is_the_mean_over_every_way_and_its_draws_are_worlds():
    """With two creatures near each other, the oracle's mean and spread are the mean and
    variance over all 16 ways the two may start (simulated one by one); a faithful draw is
    such a way's frames; and a draw against the truth, both at random, is off by twice the
    spread on average (the identity behind the faithful bound)."""
    from dataclasses import replace

    from controllers.random_agent import explore_actions
    from runtime.evaluate import direction_oracle, frame_mse, simulate
    from worlds.overworld import load_config

    wc = replace(load_config("overworld"), num_creatures=2, creature_period=1, creature_facing=False)
    seeds, steps = [3, 21], 10  # seed 21's creatures cross each other's paths
    actions = explore_actions(np.random.default_rng(2), 2, steps)
    ways = [(a, b) for a in range(4) for b in range(4)]
    runs = torch.stack([simulate(wc, seeds, actions, creature_direction=np.array(way))[0][:, 1:].double() for way in ways])
    assert len({r.sum().item() for r in runs}) > 4  # the ways differ
    aligned = torch.stack([runs[ways.index((d, d))] for d in range(4)]).mean(0)
    assert not torch.allclose(aligned, runs.mean(0), atol=1)  # where they cross, four runs are not all the ways
    drawn = []

    def keep(t, frames):
        drawn.append(frames)
        return torch.zeros(1, *frames.shape[:2])

    oracle = direction_oracle(wc, seeds, actions, draws=3, seed=5, score=keep)
    assert torch.allclose(oracle.frames.double(), runs.mean(0), atol=1e-3)
    variance = ((runs - runs.mean(0)) / 255.0).pow(2).flatten(3).mean(-1).mean(0)  # (B, T)
    assert torch.allclose(oracle.spread.double(), variance, rtol=1e-4, atol=1e-9)
    pick = np.random.default_rng([5, 4]).integers(0, 4, size=(3, 2, 2))  # the draws' own generator
    for r in range(3):
        for b in range(2):
            way = ways.index(tuple(pick[r, b]))
            assert torch.equal(torch.stack([f[r, b] for f in drawn]).double(), runs[way, b])
    pairs = torch.stack([frame_mse(runs[i], runs[j]) for i in range(16) for j in range(16)]).mean(0)
    assert torch.allclose(pairs.double(), 2 * variance, rtol=1e-4, atol=1e-9)
    assert oracle.sampled.shape == (1, 3, 2, steps)


def test_pooled_psnr_scores_the_mean_error():
    from runtime.evaluate import pooled_psnr

    mse = torch.tensor([[0.01], [0.0001]])
    assert pooled_psnr(mse).item() == pytest.approx(10 * math.log10(1 / 0.00505))


# ----------------------------------------------------------------------------- walks


def scrolled(big: torch.Tensor, path: list[tuple[int, int]], size: int) -> torch.Tensor:
    """Views (T, size, size, 3) of `big` (H, W, 3) with top-left corners `path`."""
    return torch.stack([big[y:y + size, x:x + size] for y, x in path])


def test_frame_shifts_follow_a_scrolling_view_and_stop_with_it():
    from runtime.evaluate import frame_shifts

    big = random_frames((40, 40, 3), seed=3)
    path = [(10, 10), (10, 12), (10, 14), (8, 14), (8, 14), (11, 13)]  # right, right, up, still, down 3 + left 1
    frames = scrolled(big, path, 16)[None]
    assert frame_shifts(frames, 3)[0].tolist() == [[0, 2], [0, 2], [-2, 0], [0, 0], [3, -1]]
    frozen = frames[:, :1].expand(1, 4, -1, -1, -1)
    assert frame_shifts(frozen, 3).abs().sum() == 0
    flat = torch.full((2, 3, 16, 16, 3), 77, dtype=torch.uint8)  # nothing to tell shifts apart: still
    assert frame_shifts(flat, 2).abs().sum() == 0


def test_frame_shifts_without_a_fixed_sprite_see_a_faint_ground_scroll():
    """A washed-out ground scrolls under a bright sprite that stays in the middle (the
    player): matched with the sprite, the shift is none; with its box left out, the
    ground's."""
    from runtime.evaluate import frame_shifts

    g = torch.Generator().manual_seed(4)
    big = (100 + 6 * torch.rand(48, 48, 3, generator=g)).to(torch.uint8)  # faint texture
    path = [(10, 10), (10, 12), (10, 14), (10, 14)]  # right 2, right 2, still
    frames = scrolled(big, path, 24).clone()[None]
    frames[..., 8:16, 8:16, :] = 250  # the sprite, in every frame
    assert frame_shifts(frames, 3)[0].tolist() == [[0, 0], [0, 0], [0, 0]]
    assert frame_shifts(frames, 3, (8, 8, 8))[0].tolist() == [[0, 2], [0, 2], [0, 0]]
    # a box somewhere else does not hide the sprite
    assert frame_shifts(frames, 3, (0, 0, 4))[0].tolist() == [[0, 0], [0, 0], [0, 0]]


def test_tile_psnr_is_exact_for_ground_tiles_and_low_for_blur():
    """A frame laid out from the tile set (at any grid offset) rebuilds exactly; the same
    frame blurred, or with a sprite over it, does not, unless the sprite's box is skipped."""
    from runtime.evaluate import tile_psnr
    from worlds.overworld.tiles import CREATURE, PLAYER

    atlas = random_frames((1, 16, 8, 8, 3), seed=4)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 16, (5, 5), generator=g)
    ids[ids == CREATURE] = 0
    ids[ids == PLAYER] = 1
    big = atlas[0, ids].permute(0, 2, 1, 3, 4).reshape(40, 40, 3)
    frame = big[3:35, 5:37][None, None]  # a 32-pixel view whose tile grid starts 5 and 3 pixels in
    assert tile_psnr(frame, atlas, 8).item() == 60.0
    blurred = ((frame.float() + frame.roll(1, 2).float() + frame.roll(1, 3).float()) / 3).round().to(torch.uint8)
    assert tile_psnr(blurred, atlas, 8).item() < 20.0
    sprite = frame.clone()
    sprite[..., 12:20, 12:20, :] = 255 - sprite[..., 12:20, 12:20, :]
    assert tile_psnr(sprite, atlas, 8).item() < 40.0
    assert tile_psnr(sprite, atlas, 8, skip=(12, 12)).item() == 60.0
    up = atlas.repeat_interleave(2, 2).repeat_interleave(2, 3)  # tiles drawn at 16 pixels from the 8-pixel atlas
    big16 = up[0, ids].permute(0, 2, 1, 3, 4).reshape(80, 80, 3)
    assert tile_psnr(big16[7:55, 2:50][None, None], atlas, 16).item() == 60.0


def test_walk_scores_a_model_that_plays_the_simulator_as_perfect():
    """A rollout that returns the simulator's own frames: no stalls, the walk's PSNR at the
    cap and its tile score the simulator's."""
    from runtime.evaluate import walk
    from worlds.overworld import BatchOverworld, load_config

    world = load_config("overworld")

    class Replay:  # the rollout interface of rollout_frames, playing the simulator
        def reset(self, first, prompt, seed):
            self.world = BatchOverworld(world, first.shape[0])
            self.world.reset(list(range(first.shape[0])))

        def step(self, actions, teacher=None):
            return torch.from_numpy(self.world.step(actions.numpy()))

    res = walk(Replay(), world, [0, 1, 2, 3], 10, 0)
    assert res["walk_stall_fraction"] == 0.0 and res["walk_stall_fraction_per_seed"] == [0.0] * 4
    assert res["walk_stall_curve"] == [0.0] * 10
    assert res["walk_ground_stall_fraction"] == 0.0 and res["walk_ground_stall_fraction_per_seed"] == [0.0] * 4
    # the view's true displacement, measured on the simulator's frames themselves
    assert res["walk_ground_scroll_match"] == res["sim_walk_ground_scroll_match"] > 0.9
    assert res["walk_psnr"] == 60.0
    assert res["walk_tile_psnr"] == res["sim_walk_tile_psnr"]
    assert len(res["walk_tile_psnr_curve"]) == 10


def test_pause_revisit_walks_away_stands_still_and_walks_back():
    """eval.revisit_pause: the walk is `steps` moves right, `pause` idle frames, `steps` moves
    left; a rollout that plays the simulator scores its own pair and the truth at the cap."""
    from runtime.evaluate import revisits
    from worlds.actions import IDLE, LEFT, RIGHT
    from worlds.overworld import BatchOverworld, load_config

    world = load_config("overworld")
    seen = []

    class Replay:  # the rollout interface of rollout_frames, playing the simulator
        def reset(self, first, prompt, seed):
            self.world = BatchOverworld(world, first.shape[0])
            self.world.reset(list(range(first.shape[0])))
            seen.append([])

        def step(self, actions, teacher=None):
            seen[-1].append(actions.tolist())
            return torch.from_numpy(self.world.step(actions.numpy()))

    ev = OmegaConf.create({"revisit_steps": 3, "revisit_pause": 5})
    res = revisits(Replay(), world, [0, 1], ev, 0)
    assert len(seen) == 2  # the plain revisit, then the paused one
    assert [a[0] for a in seen[0]] == [RIGHT] * 3 + [LEFT] * 3
    assert [a[0] for a in seen[1]] == [RIGHT] * 3 + [IDLE] * 5 + [LEFT] * 3
    assert res["pause_revisit_frames"] == 5 and res["pause_revisit_steps"] == 3
    assert res["pause_revisit_psnr"] == pytest.approx(res["sim_pause_revisit_psnr"])
    assert res["pause_revisit_vs_truth_psnr"] == 60.0
    assert len(res["pause_revisit_psnr_per_seed"]) == 2
    assert "pause_revisit_psnr" not in revisits(Replay(), world, [0, 1], OmegaConf.create({"revisit_steps": 3}), 0)


def test_attention_comparison_scores_each_policy_against_dense_with_the_pause_revisit(tmp_path):
    """eval.attentions: every policy's rollout against dense's over the same walks, its cache
    memory and both revisit scores. A window longer than every walk keeps what dense keeps,
    so it scores dense's figures exactly; one of 2 frames has forgotten the start after the
    pause and holds less memory."""
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors", randomise=True, seed=3)
    res = run(compose_eval([f"engine.checkpoint={ckpt}", *SMALL_EVAL, "eval.quality=false", "eval.compare_frames=5",
                            "eval.stats_recall=false", "eval.revisit_pause=6",
                            "eval.attentions=['window:window_frames=40','window:window_frames=2',dense]"]))
    configs = res["attention_configs"]
    assert list(configs)[0] == "dense"  # the reference runs first
    dense, full, short = configs["dense"], configs["window:window_frames=40"], configs["window:window_frames=2"]
    assert dense["psnr_vs_dense"] == 60.0
    assert full["psnr_vs_dense"] == 60.0
    for key in ("revisit_psnr", "pause_revisit_psnr", "psnr_vs_sim"):
        assert full[key] == dense[key], key
    assert short["pause_revisit_frames"] == 6 and math.isfinite(short["pause_revisit_psnr"])
    assert short["pause_revisit_psnr"] != dense["pause_revisit_psnr"]  # it drew the way back without the start
    assert short["cache_mb"] < full["cache_mb"]
    assert short["sim_pause_revisit_psnr"] == dense["sim_pause_revisit_psnr"]  # the same walks
