"""Differentiable Siamese augmentation (DSA, Zhao & Bilen 2021), written for metadd_fast.

As DSA defines it (VICO-UoE/DatasetCondensation, ``utils.py``: ``ParamDiffAug``,
``DiffAugment``, ``rand_*``): in mode "S" (DSA's default) each call samples ONE operation
of the strategy (``color`` = brightness, saturation and contrast together), in mode "M"
it applies all of them in order. ``DiffAugment(strategy)(x, seed)`` draws the operation
and its parameters from ``seed`` on the CPU, so calling it on the real and on the
synthetic batch of a matching step with the same seed applies the same operation with
the same parameters to both (the "Siamese" part), on any device and for any batch size.
With ``siamese=True`` (the default) one parameter set serves the whole batch (DSA with a
seed); ``siamese=False`` draws one per image (DSA with seed=-1, for training networks).

Parameter ranges (DSA's ``ParamDiffAug``): brightness +-0.5, saturation x[0, 2],
contrast x[0.5, 1.5], crop: integer translation by up to round(0.125 * size) pixels with
zero fill, cutout: a zeroed square of round(0.5 * size) at a uniform centre, flip: p=0.5,
scale: x[1/1.2, 1.2] per axis, rotate: +-15 degrees; bilinear resampling with zero fill
(``affine_grid``/``grid_sample``, align_corners=False). Every operation is
differentiable with respect to x.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import argcheck

__all__ = ["DiffAugment", "DEFAULT_STRATEGY", "OPERATIONS", "check_strategy"]

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
BRIGHTNESS, SATURATION, CONTRAST = 1.0, 2.0, 0.5
CROP_PAD, CUTOUT, FLIP, SCALE, ROTATE_DEG = 0.125, 0.5, 0.5, 1.2, 15.0

Draw = Callable[[], Tensor]  # one call: the next parameter, (n,) uniform in [0, 1)


def _per_image(r: Tensor, x: Tensor) -> Tensor:
    """A parameter (n,) with n = 1 or B as (B, 1, 1, 1) on x's device and dtype."""
    return r.to(device=x.device, dtype=x.dtype).expand(x.shape[0]).reshape(-1, 1, 1, 1)


def _uniform_int(r: Tensor, low: int, high: int) -> Tensor:
    """Integers uniform in [low, high] (both included) from uniforms r in [0, 1)."""
    return (low + torch.floor(r * (high - low + 1))).long().clamp_(low, high)


def _color(x: Tensor, draw: Draw) -> Tensor:
    x = x + (_per_image(draw(), x) - 0.5) * BRIGHTNESS
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_per_image(draw(), x) * SATURATION) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_per_image(draw(), x) + CONTRAST) + mean


