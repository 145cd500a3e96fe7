"""Training: a CPU smoke run, a two-process DDP run (gloo), the teacher-forcing masks, bad settings."""
from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, compose

from runtime.attention import MaskedSelfAttention, teacher_forcing_mask, teacher_forcing_mask_mod
from runtime.checkpoint import load_checkpoint, read_metadata
from runtime.model import ModelConfig

SMOKE = [
    "model=tiny", "device=cpu", "train.steps=2", "train.batch_size=4", "train.data.env_batch=4", "train.workers=0",
    "train.eval_every=2", "train.ckpt_every=2", "train.bf16=false", "train.progress=false", "train.attention=sdpa",
    "train.data.frames=5",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def compose_train(overrides: list[str]):
    return compose(overrides, config_name="train")


def tiny_config() -> ModelConfig:
    from omegaconf import OmegaConf

    return ModelConfig.from_dict(OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml")))


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- smoke runs


@pytest.mark.parametrize("memory, focus, start, balance", [(0, 0, 0.0, 0.0), (3, 4, 0.0, 1.0), (3, 0, 1.0, 0.0)])
def test_cpu_smoke_run(tmp_path, memory, focus, start, balance):
    """(start 1: every batch a start window, without the memory frames the mask expects;
    balance: per-frame loss weights, with the creatures' weights)"""
    from runtime.train import train

    cfg = compose_train(SMOKE + [f"out={tmp_path}", f"train.data.memory_frames={memory}", f"train.focus_weight={focus}",
                                 f"train.data.start_prob={start}", f"train.frame_balance={balance}"])
    res = train(cfg)
    assert res["steps"] == 2
    ckpt, log = tmp_path / "model.safetensors", tmp_path / "log.jsonl"
    assert ckpt.is_file() and log.is_file() and (tmp_path / "train_config.yaml").is_file()
    lines = read_log(log)
    assert [line["step"] for line in lines] == [2]
    for key in ("loss", "tf_psnr", "grad_norm", "lr"):
        assert math.isfinite(lines[-1][key]), (key, lines[-1])
    assert lines[-1]["loss"] > 0 and lines[-1]["tf_psnr"] > 0
    model, info = load_checkpoint(ckpt)
    assert model.cfg == tiny_config()
    assert info["step"] == 2 and info["processes"] == 1 and info["world_family"] == "overworld"
    assert info["metrics"] == lines[-1]


def test_cpu_smoke_run_mixing_start_windows_and_windows_with_memory(tmp_path):
    """Batches of both kinds in one run (checked on the run's own stream), each with its
    own mask, through the plain objective and self-rollout contexts."""
    from omegaconf import OmegaConf

    from runtime.data import DataConfig, WindowStream
    from runtime.train import train
    from worlds.overworld import load_config

    steps, memory = 6, 3
    cfg = compose_train(SMOKE + [f"out={tmp_path}", f"train.data.memory_frames={memory}", "train.data.start_prob=0.5",
                                 "train.rollout_prob=0.5", f"train.steps={steps}", f"train.eval_every={steps}",
                                 f"train.ckpt_every={steps}"])
    data = DataConfig(**OmegaConf.to_container(cfg.train.data), prev_frames=tiny_config().prev_frames)  # as train makes it
    stream = WindowStream([load_config(name) for name in cfg.train.worlds], data, rank=0)
    kinds = ["memory" in stream.next() for _ in range(steps)]  # the batches the run (one worker, rank 0) trains on
    assert any(kinds) and not all(kinds), kinds
    assert train(cfg)["steps"] == steps


def test_init_from_a_model_with_fewer_previous_frames_widens_it(tmp_path):
    """train.init from the same model with one previous frame trains a model with two: the
    checkpoint is widened (runtime.model.widen_prev_frames) and saved with the new config."""
    from runtime.checkpoint import save_checkpoint
    from runtime.model import WorldModel
    from runtime.train import train

    init = tmp_path / "one.safetensors"
    one = WorldModel(tiny_config())
    save_checkpoint(init, one, {"world_family": "overworld"})
    cfg = compose_train(SMOKE + [f"out={tmp_path / 'run'}", f"train.init={init}", "model.prev_frames=2",
                                 "train.data.memory_frames=2"])
    assert train(cfg)["steps"] == 2
    model, _ = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert model.cfg.prev_frames == 2 and model.embed.weight.shape[1] == 3 * model.cfg.patch_dim
    # the EMA of two steps from the widened weights: the original columns carried over,
    # the new ones near their zero start (a fresh initialisation is far from both)
    p = model.cfg.patch_dim
    kept, added = model.embed.weight[:, : 2 * p].float(), model.embed.weight[:, 2 * p :].float()
    assert (kept - one.embed.weight).abs().max() < 0.02 < one.embed.weight.abs().max()
    assert added.abs().max() < 0.02


def test_init_from_a_model_without_motion_weights_adds_the_head(tmp_path):
    """train.init from the same model without motion weights trains one with them: the
    head starts at zero (runtime.model.add_motion_head) and the result is saved with the
    new config; a model with a head of another radius is refused."""
    from runtime.checkpoint import save_checkpoint
    from runtime.model import WorldModel
    from runtime.train import train

    init = tmp_path / "plain.safetensors"
    plain = WorldModel(tiny_config())
    save_checkpoint(init, plain, {"world_family": "overworld"})
    cfg = compose_train(SMOKE + [f"out={tmp_path / 'run'}", f"train.init={init}", "model.motion_radius=2"])
    assert train(cfg)["steps"] == 2
    model, _ = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert model.cfg.motion_radius == 2
    assert model.motion.weight.shape == (len(model.cfg.motion_offsets) * 64, model.cfg.width)
    assert (model.embed.weight.float() - plain.embed.weight).abs().max() < 0.02 < plain.embed.weight.abs().max()
    assert 0 < model.motion.weight.float().abs().max() < 0.02  # trained from its zero start
    bad = compose_train(SMOKE + [f"out={tmp_path / 'run2'}", f"train.init={tmp_path / 'run' / 'model.safetensors'}",
                                 "model.motion_radius=1"])
    with pytest.raises(ValueError, match="or motion_radius 0"):
        train(bad)


def test_init_blocks_start_a_shallower_model_from_chosen_blocks(tmp_path):
    """train.init_blocks starts a model of fewer blocks from the init's blocks in the given
    order; everything outside the blocks comes from the init too. Without train.init, with
    the wrong number of blocks, a repeated or out-of-range index, or a value that is not a
    list the run is refused."""
    from dataclasses import replace

    from runtime.checkpoint import save_checkpoint
    from runtime.model import WorldModel, take_blocks
    from runtime.train import train

    deep_cfg = replace(tiny_config(), depth=3)
    deep = WorldModel(deep_cfg)
    shallow = WorldModel(replace(deep_cfg, depth=2))
    state = take_blocks(deep.state_dict(), [2, 0], 3)
    shallow.load_state_dict(state)  # strict: exactly the shallow model's keys
    for name, p in shallow.blocks[0].state_dict().items():
        assert torch.equal(p, deep.blocks[2].state_dict()[name])
    for name, p in shallow.blocks[1].state_dict().items():
        assert torch.equal(p, deep.blocks[0].state_dict()[name])
    assert torch.equal(shallow.embed.weight, deep.embed.weight)

    init = tmp_path / "deep.safetensors"
    save_checkpoint(init, deep, {"world_family": "overworld"})
    cfg = compose_train(SMOKE + [f"out={tmp_path / 'run'}", f"train.init={init}", "model.depth=2", "train.init_blocks=[2,0]",
                                 f"model.motion_radius={deep_cfg.motion_radius}", f"model.prev_frames={deep_cfg.prev_frames}"])
    assert train(cfg)["steps"] == 2
    model, _ = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert model.cfg.depth == 2
    moved = (model.blocks[0].qkv.weight.float() - deep.blocks[2].qkv.weight).abs().max()
    assert moved < 0.02 < (model.blocks[0].qkv.weight.float() - deep.blocks[0].qkv.weight).abs().max()
    same = [f"train.init={init}", f"model.motion_radius={deep_cfg.motion_radius}", f"model.prev_frames={deep_cfg.prev_frames}"]
    with pytest.raises(ValueError, match=r"train.init_blocks=\[0\] names 1 blocks; expected model.depth=2"):
        train(compose_train(SMOKE + [f"out={tmp_path / 'r2'}", "model.depth=2", "train.init_blocks=[0]"] + same))
    for blocks in ("[0,3]", "[1,1]", "[-1,0]"):
        with pytest.raises(ValueError, match=r"train.init_blocks=.* \(3 blocks\): .*expected distinct block indices in \[0, 3\)"):
            train(compose_train(SMOKE + [f"out={tmp_path / 'r3'}", "model.depth=2", f"train.init_blocks={blocks}"] + same))
    with pytest.raises(ValueError, match=r"train.init_blocks=0; expected a list of block indices"):
        train(compose_train(SMOKE + [f"out={tmp_path / 'r6'}", "model.depth=2", "train.init_blocks=0"] + same))
    with pytest.raises(ValueError, match="or another depth with train.init_blocks"):
        train(compose_train(SMOKE + [f"out={tmp_path / 'r4'}", "model.depth=2"] + same))
    with pytest.raises(ValueError, match=r"train.init_blocks=\[0, 1\] needs train.init"):
        train(compose_train(SMOKE + [f"out={tmp_path / 'r5'}", "model.depth=2", "train.init_blocks=[0,1]"]))


def test_profile_steps_write_what_a_step_spends(tmp_path, capsys):
    """train.profile_steps=N profiles N steps (here the whole 2-step run) and writes a
    per-step summary to out/profile.json; 0 (the default) writes nothing."""
    from runtime.train import train

    train(compose_train(SMOKE + [f"out={tmp_path}", "train.profile_steps=2"]))
    res = json.loads((tmp_path / "profile.json").read_text())
    assert res["device"] == "cpu" and res["steps"] == 2
    assert res["profiled_ms_per_step"] > 0 and res["host_ms_per_step"] > 0 and res["host_waits_per_step"] == 0
    assert res["top"] and all(t["ms_per_step"] > 0 for t in res["top"])
    assert any("addmm" in t["name"] or "mm" in t["name"] for t in res["top"])  # the linear layers ran under it
    assert "profile of 2 steps" in capsys.readouterr().out
    other = tmp_path / "plain"
    train(compose_train(SMOKE + [f"out={other}"]))
    assert not (other / "profile.json").exists()
    with pytest.raises(ValueError, match="train.profile_steps=-1"):
        train(compose_train(SMOKE + [f"out={other}", "train.profile_steps=-1"]))


# Runs `python -m runtime.train` under torchrun with two hooks installed first: every
# process writes the weights its model was created with, and the weights it holds
# when training ends (just before the process group is torn down), to OUT/rankR.pt.
DDP_HOOKS = '''
import os, runpy, sys
import torch
import torch.distributed as dist
import runtime.model

rank = int(os.environ["RANK"])
out = os.environ["DDP_TEST_OUT"]
made = []


class RecordingModel(runtime.model.WorldModel):
    def __init__(self, cfg):
        super().__init__(cfg)
        if not made:
            made.append((self, torch.cat([p.detach().flatten().clone() for p in self.parameters()])))


runtime.model.WorldModel = RecordingModel
destroy = dist.destroy_process_group


def record_then_destroy(*args, **kwargs):
    model, initial = made[0]
    final = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    torch.save({"initial": initial, "final": final, "world": dist.get_world_size()}, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    destroy(*args, **kwargs)


dist.destroy_process_group = record_then_destroy
sys.argv[0] = "runtime.train"
runpy.run_module("runtime.train", run_name="__main__", alter_sys=True)
'''


def run_ddp(tmp_path: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    """Train with two processes under torchrun (DDP_HOOKS installed) into tmp_path/run."""
    hooks = tmp_path / "ddp_hooks.py"
    hooks.write_text(DDP_HOOKS)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DDP_TEST_OUT=str(tmp_path))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(hooks), *overrides, f"out={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x2" in proc.stdout  # "model: ...M parameters on cpu x2"
    return proc


def test_ddp_two_processes_on_cpu(tmp_path):
    out = tmp_path / "run"
    run_ddp(tmp_path, SMOKE)

    ckpt = out / "model.safetensors"
    assert ckpt.is_file()
    info = json.loads(read_metadata(ckpt)["info"])
    assert info["processes"] == 2 and info["step"] == 2
    assert [line["step"] for line in read_log(out / "log.jsonl")] == [2]  # only rank 0 logs
    model, _ = load_checkpoint(ckpt)
    assert model.cfg == tiny_config()

    # The two processes seed their models differently (seed + rank) and draw different
    # data, so equal weights at the end mean DDP broadcast rank 0's weights and averaged
    # every gradient across both processes.
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert not torch.equal(r0["initial"], r1["initial"])
    assert not torch.equal(r0["final"], r0["initial"])  # training moved the weights
    assert torch.equal(r0["final"], r1["final"])


def test_ddp_time_limit_is_shared_by_both_processes(tmp_path):
    # A step budget no run reaches, so the time limit ends training. Each process used to
    # read its own clock for the cosine learning rate and the stop flag: the learning rates
    # differed (the weights drifted apart) and one process could leave the loop a step
    # before the other. Both now follow one elapsed time agreed on every step.
    steps = 10**6
    run_ddp(tmp_path, SMOKE + [f"train.steps={steps}", "train.time_limit_s=1.0", f"train.eval_every={steps}",
                               f"train.ckpt_every={steps}", "train.warmup=1"])
    out = tmp_path / "run"
    lines = read_log(out / "log.jsonl")
    assert len(lines) == 1  # only the stop step logs
    stopped_at = lines[0]["step"]
    assert 1 <= stopped_at < steps
    info = json.loads(read_metadata(out / "model.safetensors")["info"])
    assert info["step"] == stopped_at and info["processes"] == 2

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert not torch.equal(r0["final"], r0["initial"])
    assert torch.equal(r0["final"], r1["final"])


# ----------------------------------------------------------------------------- masks


def reference_frame_mask(frames: int, memory: int) -> torch.Tensor:
    """The teacher-forcing rule spelled out frame by frame, independently of the code:
    memory m_j sees m_i (i <= j); clean c_j sees every memory frame and c_i (i <= j);
    noisy n_j sees every memory frame, c_i (i < j) and itself."""
    seq = [("m", j) for j in range(memory)] + [("c", j) for j in range(frames)] + [("n", j) for j in range(1, frames)]

    def sees(q, k):
        (qk, qj), (kk, kj) = q, k
        if kk == "m":
            return qk != "m" or kj <= qj
        if kk == "c":
            return (qk == "c" and kj <= qj) or (qk == "n" and kj < qj)
        return qk == "n" and kj == qj

    return torch.tensor([[sees(q, k) for k in seq] for q in seq])


@pytest.mark.parametrize("frames, tokens, memory", [(1, 3, 0), (2, 1, 0), (4, 2, 0), (5, 4, 0), (9, 3, 0), (3, 2, 2), (5, 3, 4)])
def test_mask_mod_matches_dense_mask(frames, tokens, memory):
    dense = teacher_forcing_mask(frames, tokens, memory=memory)
    mask_mod, length = teacher_forcing_mask_mod(frames, tokens, torch.device("cpu"), memory)
    assert length == (memory + 2 * frames - 1) * tokens
    assert dense.shape == (length, length) and dense.dtype == torch.bool
    want = reference_frame_mask(frames, memory).repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)
    assert torch.equal(dense, want)
    q = torch.arange(length)[:, None]
    kv = torch.arange(length)[None, :]
    grid = mask_mod(torch.tensor(0), torch.tensor(0), q, kv)
    assert torch.equal(grid.expand(length, length), want)
    # element-wise, the way FlexAttention calls it
    for qi in range(0, length, max(1, length // 7)):
        for ki in range(length):
            assert bool(mask_mod(0, 0, torch.tensor(qi), torch.tensor(ki))) == bool(want[qi, ki])


def test_mask_is_the_documented_picture():
    # clean c0..c3 | noisy n1..n3, one token per frame (runtime/attention.py's drawing)
    picture = [
        "x......",
        "xx.....",
        "xxx....",
        "xxxx...",
        "x...x..",
        "xx...x.",
        "xxx...x",
    ]
    want = torch.tensor([[c == "x" for c in row] for row in picture])
    assert torch.equal(teacher_forcing_mask(4, 1), want)
    blocks = teacher_forcing_mask(4, 3)
    assert torch.equal(blocks, want.repeat_interleave(3, 0).repeat_interleave(3, 1))


def test_memory_mask_is_the_documented_picture():
    # memory m0 m1 | clean c0 c1 | noisy n1 (the drawing at teacher_forcing_mask_mod)
    picture = [
        "x....",
        "xx...",
        "xxx..",
        "xxxx.",
        "xxx.x",
    ]
    want = torch.tensor([[c == "x" for c in row] for row in picture])
    assert torch.equal(teacher_forcing_mask(2, 1, memory=2), want)
    mask_mod, length = teacher_forcing_mask_mod(2, 3, torch.device("cpu"), memory=2)
    assert length == 15
    q, kv = torch.arange(length)[:, None], torch.arange(length)[None, :]
    assert torch.equal(mask_mod(0, 0, q, kv), want.repeat_interleave(3, 0).repeat_interleave(3, 1))


def test_a_world_listed_more_often_in_train_worlds_is_drawn_more_often():
    """`train.worlds` is a list a world's tile set is drawn from uniformly, so a name listed
    three times in four is three quarters of the non-random worlds (stage 20 lists the
    default world twice)."""
    from runtime.data import DataConfig, WindowStream
    from worlds.overworld import atlas_to_prompt, build_atlas, load_config

    names = ["overworld", "overworld", "overworld", "overworld_desert"]
    cfg = DataConfig(env_batch=64, frames=2, random_tileset_prob=0.0, start_prob=1.0)
    stream = WindowStream([load_config(n) for n in names], cfg, rank=0)
    prompts = torch.cat([stream.next()["prompt"] for _ in range(2)])  # 128 worlds
    default, desert = (torch.from_numpy(atlas_to_prompt(build_atlas(load_config(n).tileset))).float()
                       for n in ("overworld", "overworld_desert"))
    is_default = (prompts == default).flatten(1).all(1)
    is_desert = (prompts == desert).flatten(1).all(1)
    assert bool((is_default ^ is_desert).all())  # every world is one of the two, never both
    share = float(is_default.float().mean())
    assert 0.62 < share < 0.88, share  # 0.75 expected; a list read as a set gives 0.5


@pytest.mark.parametrize("recent_prob, k, start", [(0.0, 1, 0.0), (1.0, 1, 0.0), (0.0, 3, 0.0), (0.0, 2, 0.5)])
def test_memory_frames_are_earlier_frames_of_the_same_trajectory(recent_prob, k, start):
    """Memory frames, their K previous frames and actions, and the K frames before x_0
    are the trajectory's own frames; start windows between them (`start_prob`) leave
    the trajectory as it was."""
    from runtime.data import DataConfig, WindowStream
    from worlds.overworld import load_config

    f, m = 4, 3
    cfg = DataConfig(env_batch=2, frames=f, episode_windows=6, memory_frames=m, memory_recent_prob=recent_prob,
                     reset_like_prob=0.0, prev_frames=k, start_prob=start)
    stream = WindowStream([load_config("overworld")], cfg, rank=0)
    frames_seen: list[np.ndarray] = []  # every window's frames in order: one trajectory
    actions_seen: list[np.ndarray] = []  # the action that produced each of them
    checked = earlier_checked = starts = 0
    windows = 0
    while windows < cfg.episode_windows:
        w = stream.next()
        if "memory" not in w:  # a start window, from worlds of its own
            starts += 1
            continue
        windows += 1
        index = w["memory_index"].numpy()
        assert index.shape == (m,) and (np.diff(index) > 0).all() and index.max() <= -1
        assert w["frames"].shape[1] == f + k and w["memory_prev"].shape[:3] == (2, m, k)
        if recent_prob == 1.0:
            assert index.tolist() == list(range(-m, 0))  # contiguous, ending at x_{-1}
        x_minus_1 = len(frames_seen)
        for j in range(1, k):  # the frames before x_{-1}, when an earlier window holds them
            if x_minus_1 - j >= 0:
                np.testing.assert_array_equal(w["frames"][:, k - 1 - j].numpy(), frames_seen[x_minus_1 - j])
                earlier_checked += 1
        frames_seen.extend(w["frames"][:, k - 1 :].numpy().swapaxes(0, 1))
        actions_seen.extend(w["actions"].numpy().T)
        for j, i in enumerate(index):
            step = x_minus_1 + 1 + int(i)  # x_0 has memory index 0
            if step >= 1:  # earlier windows (the warm-up steps are in no window)
                np.testing.assert_array_equal(w["memory"][:, j].numpy(), frames_seen[step])
                np.testing.assert_array_equal(w["memory_actions"][:, j].numpy(), actions_seen[step])
                for back in range(k):
                    if step - 1 - back >= 0:
                        np.testing.assert_array_equal(w["memory_prev"][:, j, back].numpy(), frames_seen[step - 1 - back])
                checked += 1
    assert checked >= m * (cfg.episode_windows - 2)
    assert earlier_checked == (k - 1) * (cfg.episode_windows - 1)
    assert (starts > 0) == (start > 0)


@pytest.mark.parametrize("k", [1, 2])
def test_start_windows_are_fresh_worlds_from_their_reset(k):
    """A start window is its worlds' reset frame (as x_{-K} .. x_0, the actions of x_{-1}
    and x_0 idle) and then the frames those worlds show under the window's actions, with
    no memory; its creatures are where they are drawn."""
    from runtime.data import DataConfig, WindowStream
    from worlds.overworld import BatchOverworld, atlas_to_prompt, load_config

    f = 6
    wc = load_config("overworld")
    cfg = DataConfig(env_batch=3, frames=f, memory_frames=2, prev_frames=k, start_prob=1.0)
    stream = WindowStream([wc], cfg, rank=0)
    resets = []
    reset = stream.starter.reset
    stream.starter.reset = lambda seeds, atlases: resets.append((seeds, atlases.copy())) or reset(seeds, atlases)
    for _ in range(2):
        w = stream.next()
        assert set(w) == {"frames", "actions", "prompt", "creatures"}
        assert w["frames"].shape[1] == f + k and w["actions"].shape[1] == f + 1
        assert (w["actions"][:, :2] == 0).all() and (w["actions"][:, 2:] != 0).any()
        seeds, atlases = resets[-1]
        np.testing.assert_array_equal(w["prompt"].numpy(), np.stack([atlas_to_prompt(a) for a in atlases]).astype(np.float32))
        world = BatchOverworld(wc, cfg.env_batch)
        first = world.reset(seeds, atlases)
        for j in range(k + 1):
            np.testing.assert_array_equal(w["frames"][:, j].numpy(), first)
            np.testing.assert_array_equal(w["creatures"][:, j].numpy(), world.creature_view_pos)
        for i in range(2, f + 1):
            np.testing.assert_array_equal(w["frames"][:, k + i - 1].numpy(), world.step(w["actions"][:, i].numpy()))
            np.testing.assert_array_equal(w["creatures"][:, k + i - 1].numpy(), world.creature_view_pos)
    assert len(resets) == 2 and resets[0][0] != resets[1][0]  # new worlds each time


def test_k_previous_frames_at_an_episode_start_and_in_reset_like_windows():
    """Before the episode's first frame the stack holds that frame (as the engine does at a
    reset); a reset-like window's K frames before x_0 are all x_0, its action idle."""
    from runtime.data import DataConfig, WindowStream
    from worlds.overworld import load_config

    k, f = 3, 4
    stream = WindowStream([load_config("overworld")], DataConfig(env_batch=2, frames=f, episode_windows=3, prev_frames=k,
                                                                reset_like_prob=0.0), rank=0)
    w = stream.next()  # the episode's first window: x_{-1} is step 1, so x_{-2} and x_{-3} are the reset frame
    np.testing.assert_array_equal(w["frames"][:, 0].numpy(), stream.history[0])
    np.testing.assert_array_equal(w["frames"][:, 1].numpy(), stream.history[0])
    np.testing.assert_array_equal(w["frames"][:, 2].numpy(), stream.history[1])
    stream = WindowStream([load_config("overworld")], DataConfig(env_batch=2, frames=f, episode_windows=3, prev_frames=k,
                                                                reset_like_prob=1.0), rank=0)
    for _ in range(2):
        w = stream.next()
        for j in range(k):
            np.testing.assert_array_equal(w["frames"][:, j].numpy(), w["frames"][:, k].numpy())
        assert (w["actions"][:, 1] == 0).all()


def test_window_creature_boxes_are_where_creatures_are_drawn():
    """The data's creature positions, turned into focus weights (margin 0), mark each
    window's last frame exactly where creatures are drawn: every pixel that changes when
    the same world is drawn with its creatures moved out of sight lies in a box, and
    every box wholly in view holds such pixels."""
    from runtime.data import DataConfig, WindowStream
    from runtime.train import focus_weights
    from worlds.overworld import load_config

    wc = load_config("overworld")
    cfg = DataConfig(env_batch=4, frames=6, episode_windows=8, reset_like_prob=0.0)
    stream = WindowStream([wc], cfg, rank=0)
    boxes_seen = 0
    for _ in range(cfg.episode_windows):
        w = stream.next()
        weights = focus_weights(w["creatures"], wc.view, wc.tile, 0, 1.0)[:, :, 0]  # (B, F+1, V, V)
        assert weights.shape == (cfg.env_batch, cfg.frames + 1, wc.view, wc.view)
        inside = weights[:, -1].numpy() == 2.0
        creatures = stream.world._creatures
        kept = creatures.pos.copy()
        creatures.pos = creatures.pos - 10**4  # out of sight
        bare = stream.world.render()
        creatures.pos = kept
        drawn = (w["frames"][:, -1].numpy() != bare).any(-1)  # (B, V, V)
        assert not (drawn & ~inside).any()
        for b in range(cfg.env_batch):
            for y, x in w["creatures"][b, -1].tolist():
                box = (slice(max(y, 0), max(y + wc.tile, 0)), slice(max(x, 0), max(x + wc.tile, 0)))
                if inside[b][box].size == 0:
                    continue  # out of view
                assert inside[b][box].all()
                if 0 <= y <= wc.view - wc.tile and 0 <= x <= wc.view - wc.tile:  # (a sliver may be transparent)
                    boxes_seen += 1
                    assert drawn[b][box].any()
    assert boxes_seen > 0


def test_focus_weights_grow_by_the_margin_and_keep_the_loss_scale():
    from runtime.train import focus_weights, weighted_mse

    creatures = torch.tensor([[[[10, 20]]]])  # one frame, one creature at (10, 20)
    w = focus_weights(creatures, 64, 8, 2, 3.0)[0, 0, 0]
    assert w.shape == (64, 64) and set(w.unique().tolist()) == {1.0, 4.0}
    rows, cols = torch.nonzero(w == 4.0, as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (8, 19, 18, 29)  # 8 px + 2 on each side
    pred, target = torch.zeros(1, 1, 3, 64, 64), torch.full((1, 1, 3, 64, 64), 0.5)
    full = w[None, None, None]
    assert torch.allclose(weighted_mse(pred, target, full), torch.tensor(0.25))  # uniform error: the same
    assert torch.allclose(weighted_mse(pred, target, None), torch.tensor(0.25))
    target[..., 10:18, 20:28] = 1.0  # error only inside the box weighs more than plain MSE
    inside_only = target - 0.5
    assert weighted_mse(pred, inside_only, full) > weighted_mse(pred, inside_only, None) * 2


def test_frame_balance_gives_the_gradient_of_the_mean_per_frame_log_mse():
    from runtime.train import frame_balance_weights, weighted_mse

    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 3, 8, 8, generator=g) * 2 - 1
    # frames with very different errors: 0.5, 0.05 and 0.005 of noise
    scale = torch.tensor([0.5, 0.05, 0.005]).repeat(2)[:, None, None, None].reshape(2, 3, 1, 1, 1)
    start = target + scale * torch.randn(target.shape, generator=g)
    floor_db = 50.0
    floor = 10 ** (-floor_db / 10)

    def grad_of(loss_fn):
        pred = start.clone().requires_grad_(True)
        loss_fn(pred).backward()
        return pred.grad

    balanced = grad_of(lambda p: weighted_mse(p, target, frame_balance_weights(p, target, 1.0, floor_db)))
    log_mse = grad_of(lambda p: torch.log(((p - target) ** 2).mean(dim=(2, 3, 4)) / 4 + floor).mean())
    # the same direction, a positive factor apart
    factor = (balanced * log_mse).sum() / (log_mse * log_mse).sum()
    assert factor > 0
    assert torch.allclose(balanced, factor * log_mse, rtol=1e-4, atol=1e-9)
    # plain MSE points elsewhere: its gradient follows the noisiest frames
    plain = grad_of(lambda p: weighted_mse(p, target, None))
    cos = (plain * log_mse).sum() / (plain.norm() * log_mse.norm())
    assert cos < 0.5
    # power 0 is plain MSE; the weights carry no gradient and fall with the frame's error
    assert torch.allclose(grad_of(lambda p: weighted_mse(p, target, frame_balance_weights(p, target, 0.0, floor_db))), plain)
    w = frame_balance_weights(start.requires_grad_(True), target, 1.0, floor_db)
    assert not w.requires_grad and w.shape == (2, 3, 1, 1, 1)
    assert (w[:, 0] < w[:, 1]).all() and (w[:, 1] < w[:, 2]).all()
    # a frame far better than the floor weighs about 1 / floor, not without bound
    exact = frame_balance_weights(target, target, 1.0, floor_db)
    assert torch.allclose(exact, torch.full_like(exact, 1 / floor))


def test_training_weights_each_frame_by_its_error_with_frame_balance(tmp_path, monkeypatch):
    """train.frame_balance=1 reaches the loss: the weights are the per-frame ones times the
    creatures' weights; without it the loss takes the creatures' weights alone."""
    import runtime.train as tr

    seen = []
    real_mse = tr.weighted_mse

    def mse(pred, target, weights):
        seen.append((pred.detach().float(), target, weights))
        return real_mse(pred, target, weights)

    monkeypatch.setattr(tr, "weighted_mse", mse)
    for balance in (1.0, 0.0):
        seen.clear()
        tr.train(compose_train(SMOKE + [f"out={tmp_path / str(balance)}", "train.focus_weight=2",
                                        f"train.frame_balance={balance}", "train.frame_balance_floor_db=40"]))
        assert len(seen) == 2
        for pred, target, weights in seen:
            per_frame = tr.frame_balance_weights(pred, target, 1.0, 40.0)
            focus = weights.amin(dim=(2, 3, 4), keepdim=True)  # 1 away from the creatures, times the frame's weight
            if balance:
                assert torch.allclose(focus, per_frame, rtol=1e-5)
                assert per_frame.flatten().unique().numel() > 1  # frames differ in error, so in weight
            else:
                assert torch.equal(focus, torch.ones_like(focus))


# ----------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize("override, needle", [
    ("train.batch_size=6", "multiple of train.data.env_batch"),
    ("train.batch_size=2", "multiple of train.data.env_batch"),
    ("train.attention=bogus", "train.attention='bogus'"),
    ("train.batch_size=0", "train.batch_size=0 must be a positive multiple of train.data.env_batch=4"),
    ("train.batch_size=-4", "train.batch_size=-4 must be a positive multiple of train.data.env_batch=4"),
    ("train.data.env_batch=0", "train.data.env_batch=0; expected an integer >= 1"),
    ("train.steps=0", "train.steps=0; expected an integer >= 1"),
    ("train.eval_every=0", "train.eval_every=0; expected an integer >= 1"),
    ("train.ckpt_every=0", "train.ckpt_every=0; expected an integer >= 1"),
    ("train.ckpt_every=-1", "train.ckpt_every=-1; expected an integer >= 1"),
    ("train.workers=-1", "train.workers=-1; expected an integer >= 0"),
    ("train.context_noise_prob=1.5", "train.context_noise_prob=1.5; expected a probability in [0, 1]"),
    ("train.context_noise_prob=-0.1", "train.context_noise_prob=-0.1; expected a probability in [0, 1]"),
    ("train.time_limit_s=0", "train.time_limit_s=0; expected a number of seconds > 0"),
    ("train.grid_prob=1.1", "train.grid_prob=1.1; expected a probability in [0, 1]"),
    ("train.focus_weight=-1", "train.focus_weight=-1; expected a number >= 0"),
    ("train.focus_margin=-2", "train.focus_margin=-2; expected an integer >= 0"),
    ("train.frame_balance=-1", "train.frame_balance=-1; expected a number >= 0"),
    ("train.frame_balance_floor_db=0", "train.frame_balance_floor_db=0; expected a PSNR in dB > 0"),
    ("train.rollout_prob=2", "train.rollout_prob=2; expected a probability in [0, 1]"),
    ("train.rollout_passes=0", "train.rollout_passes=0; expected an integer >= 1"),
    ("train.rollout_mode=replay", "train.rollout_mode='replay'; expected 'passes' or 'play'"),
    ("+train.data.prev_frames=2", "use model.prev_frames"),
    ("model.prev_frames=0", "model.prev_frames=0; expected an integer >= 1"),
    ("train.steps=many", "train.steps='many'; expected an integer"),
    ("train.data.memory_frames=-1", "train.data.memory_frames=-1; expected an integer >= 0"),
    ("train.data.memory_recent_prob=2", "train.data.memory_recent_prob=2; expected a probability in [0, 1]"),
    ("train.data.start_prob=-0.5", "train.data.start_prob=-0.5; expected a probability in [0, 1]"),
    ("train.lr=fast", "train.lr='fast'; expected a number"),
    ("train.bf16=maybe", "train.bf16 must be true or false, got 'maybe'"),
    ("train.distill.rolled=sometimes", "train.distill.rolled must be true or false, got 'sometimes'"),
    ("train.attention=foo", "train.attention='foo'; expected 'flex' or 'sdpa'"),
    ("train.worlds=[nowhere]", "world config 'nowhere' not found"),
    ("train.init=missing.safetensors", "train.init='missing.safetensors': no such checkpoint file"),
    ("train.distill.teacher=missing.safetensors", "train.distill.teacher='missing.safetensors': no such checkpoint file"),
    ("device=tpu", "device='tpu'; expected auto, cpu, cuda or cuda:N"),
])
def test_bad_train_settings_raise(tmp_path, override, needle):
    from runtime.train import train

    cfg = compose_train(SMOKE + [f"out={tmp_path / 'run'}", override])
    with pytest.raises(ValueError) as err:
        train(cfg)
    assert needle in str(err.value)
    assert not (tmp_path / "run").exists()  # fails before writing anything


def test_an_earlier_run_in_out_is_kept_unless_overwrite(tmp_path):
    """A second run into the same `out` is refused before anything is written; with
    train.overwrite=true, or into a new directory, it may go ahead."""
    from runtime.train import check_run

    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="holds an earlier run \\(log.jsonl\\).*train.overwrite=true"):
        check_run(compose_train(SMOKE + [f"out={out}"]))
    assert (out / "log.jsonl").read_text() == '{"step": 1}\n'
    check_run(compose_train(SMOKE + [f"out={out}", "train.overwrite=true"]))
    check_run(compose_train(SMOKE + [f"out={tmp_path / 'new'}"]))


