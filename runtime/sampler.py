"""Few-step flow-matching sampler.

Noise and data are joined by straight paths x_t = (1 - t) x0 + t eps, t in [0, 1]. The
network predicts x0; a step from t to s < t re-noises the estimate along the same path:

    eps_hat = (x_t - (1 - t) x0_hat) / t
    x_s     = (1 - s) x0_hat + s eps_hat

which is the Euler step of the flow ODE written with x0-prediction. The last step
returns x0_hat. Randomness comes only from the caller's `torch.Generator`, so a seed
replays exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from runtime.configs import strict_dataclass


@dataclass
class SamplerConfig:
    name: str = "default"
    steps: int = 2
    times: list[float] = field(default_factory=list)  # explicit times; empty = uniform from 1
    clamp: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"sampler.steps must be >= 1, got {self.steps}")
        if self.times and (len(self.times) != self.steps or any(not 0 < t <= 1 for t in self.times)):
            raise ValueError(
                f"sampler.times={list(self.times)} must hold sampler.steps={self.steps} values in (0, 1]"
            )

    @classmethod
    def from_dict(cls, d: dict) -> "SamplerConfig":
        d = dict(d)
        if d.get("times") is not None:
            d["times"] = [float(t) for t in d["times"]]
        return strict_dataclass(cls, d, "sampler")


class FlowSampler:
    def __init__(self, cfg: SamplerConfig):
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
