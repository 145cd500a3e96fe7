"""Training: `python -m runtime.train [key=value ...]` (Hydra, conf/train.yaml).

Teacher forcing on a doubled sequence (see the mask in runtime/attention.py): F clean
context frames and F-1 noisy targets, each target attending to the clean frames before
it and to itself, exactly as generation does with a KV cache. Flow matching with
x0-prediction; context-noise augmentation on half of the sequences (the clean frames
get a small noise level, which the model is told) so free-running rollouts, whose
context is the model's own output, do not drift. With `train.data.memory_frames` > 0
the sequence starts with earlier frames of the same trajectory at their true temporal
distance (runtime/data.py), so the model learns to use a long cache rather than
only the last F frames it was trained on. With `train.rollout_prob` > 0 that share of the
micro-batches takes its context from the model's own frames (`self_rollout_frames`, or
with `train.rollout_mode=play` the engine's own free-running rollout, `played_frames`)
while the targets stay the true frames: the model learns to recover from its own errors.

Runs on CPU (the tests' smoke run) and on GPUs (bf16 autocast). Several processes
through torchrun use DDP: NCCL on GPUs, gloo on CPU. Checkpoints are safetensors (EMA
weights + config); a log line per interval goes to OUT/log.jsonl.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig, OmegaConf

from runtime.attention import FlexSelfAttention, MaskedSelfAttention, dense_cross_attn, teacher_forcing_mask
from runtime.checkpoint import save_checkpoint
from runtime.cli import cli_errors
from runtime.configs import check_config_files, check_type
from runtime.data import DataConfig, WindowDataset
from runtime.engine import to_uint8, to_unit
from runtime.factory import resolve_device
from runtime.metrics import psnr  # [-1, 1] frames (..., C, H, W)
from runtime.model import ModelConfig, WorldModel, add_motion_head, take_blocks, widen_prev_frames
from runtime.sampler import FlowSampler, SamplerConfig
from worlds.overworld import load_config


def build_inputs(batch: dict, ctx_sigma: torch.Tensor | None, t_tgt: torch.Tensor, gen: torch.Generator | None,
                 device, noisy_targets: torch.Tensor | None = None, context_frames: torch.Tensor | None = None):
    """Assemble [memory | clean | noisy targets] (the mask in runtime/attention.py).
    The window's frames hold K frames before x_0 (the model's `prev_frames`): K is the
    number of frames less the number of actions, plus one.
    ctx_sigma (B,): context-noise level of the clean frames (None: clean, time 0);
    noisy_targets: the targets at time t_tgt as given (sampling) instead of noised here;
    context_frames: uint8 frames like batch["frames"] (a self-rollout) that the clean
    context is made of instead; the targets stay batch["frames"].
    Returns (noisy, prev, t, actions, frame_index, targets); prev stacks each frame's K
    previous frames on the channels, the last one first."""
    # the loader pins its batches: the copies need not wait for the device to finish the
    # previous step (a blocking copy does)
    x = to_unit(batch["frames"].to(device, non_blocking=True))  # (B, F+K, 3, S, S): x_{-K} .. x_{F-1}
    xc = x if context_frames is None else to_unit(context_frames.to(device, non_blocking=True))
    acts = batch["actions"].to(device, non_blocking=True)  # (B, F+1): the actions of x_{-1} .. x_{F-1}
    b, f = x.shape[0], acts.shape[1] - 1
    k = x.shape[1] - f
    if ctx_sigma is None:
        sigma = torch.zeros(b, device=device)
        context = lambda frames: frames  # noqa: E731
    else:
        sigma = ctx_sigma

        def context(frames: torch.Tensor) -> torch.Tensor:  # context noise on clean frames
            s = sigma.view(b, *([1] * (frames.dim() - 1)))
            return (1 - s) * frames + s * torch.randn(frames.shape, generator=gen, device=device)

    ctx = context(xc)
    # the previous frames of x_0 .. x_{F-1}: x_{i-1} .. x_{i-K} on the channels
    prev_ctx = torch.cat([ctx[:, k - 1 - j : k - 1 - j + f] for j in range(k)], dim=2)  # (B, F, K*3, S, S)
    targets = x[:, k + 1 :]  # x_1 .. x_{F-1}
    if noisy_targets is None:
        eps_t = torch.randn(targets.shape, generator=gen, device=device)
        tt = t_tgt.view(b, f - 1, 1, 1, 1)
        noisy_targets = (1 - tt) * targets + tt * eps_t
    noisy = [ctx[:, k:], noisy_targets]
    prev = [prev_ctx, prev_ctx[:, 1:]]
    t = [sigma.view(b, 1).expand(b, f), t_tgt]
    actions = [acts[:, 1:], acts[:, 2:]]
    frame_index = [torch.arange(f, device=device), torch.arange(1, f, device=device)]
    if "memory" in batch:  # earlier frames of the trajectories, at their true distance
        m = batch["memory"].shape[1]
        noisy.insert(0, context(to_unit(batch["memory"].to(device, non_blocking=True))))
        mem_prev = context(to_unit(batch["memory_prev"].to(device, non_blocking=True)))  # (B, M, K, 3, S, S)
        prev.insert(0, mem_prev.flatten(2, 3))
        t.insert(0, sigma.view(b, 1).expand(b, m))
        actions.insert(0, batch["memory_actions"].to(device, non_blocking=True))
        frame_index.insert(0, batch["memory_index"].to(device, non_blocking=True))
    cat = lambda parts: torch.cat(parts, dim=1)  # noqa: E731
    return cat(noisy), cat(prev), cat(t), cat(actions), torch.cat(frame_index), targets


def sample_times(b: int, n: int, grid: torch.Tensor, gen, device, grid_prob: float = 0.5) -> torch.Tensor:
    """On the sampler's own grid with probability `grid_prob` (the times few-step
    sampling visits), else uniform in (0, 1]. grid: the sampler's times, already on the
    device (a copy from the host on every step would wait for the device)."""
    u = 1 - torch.rand(b, n, generator=gen, device=device)
    g = grid[torch.randint(len(grid), (b, n), generator=gen, device=device)]
    pick = torch.rand(b, n, generator=gen, device=device) < grid_prob
    return torch.where(pick, g, u)


def focus_weights(creatures: torch.Tensor, size: int, box: int, margin: int, weight: float) -> torch.Tensor:
    """Per-pixel loss weights (B, n, 1, size, size): 1 + `weight` on each creature's box
    grown by `margin` pixels (which covers its one-pixel step), 1 elsewhere.
    creatures: (B, n, K, 2) view pixel (y, x) of each box's top-left in each target frame.
    Creatures are a few percent of the pixels but move by their own rule, not by the
    view's scroll: the part of a frame hardest to predict. (With the view scrolling too,
    a box can have moved up to margin + 1 pixels in the previous frame's coordinates.)"""
    r = torch.arange(size, device=creatures.device)
    y, x = creatures[..., 0, None], creatures[..., 1, None]  # (B, n, K, 1)
    rows = (r >= y - margin) & (r < y + box + margin)  # (B, n, K, size)
    cols = (r >= x - margin) & (r < x + box + margin)
    inside = (rows[..., :, None] & cols[..., None, :]).any(dim=2)  # (B, n, size, size)
    return (1 + weight * inside.float())[:, :, None]


