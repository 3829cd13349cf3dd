"""Training and testing networks: the field's evaluation protocol and model pre-training.

``train_model``: SGD with momentum 0.9 and weight decay 5e-4, the learning rate
divided by 10 at half the epochs (DC's schedule), optional DSA augmentation; the loop is
:func:`metadd_fast.student.train_student`'s (the one loop every recipe runs through).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from . import argcheck
from .augment import DiffAugment
from .recipes import RECIPES
from .student import train_student

__all__ = ["train_model", "predict", "accuracy"]


def train_model(model: nn.Module, images, labels: torch.Tensor, *, epochs: int, lr: float = 0.01,
                batch_size: int = 256, augment: Optional[DiffAugment] = None, seed: int = 0,
                progress: bool = False, desc: str = "train") -> nn.Module:
    """Train ``model`` in place on (images, labels); returns it in eval mode. images (N, C, H, W)
    floating, finite, or a row reader (a :class:`metadd_fast.sources.Source`: ``len()`` and
    ``rows(idx)``, read one batch at a time, on the CPU); labels (N,) int (the model's classes);
    augment None or a DiffAugment. DC's recipe (:data:`metadd_fast.recipes.RECIPES`
    ``["default"]``) with these settings, run by :func:`metadd_fast.student.train_student`."""
    argcheck.module("model", model)
    if isinstance(images, torch.Tensor):
        argcheck.images("images", images, finite=True)
    elif not (callable(getattr(images, "rows", None)) and hasattr(images, "__len__")):
        raise argcheck.type_error("images", "a floating (N, C, H, W) tensor or a row reader (len() and rows(idx), "
                                            "e.g. a metadd_fast.sources.Source)", images)
    argcheck.labels("labels", labels, n=len(images))
    argcheck.nonnegative_int("epochs", epochs)  # 0: the model untrained, in eval mode
    argcheck.positive_float("lr", lr)
    argcheck.positive_int("batch_size", batch_size)
    argcheck.optional(argcheck.instance, "augment", augment, DiffAugment, "None or a DiffAugment")
    seed = argcheck.seed("seed", seed)
    argcheck.boolean("progress", progress)
    argcheck.string("desc", desc)
    recipe = dataclasses.replace(RECIPES["default"], epochs=epochs, lr=lr, batch_size=batch_size, augment=augment)
    return train_student(model, images, labels, recipe, seed=seed, progress=progress, desc=desc)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Predicted classes (N,) in eval mode (the model's mode is restored)."""
    argcheck.module("model", model)
    argcheck.images("images", images)
    argcheck.positive_int("batch_size", batch_size)
    was_training = model.training
    model.eval()
    out = torch.cat([model(x).argmax(1) for x in images.split(batch_size)])
    model.train(was_training)
    return out


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict(model, images) == labels).float().mean())
