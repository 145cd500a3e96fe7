"""Checkpoints: a save/load round trip, every way a file can be wrong, and the neural engine's checks."""
from __future__ import annotations

import json
import os

import conftest
import pytest
import torch
from conftest import REPO, compose
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from runtime.checkpoint import FORMAT, file_sha256, load_checkpoint, read_metadata, save_checkpoint
from runtime.engine import NonFiniteFrameError, build_engine
from runtime.factory import build_rollout
from runtime.model import ModelConfig, WorldModel

TINY = ModelConfig.from_dict(OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml")))


pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(seed: int = 0, cfg: ModelConfig = TINY) -> WorldModel:
    return conftest.random_model(cfg, seed)


def bf16_rounded(model: WorldModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.bfloat16).float() for k, v in model.state_dict().items()}


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, random_model(), {"world_family": "overworld", "step": 7})
    return path


def resave(src, dst, edit_tensors=None, edit_meta=None):
    """Copy a checkpoint through safetensors directly, editing its tensors or metadata."""
    tensors = load_file(str(src))
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


# ----------------------------------------------------------------------------- round trip


def test_round_trip_equals_the_bf16_rounded_model(tmp_path):
    model = random_model(seed=3)
    path = tmp_path / "sub" / "dir" / "m.safetensors"
    info = {"world_family": "overworld", "step": 12, "metrics": {"tf_psnr": 20.5}}
    save_checkpoint(path, model, info)
    assert path.is_file() and not path.with_suffix(".safetensors.tmp").exists()
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any file the user makes

    loaded, got_info = load_checkpoint(path)
    assert got_info == info
    assert loaded.cfg == TINY
    assert not loaded.training
    want = bf16_rounded(model)
    got = loaded.state_dict()
    assert set(got) == set(want)
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, want[name]), name

    meta = read_metadata(path)
    assert meta["format"] == FORMAT
    assert json.loads(meta["model_config"]) == TINY.to_dict()
    with safe_open(str(path), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())

    # the loaded model computes what the rounded original does
    ref = WorldModel(TINY)
    ref.load_state_dict(want)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 2, 3, 64, 64, generator=g) * 2 - 1
    prompt = torch.randn(1, 256, 12, generator=g)
    from runtime.attention import MaskedSelfAttention, dense_cross_attn

    args = (x, x, torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long), torch.arange(2),
            MaskedSelfAttention(None), dense_cross_attn, prompt)
    with torch.no_grad():
        assert torch.equal(loaded(*args), ref.eval()(*args))


def test_load_to_another_dtype(ckpt):
    model, _ = load_checkpoint(ckpt, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


# ----------------------------------------------------------------------------- bad files


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(FileNotFoundError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError):
        read_metadata(path)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.01])
def test_truncated_file(ckpt, tmp_path, keep):
    data = ckpt.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="corrupt or truncated") as err:
        load_checkpoint(bad)
    assert str(bad) in str(err.value)


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"\x00" * 16, b"not a checkpoint at all\n"])
def test_not_a_safetensors_file(tmp_path, content):
    bad = tmp_path / "random.safetensors"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(bad)


def test_safetensors_without_our_metadata(ckpt, tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(str(ckpt)), str(plain))  # no metadata at all
    with pytest.raises(ValueError, match="format None") as err:
        load_checkpoint(plain)
    assert FORMAT in str(err.value)

    other = resave(ckpt, tmp_path / "other.safetensors", edit_meta=lambda m: m.update(format="someone-else/v3"))
    with pytest.raises(ValueError, match="someone-else/v3"):
        load_checkpoint(other)


def test_metadata_without_model_config(ckpt, tmp_path):
    bad = resave(ckpt, tmp_path / "noconfig.safetensors", edit_meta=lambda m: m.pop("model_config"))
    for load in (load_checkpoint, read_metadata):
        with pytest.raises(ValueError, match="no 'model_config' metadata") as err:
            load(bad)
        assert str(bad) in str(err.value)


@pytest.mark.parametrize("key", ["model_config", "info"])
@pytest.mark.parametrize("text", ["{not json", "", '{"step": 7'])
def test_metadata_that_is_not_json(ckpt, tmp_path, key, text):
    bad = resave(ckpt, tmp_path / "badjson.safetensors", edit_meta=lambda m: m.update({key: text}))
    for load in (load_checkpoint, read_metadata):
        with pytest.raises(ValueError, match=f"metadata '{key}' is not valid JSON") as err:
            load(bad)
        assert str(bad) in str(err.value) and "expected a JSON object" in str(err.value)


@pytest.mark.parametrize("key", ["model_config", "info"])
@pytest.mark.parametrize("value, kind", [([1, 2], "list"), ("overworld", "str"), (7, "int"), (None, "NoneType")])
def test_metadata_that_is_not_a_json_object(ckpt, tmp_path, key, value, kind):
    bad = resave(ckpt, tmp_path / "notobject.safetensors", edit_meta=lambda m: m.update({key: json.dumps(value)}))
    for load in (load_checkpoint, read_metadata):
        with pytest.raises(ValueError, match=f"metadata '{key}' is a {kind} ") as err:
            load(bad)
        assert str(bad) in str(err.value) and "expected a JSON object" in str(err.value)


