"""Evaluation: `python -m runtime.evaluate [key=value ...] out=FILE.json` (conf/evaluate.yaml).

On world seeds and action scripts never used in training (training seeds start at
10**6; these are 0..N-1, actions from a separate generator), against the simulator:

    next_*        next-frame prediction from the true context (the cache holds true
                  frames; every frame is sampled with the few-step sampler)
    rollout_*     free-running: the model feeds on its own frames for 16/64/256 frames;
                  `rollout_psnr_H` is the PSNR at frame H, `rollout_psnr_mean_H` the
                  mean over frames 1..H
    copy_last_*   the "repeat the last true frame" baseline at the same frames
    unseen_fraction_H
                  how much of frame H shows places the first frame (all a free-running
                  rollout is given) never showed
    oracle_directions_psnr_H / _mean_H
                  the best guess about what no single frame shows in a world whose
                  creatures do not face their heading (`world.creature_facing=false`), the
                  direction each creature starts walking in (drawn from the seed): the mean
                  over every way the creatures may start, exact (`direction_oracle`); where
                  they face it, frame 0 shows it, and the oracle is the simulation. It knows
                  everything else (the map included), so in mean squared error no model
                  given one frame can do better. `oracle_directions_expected_psnr_*` is
                  the PSNR of its expected squared error over the ways, rather than of
                  its error for the way the seed drew
    sampled_directions_psnr_H / _mean_H
                  with `direction_draws` > 0: a faithful generator (frames drawn from the
                  world's own odds: sharp creatures that walk one way) that knows
                  everything but those directions, each creature's drawn at random,
                  averaged over the draws. `rollout_psnr_sampled_seen_H` is frame H with
                  the seen part (below) from such a draw and the rest from the model
    *_pooled_H    `rollout_psnr`, `oracle_directions_psnr` and its expected score as the
                  PSNR of the squared error averaged over the sequences, where the other
                  keys average each sequence's PSNR; `faithful_bound_psnr_pooled_H`:
                  a faithful generator's expected squared error is twice its uncertainty
                  (a draw and the truth are independent draws of it), so no faithful
                  generator given frame 0 scores above this in expectation on pooled
                  error (an average of PSNRs has no such bound: it favours scores that
                  vary from sequence to sequence)
    *_seen_H / *_unseen_H
                  `rollout_psnr` and `oracle_directions_psnr` at frame H over the pixels
                  that show places frame 0 showed, and over the others (PSNR of the mean
                  squared error within the part, averaged over the sequences that have
                  such pixels; null if none has): where a rollout's error comes from.
                  The oracle is the best guess on the seen part too: in expected squared
                  error no model does better there than `oracle_directions_psnr_seen_H`
    rollout_psnr_oracle_seen_H / _mean_H
                  frame H (and the mean over frames 1..H) with its seen part taken from
                  the oracle and the rest from the model: the most the model's own new
                  ground allows
    rollout_psnr_oracle_unseen_H / _mean_H
                  the same with the new places taken from the oracle and the seen part
                  from the model: the most the model's own drawing of seen places allows
    rollout_error_share_unseen_H
                  the share of frame H's squared error (summed over the sequences) on
                  the new places
    rollout_psnr_unseen_near_H / _far_H
                  `rollout_psnr` over the new places within half a tile of the seen
                  ones (mostly tiles frame 0 showed a part of) and over those beyond
    rollout_psnr_seen_creatures_H / _seen_other_H
                  `rollout_psnr` over the seen places within `CREATURE_MARGIN` pixels
                  of a creature's true sprite in frame H, and over the rest of them
    map_blind_psnr_unseen_H
                  with `blind_maps` > 0, the new places of frame H guessed without the
                  map: the pixel mean over that many other maps of the world config of
                  the view moved as this walk's view moved (`blind_frames`); a reference
                  for `rollout_psnr_unseen_H`
    idle_next_psnr_creatures_move / _still
                  next-frame prediction while the player stands still (only creatures
                  and water change), on the frames where creatures take a step and on
                  the others; `copy_last_idle_psnr_creatures_*` is the baseline
    creature_step_weight_true / _back / _sides / _stay / _absent, creature_step_fit_r2
                  on those step frames, how the prediction around each stepping creature
                  splits between the places it could be (least-squares weights of renders
                  with it one step ahead, back, aside, where it was, or gone) and how well
                  those renders explain the prediction
    *_per_seed, *_sem
                  next-frame PSNR and free-running PSNR (at each horizon and its mean
                  up to it) for each seed, in seed order, and the standard error of their
                  mean over seeds: how much the averages would move on other seeds (null
                  for one sequence)
    revisit_*     walk `revisit_steps` steps away and the same number back: PSNR between
                  the generated frames at the start and on return (the same place);
                  `sim_revisit_psnr` is the simulator's own pair (water and creatures
                  move, so it is finite)
    pause_revisit_*
                  with `revisit_pause` > 0: the same walk with that many frames of
                  standing still at its far end before the way back (what a cache
                  policy keeps of the start once that much more has come since);
                  `pause_revisit_frames` the pause, and the per-seed scores
    walk_*        straight walks into places the first frame never showed (each
                  sequence holds one direction for `walk_frames` frames), the part of
                  play that needs the model to make up new ground:
                  `walk_stall_fraction` is the share of frames where the simulator's
                  view scrolled and the generated one did not (the player stuck in the
                  model's world); `walk_tile_psnr` how well each generated frame of
                  the walk's second half is rebuilt from the world's own tiles (each
                  8-pixel cell of the best-fitting grid replaced by its nearest tile:
                  low for a washed-out blur or noise), `sim_walk_tile_psnr` the same
                  for the simulator's frames (sprites cost it a little);
                  `walk_psnr` the PSNR against the simulator over the walk;
                  `walk_stall_fraction_per_seed` each walk's share and
                  `walk_stall_curve` each frame's share over the walks;
                  `walk_ground_stall_fraction` (and per seed) the same with the
                  player's box left out of the shift's match: the player, drawn in
                  the middle of every frame, pulls the match of a faint, washed-out
                  ground to no shift, so this counts only frames whose ground itself
                  did not scroll; `walk_ground_scroll_match` the share of those
                  frames whose ground scrolled by the view's true displacement (the
                  simulator's), `sim_walk_ground_scroll_match` the same for the
                  simulator's own frames (below 1 where a creature's step sways the
                  match: the measure's floor)

PSNR is per frame, on uint8 frames scaled to [0, 1], capped at 60 dB, then averaged over
sequences. SSIM uses an 11x11 Gaussian window (sigma 1.5) on each RGB channel, averaged.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from controllers.random_agent import explore_actions
from runtime.cli import cli_errors, interruptible, storage_errors
from runtime.configs import check_config_files, check_engine, check_type, check_writable_file, config_int
from runtime.engine import Rollout
from runtime.factory import build_rollout, load_model, sampler_record
from runtime.metrics import mse, psnr, psnr_of_mse
from runtime.sparse import AttentionConfig
from runtime.tempcache import TempCache
from worlds.actions import DOWN, IDLE, LEFT, RIGHT, UP
from worlds.overworld import BatchOverworld, OverworldConfig
from worlds.overworld.batch import Layers


def psnr_u8(a: torch.Tensor, b: torch.Tensor, cap: float = 60.0) -> torch.Tensor:
    """(..., H, W, 3) pairs of frames in [0, 255] (uint8, or a float mean of such frames) ->
    PSNR per frame (...), capped."""
    return psnr(a, b, cap, value_range=255.0)


def ssim_u8(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, 3) pairs -> SSIM per frame (...), Gaussian window 11, sigma 1.5."""
    lead = a.shape[:-3]
    x = a.reshape(-1, *a.shape[-3:]).permute(0, 3, 1, 2).float() / 255.0
    y = b.reshape(-1, *b.shape[-3:]).permute(0, 3, 1, 2).float() / 255.0
    g = torch.exp(-((torch.arange(11, dtype=torch.float32) - 5) ** 2) / (2 * 1.5**2))
    g = (g / g.sum()).to(x.device)
    w = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)

    def blur(z):
        return F.conv2d(z, w, groups=3)

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx**2
    syy = blur(y * y) - my**2
    sxy = blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(-1).reshape(lead)


