"""A synthetic set in the layouts other tools read.

- ``export_imagefolder``: PNG files in SRe2L's layout (VILA-Lab/SRe2L ``recover``'s
  ``save_images``): ``DIR/new{class:03d}/class{class:03d}_id{i:03d}.png``, i the image's
  index within its class, de-normalized with the data set's mean and std and rounded to
  8 bits (SRe2L writes JPEG and truncates; PNG is lossless, so a round trip is exact to
  half a grey level). One channel is written as a grey ("L") image, three as RGB. SRe2L's
  relabel/train scripts and DD-Ranking read the folder with torchvision's ImageFolder,
  which sorts class folders by name: ``new000``, ``new001``, ... give the labels back.
- ``export_tensors``: ``{"images": (N, C, H, W) float32 normalized, "labels": (N,) int64}``
  in one ``torch.save`` file, as DD-Ranking's Python API takes them.

Every file is written atomically (:func:`metadd_fast.results.atomic_write`).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from .results import atomic_save, atomic_write

__all__ = ["to_uint8", "export_imagefolder", "export_tensors", "png_path"]


def to_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, C, H, W) normalized float -> uint8 pixels: round(clamp(x * std + mean, 0, 1) * 255)."""
    m = torch.tensor(mean, dtype=torch.float64)[:, None, None]
    s = torch.tensor(std, dtype=torch.float64)[:, None, None]
    return ((images.double() * s + m).clamp(0, 1) * 255).round().to(torch.uint8)


def png_path(out: str, label: int, i: int) -> str:
    """SRe2L's file name of the i-th image of class ``label``."""
    return os.path.join(out, f"new{label:03d}", f"class{label:03d}_id{i:03d}.png")


def export_imagefolder(images: torch.Tensor, labels: torch.Tensor, out: str, mean: Sequence[float],
                       std: Sequence[float]) -> list:
    """Write the set as PNGs under ``out`` (see the module's docstring); returns the paths."""
    from PIL import Image

    if images.shape[1] not in (1, 3):
        raise ValueError(f"images: PNG export takes 1 or 3 channels, got {images.shape[1]}")
    if len(mean) != images.shape[1] or len(std) != images.shape[1]:
        raise ValueError(f"mean, std: expected {images.shape[1]} values each, got {len(mean)} and {len(std)}")
    pixels = to_uint8(images, mean, std).permute(0, 2, 3, 1).numpy()
    seen: dict = {}
    paths = []
    for k, label in enumerate(labels.tolist()):
        i = seen[label] = seen.get(label, -1) + 1
        path = png_path(out, label, i)
        array = pixels[k][:, :, 0] if pixels.shape[3] == 1 else pixels[k]
        image = Image.fromarray(np.ascontiguousarray(array))  # (H, W) uint8: "L"; (H, W, 3): "RGB"
        atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
        paths.append(path)
    return paths


def export_tensors(images: torch.Tensor, labels: torch.Tensor, path: str) -> None:
    """``{"images", "labels"}`` in ``path`` (torch.save, read back with weights_only=True)."""
    atomic_save({"images": images.detach().cpu().float().contiguous(), "labels": labels.detach().cpu().long()},
                path)
