"""Build the neural engine from a resolved config: checkpoint, cache policy, sampler.

The only place that turns config values into runtime objects for `engine=neural`;
everything it builds is plain Python objects, so tests can build them directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from runtime.attention import DEFAULT_CPU_ATTENTION, set_cpu_attention
from runtime.cache import CacheSpec
from runtime.checkpoint import file_sha256, load_checkpoint
from runtime.configs import config_int
from runtime.engine import NeuralEngine, Rollout
from runtime.sampler import FlowSampler, SamplerConfig
from runtime.model import WorldModel
from runtime.sparse import AttentionConfig, AttentionRuntime
from worlds.overworld import PROMPT_DIM, PROMPT_TOKENS, OverworldConfig

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if not isinstance(name, str):
        raise ValueError(f"device must be a string (auto, cpu, cuda or cuda:N), got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use device=cpu or device=auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device={name!r}; expected auto, cpu, cuda or cuda:N")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
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


def engine_flag(cfg, name: str) -> bool:
    """A yes/no setting of `cfg.engine` (false when the config has no engine group or key)."""
    return bool((cfg.get("engine") or {}).get(name, False))


def sampler_config(cfg, device) -> SamplerConfig:
    """`cfg.sampler` as a model on `device` runs it (SamplerConfig.on)."""
    return SamplerConfig.from_dict(OmegaConf.to_container(cfg.sampler, resolve=True)).on(device)


def sampler_record(cfg, device) -> dict:
    """What a run's results record of its sampler on `device`: steps and times."""
    sc = sampler_config(cfg, device)
    return {"sampler_steps": sc.steps, "sampler_times": FlowSampler(sc).times}


def build_rollout(model, cfg, batch: int = 1, attention=None, cuda_graph: bool | None = None) -> Rollout:
    """The rollout for `model` with the cache policy and attention of `cfg.attention`, or
    of `attention` (a config node, e.g. `runtime.evaluate.attention_cfg(spec)`) when given;
    CUDA graphs as `cfg.engine.cuda_graph` says, unless `cuda_graph` is given; the model's
    blocks compiled as `cfg.engine.compile` says (WorldModel.compile_blocks); on a GPU a
    rehearsal of the full cache's shape at every reset as `cfg.engine.rehearse` says."""
    model.compile_blocks(engine_flag(cfg, "compile"))
    p = next(model.parameters())
    mc = model.cfg
    spec = CacheSpec(mc.depth, batch, mc.heads, mc.head_dim, mc.tokens_per_frame, p.device, p.dtype)
    runtime = AttentionRuntime(AttentionConfig.from_dict(cfg.attention if attention is None else attention))
    cache = runtime.build_cache(spec)
    sampler = FlowSampler(sampler_config(cfg, p.device))
    if cuda_graph is None:
        cuda_graph = engine_flag(cfg, "cuda_graph")
    rehearse = engine_flag(cfg, "rehearse") and p.device.type == "cuda"  # nothing to build ahead on a CPU
    return Rollout(model, sampler, cache, attention=runtime, cuda_graph=cuda_graph, rehearse=rehearse)


@dataclass
class LoadedModel:
    model: WorldModel
    info: dict
    path: Path
    device: torch.device
    dtype: torch.dtype


def apply_cpu_settings(ecfg, device: torch.device) -> None:
    """The engine config's process-wide CPU choices: torch's threads and the attention kernel."""
    threads = config_int(ecfg.get("threads"), "engine.threads", minimum=1, optional=True)
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    set_cpu_attention(str(ecfg.get("cpu_attention", DEFAULT_CPU_ATTENTION)))


def load_model(cfg, world_cfg) -> LoadedModel:
    """The checkpoint of `cfg.engine` on `cfg.device`, checked against the world it will
    play (prompt layout, frame size, world family). Used by play, evaluation and bench."""
    ecfg = cfg.engine
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(str(ecfg.dtype))
    apply_cpu_settings(ecfg, device)
    path = resolve_path(str(ecfg.checkpoint))
    model, info = load_checkpoint(path, device=device, dtype=dtype)
    world_cfg = OverworldConfig.coerce(world_cfg)
    if (PROMPT_TOKENS, PROMPT_DIM) != (model.cfg.prompt_tokens, model.cfg.prompt_dim):
        raise ValueError(
            f"world {world_cfg.name!r} has a prompt of shape {(PROMPT_TOKENS, PROMPT_DIM)}, but checkpoint {str(path)!r} "
            f"expects ({model.cfg.prompt_tokens}, {model.cfg.prompt_dim}): it was trained for another world"
        )
    if world_cfg.view != model.cfg.frame_size:
        raise ValueError(
            f"world {world_cfg.name!r} renders {world_cfg.view}x{world_cfg.view} frames, but checkpoint {str(path)!r} "
            f"expects {model.cfg.frame_size}x{model.cfg.frame_size}"
        )
    family = info.get("world_family", "overworld")
    if family != world_cfg.family:
        raise ValueError(f"checkpoint {str(path)!r} was trained on world family {family!r}, not {world_cfg.family!r}")
    return LoadedModel(model, info, path, device, dtype)


def build_neural_engine(cfg, world) -> NeuralEngine:
    loaded = load_model(cfg, world.cfg)
    meta = {"kind": "neural", "checkpoint": str(cfg.engine.checkpoint), "checkpoint_sha256": file_sha256(loaded.path),
            "device": str(loaded.device), "dtype": str(loaded.dtype).replace("torch.", ""),
            "attention": str(cfg.attention.name), **sampler_record(cfg, loaded.device)}
    return NeuralEngine(world, build_rollout(loaded.model, cfg), chunk_size=int(cfg.engine.chunk_size), info=meta)
