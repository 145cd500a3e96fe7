"""Build the neural engine from a resolved config: checkpoint, cache policy, sampler.

The only place that turns config values into runtime objects for `engine=neural`;
everything it builds is plain Python objects, so tests can build them directly.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from runtime.cache import CacheSpec, DenseCache, KVCache, WindowCache
from runtime.checkpoint import file_sha256, load_checkpoint
from runtime.engine import NeuralEngine, Rollout
from runtime.model import ModelConfig
from runtime.sampler import FlowSampler, SamplerConfig

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use device=cpu or device=auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device={name!r}; expected auto, cpu, cuda or cuda:N")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"engine.dtype={name!r}; expected auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_path(path: str) -> Path:
    p = Path(path)
    if not p.is_absolute() and not p.exists() and (ROOT / p).exists():
        p = ROOT / p
    return p


def build_cache(att_cfg, model_cfg: ModelConfig, batch: int, device, dtype) -> KVCache:
    spec = CacheSpec(model_cfg.depth, batch, model_cfg.heads, model_cfg.head_dim, model_cfg.tokens_per_frame, device, dtype)
    policy = att_cfg.get("policy", "dense")
    if policy == "dense":
        return DenseCache(spec, initial_frames=int(att_cfg.get("initial_frames", 64)))
    if policy == "window":
        return WindowCache(spec, sink_frames=int(att_cfg.sink_frames), window_frames=int(att_cfg.window_frames))
    raise ValueError(f"attention.policy={policy!r}; expected 'dense' or 'window'")


def build_rollout(model, cfg, batch: int = 1) -> Rollout:
    p = next(model.parameters())
    cache = build_cache(cfg.attention, model.cfg, batch, p.device, p.dtype)
    sampler = FlowSampler(SamplerConfig.from_dict(OmegaConf.to_container(cfg.sampler, resolve=True)))
    return Rollout(model, sampler, cache)


def build_neural_engine(cfg, world) -> NeuralEngine:
    ecfg = cfg.engine
    device = resolve_device(str(cfg.device))
    dtype = resolve_dtype(str(ecfg.dtype), device)
    if ecfg.get("threads") is not None and device.type == "cpu":
        torch.set_num_threads(int(ecfg.threads))
    path = resolve_path(str(ecfg.checkpoint))
    model, info = load_checkpoint(path, device=device, dtype=dtype)
    prompt = world.prompt
    if tuple(prompt.shape) != (model.cfg.prompt_tokens, model.cfg.prompt_dim):
        raise ValueError(
            f"world {world.cfg.name!r} has a prompt of shape {tuple(prompt.shape)}, but checkpoint {str(path)!r} "
            f"expects ({model.cfg.prompt_tokens}, {model.cfg.prompt_dim}): it was trained for another world"
        )
    if world.cfg.view != model.cfg.frame_size:
        raise ValueError(
            f"world {world.cfg.name!r} renders {world.cfg.view}x{world.cfg.view} frames, but checkpoint {str(path)!r} "
            f"expects {model.cfg.frame_size}x{model.cfg.frame_size}"
        )
    family = info.get("world_family", "overworld")
    if family != world.cfg.family:
        raise ValueError(f"checkpoint {str(path)!r} was trained on world family {family!r}, not {world.cfg.family!r}")
    rollout = build_rollout(model, cfg)
    meta = {"kind": "neural", "checkpoint": str(ecfg.checkpoint), "checkpoint_sha256": file_sha256(path),
            "device": str(device), "dtype": str(dtype).replace("torch.", ""), "attention": str(cfg.attention.name)}
    return NeuralEngine(world, rollout, chunk_size=int(ecfg.chunk_size), info=meta)