def frame_balance_weights(pred: torch.Tensor, target: torch.Tensor, power: float, floor_db: float) -> torch.Tensor:
    """Per-frame loss weights (B, n, 1, 1, 1), without gradient: (frame MSE + floor) ** -power,
    the MSE on the [0, 1] scale of the evaluation's PSNR (frames here are in [-1, 1]) and the
    floor the MSE of a frame at `floor_db` dB. Plain MSE spends most of its gradient on the
    frames with the most error (new ground no frame showed, which no model can know); the
    evaluation averages PSNR, a log of each frame's MSE, so a dB gained on a frame with
    little error counts as much as one on a frame with much. With power 1 and the weights
    normalized (`weighted_mse`), the gradient is that of the mean over frames of
    log(MSE + floor), up to a positive factor per batch; 0 gives plain MSE."""
    with torch.no_grad():
        mse = ((pred.float() - target.float()) ** 2).mean(dim=(2, 3, 4), keepdim=True) / 4
        return (mse + 10.0 ** (-floor_db / 10)) ** -power


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """MSE, or with per-pixel weights normalized by their mean (the loss keeps its scale)."""
    err = (pred.float() - target) ** 2
    if weights is None:
        return err.mean()
    return (weights * err).mean() / weights.mean()


def forward_doubled(model, batch, ctx_sigma, t_tgt, gen, device, self_attn, context_frames=None, noisy_targets=None):
    noisy, prev, t, actions, frame_index, targets = build_inputs(batch, ctx_sigma, t_tgt, gen, device,
                                                                 noisy_targets=noisy_targets,
                                                                 context_frames=context_frames)
    prompt = batch["prompt"].to(device, non_blocking=True)
    return model(noisy, prev, t, actions, frame_index, self_attn, dense_cross_attn, prompt, outputs=targets.shape[1]), targets