def test_init_checkpoint_of_another_model_config_is_rejected(tmp_path):
    from runtime.checkpoint import save_checkpoint
    from runtime.model import WorldModel
    from runtime.train import train

    other = tmp_path / "other.safetensors"
    save_checkpoint(other, WorldModel(ModelConfig(width=32, depth=1, heads=2, mlp_ratio=2.0, rope_frame_dims=8)))
    cfg = compose_train(SMOKE + [f"out={tmp_path / 'run'}", f"train.init={other}"])
    with pytest.raises(ValueError, match="has model config"):
        train(cfg)


# ----------------------------------------------------------------------------- self-rollout context


def rollout_setup(k: int, r: int, f: int = 6):
    """A randomised model (k previous frames, motion radius r), a window of f frames as the
    engine starts one (the reset frame repeated before x_0, x_0's action idle) and its prompt."""
    import conftest

    from runtime.sampler import FlowSampler, SamplerConfig

    cfg = ModelConfig(width=64, depth=2, heads=2, mlp_ratio=2.0, rope_frame_dims=8, prev_frames=k, motion_radius=r)
    model = conftest.random_model(cfg)
    g = torch.Generator().manual_seed(3)
    frames = torch.randint(0, 256, (1, f, 64, 64, 3), generator=g, dtype=torch.uint8)
    actions = torch.randint(0, cfg.num_actions, (1, f), generator=g)
    idle = torch.zeros(1, 1, dtype=torch.long)
    window = {"frames": torch.cat([frames[:, :1]] * k + [frames], dim=1),
              "actions": torch.cat([idle, idle, actions[:, 1:]], dim=1),
              "prompt": torch.randn(1, cfg.prompt_tokens, cfg.prompt_dim, generator=g)}
    return model, window, FlowSampler(SamplerConfig(steps=2))


