"""Safetensors checkpoints: weights plus the model config and provenance as metadata.

No pickle anywhere. Loading checks everything a user can get wrong and says what was
expected: a missing file, a truncated or corrupt file, a file without our metadata,
tensors of the wrong shape, or a checkpoint trained for another prompt layout.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from runtime.model import ModelConfig, WorldModel

FORMAT = "neural-game-engine/world-model/v1"


def save_checkpoint(path: str | Path, model: WorldModel, info: dict | None = None, dtype=torch.bfloat16) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "model_config": json.dumps(model.cfg.to_dict()), "info": json.dumps(info or {})}
    tmp = path.with_suffix(path.suffix + ".tmp")
    # written by open(), so its mode is any file's the user makes (the library's own writer
    # leaves the file private); a checkpoint is tens of MB, fine to hold in memory once
    tmp.write_bytes(save(tensors, metadata=meta))
    tmp.replace(path)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {str(path)!r} is a directory; expected a .safetensors file "
                                "(engine.checkpoint)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; train one or set engine.checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or truncated ({e}); expected a safetensors file") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {str(path)!r} has format {meta.get('format')!r}; expected {FORMAT!r}")
    if "model_config" not in meta:
        raise ValueError(f"checkpoint {str(path)!r} has no 'model_config' metadata; expected the model config as a JSON object")
    _json_object(path, meta, "model_config")
    _json_object(path, meta, "info", default="{}")
    return meta


def _json_object(path: Path, meta: dict, key: str, default: str | None = None) -> dict:
    """Parse the metadata field `key` of checkpoint `path`, which must hold a JSON object."""
    text = meta.get(key, default)
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {str(path)!r}: metadata {key!r} is not valid JSON ({e}); expected a JSON object") from e
    if not isinstance(value, dict):
        raise ValueError(f"checkpoint {str(path)!r}: metadata {key!r} is a {type(value).__name__} ({text[:80]!r}); expected a JSON object")
    return value


def load_checkpoint(path: str | Path, device="cpu", dtype=torch.float32) -> tuple[WorldModel, dict]:
    """Returns (model in eval mode, info dict)."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        cfg = ModelConfig.from_dict(_json_object(path, meta, "model_config"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {str(path)!r} has an invalid model config ({e}); expected the keys of ModelConfig") from e
    info = _json_object(path, meta, "info", default="{}")
    model = WorldModel(cfg)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or truncated ({e})") from e
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(path)!r} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"checkpoint {str(path)!r}: tensor {name!r} has shape {tuple(t.shape)}, "
                f"expected {tuple(expected[name].shape)} for model config {cfg}"
            )
        if not torch.isfinite(t.float()).all():
            raise ValueError(f"checkpoint {str(path)!r}: tensor {name!r} holds non-finite values")
    model.load_state_dict(state)
    model.to(device=device, dtype=dtype).eval()
    return model, info