def simulate(world_cfg: OverworldConfig, seeds: list[int], actions: np.ndarray,
             creature_direction: int | np.ndarray | None = None):
    """Ground truth: frames (B, T+1, H, W, 3) uint8 (index 0 = reset) and positions (B, T+1, 2).
    `creature_direction`: the creatures start walking that way instead, as
    `BatchOverworld.point_creatures` takes it (what-if runs)."""
    w = BatchOverworld(world_cfg, len(seeds))
    frames = [w.reset(seeds)]
    if creature_direction is not None:
        w.point_creatures(creature_direction)
    pos = [w.player_pos.copy()]
    for t in range(actions.shape[1]):
        frames.append(w.step(actions[:, t]))
        pos.append(w.player_pos.copy())
    return torch.from_numpy(np.stack(frames, 1)), np.stack(pos, 1), torch.from_numpy(w.atlases.copy())


@torch.no_grad()
def rollout_frames(rollout: Rollout, first: torch.Tensor, prompt: torch.Tensor, actions: np.ndarray, seed: int,
                   teacher: torch.Tensor | None = None) -> torch.Tensor:
    """Generate T frames (B, T, H, W, 3). With `teacher` (B, T+1, ...) the cache gets true frames."""
    rollout.reset(first, prompt, seed)
    acts = torch.from_numpy(actions).long()
    out = [rollout.step(acts[:, t], None if teacher is None else teacher[:, t + 1]).cpu() for t in range(actions.shape[1])]
    return torch.stack(out, 1)


def prompts_of(atlases: torch.Tensor) -> torch.Tensor:
    from worlds.overworld import atlas_to_prompt

    return torch.from_numpy(np.stack([atlas_to_prompt(a) for a in atlases.numpy()])).float()


def seen_mask(pos: np.ndarray, view: int) -> torch.Tensor:
    """(B, T, V, V) bool: which pixels of frame t (t = 1..T) show places frame 0 showed, for
    the player's map pixel positions `pos` (B, T+1, 2) (the view follows the player)."""
    d = torch.from_numpy(pos[:, 1:] - pos[:, :1])  # (B, T, 2): the view's shift since frame 0
    r = torch.arange(view)
    rows = ((r + d[..., :1]) >= 0) & ((r + d[..., :1]) < view)  # (B, T, V): frame 0 showed this row
    cols = ((r + d[..., 1:]) >= 0) & ((r + d[..., 1:]) < view)
    return rows[..., :, None] & cols[..., None, :]


def unseen_fraction(pos: np.ndarray, view: int) -> torch.Tensor:
    """(T,) mean fraction of frame t's pixels (t = 1..T) that show places frame 0 did not."""
    return 1 - seen_mask(pos, view).float().mean((-2, -1)).mean(0)