@pytest.mark.parametrize("k,r", [(1, 0), (2, 1)])
def test_a_self_rollout_of_every_pass_is_the_engines_free_running_rollout(k, r):
    """With as many passes as targets, `self_rollout_frames` gives exactly the frames the
    engine generates from x_0 with a KV cache (the same noise per frame); with P passes the
    first P frames already are those frames and the later ones are not yet."""
    from runtime.cache import CacheSpec, DenseCache
    from runtime.engine import Rollout
    from runtime.train import self_rollout_frames

    model, window, sampler = rollout_setup(k, r)
    n = window["actions"].shape[1] - 2
    attn = MaskedSelfAttention(teacher_forcing_mask(n + 1, model.cfg.tokens_per_frame))
    rolled = self_rollout_frames(model, window, n, sampler, torch.Generator().manual_seed(5), "cpu", attn)
    noise = torch.randn((1, n, 3, 64, 64), generator=torch.Generator().manual_seed(5))
    spec = CacheSpec(model.cfg.depth, 1, model.cfg.heads, model.cfg.head_dim, model.cfg.tokens_per_frame,
                     torch.device("cpu"), torch.float32)
    engine = Rollout(model, sampler, DenseCache(spec, initial_frames=2))
    engine.reset(window["frames"][:, k], window["prompt"], seed=0)
    draws = iter(noise.split(1, dim=1))
    engine.draw_noise = lambda: next(draws)
    played = torch.stack([engine.step(window["actions"][:, 2 + i]) for i in range(n)], dim=1)
    assert torch.equal(rolled[:, : k + 1], window["frames"][:, : k + 1])  # x_{-K} .. x_0 stay true
    diff = (rolled[:, k + 1 :].int() - played.int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.999, (diff.max(), (diff > 0).float().mean())
    assert not torch.equal(played, window["frames"][:, k + 1 :])
    two = self_rollout_frames(model, window, 2, sampler, torch.Generator().manual_seed(5), "cpu", attn)
    assert torch.equal(two[:, : k + 3], rolled[:, : k + 3])
    assert not torch.equal(two[:, k + 3 :], rolled[:, k + 3 :])


@pytest.mark.parametrize("k", [1, 2])
def test_played_frames_are_the_engines_rollout_from_x0_with_the_models_current_weights(k):
    """`played_frames` (train.rollout_mode=play) keeps x_{-K} .. x_0 and replaces every
    target with the engine's free-running rollout from x_0, made with the weights the model
    has now (copied into the player first): the same seed gives the same frames."""
    from runtime.cache import CacheSpec, DenseCache
    from runtime.engine import Rollout
    from runtime.train import played_frames

    model, window, sampler = rollout_setup(k, 1)
    n = window["actions"].shape[1] - 2
    player = copy.deepcopy(model)
    with torch.no_grad():
        for p in player.parameters():
            p.zero_()  # stale weights: played_frames must overwrite them
    rolled = played_frames(player, model, window, sampler, 11, "cpu")
    spec = CacheSpec(model.cfg.depth, 1, model.cfg.heads, model.cfg.head_dim, model.cfg.tokens_per_frame,
                     torch.device("cpu"), torch.float32)
    engine = Rollout(model, sampler, DenseCache(spec))
    engine.reset(window["frames"][:, k], window["prompt"], seed=11)
    played = torch.stack([engine.step(window["actions"][:, 2 + i]) for i in range(n)], dim=1)
    assert rolled.shape == window["frames"].shape and rolled.dtype == torch.uint8
    assert torch.equal(rolled[:, : k + 1], window["frames"][:, : k + 1])
    assert torch.equal(rolled[:, k + 1 :], played)
    assert not torch.equal(played, window["frames"][:, k + 1 :])
    assert not torch.equal(played_frames(player, model, window, sampler, 12, "cpu"), rolled)  # another seed


def test_build_inputs_takes_the_context_from_a_self_rollout_and_the_targets_from_the_truth():
    from runtime.train import build_inputs

    _, window, _ = rollout_setup(1, 0)
    rolled = 255 - window["frames"]
    t = torch.full((1, window["actions"].shape[1] - 2), 0.5)
    noisy = torch.randn(1, t.shape[1], 3, 64, 64)
    ref = build_inputs(window, None, t, None, "cpu", noisy_targets=noisy)
    got = build_inputs(window, None, t, None, "cpu", noisy_targets=noisy, context_frames=rolled)
    clean = t.shape[1] + 1
    assert torch.equal(got[5], ref[5])  # targets: the true frames
    assert torch.allclose(got[0][:, :clean], -ref[0][:, :clean], atol=1e-6)  # the context: the rolled frames
    assert torch.equal(got[0][:, clean:], ref[0][:, clean:])  # the noisy targets as given
    assert torch.allclose(got[1], -ref[1], atol=1e-6)  # previous frames from the rolled frames too


def test_cpu_smoke_run_with_self_rollout_contexts(tmp_path):
    from runtime.train import train

    cfg = compose_train(SMOKE + [f"out={tmp_path}", "train.rollout_prob=1.0", "train.rollout_passes=2",
                                 "train.data.memory_frames=2"])
    res = train(cfg)
    assert res["steps"] == 2 and math.isfinite(res["metrics"]["loss"]) and res["metrics"]["loss"] > 0


def test_cpu_smoke_run_with_played_contexts(tmp_path):
    from runtime.train import train

    cfg = compose_train(SMOKE + [f"out={tmp_path}", "train.rollout_prob=1.0", "train.rollout_mode=play",
                                 "train.data.memory_frames=2"])
    res = train(cfg)
    assert res["steps"] == 2 and math.isfinite(res["metrics"]["loss"]) and res["metrics"]["loss"] > 0


def test_training_trains_on_the_self_rollout_it_made(tmp_path, monkeypatch):
    """With train.rollout_prob=0.5 some micro-batches, and not others, take their context from
    `self_rollout_frames`: the forward gets exactly the frames it made, or none."""
    import runtime.train as tr

    made, used = [], []
    real_roll, real_forward = tr.self_rollout_frames, tr.forward_doubled

    def roll(*args, **kwargs):
        made.append(real_roll(*args, **kwargs))
        return made[-1]

    def forward(*args, **kwargs):
        used.append(args[7] if len(args) > 7 else kwargs.get("context_frames"))
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(tr, "self_rollout_frames", roll)
    monkeypatch.setattr(tr, "forward_doubled", forward)
    res = tr.train(compose_train(SMOKE + [f"out={tmp_path}", "train.steps=8", "train.eval_every=8", "train.ckpt_every=8",
                                          "train.rollout_prob=0.5", "train.rollout_passes=2"]))
    assert res["steps"] == 8 and len(used) == 8
    rolled = [u for u in used if u is not None]
    assert 0 < len(rolled) < 8 and len(rolled) == len(made)
    assert all(u is m for u, m in zip(rolled, made))


# ----------------------------------------------------------------------------- distillation


def test_distillation_regresses_one_step_from_time_1_on_the_teachers_frames_from_the_same_noise(tmp_path, monkeypatch):
    """With train.distill.teacher every micro-batch (prob 1) feeds the student the noise at
    time 1 for every target, with a clean context, and its loss target is what the teacher's
    two-step sampler made of that very noise."""
    import conftest

    import runtime.train as tr
    from runtime.checkpoint import save_checkpoint

    teacher_path = tmp_path / "teacher.safetensors"
    save_checkpoint(teacher_path, conftest.random_model(tiny_config()))
    calls = []
    real_targets, real_forward, real_mse = tr.distill_targets, tr.forward_doubled, tr.weighted_mse

    def targets(teacher, batch, noise, sampler, device, attn):
        out = real_targets(teacher, batch, noise, sampler, device, attn)
        calls.append({"noise": noise.clone(), "teacher_out": out.clone(), "times": sampler.times})
        return out

    def forward(model, batch, ctx_sigma, t_tgt, gen, device, attn, context_frames=None, noisy_targets=None):
        calls[-1].update(ctx_sigma=ctx_sigma, t=t_tgt.clone(), noisy=noisy_targets)
        return real_forward(model, batch, ctx_sigma, t_tgt, gen, device, attn, context_frames, noisy_targets)

    def mse(pred, target, weights):
        calls[-1]["target"] = target
        return real_mse(pred, target, weights)

    monkeypatch.setattr(tr, "distill_targets", targets)
    monkeypatch.setattr(tr, "forward_doubled", forward)
    monkeypatch.setattr(tr, "weighted_mse", mse)
    res = tr.train(compose_train(SMOKE + [f"out={tmp_path / 'run'}", f"train.distill.teacher={teacher_path}",
                                          "train.distill.times=[1.0,0.25]"]))
    assert res["steps"] == 2 and math.isfinite(res["metrics"]["loss"]) and res["metrics"]["loss"] > 0
    assert len(calls) == 2
    for c in calls:
        assert c["times"] == [1.0, 0.25]
        assert c["ctx_sigma"] is None and torch.equal(c["t"], torch.ones_like(c["t"]))
        assert c["noisy"] is not None and torch.equal(c["noisy"], c["noise"])
        assert torch.equal(c["target"], c["teacher_out"].float())
    assert not torch.equal(calls[0]["noise"], calls[1]["noise"])


def test_distillation_with_prob_half_mixes_distilled_and_plain_micro_batches(tmp_path, monkeypatch):
    import conftest

    import runtime.train as tr
    from runtime.checkpoint import save_checkpoint

    teacher_path = tmp_path / "teacher.safetensors"
    save_checkpoint(teacher_path, conftest.random_model(tiny_config()))
    kinds = []
    real_forward = tr.forward_doubled

    def forward(*args, **kwargs):
        kinds.append(kwargs.get("noisy_targets") is not None)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(tr, "forward_doubled", forward)
    res = tr.train(compose_train(SMOKE + [f"out={tmp_path / 'run'}", f"train.distill.teacher={teacher_path}",
                                          "train.distill.prob=0.5", "train.steps=8", "train.eval_every=8",
                                          "train.ckpt_every=8"]))
    assert res["steps"] == 8 and len(kinds) == 8 and 0 < sum(kinds) < 8


@pytest.mark.parametrize("override, needle", [
    ("train.distill.prob=1.5", "train.distill.prob=1.5; expected a probability in [0, 1]"),
    ("train.distill.times=[]", "train.distill.times=[]; expected the teacher's sampler times"),
    ("train.distill.times=[1.0,0.0]", "train.distill.times=[1.0, 0.0]; expected the teacher's sampler times"),
])
def test_bad_distillation_settings_raise(tmp_path, override, needle):
    from runtime.train import train

    cfg = compose_train(SMOKE + [f"out={tmp_path / 'run'}", f"train.distill.teacher={tmp_path / 't.safetensors'}", override])
    with pytest.raises(ValueError) as err:
        train(cfg)
    assert needle in str(err.value)
    assert not (tmp_path / "run").exists()


def test_a_distillation_teacher_that_reads_other_windows_is_rejected(tmp_path):
    import conftest

    from runtime.checkpoint import save_checkpoint
    from runtime.train import train

    teacher_path = tmp_path / "teacher.safetensors"
    save_checkpoint(teacher_path, conftest.random_model(ModelConfig(**{**vars(tiny_config()), "prev_frames": 2})))
    cfg = compose_train(SMOKE + [f"out={tmp_path / 'run'}", f"train.distill.teacher={teacher_path}"])
    with pytest.raises(ValueError, match=r"train.distill.teacher=.* has model.prev_frames=2, but the model trained has 1"):
        train(cfg)


def record_rollouts_and_distillation(tmp_path, monkeypatch):
    """A random teacher's checkpoint, and `train`'s rolled contexts (`played_frames`) and
    the frames each distilled micro-batch gave its teacher (`distill_targets`) recorded
    as they are made: (teacher path, rolled, teacher's frames)."""
    import conftest

    import runtime.train as tr
    from runtime.checkpoint import save_checkpoint

    teacher_path = tmp_path / "teacher.safetensors"
    save_checkpoint(teacher_path, conftest.random_model(tiny_config()))
    made, teacher_saw = [], []
    real_played, real_targets = tr.played_frames, tr.distill_targets

    def played(*args, **kwargs):
        made.append(real_played(*args, **kwargs))
        return made[-1]

    def targets(teacher, batch, *args):
        teacher_saw.append(batch["frames"])
        return real_targets(teacher, batch, *args)

    monkeypatch.setattr(tr, "played_frames", played)
    monkeypatch.setattr(tr, "distill_targets", targets)
    return teacher_path, made, teacher_saw


def test_distillation_with_rollouts_gives_teacher_and_student_the_models_own_frames(tmp_path, monkeypatch):
    """train.distill with train.rollout_prob=1 (rollout_mode=play): the context both the
    teacher and the student read is the engine's rollout of the model, not the true frames."""
    import runtime.train as tr

    teacher_path, made, teacher_saw = record_rollouts_and_distillation(tmp_path, monkeypatch)
    student_saw = []
    real_forward = tr.forward_doubled

    def forward(model, batch, *args, **kwargs):
        student_saw.append(batch["frames"])
        return real_forward(model, batch, *args, **kwargs)

    monkeypatch.setattr(tr, "forward_doubled", forward)
    res = tr.train(compose_train(SMOKE + [f"out={tmp_path / 'run'}", f"train.distill.teacher={teacher_path}",
                                          "train.rollout_prob=1.0", "train.rollout_mode=play"]))
    assert res["steps"] == 2 and len(made) == 2
    assert all(t is m and s is m for t, s, m in zip(teacher_saw, student_saw, made))


def test_distillation_that_skips_rolled_contexts_teaches_them_the_true_frames(tmp_path, monkeypatch):
    """train.distill.rolled=false: a micro-batch whose context is the model's own rollout
    is not distilled: it learns the true frames (the plain objective) from that context,
    while the micro-batches with true contexts are distilled as before."""
    import runtime.train as tr

    teacher_path, made, distilled = record_rollouts_and_distillation(tmp_path, monkeypatch)
    plain = []
    real_forward = tr.forward_doubled

    def forward(model, batch, ctx_sigma, t_tgt, gen, device, self_attn, context_frames=None, noisy_targets=None):
        if noisy_targets is None:  # the plain objective: the batch's own frames are its targets
            plain.append((batch["frames"], context_frames))
        return real_forward(model, batch, ctx_sigma, t_tgt, gen, device, self_attn, context_frames, noisy_targets)

    monkeypatch.setattr(tr, "forward_doubled", forward)
    common = SMOKE + [f"train.distill.teacher={teacher_path}", "train.rollout_mode=play", "train.distill.rolled=false"]
    res = tr.train(compose_train(common + [f"out={tmp_path / 'all'}", "train.rollout_prob=1.0"]))
    assert res["steps"] == 2 and len(made) == 2 and not distilled  # every context rolled: nothing distilled
    assert len(plain) == 2 and all(c is m for (_, c), m in zip(plain, made))
    assert all(not torch.equal(f[:, -1], m[:, -1]) for (f, _), m in zip(plain, made))  # targets: the true frames
    made.clear(), plain.clear()
    res = tr.train(compose_train(common + [f"out={tmp_path / 'none'}", "train.rollout_prob=0.0"]))
    assert res["steps"] == 2 and not made and not plain and len(distilled) == 2  # true contexts: distilled


def test_distillation_brings_one_step_closer_to_the_teachers_two_steps(tmp_path):
    """A short CPU run of train.distill (the student starting as the teacher) moves the
    student's one step from time 1 towards what the teacher's two steps make of the same
    noise, on a window the run never trained on."""
    import conftest

    from runtime.checkpoint import save_checkpoint
    from runtime.data import DataConfig, WindowDataset
    from runtime.sampler import FlowSampler, SamplerConfig
    from runtime.train import sample_targets, train
    from worlds.overworld import load_config

    teacher_path = tmp_path / "teacher.safetensors"
    save_checkpoint(teacher_path, conftest.random_model(tiny_config(), seed=2))
    train(compose_train(SMOKE + [f"out={tmp_path / 'run'}", f"train.init={teacher_path}",
                                 f"train.distill.teacher={teacher_path}", "train.steps=30", "train.lr=2e-3",
                                 "train.warmup=1", "train.eval_every=30", "train.ckpt_every=30", "train.ema=0.5",
                                 "train.data.memory_frames=0"]))
    teacher, _ = load_checkpoint(teacher_path)
    student, _ = load_checkpoint(tmp_path / "run" / "model.safetensors")
    window = next(iter(WindowDataset([load_config("overworld")], DataConfig(env_batch=4, frames=5, memory_frames=0,
                                                                             seed_base=12345))))
    n = window["actions"].shape[1] - 2
    attn = MaskedSelfAttention(teacher_forcing_mask(n + 1, tiny_config().tokens_per_frame))
    noise = torch.randn((4, n, 3, 64, 64), generator=torch.Generator().manual_seed(0))

    def sample(model, times):
        with torch.no_grad():
            pkv = model.encode_prompt(window["prompt"])
            return sample_targets(model, window, noise, FlowSampler(SamplerConfig(steps=len(times), times=times)),
                                  "cpu", attn, pkv)

    goal = sample(teacher, [1.0, 0.25])
    before = float(((sample(teacher, [1.0]) - goal) ** 2).mean())
    after = float(((sample(student, [1.0]) - goal) ** 2).mean())
    assert after < 0.7 * before, (before, after)  # 0.40x here; plain training instead: 1.3x


def test_a_deeper_teacher_distills_into_a_shallower_student(tmp_path):
    """The teacher may be another network reading the same windows: a 2-block teacher
    trains a 1-block student."""
    import conftest

    from runtime.checkpoint import save_checkpoint
    from runtime.train import train

    teacher_path = tmp_path / "teacher.safetensors"
    save_checkpoint(teacher_path, conftest.random_model(tiny_config()))
    res = train(compose_train(SMOKE + [f"out={tmp_path / 'run'}", "model.depth=1", f"train.distill.teacher={teacher_path}"]))
    assert res["steps"] == 2 and math.isfinite(res["metrics"]["loss"]) and res["metrics"]["loss"] > 0
    student, _ = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert student.cfg.depth == 1 and tiny_config().depth == 2
