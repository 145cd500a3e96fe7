"""Every conf/ preset composes; typos and bad values fail at start-up with clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, compose, run_play
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from runtime.configs import strict_dataclass

GROUPS = sorted(p.name for p in (REPO / "conf").iterdir() if p.is_dir())
PRESETS = [(g, f.stem) for g in GROUPS for f in sorted((REPO / "conf" / g).glob("*.yaml"))]


def test_groups_are_the_documented_ones():
    for group in ("world", "engine", "model", "attention", "sampler", "controller", "window", "preset"):
        assert group in GROUPS


@pytest.mark.parametrize("group, option", PRESETS, ids=[f"{g}={o}" for g, o in PRESETS])
def test_every_preset_composes(group, option):
    cfg = compose([f"{group}={option}"])
    assert OmegaConf.is_struct(cfg)  # unknown keys are rejected
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("option", [p.stem for p in (REPO / "conf" / "window").glob("*.yaml")])
def test_window_presets_match_their_dataclass(option):
    from runtime.loop import HeadlessConfig
    from runtime.window import WindowConfig

    cfg = compose([f"window={option}"])
    cls = {"pygame": WindowConfig, "headless": HeadlessConfig}[cfg.window.kind]
    strict_dataclass(cls, cfg.window, f"window ({option})")


@pytest.mark.parametrize("override, needle", [
    ("max_frame=3", "max_frame"),
    ("controller.scrpt=R", "scrpt"),
    ("window.fsp=60", "fsp"),
    ("recrod.path=x", "recrod"),
])
def test_misspelled_keys_fail(override, needle):
    with pytest.raises(ConfigCompositionException, match=needle):
        compose(["controller=scripted", override])


@pytest.mark.parametrize("override, needle", [
    ("controller=keybord", "controller/keybord"),
    ("window=headles", "window/headles"),
])
def test_unknown_options_fail_listing_the_choices(override, needle):
    with pytest.raises(MissingConfigException, match=needle) as err:
        compose([override])
    assert "Available options" in str(err.value)


def test_unknown_sub_config_keys_and_bad_values_fail_in_play():
    import play

    for overrides, needle in [
        (["window=pygame", "+window.vsync=true"], "'vsync'"),
        (["window=headless", "+window.fps=3"], "'fps'"),
        (["window=headless", "controller=scripted", "+controller.speed=2"], "'speed'"),
        (["window=headless", "controller=scripted", "controller.script=R*2 Z"], "'Z'"),
        (["window=headless", "controller=keyboard"], "needs a window"),
        (["window=headless", "controller=replay"], "controller.path"),
        (["window=pygame", "window.scale=0"], "window.scale"),
        (["window=headless", "controller=scripted", "max_frames=-1"], "max_frames"),
        # values of the wrong type name their key and what it takes
        (["window=headless", "controller=scripted", "controller.loop='false'"], "controller.loop must be true or false"),
        (["window=pygame", "window.fps=abc"], "window.fps must be a number, got 'abc'"),
        (["window=headless", "controller=scripted", "attention.budget_frames=2.5"],
         "attention.budget_frames must be an integer, got 2.5"),
        (["window=headless", "controller=scripted", "seed=1.5"], "seed must be an integer, got 1.5"),
        (["window=headless", "controller=random", "controller.seed=abc"], "controller.seed must be an integer or null"),
        (["window=headless", "controller=scripted", "engine.chunk_size=abc"], "engine.chunk_size must be an integer >= 1"),
        (["window=headless", "controller=scripted", "engine.threads=0"], "engine.threads must be null or an integer >= 1"),
        (["window=pygame", "window.keys.quit=[esc]"], "window.keys.quit: unknown key name 'esc'"),
        (["window=headless", "controller=scripted", f"record.dir={REPO / 'README.md' / 'sub'}"],
         "record.dir '" + str(REPO / "README.md" / "sub") + "' cannot be a directory"),
        (["window=headless", "controller=scripted", f"record.path={REPO / 'README.md' / 'sub'}"],
         "record.path '" + str(REPO / "README.md" / "sub") + "' cannot be a directory"),
    ]:
        with pytest.raises(ValueError, match=needle):
            play.play(compose(overrides))


def test_cli_reports_a_bad_script(tmp_path: Path):
    result = run_play(["window=headless", "controller=scripted", "controller.script=R*3 R*x",
                       "max_frames=3"], cwd=tmp_path)
    assert result.returncode != 0
    assert "'R*x'" in result.stderr


@pytest.mark.parametrize("override, needle", [
    ("engine.checkpoint=missing.safetensors", "checkpoint 'missing.safetensors' does not exist"),
    ("engine.checkpoint=.", "checkpoint '.' is a directory; expected a .safetensors file"),
    ("seed=abc", "seed must be an integer, got 'abc'"),
])
def test_cli_reports_bad_values_and_files_in_one_line(tmp_path: Path, override, needle):
    """A usage error is one line on stderr naming the bad value, exit status 2: no traceback."""
    result = run_play(["window=headless", "controller=scripted", "max_frames=3", override], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"play.py: error: {needle}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()  # and no log directory left behind


def test_cli_reports_a_misspelled_key(tmp_path: Path):
    result = run_play(["window=headless", "controller=scripted", "max_frams=3"], cwd=tmp_path)
    assert result.returncode != 0
    assert "max_frams" in result.stderr


@pytest.mark.parametrize("name", ["overworld_small", "overworld_fast"])
def test_shipped_checkpoints_are_their_model_configs(name):
    """Each shipped file holds the network its model config describes (`model=NAME`)."""
    from runtime.checkpoint import load_checkpoint
    from runtime.model import ModelConfig

    model, _ = load_checkpoint(REPO / "worlds" / "overworld" / "checkpoints" / f"{name}.safetensors")
    want = ModelConfig.from_dict(OmegaConf.to_container(compose([f"model={name}"]).model, resolve=True))
    assert model.cfg == want


def test_the_fast_preset_plays_the_four_block_model_with_a_32_frame_budget(tmp_path: Path):
    """`fast` samples as each device does (one step by default)."""
    import json

    from runtime.checkpoint import file_sha256

    result = run_play(["preset=fast", "window=headless", "controller=scripted", "controller.script=R*3",
                       "max_frames=3", "device=cpu", f"record.path={tmp_path / 'rec'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "rec" / "meta.json").read_text())
    fast = REPO / "worlds" / "overworld" / "checkpoints" / "overworld_fast.safetensors"
    assert meta["checkpoint_sha256"] == file_sha256(fast)
    assert meta["config"]["attention"]["name"] == "fastar" and meta["config"]["attention"]["budget_frames"] == 32
    assert meta["config"]["sampler"]["steps"] is None and meta["config"]["sampler"]["times"] == []
    assert compose([])["engine"]["checkpoint"].endswith("overworld_small.safetensors")  # not the default


def test_play_defaults_to_the_eight_block_model_with_a_32_frame_budget():
    # the play preset sets the budget; evaluation and benchmarks keep the group's 64 frames,
    # and a budget given on the command line wins over the preset
    cfg = compose([])
    assert cfg.engine.checkpoint.endswith("overworld_small.safetensors") and cfg.attention.name == "fastar"
    assert cfg.attention.budget_frames == 32
    assert compose(["attention.budget_frames=64"]).attention.budget_frames == 64
    for tool in ("evaluate", "bench"):
        assert compose(["attention=fastar"], config_name=tool).attention.budget_frames == 64


def test_the_sampler_on_a_gpu_takes_its_gpu_steps_and_times():
    """With `sampler.steps` null each device samples as its own settings say (the default:
    one step on a CPU, and on a GPU the CPU's, as `gpu_steps` is null); a `steps` given
    applies on every device; what evaluation and bench record is what ran."""
    import torch

    from runtime.factory import sampler_record
    from runtime.sampler import FlowSampler, SamplerConfig

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    cfg = compose([])
    assert sampler_record(cfg, cpu) == {"sampler_steps": 1, "sampler_times": [1.0]}
    assert sampler_record(cfg, gpu) == {"sampler_steps": 1, "sampler_times": [1.0]}
    two = compose(["sampler.gpu_steps=2", "sampler.gpu_times=[1.0,0.15]"])
    assert sampler_record(two, gpu) == {"sampler_steps": 2, "sampler_times": [1.0, 0.15]}
    assert sampler_record(two, cpu) == {"sampler_steps": 1, "sampler_times": [1.0]}
    for device in (cpu, gpu):  # an explicit step count wins on every device
        assert sampler_record(compose(["sampler.steps=4"]), device) == {"sampler_steps": 4,
                                                                       "sampler_times": [1.0, 0.75, 0.5, 0.25]}
    assert sampler_record(compose(["sampler.cpu_steps=2"]), gpu)["sampler_steps"] == 2  # the CPU's on a GPU
    assert sampler_record(compose(["sampler.cpu_steps=3"]), cpu)["sampler_steps"] == 3
    assert SamplerConfig(steps=None, gpu_steps=4).on("cuda").times == []
    with pytest.raises(ValueError, match="resolve it with SamplerConfig.on"):
        FlowSampler(SamplerConfig(steps=None))
    for bad, needle in ((dict(gpu_steps=0), "sampler.gpu_steps must be an integer >= 1, got 0"),
                        (dict(cpu_steps=None), "sampler.cpu_steps must be an integer >= 1, got None"),
                        (dict(gpu_steps=2, gpu_times=[1.0]), r"sampler.gpu_times=\[1.0\] must hold sampler.gpu_steps=2"),
                        (dict(gpu_steps=2, gpu_times=[1.0, 0.0]), "values in \\(0, 1\\]"),
                        (dict(steps=None, times=[1.0]), r"sampler.times=\[1.0\] needs sampler.steps"),
                        (dict(steps=True), "sampler.steps must be an integer >= 1, got True")):
        with pytest.raises(ValueError, match=needle):
            SamplerConfig(**bad)
    with pytest.raises(ValueError, match="gpu_stepz"):
        SamplerConfig.from_dict({"steps": 1, "gpu_stepz": 2})


@pytest.mark.parametrize("override, needle", [
    ("showcase.frames=[0,100]", "showcase.frames=[0, 100]; expected frame indices from 0 to the script's length"),
    ("showcase.worlds=[nowhere]", "nowhere.yaml' not found"),
    ("showcase.scale=0", "showcase.scale must be an integer >= 1, got 0"),
])
def test_the_showcase_checks_its_settings_before_drawing(override, needle):
    from runtime.showcase import check

    with pytest.raises(ValueError) as err:
        check(compose([override], config_name="showcase"))
    assert needle in str(err.value)


@pytest.mark.parametrize("signum, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupted_tool_says_so_in_one_line(tmp_path, signum, code):
    """Ctrl-C or SIGTERM inside `interruptible`: one line on stderr, the shell's exit code
    for the signal, cleanup in `finally` done, no traceback."""
    import subprocess
    import sys

    program = (
        "import os, signal\n"
        "from runtime.cli import interruptible\n"
        "with interruptible('tool', lambda: ' (partial results in out/)'):\n"
        "    try:\n"
        f"        os.kill(os.getpid(), signal.{signum})\n"
        "        import time; time.sleep(30)\n"
        "    finally:\n"
        "        print('cleaned up', flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == code, result.stderr
    assert result.stderr.strip() == "tool: interrupted (partial results in out/)"
    assert result.stdout.strip() == "cleaned up"


def test_a_config_file_with_a_yaml_mistake_is_one_line(tmp_path, monkeypatch, capsys):
    """A world file of one's own with a YAML syntax error (an unquoted colour in a flow
    mapping) is named with its line and column, before Hydra would print a traceback;
    files that parse, and arguments that are not GROUP=OPTION, pass."""
    from runtime import configs

    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "mine.yaml").write_text("name: mine\ntileset:\n  grass: {pattern: tufts, base: #5aa83c}\n")
    (tmp_path / "world" / "fine.yaml").write_text("name: fine\n")
    monkeypatch.setattr(configs, "CONF", tmp_path)
    configs.check_config_files("play.py", ["world=fine", "seed=3", "world.view=64", "max_frames=2"])
    with pytest.raises(SystemExit) as stop:
        configs.check_config_files("play.py", ["engine=simulator", "world=mine"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"play.py: error: {tmp_path / 'world' / 'mine.yaml'}, line 4, column 1: ")