def pixel_se(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., H, W, 3) pairs of frames in [0, 255] -> squared error per pixel (..., H, W),
    averaged over the channels, pixels in [0, 1]."""
    return ((a.float() - b.float()) / 255.0).pow(2).mean(-1)


def region_psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, cap: float = 60.0) -> torch.Tensor:
    """(..., H, W, 3) pairs of frames in [0, 255] -> PSNR per frame (...) over the pixels
    where `mask` (..., H, W) is true, capped; NaN for a frame with no such pixel."""
    return masked_psnr(pixel_se(a, b), mask, cap)


def masked_psnr(se: torch.Tensor, mask: torch.Tensor, cap: float = 60.0) -> torch.Tensor:
    """`region_psnr` from the squared errors `pixel_se` gives (..., H, W)."""
    n = mask.sum((-2, -1))
    err = (se * mask).sum((-2, -1)) / n.clamp_min(1)
    return torch.where(n > 0, psnr_of_mse(err, cap), float("nan"))


def distance_from(mask: torch.Tensor, limit: int) -> torch.Tensor:
    """(..., H, W) bool -> (..., H, W) int64: each pixel's chessboard distance in pixels to
    the nearest marked pixel of its frame, up to `limit`; limit + 1 beyond it (and in a frame
    with nothing marked)."""
    grown = mask.reshape(-1, 1, *mask.shape[-2:])
    dist = torch.where(grown, 0, limit + 1)
    for d in range(1, limit + 1):
        grown = F.max_pool2d(grown.float(), 3, stride=1, padding=1) > 0
        dist = torch.where(grown & (dist > d), d, dist)
    return dist.reshape(mask.shape)


CREATURE_MARGIN = 3  # pixels around a creature's sprite that its misplaced drawing covers


def creature_cover(world_cfg: OverworldConfig, seeds: list[int], actions: np.ndarray) -> torch.Tensor:
    """(B, T, H, W) bool: where a creature covers frame t (t = 1..T) of the simulation that
    `simulate` runs for these seeds and actions."""
    w = BatchOverworld(world_cfg, len(seeds))
    w.reset(seeds)
    cover = []
    for t in range(actions.shape[1]):
        w.step(actions[:, t])
        cover.append(w.creature_covers().any(1))
    return torch.from_numpy(np.stack(cover, 1))


@dataclass
class DirectionOracle:
    """What `direction_oracle` finds for frames 1..T of a walk."""

    frames: torch.Tensor   # (B, T, H, W, 3) float32 in [0, 255]: the mean over the creatures' ways
    spread: torch.Tensor   # (B, T) float32: its expected squared error, pixels in [0, 1]
    sampled: torch.Tensor  # (S, D, B, T): the S scores `score` gives D drawn frames (see direction_oracle)

    def expected_psnr(self, cap: float = 60.0) -> torch.Tensor:
        """(B, T) PSNR of the mean's expected squared error (not the PSNR it scores in
        expectation: a mean of logarithms is at least the logarithm of the mean)."""
        return psnr_of_mse(self.spread, cap)


def direction_oracle(world_cfg: OverworldConfig, seeds: list[int], actions: np.ndarray, draws: int = 0,
                     seed: int = 0, score: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> DirectionOracle:
    """The direction oracle (see the module docstring) for frames 1..T of this walk, and
    `draws` faithful draws of them, scored as they are made: `score(t, frames)` gets frame
    t + 1 of each draw, (D, B, H, W, 3) uint8, and returns (S, D, B) scores.

    Each creature's first direction is one of four, equally likely and drawn apart from
    everything else; a creature's path depends on its own direction only (nothing it meets
    moves), so four runs with every creature pointed one way give each creature's four
    paths. Their drawing order makes the mixture exact: creature k covers what is drawn
    below it, and its direction is independent of theirs, so the mean (and the mean
    square) of a pixel over all 4**K ways is the mean over k's four of its cover or, where
    it does not cover, the mean below. The spread is the mean's expected squared error:
    the frames' variance about it over the ways. In expectation no predictor given frame 0
    and the walk has a smaller squared error than the mean.

    A generator whose frames are draws from the world's own odds given what it is shown
    (a faithful one: sharp creatures that walk somewhere) pays twice its uncertainty in
    expected squared error, so at least twice the spread. A draw here picks each
    creature's direction at random (generator seeded by `seed`) and composes that world's
    frames: the score of a faithful generator that knows everything but the directions.

    Where creatures face their heading (`creature_facing`), frame 0 shows each direction:
    the one way is the seed's, the oracle is the simulation (spread 0) and so is every draw."""
    ways = 1 if world_cfg.creature_facing else 4
    worlds = [BatchOverworld(world_cfg, len(seeds)) for _ in range(ways)]
    for d, w in enumerate(worlds):
        w.reset(seeds)
        if ways > 1:
            w.point_creatures(d)
    made = min(draws, 1) if ways == 1 else draws  # with one way every draw is the same: made once
    pick = np.random.default_rng([seed % 2**64, 4]).integers(0, ways, size=(made, len(seeds), world_cfg.num_creatures))
    seq, kth = np.arange(len(seeds))[:, None], np.arange(world_cfg.num_creatures)[None, :]
    means, spreads, sampled = [], [], []
    for t in range(actions.shape[1]):
        layers = []
        for w in worlds:
            w.step(actions[:, t])
            layers.append(w.render_layers())
        first = layers[0]  # the ground and the player are the same in every run
        m1 = torch.from_numpy(first.ground).double()
        m2 = m1.square()
        for k in range(first.creatures.shape[1]):
            cover = [torch.from_numpy(x.creature_cover[:, k, ..., None]) for x in layers]
            image = [torch.from_numpy(x.creatures[:, k]).double() for x in layers]
            m1, m2 = (sum(torch.where(c, i, m1) for c, i in zip(cover, image)) / ways,
                      sum(torch.where(c, i.square(), m2) for c, i in zip(cover, image)) / ways)
        top = torch.from_numpy(first.player_cover[..., None])
        player = torch.from_numpy(first.player).double()
        m1, m2 = torch.where(top, player, m1), torch.where(top, player.square(), m2)
        means.append(m1.float())
        spreads.append(((m2 - m1.square()).clamp_min(0) / 255.0**2).flatten(1).mean(1).float())
        if made and score is not None:
            images = np.stack([x.creatures for x in layers])  # (ways, B, K, V, V, 3)
            covers = np.stack([x.creature_cover for x in layers])
            # each draw: every sequence's creature k walks its drawn way (pick (B, K))
            frames = np.stack([Layers(first.ground, images[p, seq, kth], covers[p, seq, kth], first.player,
                                      first.player_cover).compose() for p in pick])
            scores = score(t, torch.from_numpy(frames))  # (S, made, B)
            sampled.append(scores.expand(-1, draws, -1))
    return DirectionOracle(torch.stack(means, 1), torch.stack(spreads, 1),
                           torch.stack(sampled, -1) if sampled else torch.zeros(0, draws, len(seeds), actions.shape[1]))


def splice(frames: torch.Tensor, guess: torch.Tensor, seen: torch.Tensor, part: str) -> torch.Tensor:
    """`frames` (B, T, H, W, 3) with one part taken from `guess`: "seen" the pixels that
    `seen` (B, T, H, W) marks (places frame 0 showed), "unseen" the others. Float."""
    if part not in ("seen", "unseen"):
        raise ValueError(f"part={part!r}; expected 'seen' or 'unseen'")
    take = seen if part == "seen" else ~seen
    return torch.where(take[..., None], guess.float(), frames.float())


def frame_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., H, W, 3) pairs of frames in [0, 255] -> mean squared error per frame (...), pixels in [0, 1]."""
    return mse(a, b, value_range=255.0)


def pooled_psnr(err: torch.Tensor) -> torch.Tensor:
    """(B, T) squared errors -> (T,) PSNR of their mean over the sequences: the score of
    the pooled error, where the average PSNR is the mean of each sequence's score."""
    return psnr_of_mse(err.mean(0))


BLIND_SEED = 7 * 10**7  # the other maps of `blind_frames`: far from the evaluation's and training's seeds


def blind_frames(world_cfg: OverworldConfig, pos: np.ndarray, maps: int) -> torch.Tensor:
    """Frames 1..T (B, T, H, W, 3) uint8 guessed without the map: for each sequence, the
    pixel mean over `maps` other maps of the same world config (world seeds BLIND_SEED,
    BLIND_SEED + 1, ...; the same for every sequence) of the view moved from the spawn as
    the sequence's view moved (`pos` (B, T+1, 2), the player's positions). What a guess
    that knows the tiles and the walk, and nothing of this map, draws for a place."""
    n, steps = pos.shape[0], pos.shape[1] - 1
    total = None
    for k in range(maps):
        w = BatchOverworld(world_cfg, n)
        w.reset([BLIND_SEED + k] * n)
        idle = np.full(n, IDLE)
        frames = []
        for t in range(1, steps + 1):
            w.step(idle)  # water and creatures go on; the player stands, and the view is moved
            frames.append(w.render_view_moved(pos[:, t] - pos[:, 0]))
        run = np.stack(frames, 1).astype(np.uint32)
        total = run if total is None else total + run
    return torch.from_numpy(np.round(total / maps).astype(np.uint8))