def _crop(x: Tensor, draw: Draw) -> Tensor:
    B, _, H, W = x.shape
    sh, sw = int(H * CROP_PAD + 0.5), int(W * CROP_PAD + 0.5)
    ty = _uniform_int(draw(), -sh, sh).expand(B).to(x.device)
    tx = _uniform_int(draw(), -sw, sw).expand(B).to(x.device)
    rows = (torch.arange(H, device=x.device) + ty[:, None] + 1).clamp(0, H + 1)  # (B, H) in the padded image
    cols = (torch.arange(W, device=x.device) + tx[:, None] + 1).clamp(0, W + 1)
    padded = F.pad(x, (1, 1, 1, 1))  # a zero border: shifted-in pixels read zeros
    out = padded[torch.arange(B, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def _cutout(x: Tensor, draw: Draw) -> Tensor:
    B, _, H, W = x.shape
    ch, cw = int(H * CUTOUT + 0.5), int(W * CUTOUT + 0.5)
    oy = _uniform_int(draw(), 0, H - ch % 2).expand(B).to(x.device)  # DSA: randint(0, H + (1 - ch % 2))
    ox = _uniform_int(draw(), 0, W - cw % 2).expand(B).to(x.device)

    def inside(offset, size, n):
        lo = (offset - size // 2).clamp(0, n - 1)[:, None]
        hi = (offset - size // 2 + size - 1).clamp(0, n - 1)[:, None]
        i = torch.arange(n, device=x.device)
        return (i >= lo) & (i <= hi)  # (B, n)

    hole = inside(oy, ch, H)[:, :, None] & inside(ox, cw, W)[:, None, :]
    return x * (~hole).to(x.dtype)[:, None]


def _flip(x: Tensor, draw: Draw) -> Tensor:
    return torch.where(_per_image(draw(), x) < FLIP, x.flip(3), x)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    theta = theta.to(device=x.device, dtype=x.dtype).expand(x.shape[0], 2, 3)
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)


def _scale(x: Tensor, draw: Draw) -> Tensor:
    sx = draw() * (SCALE - 1.0 / SCALE) + 1.0 / SCALE
    sy = draw() * (SCALE - 1.0 / SCALE) + 1.0 / SCALE
    zero = torch.zeros_like(sx)
    return _affine(x, torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1))


def _rotate(x: Tensor, draw: Draw) -> Tensor:
    a = (draw() - 0.5) * 2 * math.radians(ROTATE_DEG)
    zero = torch.zeros_like(a)
    return _affine(x, torch.stack([torch.stack([a.cos(), -a.sin(), zero], 1),
                                   torch.stack([a.sin(), a.cos(), zero], 1)], 1))


OPERATIONS = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale, "rotate": _rotate}


def check_strategy(name: str, strategy) -> list:
    """The operation names of ``strategy`` (names of ``OPERATIONS`` joined by "_"); InputError
    naming ``name`` (e.g. "augment" for the callers that take a strategy) otherwise."""
    expected = f"operation names joined by '_' from {', '.join(OPERATIONS)}"
    argcheck.string(name, strategy, expected)
    names = strategy.split("_")
    unknown = [n for n in names if n not in OPERATIONS]
    if unknown:
        raise argcheck.InputError(f"{name}: expected {expected}, got {strategy!r} "
                                  f"(unknown: {', '.join(map(repr, unknown))})")
    return names


class DiffAugment:
    """DSA on (B, C, H, W) floating images: ``aug(x, seed, siamese=True)``. strategy: operation
    names joined by "_" (``OPERATIONS``); mode: "S" (one operation per call, DSA's default)
    or "M" (all, in order)."""

    def __init__(self, strategy: str = DEFAULT_STRATEGY, mode: str = "S"):
        names = check_strategy("strategy", strategy)
        argcheck.choice("mode", mode, ("S", "M"))
        self.names, self.mode = names, mode

    def __repr__(self) -> str:
        return f"DiffAugment({'_'.join(self.names)!r}, mode={self.mode!r})"

    def operations(self, seed: int) -> list:
        """The operation names a call with ``seed`` applies."""
        seed = argcheck.seed("seed", seed)
        if self.mode == "M":
            return list(self.names)
        g = torch.Generator().manual_seed(seed)
        return [self.names[int(torch.randint(len(self.names), (1,), generator=g))]]

    def __call__(self, x: Tensor, seed: int, siamese: bool = True) -> Tensor:
        """x (B, C, H, W) floating, B >= 1; seed an int in [0, 2**63); siamese a bool."""
        argcheck.images("x", x)
        seed = argcheck.seed("seed", seed)
        argcheck.boolean("siamese", siamese)
        g = torch.Generator().manual_seed(seed)
        names = self.operations(seed)
        if self.mode == "S":
            torch.randint(len(self.names), (1,), generator=g)  # the draw that chose the operation
        n = 1 if siamese else x.shape[0]
        draw = lambda: torch.rand(n, generator=g, dtype=torch.float64)  # noqa: E731
        for name in names:
            x = OPERATIONS[name](x, draw)
        return x.contiguous()