def sample_targets(model, batch: dict, noise: torch.Tensor, sampler: FlowSampler, device, self_attn, pkv) -> torch.Tensor:
    """Every target of the window sampled at once from the batch's clean context: one
    sampler run from `noise` (B, F-1, 3, S, S); x0 estimates in [-1, 1] (pkv: the encoded prompt)."""
    b, n = noise.shape[:2]

    def denoise(x, t, i):  # the sequence with the current noisy targets
        t_tgt = torch.full((b, n), t, device=device)
        noisy, prev, tt, actions, fi, _ = build_inputs(batch, None, t_tgt, None, device, noisy_targets=x)
        return model(noisy, prev, tt, actions, fi, self_attn, dense_cross_attn, pkv, outputs=n)

    return sampler.sample(denoise, noise)


@torch.no_grad()
def distill_targets(teacher, batch: dict, noise: torch.Tensor, sampler: FlowSampler, device, self_attn) -> torch.Tensor:
    """What the teacher's sampler makes of every target of the window from `noise` (B, F-1,
    3, S, S) at time 1 and the window's clean context (batch["frames"], without context
    noise): x0 estimates in [-1, 1], the targets of `train.distill` (a one-step model learns
    to map the same noise to the same frames)."""
    pkv = teacher.encode_prompt(batch["prompt"].to(device, non_blocking=True))
    return sample_targets(teacher, batch, noise, sampler, device, self_attn, pkv)


def load_teacher(dc, mcfg: ModelConfig, device):
    """The frozen teacher of `train.distill` and its sampler; None without a teacher.
    Its frames and previous frames must be the student's (they read the same windows)."""
    if not dc.get("teacher"):
        return None, None
    from runtime.checkpoint import load_checkpoint

    teacher, _ = load_checkpoint(str(dc.teacher))
    for key in ("frame_size", "patch", "channels", "prev_frames", "num_actions", "prompt_tokens", "prompt_dim"):
        if getattr(teacher.cfg, key) != getattr(mcfg, key):
            raise ValueError(f"train.distill.teacher={str(dc.teacher)!r} has model.{key}={getattr(teacher.cfg, key)!r}, "
                             f"but the model trained has {getattr(mcfg, key)!r}: a teacher must read the same windows")
    return teacher.to(device).eval().requires_grad_(False), teacher_sampler(dc.times)


def teacher_sampler(times) -> FlowSampler:
    """The teacher's sampler of `train.distill`: its `times`, one step each (SamplerConfig
    checks them)."""
    times = [float(t) for t in times]
    return FlowSampler(SamplerConfig(steps=len(times), times=times))


@torch.no_grad()
def self_rollout_frames(model, batch: dict, passes: int, sampler: FlowSampler, gen, device, self_attn) -> torch.Tensor:
    """The window's frames (uint8, like batch["frames"]) with x_1 .. x_{F-1} replaced by
    the model's own frames, rounded to uint8 as generation shows and remembers them.

    Each pass samples every target at once from the context the pass before left (the
    first from the true frames), with one noise draw per frame kept over the passes. So
    after P passes x_1 .. x_P are exactly the free-running rollout from the true x_0 and
    its predecessors, and each later frame carries P steps of the model's own error: a
    training context like the one play gives, for P forwards without gradients (a
    rollout of all F-1 frames would take F-1). Memory frames stay true."""
    frames = batch["frames"].to(device, non_blocking=True)
    b, n = frames.shape[0], batch["actions"].shape[1] - 2
    noise = torch.randn((b, n, 3) + tuple(frames.shape[2:4]), generator=gen, device=device)
    pkv = model.encode_prompt(batch["prompt"].to(device, non_blocking=True))
    for _ in range(min(passes, n)):  # after n passes every frame is free-running: more change nothing
        x0 = sample_targets(model, dict(batch, frames=frames), noise, sampler, device, self_attn, pkv)
        frames = torch.cat([frames[:, :-n], to_uint8(x0)], dim=1)
    return frames