def nan_mean(x: torch.Tensor) -> float | None:
    """The mean of the finite entries (None, JSON null, if there are none)."""
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else None


def per_seed(name: str, scores: torch.Tensor) -> dict:
    """`name`_per_seed: one score per sequence (seed order); `name`_sem: the standard error
    of their mean (sample standard deviation / sqrt(n); None, JSON null, for one sequence:
    one score shows no spread, and 0 would claim an exact mean)."""
    n = scores.numel()
    sem = float(scores.double().std() / n**0.5) if n > 1 else None
    return {f"{name}_per_seed": [round(float(v), 3) for v in scores], f"{name}_sem": sem}


def evaluate_model(model, cfg, world_cfg: OverworldConfig) -> dict:
    ev = cfg.eval
    n = int(ev.sequences)
    seeds = list(range(int(ev.seed_offset), int(ev.seed_offset) + n))
    rng = np.random.default_rng(int(ev.action_seed))
    horizons = [int(h) for h in ev.horizons]
    longest = max(horizons)
    nxt = int(ev.next_frames)
    # one walk per sequence, long enough for the longest horizon and for the next-frame scores
    actions = explore_actions(rng, n, max(longest, nxt))
    truth, pos, atlases = simulate(world_cfg, seeds, actions)
    prompt = prompts_of(atlases)
    rollout = build_rollout(model, cfg, batch=n)
    res: dict = {"sequences": n, "seeds": [seeds[0], seeds[-1]], "world": world_cfg.name}

    t0 = time.time()
    gen = rollout_frames(rollout, truth[:, 0], prompt, actions[:, :nxt], int(cfg.seed), teacher=truth)
    next_frames = psnr_u8(gen, truth[:, 1 : nxt + 1])  # (B, nxt)
    res["next_psnr"] = float(next_frames.mean())
    res.update(per_seed("next_psnr", next_frames.mean(1)))
    res["next_ssim"] = float(ssim_u8(gen, truth[:, 1 : nxt + 1]).mean())
    res["copy_last_next_psnr"] = float(psnr_u8(truth[:, :nxt], truth[:, 1 : nxt + 1]).mean())

    # free-running over the longest horizon (the walk may be longer for the next-frame scores)
    actions, truth, pos = actions[:, :longest], truth[:, : longest + 1], pos[:, : longest + 1]
    gen = rollout_frames(rollout, truth[:, 0], prompt, actions, int(cfg.seed))
    per_seq_frame = psnr_u8(gen, truth[:, 1:])  # (B, T)
    per_frame = per_seq_frame.mean(0)  # (T,)
    ssim_frame = ssim_u8(gen, truth[:, 1:]).mean(0)
    copy = psnr_u8(truth[:, :1].expand_as(truth[:, 1:]), truth[:, 1:]).mean(0)
    unseen = unseen_fraction(pos, truth.shape[2])
    seen = seen_mask(pos, truth.shape[2])

    def faithful(t: int, frames: torch.Tensor) -> torch.Tensor:  # a draw, and its seen part with the model's new ground
        target = truth[:, t + 1].expand_as(frames)
        spliced = splice(gen[:, t], frames, seen[:, t], "seen")
        return torch.stack([psnr_u8(frames, target), psnr_u8(spliced, target)])

    directions = direction_oracle(world_cfg, seeds, actions, int(ev.get("direction_draws", 0)), int(cfg.seed), faithful)
    guess = directions.frames
    oracle = psnr_u8(guess, truth[:, 1:]).mean(0)
    oracle_expected = directions.expected_psnr().mean(0)
    sampled = directions.sampled.mean((1, 2)) if directions.sampled.numel() else None  # (2, T)
    pooled = {"rollout_psnr_pooled": pooled_psnr(frame_mse(gen, truth[:, 1:])),
              "oracle_directions_psnr_pooled": pooled_psnr(frame_mse(guess, truth[:, 1:])),
              "oracle_directions_expected_psnr_pooled": pooled_psnr(directions.spread),
              "faithful_bound_psnr_pooled": pooled_psnr(2 * directions.spread)}
    # where the error comes from: places frame 0 showed and places it did not
    se = pixel_se(gen, truth[:, 1:])  # (B, T, H, W): the model's error, once for every part below
    split = {"rollout_psnr": se, "oracle_directions_psnr": pixel_se(guess, truth[:, 1:])}
    split = {name: (masked_psnr(err, seen), masked_psnr(err, ~seen)) for name, err in split.items()}
    best = {part: psnr_u8(splice(gen, guess, seen, part), truth[:, 1:]).mean(0) for part in ("seen", "unseen")}
    # the parts of each frame: new places near the seen ones and beyond, seen places near
    # a creature and the rest; and the new places' share of the squared error
    near_seen = distance_from(seen, world_cfg.tile // 2) <= world_cfg.tile // 2
    creatures = distance_from(creature_cover(world_cfg, seeds, actions), CREATURE_MARGIN) <= CREATURE_MARGIN
    parts = {"unseen_near": ~seen & near_seen, "unseen_far": ~seen & ~near_seen,
             "seen_creatures": seen & creatures, "seen_other": seen & ~creatures}
    parts = {name: masked_psnr(se, mask) for name, mask in parts.items()}
    share_unseen = (se * ~seen).sum((0, 2, 3)) / se.sum((0, 2, 3)).clamp_min(1e-12)  # (T,)
    maps = int(ev.get("blind_maps", 0))
    blind = region_psnr(blind_frames(world_cfg, pos, maps), truth[:, 1:], ~seen) if maps > 0 else None
    for h in horizons:
        res[f"unseen_fraction_{h}"] = float(unseen[h - 1])
        res[f"oracle_directions_psnr_{h}"] = float(oracle[h - 1])
        res[f"oracle_directions_psnr_mean_{h}"] = float(oracle[:h].mean())
        res[f"oracle_directions_expected_psnr_{h}"] = float(oracle_expected[h - 1])
        res[f"oracle_directions_expected_psnr_mean_{h}"] = float(oracle_expected[:h].mean())
        if sampled is not None:
            res[f"sampled_directions_psnr_{h}"] = float(sampled[0, h - 1])
            res[f"sampled_directions_psnr_mean_{h}"] = float(sampled[0, :h].mean())
            res[f"rollout_psnr_sampled_seen_{h}"] = float(sampled[1, h - 1])
        for name, scores in pooled.items():
            res[f"{name}_{h}"] = float(scores[h - 1])
        for name, (on_seen, on_unseen) in split.items():
            res[f"{name}_seen_{h}"] = nan_mean(on_seen[:, h - 1])
            res[f"{name}_unseen_{h}"] = nan_mean(on_unseen[:, h - 1])
        for part, scores in best.items():
            res[f"rollout_psnr_oracle_{part}_{h}"] = float(scores[h - 1])
            res[f"rollout_psnr_oracle_{part}_mean_{h}"] = float(scores[:h].mean())
        for name, scores in parts.items():
            res[f"rollout_psnr_{name}_{h}"] = nan_mean(scores[:, h - 1])
        res[f"rollout_error_share_unseen_{h}"] = float(share_unseen[h - 1])
        if blind is not None:
            res[f"map_blind_psnr_unseen_{h}"] = nan_mean(blind[:, h - 1])
        res[f"rollout_psnr_{h}"] = float(per_frame[h - 1])
        res.update(per_seed(f"rollout_psnr_{h}", per_seq_frame[:, h - 1]))
        res.update(per_seed(f"rollout_psnr_mean_{h}", per_seq_frame[:, :h].mean(1)))
        res[f"rollout_psnr_mean_{h}"] = float(per_frame[:h].mean())
        res[f"rollout_ssim_{h}"] = float(ssim_frame[h - 1])
        res[f"copy_last_psnr_{h}"] = float(copy[h - 1])
        res[f"copy_last_psnr_mean_{h}"] = float(copy[:h].mean())
    res["rollout_psnr_curve"] = [round(float(v), 3) for v in per_frame]
    res["time_rollout_s"] = round(time.time() - t0, 2)
    res.update(idle_next(rollout, world_cfg, seeds, nxt, int(cfg.seed)))
    res.update(revisits(rollout, world_cfg, seeds, ev, int(cfg.seed)))
    if int(ev.walk_frames) > 0:
        res.update(walk(rollout, world_cfg, seeds, int(ev.walk_frames), int(cfg.seed)))
    return res


def idle_next(rollout: Rollout, world_cfg: OverworldConfig, seeds: list[int], frames: int, seed: int) -> dict:
    """Next-frame prediction from true context while the player stands still: the view does
    not scroll, so what changes is the creatures (they move one pixel on every
    `creature_period`-th frame, on a rule their past moves reveal) and the water's phase.
    Scored separately on the frames where creatures move and on the others; frames where
    the water changes phase are left out of both. A group with no frame is left out."""
    n = len(seeds)
    acts = np.zeros((n, frames), dtype=np.int64)
    truth, atlases, places = simulate_creature_places(world_cfg, seeds, frames)
    gen = rollout_frames(rollout, truth[:, 0], prompts_of(atlases), acts, seed, teacher=truth)
    model, copy = psnr_u8(gen, truth[:, 1:]), psnr_u8(truth[:, :-1], truth[:, 1:])  # (B, T)
    t = torch.arange(1, frames + 1)  # frame t moves them when t is a multiple of the period (the simulator's clock)
    moves, water = t % world_cfg.creature_period == 0, t % world_cfg.water_period == 0
    out = {}
    for name, pick in (("move", moves & ~water), ("still", ~moves & ~water)):
        if not bool(pick.any()):
            continue
        out[f"idle_next_psnr_creatures_{name}"] = float(model[:, pick].mean())
        out[f"copy_last_idle_psnr_creatures_{name}"] = float(copy[:, pick].mean())
    out.update(step_weights(gen, places))
    return out


# where a creature can be one move tick after its last position: the four one-pixel steps
# (worlds/overworld/creatures.py's compass: up, right, down, left), staying (a turn), and
# "absent" (drawn out of sight: the ground it stands on), the last two by their index
PLACES = np.array([(-1, 0), (0, 1), (1, 0), (0, -1), (0, 0)], dtype=np.int64)
STAY, ABSENT = 4, 5
OUT_OF_SIGHT = np.array([10**4, 10**4], dtype=np.int64)


def simulate_creature_places(world_cfg: OverworldConfig, seeds: list[int], frames: int):
    """The idle simulation of `idle_next`, and on each frame where creatures step (water
    flips left out), for each creature that steps and whose box and one-pixel surroundings
    are in view: that frame drawn with the creature at each of the five PLACES around its
    last position and once without it (ABSENT).
    Returns frames (B, T+1, H, W, 3) uint8, the tile sets, and a list of
    (b, t, (y0, y1, x0, x1) region, renders (6, h, w, 3) uint8, index of the true place);
    t indexes the generated frames (frame t + 1)."""
    w = BatchOverworld(world_cfg, len(seeds))
    truth = [w.reset(seeds)]
    places = []
    box, view = world_cfg.tile, world_cfg.view
    idle = np.zeros(len(seeds), dtype=np.int64)
    for t in range(frames):
        before = w.creature_view_pos.copy()
        truth.append(w.step(idle))
        if w.frame_index % world_cfg.creature_period or w.frame_index % world_cfg.water_period == 0:
            continue
        moved = w.creature_view_pos - before  # (B, K, 2)
        stepped = ((before >= 1) & (before + box + 1 <= view)).all(-1) & (moved != 0).any(-1)  # (B, K)
        for k in np.nonzero(stepped.any(0))[0]:  # one render per place for the whole batch
            renders = [w.render_creature_moved(int(k), d - moved[:, k]) for d in PLACES]
            renders.append(w.render_creature_moved(int(k), OUT_OF_SIGHT - moved[:, k]))
            for b in np.nonzero(stepped[:, k])[0]:
                y, x = before[b, k]
                region = (y - 1, y + box + 1, x - 1, x + box + 1)
                true = int(np.nonzero((PLACES == moved[b, k]).all(-1))[0][0])
                places.append((int(b), t, region, np.stack([r[b, region[0]:region[1], region[2]:region[3]] for r in renders]), true))
    return torch.from_numpy(np.stack(truth, 1)), torch.from_numpy(w.atlases.copy()), places


def step_weights(gen: torch.Tensor, places: list) -> dict:
    """How a generated frame draws each stepping creature of `places`
    (simulate_creature_places): the least-squares weights of the six renders (the five
    places and the creature absent) that best reproduce the generated patch around it.
    A model that knows where a creature goes puts weight 1 on the true step; one that
    repeats the last frame, 1 on staying; a blur over the possible steps spreads it.
    Reported as mean weights on the true step, the step back, the two side steps, staying
    and absent, with the fit's mean R^2 (how much of the patch's variation the six renders
    explain: a low value means the patch is something else, e.g. a creature drawn two
    pixels off). Fits whose renders are not independent (a creature hidden at every
    place) are left out; `creature_step_count` is how many fits count."""
    rows = []
    for b, t, (y0, y1, x0, x1), renders, true in places:
        a = torch.from_numpy(renders).double().reshape(len(renders), -1).T  # (pixels, 6)
        if int(torch.linalg.matrix_rank(a)) < a.shape[1]:
            continue
        y = gen[b, t, y0:y1, x0:x1].double().reshape(-1)
        weights = torch.linalg.lstsq(a, y[:, None]).solution[:, 0]
        resid = y - a @ weights
        r2 = 1 - float(resid @ resid) / max(float(((y - y.mean()) ** 2).sum()), 1e-12)
        back = (true + 2) % 4
        sides = [i for i in range(4) if i not in (true, back)]
        rows.append([float(weights[true]), float(weights[back]), float(weights[sides].sum()), float(weights[STAY]),
                     float(weights[ABSENT]), r2])
    if not rows:
        return {"creature_step_count": 0}
    mean = np.mean(rows, axis=0)
    names = ("true", "back", "sides", "stay", "absent")
    return {"creature_step_count": len(rows), **{f"creature_step_weight_{n}": float(v) for n, v in zip(names, mean[:5])},
            "creature_step_fit_r2": float(mean[5])}


def revisit(rollout: Rollout, world_cfg: OverworldConfig, seeds: list[int], steps: int, seed: int,
            pause: int = 0, key: str = "revisit") -> dict:
    """Walk right `steps` times, stand still `pause` frames, walk left as many steps; compare
    frames where the player stands again. Keys start with `key`."""
    n = len(seeds)
    acts = np.concatenate([np.full((n, steps), RIGHT), np.full((n, pause), IDLE), np.full((n, steps), LEFT)], axis=1)
    truth, pos, atlases = simulate(world_cfg, seeds, acts)
    gen = rollout_frames(rollout, truth[:, 0], prompts_of(atlases), acts, seed)
    gen = torch.cat([truth[:, :1], gen], dim=1)  # frame 0 is the true reset frame
    # the return frame: the last frame at the start position (collisions can shorten walks)
    back = np.array([max(t for t in range(acts.shape[1] + 1) if (pos[i, t] == pos[i, 0]).all()) for i in range(n)])
    moved = np.array([np.abs(pos[i] - pos[i, 0]).max() for i in range(n)])
    idx = torch.arange(n)
    b = torch.from_numpy(back)
    gen_pair = psnr_u8(gen[idx, b], gen[:, 0])
    sim_pair = psnr_u8(truth[idx, b], truth[:, 0])
    out = {
        f"{key}_psnr": float(gen_pair.mean()),
        f"sim_{key}_psnr": float(sim_pair.mean()),
        f"{key}_vs_truth_psnr": float(psnr_u8(gen[idx, b], truth[idx, b]).mean()),
        f"{key}_steps": steps,
        f"{key}_mean_distance_px": float(moved.mean()),
    }
    if pause:
        out[f"{key}_frames"] = pause
        out.update(per_seed(f"{key}_psnr", gen_pair))
    return out


def revisits(rollout: Rollout, world_cfg: OverworldConfig, seeds: list[int], ev, seed: int) -> dict:
    """The revisit scores: `revisit_*`, and with `eval.revisit_pause` > 0 frames also
    `pause_revisit_*`: the same walk with that many frames of standing still at its far
    end, so the cache holds that much more before the way back (a policy that keeps only
    recent frames forgets the start; one that merges what repeats need not)."""
    res = revisit(rollout, world_cfg, seeds, int(ev.revisit_steps), seed)
    if int(ev.get("revisit_pause", 0)) > 0:
        res.update(revisit(rollout, world_cfg, seeds, int(ev.revisit_steps), seed, int(ev.revisit_pause), "pause_revisit"))
    return res


WALK_DIRECTIONS = (RIGHT, DOWN, LEFT, UP)


def frame_shifts(frames: torch.Tensor, radius: int, skip: tuple[int, int, int] | None = None) -> torch.Tensor:
    """(B, T, 2) integer shift (dy, dx) from each frame of `frames` (B, T + 1, H, W, 3) to
    the next: the displacement within `radius` pixels whose content matches best on the
    part both frames show (the next frame at pixel (y, x) against this one at
    (y + dy, x + dx)). Ties go to (0, 0): a flat frame does not move. skip (y, x, size):
    a box that stays put whatever the view does (the player), left out of the match with
    a margin of `radius`, so that it does not pull a faint background's shift to (0, 0)."""
    f = frames.float().mean(-1)  # (B, T+1, H, W)
    r, h, w = radius, f.shape[2], f.shape[3]
    nxt = f[:, 1:, r:h - r, r:w - r]
    keep = torch.ones(h - 2 * r, w - 2 * r, device=f.device)
    if skip is not None:  # in the coordinates of `nxt`: pixel (y, x) of the frame is (y - r, x - r)
        y0, x0, size = skip
        keep[max(0, y0 - 2 * r):max(0, y0 + size), max(0, x0 - 2 * r):max(0, x0 + size)] = 0
    keep = keep / keep.sum()
    cands = [(0, 0)] + [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0)]
    err = torch.stack([(((f[:, :-1, r + dy:h - r + dy, r + dx:w - r + dx] - nxt) ** 2) * keep).sum((-1, -2))
                       for dy, dx in cands], -1)  # (B, T, candidates)
    best = err.argmin(-1)  # the first of equal minima: (0, 0) when nothing tells the shifts apart
    return torch.tensor(cands)[best]


