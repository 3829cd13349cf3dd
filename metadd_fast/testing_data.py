"""Generated image folders for tests and benchmarks (one copy, imported by both).

:func:`make_imagenet_folder` writes an ImageNet-layout folder of JPEGs,
``<root>/<split>/<wnid>/<wnid>_<i>.JPEG``, with photo-like content: a smooth random colour
field (a few low-frequency blobs per image) plus mild noise, so the files compress and decode
like photographs (about 30 to 60 KB at 500 x 375, quality 90), not like white noise.
Everything is drawn from ``seed``: the same call writes the same bytes.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

__all__ = ["make_imagenet_folder", "wnid", "photo_like"]


def wnid(c: int) -> str:
    """An ImageNet-style class folder name (a WordNet id): n0..., sorted in class order."""
    return f"n{1440764 + 7 * c:08d}"


def photo_like(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """uint8 (height, width, 3): a smooth random colour field plus mild noise."""
    from PIL import Image

    coarse = rng.integers(0, 256, size=(rng.integers(3, 7), rng.integers(3, 7), 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    noise = rng.normal(0.0, 6.0, size=(height, width, 1)).astype(np.float32)
    return np.clip(field + noise, 0, 255).astype(np.uint8)


def make_imagenet_folder(root: str, classes: int, per_class, size: tuple = (500, 375), seed: int = 0, *,
                         split: str = "train", quality: int = 90, names: Optional[Sequence[str]] = None) -> list:
    """Write ``per_class`` JPEGs (an int, or one count per class) of ``size`` (width, height)
    for each of ``classes`` classes under ``<root>/<split>/<name>/``; returns the class names
    (``names``, default ImageNet-style wnids). Files: ``<name>_<i>.JPEG``."""
    from PIL import Image

    names = list(names) if names is not None else [wnid(c) for c in range(classes)]
    if len(names) != classes:
        raise ValueError(f"names: expected {classes} class names, got {len(names)}")
    counts = [per_class] * classes if isinstance(per_class, int) else list(per_class)
    rng = np.random.default_rng(seed)
    for name, n in zip(names, counts):
        folder = os.path.join(root, split, name)
        os.makedirs(folder, exist_ok=True)
        for i in range(n):
            Image.fromarray(photo_like(rng, *size)).save(os.path.join(folder, f"{name}_{i}.JPEG"), quality=quality)
    return names