@torch.no_grad()
def played_frames(player, model, batch: dict, sampler: FlowSampler, seed: int, device) -> torch.Tensor:
    """The window's frames (uint8, like batch["frames"]) with x_1 .. x_{F-1} replaced by the
    engine's free-running rollout from x_0: `runtime.engine.Rollout` over a KV cache, one
    frame after another, every frame from the frames it made before, as in play. x_0
    starts it as play starts (its previous frames are itself, its action idle) and memory
    frames are not in its cache. `player` is a copy of `model` in the dtype the rollout runs
    in (bf16 when training in bf16); the model's current weights are copied into it first.
    For about one forward over the window it gives what `self_rollout_frames` needs F-1
    passes for, so every frame of a window can be free-running."""
    from runtime.cache import CacheSpec, DenseCache
    from runtime.engine import Rollout

    torch._foreach_copy_(list(player.parameters()), list(model.parameters()))
    frames = batch["frames"].to(device, non_blocking=True)
    acts = batch["actions"].to(device, non_blocking=True)
    n = acts.shape[1] - 2  # targets x_1 .. x_{F-1}
    k = frames.shape[1] - n - 1  # x_0's index: x_{-K} .. x_{-1} come first
    c = player.cfg
    dtype = next(player.parameters()).dtype
    spec = CacheSpec(c.depth, frames.shape[0], c.heads, c.head_dim, c.tokens_per_frame, torch.device(device), dtype)
    engine = Rollout(player, sampler, DenseCache(spec, initial_frames=n + 1))
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        engine.reset(frames[:, k], batch["prompt"].to(device, non_blocking=True), seed)
        made = [engine.step(acts[:, 2 + i]) for i in range(n)]
    return torch.cat([frames[:, : k + 1], torch.stack(made, dim=1)], dim=1)


@torch.no_grad()
def teacher_forced_psnr(model, batch, sampler: FlowSampler, device, mask) -> float:
    """Next-frame PSNR from the true context, sampling every target with the sampler.
    The context is the window's own frames (memory frames are left out: `mask` is the
    plain teacher-forcing mask)."""
    window = {k: v for k, v in batch.items() if not k.startswith("memory")}
    b, n = batch["frames"].shape[0], batch["actions"].shape[1] - 2
    gen = torch.Generator(device=device).manual_seed(1234)
    noise = torch.randn((b, n, 3) + tuple(batch["frames"].shape[2:4]), generator=gen, device=device)
    pkv = model.encode_prompt(batch["prompt"].to(device))
    x0 = sample_targets(model, window, noise, sampler, device, MaskedSelfAttention(mask), pkv)
    x0 = to_unit(to_uint8(x0))  # rounded as generation shows frames
    return float(psnr(x0, to_unit(batch["frames"][:, -n:].to(device))).mean())