def tile_psnr(frames: torch.Tensor, atlases: torch.Tensor, tile: int, skip: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, T) PSNR of each frame (B, T, H, W, 3) uint8 against itself rebuilt from the
    world's ground tiles (atlases (B, 16, a, a, 3), upsampled to `tile` pixels): each
    `tile`-pixel cell of a grid, over the grid offset that fits best, replaced by its
    nearest tile (the sprite tiles, creature and player, are not ground). Cells cut by
    the frame's border are left out, and those overlapping the `tile`-pixel box whose top
    left pixel is `skip` (y, x) (the player, drawn there in every frame)."""
    from worlds.overworld.tiles import SPRITE_TILES

    b, t, h, w, _ = frames.shape
    up = tile // atlases.shape[2]
    ground = [i for i in range(atlases.shape[1]) if i not in SPRITE_TILES]
    tiles = atlases[:, ground].float().repeat_interleave(up, 2).repeat_interleave(up, 3)  # (B, G, tile, tile, 3)
    tiles = tiles.reshape(b, 1, len(ground), -1).expand(b, t, -1, -1)
    x = frames.float()
    best = None
    for oy in range(tile):
        for ox in range(tile):
            ny, nx = (h - oy) // tile, (w - ox) // tile
            cells = x[:, :, oy:oy + ny * tile, ox:ox + nx * tile].reshape(b, t, ny, tile, nx, tile, 3)
            cells = cells.permute(0, 1, 2, 4, 3, 5, 6).reshape(b, t, ny * nx, -1)  # (B, T, N, tile*tile*3)
            err = (torch.cdist(cells, tiles) ** 2).min(-1).values / cells.shape[-1]  # (B, T, N)
            keep = torch.ones(ny, nx, dtype=torch.bool)
            if skip is not None:
                y0, x0 = oy + torch.arange(ny) * tile, ox + torch.arange(nx) * tile
                rows = (y0 < skip[0] + tile) & (y0 + tile > skip[0])
                cols = (x0 < skip[1] + tile) & (x0 + tile > skip[1])
                keep = ~(rows[:, None] & cols[None, :])
            err = err[..., keep.flatten()].mean(-1)  # (B, T)
            best = err if best is None else torch.minimum(best, err)
    return psnr_of_mse(best / 255.0**2)


def walk(rollout: Rollout, world_cfg: OverworldConfig, seeds: list[int], frames: int, seed: int) -> dict:
    """Each sequence walks one way (right, down, left, up, in turn) for `frames` frames,
    out of the first frame's view into ground the model has to make up (see `walk_*` in
    the module docstring)."""
    n = len(seeds)
    acts = np.stack([np.full(frames, WALK_DIRECTIONS[i % 4], dtype=np.int64) for i in range(n)])
    truth, pos, atlases = simulate(world_cfg, seeds, acts)
    gen = rollout_frames(rollout, truth[:, 0], prompts_of(atlases), acts, seed)
    moved = torch.from_numpy((np.diff(pos, axis=1) != 0).any(-1))  # (B, T) the simulator's view scrolled
    seq = torch.cat([truth[:, :1], gen], 1)
    still = (frame_shifts(seq, world_cfg.scroll + 1) == 0).all(-1)
    player = (world_cfg.player_view, world_cfg.player_view)  # drawn there in every frame
    # the same without the player's box: the ground's own scroll, however faint, and
    # whether it is the view's true displacement (the simulator's frames measured the same
    # way: the measure's own floor, which creatures stepping in view lower a little)
    box = player + (world_cfg.tile,)
    ground = frame_shifts(seq, world_cfg.scroll + 1, box)
    still_ground = (ground == 0).all(-1)
    true_shift = torch.from_numpy(np.diff(pos, axis=1))  # (B, T, 2): the view's displacement, as frame_shifts gives it
    same = (ground == true_shift).all(-1)
    sim_same = (frame_shifts(truth, world_cfg.scroll + 1, box) == true_shift).all(-1)
    gen_tiles = tile_psnr(gen, atlases, world_cfg.tile, player).mean(0)  # (T,)
    sim_tiles = tile_psnr(truth[:, 1:], atlases, world_cfg.tile, player).mean(0)
    half = slice(frames // 2, frames)

    def share(flags: torch.Tensor, *dim: int):
        """The share of the frames where the simulator's view scrolled that `flags` marks
        (over everything, or per walk / per frame along `dim`)."""
        return (moved & flags).sum(*dim) / moved.sum(*dim).clamp_min(1)

    return {
        "walk_frames": frames,
        "walk_stall_fraction": float(share(still)),
        # per walk (paired comparisons) and per frame of the walks (where stalls begin)
        **per_seed("walk_stall_fraction", share(still, 1)),
        "walk_stall_curve": [round(float(v), 3) for v in share(still, 0)],
        "walk_ground_stall_fraction": float(share(still_ground)),
        **per_seed("walk_ground_stall_fraction", share(still_ground, 1)),
        "walk_ground_scroll_match": float(share(same)),
        "sim_walk_ground_scroll_match": float(share(sim_same)),
        "walk_tile_psnr": float(gen_tiles[half].mean()),
        "sim_walk_tile_psnr": float(sim_tiles[half].mean()),
        "walk_tile_psnr_curve": [round(float(v), 2) for v in gen_tiles],
        "walk_psnr": float(psnr_u8(gen, truth[:, 1:]).mean()),
    }


def attention_cfg(spec: str):
    """conf/attention/NAME.yaml as a config node (for comparing several in one run).

    `spec` is NAME or NAME:KEY=VALUE;KEY=VALUE (variants of a preset, e.g.
    "tempcache:match=local;threshold=0.9"); a variant is named by its whole spec."""
    name, _, rest = spec.partition(":")
    path = Path(__file__).resolve().parent.parent / "conf" / "attention" / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"unknown attention config {name!r} in {spec!r}; expected some of {options}")
    node = OmegaConf.load(path)
    if rest:
        items = [kv for kv in rest.split(";") if kv]
        bad = [kv for kv in items if "=" not in kv or kv.split("=", 1)[0].split(".")[0] not in node]
        if bad:
            raise ValueError(f"attention variant {spec!r}: {bad} are not KEY=VALUE with keys of {name}.yaml ({list(node)})")
        node = OmegaConf.merge(node, OmegaConf.from_dotlist(items))
        node.name = spec
    return node


def check_attention(spec: str, where: str) -> None:
    """An attention spec of a list setting (`where`) is a valid config, or ValueError naming
    the entry."""
    try:
        AttentionConfig.from_dict(attention_cfg(spec))
    except ValueError as err:
        raise ValueError(f"{where} entry {spec!r}: {err}") from None


def compare_attention(model, cfg, world_cfg: OverworldConfig) -> dict:
    """Each attention config against the dense rollout with the same seeds and actions."""
    ev = cfg.eval
    n, frames = int(ev.sequences), int(ev.compare_frames)
    seeds = list(range(int(ev.seed_offset), int(ev.seed_offset) + n))
    actions = explore_actions(np.random.default_rng(int(ev.action_seed) + 1), n, frames)
    truth, _, atlases = simulate(world_cfg, seeds, actions)
    prompt = prompts_of(atlases)
    out, ref = {}, None
    names = list(ev.attentions)
    if "dense" in names:  # the reference first
        names.remove("dense")
        names.insert(0, "dense")
    for name in names:
        acfg = attention_cfg(name)
        acfg.stats_recall = bool(ev.stats_recall)
        rollout = build_rollout(model, cfg, batch=n, attention=acfg)
        t0 = time.time()
        gen = rollout_frames(rollout, truth[:, 0], prompt, actions, int(cfg.seed))
        r = {"time_s": round(time.time() - t0, 2), "frames": frames,
             "psnr_vs_sim": float(psnr_u8(gen, truth[:, 1:]).mean()),
             "ssim_vs_sim": float(ssim_u8(gen, truth[:, 1:]).mean()),
             "cache_tokens_per_layer": rollout.cache.num_tokens(0),
             "cache_mb": round(rollout.cache.memory_bytes() / 2**20, 2)}
        if name == "dense":
            ref = gen
        if ref is not None:
            h = min(int(ev.compare_head), frames)
            r["psnr_vs_dense"] = float(psnr_u8(gen, ref).mean())
            r[f"psnr_vs_dense_{h}"] = float(psnr_u8(gen[:, :h], ref[:, :h]).mean())
            r["ssim_vs_dense"] = float(ssim_u8(gen, ref).mean())
        stats = rollout.attention.summary()
        r["self_attn"] = {k: stats["self_attn"][k] for k in ("density", "recall")}
        r["cross_attn"] = {k: stats["cross_attn"][k] for k in ("density", "recall")}
        r["self_attn_per_layer"] = stats["self_attn"]["per_layer"]
        if "merge_rate" in stats:
            r["merge_rate"] = stats["merge_rate"]
        r.update(revisits(rollout, world_cfg, seeds, ev, int(cfg.seed)))
        out[name] = r
    return out


def motion_split(model, cfg, world_cfg: OverworldConfig) -> dict:
    """Merge rate, density and recall of each attention config, separately for idle play
    (nothing scrolls) and moving play (the view scrolls 2 px per frame). For TempCache,
    `history_recall` is the fraction of dense attention mass over every key the rollout
    committed that the cache still represents (TempCache.history_recall)."""
    ev = cfg.eval
    n, frames = int(ev.sequences), int(ev.motion_frames)
    seeds = list(range(int(ev.seed_offset), int(ev.seed_offset) + n))
    rng = np.random.default_rng(int(ev.action_seed) + 2)
    moving = rng.choice([1, 2, 3, 4], size=(n, 1)).repeat(frames, axis=1)  # one held direction each
    scripts = {"idle": np.zeros((n, frames), dtype=np.int64), "moving": moving}
    sims = {kind: simulate(world_cfg, seeds, acts) for kind, acts in scripts.items()}  # the same for every config
    out: dict = {}
    for name in ev.attentions:
        acfg = attention_cfg(str(name))
        acfg.stats_recall = True
        out[str(name)] = {}
        for kind, acts in scripts.items():
            truth, _, atlases = sims[kind]
            rollout = build_rollout(model, cfg, batch=n, attention=acfg)
            if isinstance(rollout.cache, TempCache):
                rollout.cache.track_history = True
            rollout_frames(rollout, truth[:, 0], prompts_of(atlases), acts, int(cfg.seed))
            s = rollout.attention.summary()
            history = rollout.cache.recall_summary() if isinstance(rollout.cache, TempCache) else None
            out[str(name)][kind] = {"merge_rate": s.get("merge_rate"), "history_recall": history,
                                    "self_attn": {k: s["self_attn"][k] for k in ("density", "recall")},
                                    "cross_attn": {k: s["cross_attn"][k] for k in ("density", "recall")}}
    return out


def check(cfg: DictConfig) -> None:
    """The evaluation's settings, checked before anything runs: ValueError naming the bad one."""
    ev = cfg.eval
    check_engine(cfg)
    config_int(cfg.seed, "seed")
    for key in ("quality", "stats_recall"):
        check_type(ev.get(key, True), bool, f"eval.{key}")
    if cfg.get("out"):
        check_writable_file(str(cfg.out), "out")
    for key, minimum in (("sequences", 1), ("seed_offset", 0), ("action_seed", 0), ("next_frames", 1),
                         ("revisit_steps", 1), ("revisit_pause", 0), ("walk_frames", 0), ("compare_frames", 0),
                         ("compare_head", 0), ("motion_frames", 0), ("blind_maps", 0), ("direction_draws", 0)):
        config_int(ev.get(key, 0), f"eval.{key}", minimum=minimum)
    horizons = check_type(ev.horizons, list[int], "eval.horizons")
    if not horizons or min(horizons) < 1:
        raise ValueError(f"eval.horizons must be a non-empty list of integers >= 1, got {horizons!r}")
    for spec in check_type(ev.attentions, list[str], "eval.attentions"):
        check_attention(spec, "eval.attentions")


