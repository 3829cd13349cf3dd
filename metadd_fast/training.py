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

from .augment import DiffAugment
from .recipes import RECIPES
from .student import train_student

__all__ = ["train_model", "predict", "accuracy"]


def train_model(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, lr: float = 0.01,
                batch_size: int = 256, augment: Optional[DiffAugment] = None, seed: int = 0,
                progress: bool = False, desc: str = "train") -> nn.Module:
    """Train ``model`` in place on (images, labels); returns it in eval mode. DC's recipe
    (:data:`metadd_fast.recipes.RECIPES` ``["default"]``) with these settings, run by
    :func:`metadd_fast.student.train_student`."""
    recipe = dataclasses.replace(RECIPES["default"], epochs=epochs, lr=lr, batch_size=batch_size, augment=augment)
    return train_student(model, images, labels, recipe, seed=seed, progress=progress, desc=desc)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Predicted classes (N,) in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x).argmax(1) for x in images.split(batch_size)])
    model.train(was_training)
    return out


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict(model, images) == labels).float().mean())