def setup_distributed(device_cfg: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device_cfg in ("auto", "cuda") and torch.cuda.is_available() or device_cfg.startswith("cuda:")
    if want_cuda:
        device = torch.device(device_cfg if device_cfg.startswith("cuda:") else f"cuda:{local}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def check_train_settings(tc: DictConfig) -> None:
    """Reject settings that would train on nothing or fail mid-run, before anything starts.

    Raises ValueError naming the key, its value and what was expected.
    """

    def integer(key: str, value) -> int:
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={value!r}; expected an integer") from None

    def number(key: str, value) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={value!r}; expected a number") from None

    env_batch = integer("train.data.env_batch", tc.data.env_batch)
    if env_batch < 1:
        raise ValueError(f"train.data.env_batch={tc.data.env_batch!r}; expected an integer >= 1")
    batch_size = integer("train.batch_size", tc.batch_size)
    if batch_size < 1 or batch_size % env_batch:
        raise ValueError(f"train.batch_size={tc.batch_size} must be a positive multiple of train.data.env_batch={env_batch}")
    for key in ("steps", "eval_every", "ckpt_every"):
        if integer(f"train.{key}", tc[key]) < 1:
            raise ValueError(f"train.{key}={tc[key]!r}; expected an integer >= 1")
    if integer("train.workers", tc.workers) < 0:
        raise ValueError(f"train.workers={tc.workers!r}; expected an integer >= 0")
    if integer("train.profile_steps", tc.profile_steps) < 0:
        raise ValueError(f"train.profile_steps={tc.profile_steps!r}; expected an integer >= 0")
    for key in ("context_noise_prob", "grid_prob"):
        if not 0.0 <= number(f"train.{key}", tc[key]) <= 1.0:
            raise ValueError(f"train.{key}={tc[key]!r}; expected a probability in [0, 1]")
    if not number("train.focus_weight", tc.focus_weight) >= 0:
        raise ValueError(f"train.focus_weight={tc.focus_weight!r}; expected a number >= 0")
    if not number("train.frame_balance", tc.frame_balance) >= 0:
        raise ValueError(f"train.frame_balance={tc.frame_balance!r}; expected a number >= 0 (0: plain MSE, 1: the mean per-frame log-MSE)")
    if not number("train.frame_balance_floor_db", tc.frame_balance_floor_db) > 0:
        raise ValueError(f"train.frame_balance_floor_db={tc.frame_balance_floor_db!r}; expected a PSNR in dB > 0, e.g. 50")
    if integer("train.focus_margin", tc.focus_margin) < 0:
        raise ValueError(f"train.focus_margin={tc.focus_margin!r}; expected an integer >= 0")
    if not 0.0 <= number("train.rollout_prob", tc.rollout_prob) <= 1.0:
        raise ValueError(f"train.rollout_prob={tc.rollout_prob!r}; expected a probability in [0, 1]")
    if integer("train.rollout_passes", tc.rollout_passes) < 1:
        raise ValueError(f"train.rollout_passes={tc.rollout_passes!r}; expected an integer >= 1")
    if tc.rollout_mode not in ("passes", "play"):
        raise ValueError(f"train.rollout_mode={tc.rollout_mode!r}; expected 'passes' or 'play'")
    dc = tc.get("distill") or {}
    if not 0.0 <= number("train.distill.prob", dc.get("prob", 1.0)) <= 1.0:
        raise ValueError(f"train.distill.prob={dc.get('prob')!r}; expected a probability in [0, 1]")
    check_type(dc.get("rolled", True), bool, "train.distill.rolled")
    if dc.get("teacher"):
        times = dc.get("times")
        try:
            teacher_sampler(times)
        except (TypeError, ValueError):
            raise ValueError(f"train.distill.times={times!r}; expected the teacher's sampler times, values in (0, 1], "
                             "e.g. [1.0, 0.25]") from None
    for key in ("lr", "weight_decay", "grad_clip", "ema", "context_noise_max"):
        number(f"train.{key}", tc[key])
    if integer("train.warmup", tc.warmup) < 0:
        raise ValueError(f"train.warmup={tc.warmup!r}; expected an integer >= 0")
    for key in ("bf16", "compile", "progress", "overwrite"):
        check_type(tc.get(key, False), bool, f"train.{key}")
    if tc.attention not in ("flex", "sdpa"):
        raise ValueError(f"train.attention={tc.attention!r}; expected 'flex' or 'sdpa'")
    worlds = check_type(tc.worlds, list[str], "train.worlds")
    if not worlds:
        raise ValueError("train.worlds=[]; expected at least one world config name, e.g. [overworld]")
    for name in worlds:
        load_config(name)
    for key, path in (("train.init", tc.get("init")), ("train.distill.teacher", dc.get("teacher"))):
        if path and not Path(str(path)).is_file():
            raise ValueError(f"{key}={str(path)!r}: no such checkpoint file")
    if not number("train.time_limit_s", tc.time_limit_s) > 0:
        raise ValueError(f"train.time_limit_s={tc.time_limit_s!r}; expected a number of seconds > 0")
    if tc.get("init_blocks") is not None:
        if not tc.get("init"):
            raise ValueError(f"train.init_blocks={tc.init_blocks!r} needs train.init: the checkpoint whose blocks to start from")
        if not isinstance(tc.init_blocks, (list, ListConfig)):
            raise ValueError(f"train.init_blocks={tc.init_blocks!r}; expected a list of block indices, e.g. [0,3,5,7]")


def profile_start(device):
    """torch.profiler over the next training steps (`train.profile_steps`)."""
    from torch.profiler import profile

    from runtime.profile_step import activities

    prof = profile(activities=activities(device.type == "cuda"))
    prof.start()
    return prof


def profile_stop(prof, device, n: int, path: Path, progress) -> None:
    """End the profile of `n` steps; write what a step spent to `path` and print it."""
    from runtime.profile_step import summarize

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    prof.stop()
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "steps": n,
           **summarize(prof, n, device.type == "cuda", 25, "step")}
    path.write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"profile of {n} steps: {res['profiled_ms_per_step']:.1f} ms of kernels/operators per step, host "
             f"{res['host_ms_per_step']:.1f} ms, {res['host_waits_per_step']:.1f} waits per step ({path})"]
    lines += [f"  {t['ms_per_step']:8.2f} ms  x{t['calls_per_step']:<7.1f} {t['name'][:100]}" for t in res["top"][:12]]
    (progress.write if progress is not None else print)("\n".join(lines))


def check_run(cfg: DictConfig) -> None:
    """The settings, the device and the output directory, before anything starts: `out`
    must not hold an earlier run (its checkpoint and log) unless train.overwrite=true."""
    check_train_settings(cfg.train)
    resolve_device(cfg.device)  # a known device that this machine has
    out = Path(str(cfg.out))
    held = [n for n in ("model.safetensors", "log.jsonl") if (out / n).exists()]
    if held and not cfg.train.get("overwrite", False) and int(os.environ.get("RANK", "0")) == 0:
        raise ValueError(f"out={str(out)!r} holds an earlier run ({', '.join(held)}); choose a new directory, or pass "
                         "train.overwrite=true to replace it")