def run(cfg: DictConfig, loaded=None) -> dict:
    """The evaluation. `loaded`: the model `load_model` gives, loaded after `check` passed (as
    main does); without it, both are done here."""
    world_cfg = OverworldConfig.from_dict(cfg.world)
    if loaded is None:
        check(cfg)
        loaded = load_model(cfg, world_cfg)
    model = loaded.model
    t0 = time.time()
    res = {"checkpoint": str(cfg.engine.checkpoint), "device": str(loaded.device), "dtype": str(loaded.dtype).replace("torch.", ""),
           "attention": str(cfg.attention.name), **sampler_record(cfg, loaded.device),
           "metric": "per-frame PSNR on uint8 frames in [0,1], capped at 60 dB, averaged over sequences"}
    if bool(cfg.eval.quality):
        res.update(evaluate_model(model, cfg, world_cfg))
    if cfg.eval.attentions and int(cfg.eval.compare_frames) > 0:
        res["attention_configs"] = compare_attention(model, cfg, world_cfg)
    if cfg.eval.attentions and int(cfg.eval.motion_frames) > 0:
        res["motion_split"] = motion_split(model, cfg, world_cfg)
    res["total_s"] = round(time.time() - t0, 1)
    return res


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with interruptible("runtime.evaluate"):
        with cli_errors("runtime.evaluate"):  # bad settings, a missing or corrupt checkpoint, an unwritable out: one line, exit 2
            check(cfg)
            loaded = load_model(cfg, OverworldConfig.from_dict(cfg.world))
        res = run(cfg, loaded)
        if cfg.out:
            with storage_errors("runtime.evaluate"):  # the disk filled meanwhile: the results go to stdout instead
                try:
                    Path(str(cfg.out)).parent.mkdir(parents=True, exist_ok=True)
                    Path(str(cfg.out)).write_text(json.dumps(res, indent=2) + "\n")
                except OSError:
                    print(json.dumps(res, indent=2), flush=True)
                    raise
    summary = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items() if not isinstance(v, (list, dict))}
    for name, r in res.get("attention_configs", {}).items():
        summary[name] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                         if k.startswith("psnr_vs_dense") or k in ("psnr_vs_sim", "revisit_psnr", "pause_revisit_psnr",
                                                                    "merge_rate", "cache_tokens_per_layer", "cache_mb", "time_s")}
        summary[name]["sa_density"] = r["self_attn"]["density"]
        summary[name]["ca_density"] = r["cross_attn"]["density"]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    check_config_files("runtime.evaluate", sys.argv[1:])
    main()
