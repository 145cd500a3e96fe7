"""Image metrics shared by training and evaluation."""
from __future__ import annotations

import torch


def mse(a: torch.Tensor, b: torch.Tensor, value_range: float = 2.0) -> torch.Tensor:
    """Per-image mean squared error over the last three dimensions, in units of the pixel
    values' span `value_range` (2 for [-1, 1] images, 255 for uint8): (..., X, Y, Z) -> (...)."""
    return ((a.float() - b.float()) / value_range).pow(2).flatten(-3).mean(-1)


def psnr(a: torch.Tensor, b: torch.Tensor, cap: float = 60.0, value_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB over the last three dimensions, capped: (..., X, Y, Z) -> (...).

    `value_range` is the span of the pixel values: 2 for [-1, 1] images, 255 for uint8."""
    return psnr_of_mse(mse(a, b, value_range), cap)


def psnr_of_mse(mse: torch.Tensor, cap: float = 60.0) -> torch.Tensor:
    """PSNR in dB of mean squared errors of values in a unit range, capped."""
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-12))).clamp(max=cap)