def train(cfg: DictConfig, checked: bool = False) -> dict:
    """Train (`checked`: `check_run` already passed, as in main)."""
    if not checked:
        check_run(cfg)
    rank, world, device = setup_distributed(str(cfg.device))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(int(cfg.seed) + rank)
    mcfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True) | {})
    # the noise levels' grid and the rollouts of training: the CPU's sampler (or `sampler.steps`)
    # on every device, as every shipped stage was trained
    scfg = SamplerConfig.from_dict(OmegaConf.to_container(cfg.sampler, resolve=True)).on("cpu")
    sampler = FlowSampler(scfg)
    tc = cfg.train
    data = OmegaConf.to_container(tc.data, resolve=True)
    if "prev_frames" in data:
        raise ValueError("train.data.prev_frames is set by the model; use model.prev_frames instead")
    dcfg = DataConfig(**data, prev_frames=mcfg.prev_frames)
    world_cfgs = [load_config(name) for name in tc.worlds]
    model = WorldModel(mcfg).to(device)
    if tc.get("init"):
        from runtime.checkpoint import load_checkpoint

        init, _ = load_checkpoint(str(tc.init))
        state = init.state_dict()
        blocks = tc.get("init_blocks")
        if blocks is not None:  # a shallower model from some of the init's blocks
            blocks = list(blocks)
            if len(blocks) != mcfg.depth:
                raise ValueError(f"train.init_blocks={blocks!r} names {len(blocks)} blocks; expected model.depth={mcfg.depth} of them")
            try:
                state = take_blocks(state, blocks, init.cfg.depth)
            except ValueError as err:
                raise ValueError(f"train.init_blocks={blocks!r} for train.init={tc.init!r} ({init.cfg.depth} blocks): {err}") from None
        if init.cfg != mcfg:  # accepted only as the same model given more previous frames or motion weights
            grown = replace(init.cfg, prev_frames=mcfg.prev_frames, motion_radius=mcfg.motion_radius,
                            depth=mcfg.depth if blocks is not None else init.cfg.depth)
            if (grown != mcfg or init.cfg.prev_frames > mcfg.prev_frames
                    or init.cfg.motion_radius not in (0, mcfg.motion_radius)):
                raise ValueError(f"train.init={tc.init!r} has model config {init.cfg}, expected {mcfg} "
                                 "(or the same with fewer prev_frames, or motion_radius 0, or another depth with train.init_blocks)")
            state = widen_prev_frames(state, mcfg)
            if init.cfg.motion_radius != mcfg.motion_radius:
                state = add_motion_head(state, mcfg)
        model.load_state_dict(state)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    dc = tc.get("distill") or {}
    teacher, teacher_flow = load_teacher(dc, mcfg, device)
    distill_prob = float(dc.get("prob", 1.0)) if teacher is not None else 0.0
    distill_rolled = bool(dc.get("rolled", True))  # false: rolled micro-batches learn the true frames instead
    player = None  # the engine's copy for train.rollout_mode=play: made before any compiling
    if float(tc.rollout_prob) > 0 and tc.rollout_mode == "play":
        player = copy.deepcopy(model).eval().requires_grad_(False).to(torch.bfloat16 if bool(tc.bf16) else torch.float32)
    if rank == 0:
        print(f"model: {model.num_params() / 1e6:.2f}M parameters on {device} x{world}", flush=True)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=float(tc.lr), betas=(0.9, 0.95), weight_decay=float(tc.weight_decay))
    loader = torch.utils.data.DataLoader(
        WindowDataset(world_cfgs, dcfg, rank=rank),
        batch_size=None,
        num_workers=int(tc.workers),
        pin_memory=device.type == "cuda",
        persistent_workers=int(tc.workers) > 0,
        prefetch_factor=4 if int(tc.workers) > 0 else None,
    )
    micro = int(tc.batch_size) // dcfg.env_batch  # >= 1: check_train_settings
    if str(tc.attention) not in ("flex", "sdpa"):
        raise ValueError(f"train.attention={tc.attention!r}; expected 'flex' (GPU) or 'sdpa'")

    def attention_over(memory: int):
        if str(tc.attention) == "flex" and device.type == "cuda":
            return FlexSelfAttention(dcfg.frames, mcfg.tokens_per_frame, device, memory)
        return MaskedSelfAttention(teacher_forcing_mask(dcfg.frames, mcfg.tokens_per_frame, device, memory))

    # start windows (train.data.start_prob) carry no memory frames: their own mask
    attn_of = {dcfg.memory_frames: attention_over(dcfg.memory_frames)}
    if dcfg.memory_frames and dcfg.start_prob > 0:
        attn_of[0] = attention_over(0)
    if bool(tc.compile):
        for blk in [*model.blocks, *(teacher.blocks if teacher is not None else [])]:
            blk.compile(dynamic=False)  # regional compilation: each block's forward, one code shared by all
        # that code keeps a compiled entry per layer index (an int argument) and grad mode:
        # training and the self-rollout passes (no grad) need two per block (the EMA copy the
        # evaluation runs was made before compiling), the limit below leaves room to spare.
        # Past torch's default limit (8) the blocks ran eagerly, with FlexAttention unfused:
        # many times slower
        dyn = torch._dynamo.config
        limit = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"  # the older name
        # (a distillation teacher's blocks add one entry each; start windows, shorter, one more each)
        setattr(dyn, limit, max(getattr(dyn, limit), 8 * len(model.blocks)))
    eval_batch = next(iter(torch.utils.data.DataLoader(
        WindowDataset(world_cfgs, DataConfig(**{**asdict(dcfg), "seed_base": 17, "env_batch": min(16, dcfg.env_batch), "start_prob": 0.0})),
        batch_size=None)))
    out = Path(str(cfg.out))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, out / "train_config.yaml")
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bool(tc.bf16))
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed) * 1000 + rank)
    grid = torch.tensor(sampler.times, device=device, dtype=torch.float32)  # the sampler's times, once
    steps = int(tc.steps)
    focus_weight = float(tc.focus_weight)
    balance, balance_floor_db = float(tc.frame_balance), float(tc.frame_balance_floor_db)
    rollout_prob, rollout_passes = float(tc.rollout_prob), int(tc.rollout_passes)
    # which micro-batches get a self-rollout context: the same on every process (under DDP a
    # step waits for the slowest process), drawn on the host (no device sync)
    pick = random.Random(int(cfg.seed))
    noise_seeds = random.Random(int(cfg.seed) * 1000 + rank)  # the played rollouts' noise, per process
    box = world_cfgs[0].tile  # a creature's box is one tile
    t_start = time.time()

    def elapsed_s() -> float:
        """Seconds since the start, the same on every process: the slowest clock (a collective
        under DDP, so every process calls it at the same point of each step). Learning rates
        and the time-limit stop derive from it, so the processes agree on both."""
        elapsed = time.time() - t_start
        if world > 1:
            shared = torch.tensor([elapsed], dtype=torch.float64, device=device)
            dist.all_reduce(shared, op=dist.ReduceOp.MAX)
            elapsed = float(shared.item())
        return elapsed

    def rolled_context(batch: dict, attn) -> torch.Tensor:
        """The window's frames with the targets replaced by the model's own (train.rollout_mode);
        `attn`: the batch's training attention (the self-rollout passes use it)."""
        if player is not None:
            return played_frames(player, model, batch, sampler, noise_seeds.getrandbits(62), device)
        return self_rollout_frames(model, batch, rollout_passes, sampler, gen, device, attn)

    it = iter(loader)
    log = []
    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=steps, desc="train", dynamic_ncols=True, disable=not bool(tc.progress))
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    # train.profile_steps: profile that many steps (rank 0), after 10 steps of warm-up
    # (compiles, the loader's first batches) or from the start of a shorter run
    n_prof = int(tc.profile_steps)
    prof_from = max(0, min(10, steps - n_prof)) if n_prof and rank == 0 else -1
    prof = None
    step = 0
    elapsed = 0.0  # the shared clock, read once per step (a collective under DDP)
    last_metrics: dict = {}
    while step < steps:
        # cosine decay over whichever runs out first: the step budget or the time budget
        progress_frac = min(1.0, max(step / steps, elapsed / float(tc.time_limit_s)))
        lr = float(tc.lr) * min(1.0, (step + 1) / max(1, int(tc.warmup))) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        if step == prof_from:
            prof = profile_start(device)
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)  # stays on the device: no host sync per micro-batch
        for _ in range(micro):
            batch = next(it)
            b = batch["frames"].shape[0]
            train_attn = attn_of[batch["memory"].shape[1] if "memory" in batch else 0]
            ctx_sigma = torch.rand(b, generator=gen, device=device) * float(tc.context_noise_max)
            ctx_sigma = ctx_sigma * (torch.rand(b, generator=gen, device=device) < float(tc.context_noise_prob))
            t_tgt = sample_times(b, dcfg.frames - 1, grid, gen, device, float(tc.grid_prob))
            weights = None
            if focus_weight > 0:
                creatures = batch["creatures"]
                creatures = creatures[:, creatures.shape[1] - (dcfg.frames - 1):].to(device, non_blocking=True)  # the targets' frames
                weights = focus_weights(creatures, mcfg.frame_size, box, int(tc.focus_margin), focus_weight)
            with amp:
                # which micro-batches are distilled and which take the model's own frames as
                # context: drawn in that order (the same on every process)
                distilled = distill_prob > 0 and pick.random() < distill_prob
                rolled = None
                if rollout_prob > 0 and pick.random() < rollout_prob:
                    rolled = rolled_context(batch, train_attn)
                    # weights cast to bf16 without gradients must not serve the forward that
                    # trains (older torch kept them in autocast's cache)
                    torch.clear_autocast_cache()
                    # train.distill.rolled=false: a rolled context trains the plain objective,
                    # the true frames its targets, and only true contexts are distilled
                    distilled = distilled and distill_rolled
                if distilled:
                    # one step from time 1 learns the teacher's frames from the same noise and context;
                    # a rolled context is the teacher's too (it corrects the student where the
                    # student's own rollouts take it)
                    if rolled is not None:
                        batch = dict(batch, frames=rolled)
                    n, size = dcfg.frames - 1, mcfg.frame_size
                    noise = torch.randn((b, n, mcfg.channels, size, size), generator=gen, device=device)
                    target = distill_targets(teacher, batch, noise, teacher_flow, device, train_attn).float()
                    torch.clear_autocast_cache()  # the teacher's bf16 weight copies must not serve the student
                    pred, _ = forward_doubled(ddp, batch, None, torch.ones(b, n, device=device), gen, device,
                                              train_attn, noisy_targets=noise)
                else:
                    pred, target = forward_doubled(ddp, batch, ctx_sigma, t_tgt, gen, device, train_attn, rolled)
                if balance > 0:
                    per_frame = frame_balance_weights(pred, target, balance, balance_floor_db)
                    weights = per_frame if weights is None else weights * per_frame
                loss = weighted_mse(pred, target, weights) / micro
            loss.backward()
            total += loss.detach()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), float(tc.grad_clip))
        opt.step()
        with torch.no_grad():
            d = min(float(tc.ema), (1 + step) / (10 + step))  # short runs: the average ramps up
            torch._foreach_lerp_(ema_params, model_params, 1 - d)
        step += 1
        if prof is not None and (step == prof_from + n_prof or step == steps):
            profile_stop(prof, device, step - prof_from, out / "profile.json", progress)
            prof = None
        elapsed = elapsed_s()
        stop = elapsed > float(tc.time_limit_s)
        if rank == 0:
            progress.update(1)
            if step % 10 == 0:  # reading the loss syncs with the device: not every step
                progress.set_postfix(loss=f"{float(total):.5f}", lr=f"{lr:.1e}")
            if step % int(tc.eval_every) == 0 or step == steps or stop:
                with amp:
                    tf = teacher_forced_psnr(ema, eval_batch, sampler, device, teacher_forcing_mask(eval_batch["actions"].shape[1] - 1, mcfg.tokens_per_frame, device))
                last_metrics = {"step": step, "loss": float(total), "grad_norm": float(gn), "lr": lr, "elapsed_s": round(elapsed, 1), "tf_psnr": round(tf, 2)}
                log.append(last_metrics)
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(last_metrics) + "\n")
                progress.write(json.dumps(last_metrics))
            if step % int(tc.ckpt_every) == 0 or step == steps or stop:
                info = {"world_family": "overworld", "step": step, "elapsed_s": round(elapsed, 1), "device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
                        "processes": world, "sampler": OmegaConf.to_container(cfg.sampler), "train": OmegaConf.to_container(tc), "metrics": last_metrics}
                save_checkpoint(out / "model.safetensors", ema, info)
        if stop:
            break
    if prof is not None:  # the time limit came first
        profile_stop(prof, device, step - prof_from, out / "profile.json", progress)
    if progress is not None:
        progress.close()
    if world > 1:
        # together: a process that tore its group down while rank 0 still saved could abort at
        # exit (gloo: "terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
    return {"steps": step, "metrics": last_metrics, "elapsed_s": time.time() - t_start}


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with cli_errors("runtime.train"):  # bad settings, missing files, an earlier run in `out`: one line, exit 2
        check_run(cfg)
    train(cfg, checked=True)


if __name__ == "__main__":
    check_config_files("runtime.train", sys.argv[1:])
    main()
