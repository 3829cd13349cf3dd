"""Training and testing networks: the field's evaluation protocol and model pre-training.

``train_model``: SGD with momentum 0.9 and weight decay 5e-4, the learning rate
divided by 10 at half the epochs (DC's protocol), optional DSA augmentation.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import argcheck
from .augment import DiffAugment

__all__ = ["train_model", "predict", "accuracy"]


def train_model(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, lr: float = 0.01,
                batch_size: int = 256, augment: Optional[DiffAugment] = None, seed: int = 0,
                progress: bool = False, desc: str = "train") -> nn.Module:
    """Train ``model`` in place on (images, labels); returns it in eval mode. images (N, C, H, W)
    floating, finite; labels (N,) int (the model's classes); augment None or a DiffAugment."""
    argcheck.module("model", model)
    argcheck.images("images", images, finite=True)
    argcheck.labels("labels", labels, n=images.shape[0])
    argcheck.positive_int("epochs", epochs)
    argcheck.positive_float("lr", lr)
    argcheck.positive_int("batch_size", batch_size)
    argcheck.optional(argcheck.instance, "augment", augment, DiffAugment, "None or a DiffAugment")
    seed = argcheck.seed("seed", seed)
    argcheck.boolean("progress", progress)
    argcheck.string("desc", desc)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(1, epochs // 2)], gamma=0.1)
    images, labels = images.detach(), labels.detach()
    model.train()
    for _ in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
        order = torch.randperm(images.shape[0], generator=g).to(images.device)
        for idx in order.split(batch_size):
            x = images[idx]
            if augment is not None:
                x = augment(x, int(torch.randint(1 << 30, (1,), generator=g)), siamese=False)  # DSA: per image
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


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
