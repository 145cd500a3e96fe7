"""Few-step flow-matching sampler.

Noise and data are joined by straight paths x_t = (1 - t) x0 + t eps, t in [0, 1]. The
network predicts x0; a step from t to s < t re-noises the estimate along the same path:

    eps_hat = (x_t - (1 - t) x0_hat) / t
    x_s     = (1 - s) x0_hat + s eps_hat

which is the Euler step of the flow ODE written with x0-prediction. The last step
returns x0_hat. Randomness comes only from the caller's `torch.Generator`, so a seed
replays exactly.

A GPU can afford more steps than play's 30 frames per second leave a small CPU. `steps`
(with `times`) applies on every device; left null, each device takes its own:
`gpu_steps` / `gpu_times` on a GPU when set, else `cpu_steps` / `cpu_times`
(`SamplerConfig.on` resolves it).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from runtime.configs import strict_dataclass


@dataclass
class SamplerConfig:
    name: str = "default"
    steps: int | None = None  # on every device; None: the device's own (cpu_* / gpu_*), as conf/sampler/default.yaml
    times: list[float] = field(default_factory=list)  # explicit times; empty = uniform from 1
    clamp: bool = True
    cpu_steps: int = 1  # with steps None: on a CPU, and on a GPU without gpu_steps
    cpu_times: list[float] = field(default_factory=list)
    gpu_steps: int | None = None  # with steps None: on a GPU (None: the CPU's)
    gpu_times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.steps is None and self.times:
            raise ValueError(f"sampler.times={list(self.times)} needs sampler.steps (null: the device's own steps "
                             "and times, sampler.cpu_times / gpu_times)")
        for prefix, steps, times in (("", self.steps, self.times), ("cpu_", self.cpu_steps, self.cpu_times),
                                     ("gpu_", self.gpu_steps, self.gpu_times)):
            if steps is None and prefix != "cpu_":  # steps: the device's own; gpu_steps: the CPU's
                continue
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"sampler.{prefix}steps must be an integer >= 1, got {steps!r}")
            if times and (len(times) != steps or any(not 0 < t <= 1 for t in times)):
                raise ValueError(
                    f"sampler.{prefix}times={list(times)} must hold sampler.{prefix}steps={steps} values in (0, 1]"
                )

    @classmethod
    def from_dict(cls, d: dict) -> "SamplerConfig":
        d = dict(d)
        for key in ("times", "cpu_times", "gpu_times"):
            if d.get(key) is not None:
                d[key] = [float(t) for t in d[key]]
        return strict_dataclass(cls, d, "sampler")

    def on(self, device) -> "SamplerConfig":
        """The sampler a model on `device` runs (`steps` set): `steps` / `times` when set,
        else `gpu_steps` / `gpu_times` on a GPU when those are set, else `cpu_steps` /
        `cpu_times`."""
        if self.steps is not None:
            return self
        gpu = self.gpu_steps is not None and torch.device(device).type == "cuda"
        steps, times = (self.gpu_steps, self.gpu_times) if gpu else (self.cpu_steps, self.cpu_times)
        return replace(self, steps=steps, times=list(times))


class FlowSampler:
    def __init__(self, cfg: SamplerConfig):
        if cfg.steps is None:
            raise ValueError("sampler.steps is null (each device's own): resolve it with SamplerConfig.on(device)")
        self.cfg = cfg
        if cfg.times:
            self.times = [float(t) for t in cfg.times]
        else:
            self.times = [1.0 - i / cfg.steps for i in range(cfg.steps)]

    def sample(self, denoise: Callable[[torch.Tensor, float, int], torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
        """denoise(x_t, t, step_index) -> x0_hat. Returns the final x0_hat."""
        x = noise
        x0 = noise
        for i, t in enumerate(self.times):
            x0 = denoise(x, t, i)
            if self.cfg.clamp:
                x0 = x0.clamp(-1.0, 1.0)
            s = self.times[i + 1] if i + 1 < len(self.times) else 0.0
            if s > 0:
                eps = (x - (1.0 - t) * x0) / t
                x = (1.0 - s) * x0 + s * eps
        return x0
