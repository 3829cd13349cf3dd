"""Differentiable Siamese augmentation (DSA, Zhao & Bilen 2021), written for metadd_fast.

``DiffAugment(strategy)(x, seed)`` applies the listed transforms with parameters
drawn from ``seed``: calling it on the real and on the synthetic batch with the
same seed applies the same transform to both (the "Siamese" part), and every
transform is differentiable with respect to x. Parameters are drawn once per
batch, on the CPU, so a seed gives the same augmentation on any device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["DiffAugment", "DEFAULT_STRATEGY"]

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"


class DiffAugment:
    """Transforms, in order: color (brightness, saturation, contrast), crop (translation by up
    to 1/8 of the size), cutout (a zeroed square of half the size), flip (horizontal, p=0.5),
    scale (x0.8-1.2 per axis), rotate (+-15 degrees)."""

    def __init__(self, strategy: str = DEFAULT_STRATEGY):
        names = [s for s in strategy.split("_") if s]
        unknown = set(names) - {"color", "crop", "cutout", "flip", "scale", "rotate"}
        if unknown:
            raise ValueError(f"strategy: unknown transforms {sorted(unknown)} in {strategy!r}")
        self.names = names

    def __repr__(self) -> str:
        return f"DiffAugment({'_'.join(self.names)!r})"

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(seed))
        u = lambda: float(torch.rand((), generator=g))  # noqa: E731
        for name in self.names:
            x = getattr(self, "_" + name)(x, u)
        return x

    @staticmethod
    def _color(x, u):
        x = x + (u() - 0.5)  # brightness
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (u() * 2) + mean  # saturation
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (u() + 0.5) + mean  # contrast

    @staticmethod
    def _crop(x, u):
        H, W = x.shape[2:]
        dy, dx = round((u() - 0.5) * 2 * H / 8), round((u() - 0.5) * 2 * W / 8)
        padded = F.pad(x, (abs(dx), abs(dx), abs(dy), abs(dy)))
        return padded[:, :, abs(dy) - dy: abs(dy) - dy + H, abs(dx) - dx: abs(dx) - dx + W]

    @staticmethod
    def _cutout(x, u):
        H, W = x.shape[2:]
        h, w = H // 2, W // 2
        cy, cx = int(u() * H), int(u() * W)
        mask = torch.ones(H, W, dtype=x.dtype, device=x.device)
        mask[max(0, cy - h // 2): cy + (h + 1) // 2, max(0, cx - w // 2): cx + (w + 1) // 2] = 0
        return x * mask

    @staticmethod
    def _flip(x, u):
        return x.flip(3) if u() < 0.5 else x

    @staticmethod
    def _affine(x, theta):
        grid = F.affine_grid(theta.to(x.dtype).to(x.device).expand(x.shape[0], 2, 3), list(x.shape),
                             align_corners=True)
        return F.grid_sample(x, grid, align_corners=True)

    @classmethod
    def _scale(cls, x, u):
        sx, sy = 0.8 + 0.4 * u(), 0.8 + 0.4 * u()
        return cls._affine(x, torch.tensor([[[sx, 0.0, 0.0], [0.0, sy, 0.0]]]))

    @classmethod
    def _rotate(cls, x, u):
        a = (u() - 0.5) * 2 * math.radians(15)
        return cls._affine(x, torch.tensor([[[math.cos(a), math.sin(-a), 0.0], [math.sin(a), math.cos(a), 0.0]]]))
