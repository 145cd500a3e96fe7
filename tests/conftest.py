"""Shared test set-up: headless SDL, the repository on sys.path, config helpers."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

# Tests never open a real display or audio device (the Xvfb test opts back in).
os.environ["SDL_VIDEODRIVER"] = "dummy"
os.environ["SDL_AUDIODRIVER"] = "dummy"
os.environ["PYGAME_HIDE_SUPPORT_PROMPT"] = "1"

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402


def compose(overrides: list[str] | None = None, config_name: str = "config"):
    """A config of conf/ (the root config by default), with command-line style overrides."""
    from runtime.configs import compose_config

    return compose_config(config_name, overrides)


_INTERPRETER_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def probe(X, n):
    for t in range(0, tl.program_id(0) + n):  # a loop bound computed in the kernel
        tl.store(X + t, t)
x = torch.zeros(4, dtype=torch.int32)
probe[(1,)](x, 3)
assert x.tolist() == [0, 1, 2, 0], x
"""


def _interpreted_env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)


@functools.lru_cache(maxsize=1)
def _interpreter_fault() -> str | None:
    """None if this Triton's CPU interpreter runs a kernel with a computed loop bound, else
    why not (Triton 3.6's interpreter with NumPy 2.4 cannot: its scalars are 1-element arrays)."""
    res = subprocess.run([sys.executable, "-c", _INTERPRETER_PROBE], env=_interpreted_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    return None if res.returncode == 0 else (res.stderr.strip().splitlines() or ["no output"])[-1]


def run_interpreted(script: str, *args: str) -> str:
    """Run a test file as a script with Triton's interpreter on (TRITON_INTERPRET=1 must be
    set before Triton is imported, hence a child process): its kernels run on the CPU.
    Skips when this Triton's interpreter cannot run a plain kernel (the GPU tests check the
    kernels there); fails with the child's output if it fails; returns its stdout."""
    fault = _interpreter_fault()
    if fault is not None:
        import numpy
        import triton
        pytest.skip(f"Triton {triton.__version__}'s interpreter does not run with NumPy {numpy.__version__}: {fault}")
    res = subprocess.run([sys.executable, script, *args], env=_interpreted_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.fixture
def one_thread():
    """Small tensors: one thread is fastest and avoids stalls when the cores are shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(cfg, seed: int = 0):
    """A model whose zero-initialised layers are randomised too, so every tensor matters."""
    import torch

    from runtime.model import WorldModel

    torch.manual_seed(seed)
    model = WorldModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def run_play(args: list[str], cwd: Path, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run `python play.py ARGS` in a subprocess (cwd keeps Hydra's outputs/ out of the repo)."""
    return subprocess.run([sys.executable, str(REPO / "play.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def read_video(path: Path) -> list:
    import imageio.v2 as imageio

    with imageio.get_reader(path) as reader:
        return [frame for frame in reader]


@pytest.fixture
def repo() -> Path:
    return REPO