def test_model_config_with_unknown_keys(ckpt, tmp_path):
    bad = resave(ckpt, tmp_path / "keys.safetensors",
                 edit_meta=lambda m: m.update(model_config=json.dumps(TINY.to_dict() | {"colour": "red"})))
    with pytest.raises(ValueError, match="invalid model config") as err:
        load_checkpoint(bad)
    assert str(bad) in str(err.value) and "colour" in str(err.value)


def test_metadata_without_info_loads_as_empty(ckpt, tmp_path):
    plain = resave(ckpt, tmp_path / "noinfo.safetensors", edit_meta=lambda m: m.pop("info"))
    _, info = load_checkpoint(plain)
    assert info == {}


def test_tensor_of_the_wrong_shape_is_named(ckpt, tmp_path):
    def widen(tensors):
        tensors["blocks.1.proj.weight"] = torch.zeros(64, 65, dtype=torch.bfloat16)

    bad = resave(ckpt, tmp_path / "shape.safetensors", edit_tensors=widen)
    with pytest.raises(ValueError) as err:
        load_checkpoint(bad)
    msg = str(err.value)
    assert "'blocks.1.proj.weight'" in msg and "(64, 65)" in msg and "(64, 64)" in msg


def test_missing_and_unexpected_tensors(ckpt, tmp_path):
    def rename(tensors):
        tensors["blocks.0.extra"] = tensors.pop("out.bias")

    bad = resave(ckpt, tmp_path / "keys.safetensors", edit_tensors=rename)
    with pytest.raises(ValueError, match="does not match the model") as err:
        load_checkpoint(bad)
    assert "out.bias" in str(err.value) and "blocks.0.extra" in str(err.value)


def test_config_in_metadata_that_does_not_fit_the_tensors(ckpt, tmp_path):
    def deeper(meta):
        meta["model_config"] = json.dumps(TINY.to_dict() | {"width": 32})

    bad = resave(ckpt, tmp_path / "config.safetensors", edit_meta=deeper)
    with pytest.raises(ValueError, match="has shape"):
        load_checkpoint(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights(tmp_path, value):
    model = random_model()
    with torch.no_grad():
        model.blocks[0].mlp[0].weight[3, 5] = value
    path = tmp_path / "nonfinite.safetensors"
    save_checkpoint(path, model)
    with pytest.raises(ValueError, match="non-finite") as err:
        load_checkpoint(path)
    assert "'blocks.0.mlp.0.weight'" in str(err.value)


# ----------------------------------------------------------------------------- the neural engine


def engine_config(path, *extra):
    return compose(["engine=neural", f"engine.checkpoint={path}", "device=cpu", "engine.dtype=float32",
                    "attention=dense", *extra])


def build(cfg):
    from worlds import build_world

    world = build_world(cfg.world)
    return build_engine(cfg, world)


def test_neural_engine_from_a_tiny_checkpoint(ckpt):
    engine = build(engine_config(ckpt))
    assert engine.info["kind"] == "neural"
    assert engine.info["checkpoint_sha256"] == file_sha256(ckpt)
    assert engine.info["dtype"] == "float32"
    first = engine.reset(0)
    assert first.shape == (64, 64, 3)
    frames = engine.step([1])
    assert frames.shape == (1, 64, 64, 3) and frames.dtype.name == "uint8"


def test_checkpoint_for_another_prompt_layout(tmp_path):
    path = tmp_path / "prompt128.safetensors"
    save_checkpoint(path, random_model(cfg=ModelConfig.from_dict(TINY.to_dict() | {"prompt_tokens": 128})),
                    {"world_family": "overworld"})
    with pytest.raises(ValueError, match="prompt") as err:
        build(engine_config(path))
    msg = str(err.value)
    assert "(256, 12)" in msg and "(128, 12)" in msg and str(path) in msg


def test_checkpoint_for_another_frame_size(tmp_path):
    path = tmp_path / "frame32.safetensors"
    save_checkpoint(path, random_model(cfg=ModelConfig.from_dict(TINY.to_dict() | {"frame_size": 32})))
    with pytest.raises(ValueError, match="64x64 frames.*32x32"):
        build(engine_config(path))


def test_checkpoint_for_another_world_family(tmp_path):
    path = tmp_path / "other.safetensors"
    save_checkpoint(path, random_model(), {"world_family": "other"})
    with pytest.raises(ValueError, match="world family 'other'"):
        build(engine_config(path))


def test_engine_with_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="engine.checkpoint"):
        build(engine_config(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("where", ["out.bias", "blocks.1.qkv.weight", "embed.weight"])
def test_non_finite_frame_is_reported(where):
    # load_checkpoint rejects such weights, so the model is corrupted in memory
    model = random_model()
    with torch.no_grad():
        dict(model.named_parameters())[where].view(-1)[0] = float("nan")
    rollout = build_rollout(model, compose(["attention=dense"]))
    g = torch.Generator().manual_seed(0)
    first = torch.randint(0, 256, (1, 64, 64, 3), generator=g, dtype=torch.uint8)
    rollout.reset(first, torch.randn(1, 256, 12, generator=g), seed=0)
    with pytest.raises(NonFiniteFrameError, match="non-finite values at frame 1") as err:
        rollout.step(torch.tensor([0]))
    assert "engine.dtype" in str(err.value)
