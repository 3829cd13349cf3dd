"""Evaluation recipes of the field: how a student is trained on a synthetic set.

Each preset writes out its paper's published settings (docs/evaluation.md has the table
and the sources); ``resolve(name, **overrides)`` gives the preset with every explicitly
given setting replacing the preset's (``None`` keeps the preset's value).

- ``default``: SGD lr 0.01, momentum 0.9, wd 5e-4, lr / 10 at half, 300 epochs, batch 256,
  DSA augmentation: DC's optimizer and schedule with DSA's augmentation at DC's epoch
  count. This is :func:`metadd_fast.training.train_model`'s protocol, and what ``evaluate``
  has always run.
- ``dc``: DC's ConvNet evaluation (Zhao et al. 2021, VICO-UoE/DatasetCondensation
  ``main.py``/``evaluate_synset``, data sets other than MNIST): as ``default``, without
  augmentation (DC's code sets 300 epochs when nothing augments).
- ``dm``: DM's and DSA's (``main_DM.py``; ``main.py`` with ``--dsa``): as ``default`` with
  1,000 epochs (their code sets 1,000 when DSA augments).
- ``sre2l-imagenet``: SRe2L's ImageNet-1K validation (VILA-Lab/SRe2L ``validate/train_KD``):
  AdamW lr 1e-3, wd 0.01, cosine to 0 over 300 epochs, batch 1024, T = 20,
  RandomResizedCrop(scale 0.08..1) + flip, CutMix (alpha 1).
- ``sre2l-tiny``: SRe2L's Tiny-ImageNet relabel (zeyuanyin/tiny-imagenet ``train_kd``):
  SGD lr 0.2, momentum 0.9, wd 1e-4, 5 linear warm-up epochs from 0.01 x lr then cosine,
  100 epochs, batch 256, T = 20, RandomResizedCrop + flip, no CutMix.

``temperature`` of the default, DC and DM presets (used only with soft labels) is DD-Ranking's default, 1.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Union

import torch

from .augment import DEFAULT_STRATEGY, DiffAugment

__all__ = ["Recipe", "RECIPES", "resolve", "make_optimizer"]

RRC_FLIP = "rrc_flip"  # SRe2L's RandomResizedCrop + horizontal flip (metadd_fast.soft_labels)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """optimizer "sgd" | "adamw"; schedule "step_half" (lr / 10 at half the epochs) | "cosine"
    (to 0, after ``warmup_epochs`` linear from ``warmup_start`` x lr); augment: a DSA strategy
    (:mod:`metadd_fast.augment`) or a ``DiffAugment``, ``"rrc_flip"`` or None; cutmix_alpha: 0 is off."""

    name: str
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    schedule: str
    epochs: int
    batch_size: int
    temperature: float
    augment: Union[str, DiffAugment, None]
    cutmix_alpha: float = 0.0
    warmup_epochs: int = 0
    warmup_start: float = 1.0


RECIPES = {
    "default": Recipe("default", "sgd", 0.01, 0.9, 5e-4, "step_half", 300, 256, 1.0, DEFAULT_STRATEGY),
    "dc": Recipe("dc", "sgd", 0.01, 0.9, 5e-4, "step_half", 300, 256, 1.0, None),
    "dm": Recipe("dm", "sgd", 0.01, 0.9, 5e-4, "step_half", 1000, 256, 1.0, DEFAULT_STRATEGY),
    "sre2l-imagenet": Recipe("sre2l-imagenet", "adamw", 1e-3, 0.0, 0.01, "cosine", 300, 1024, 20.0, RRC_FLIP,
                             cutmix_alpha=1.0),
    "sre2l-tiny": Recipe("sre2l-tiny", "sgd", 0.2, 0.9, 1e-4, "cosine", 100, 256, 20.0, RRC_FLIP,
                         warmup_epochs=5, warmup_start=0.01),
}


def resolve(name: str = "default", **overrides) -> Recipe:
    """The preset ``name`` with the overrides that are not None (fields of :class:`Recipe`)."""
    if name not in RECIPES:
        raise ValueError(f"recipe: expected one of {', '.join(RECIPES)}, got {name!r}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Recipe)}
    if unknown:
        raise TypeError(f"resolve: unknown recipe settings {sorted(unknown)}")
    return dataclasses.replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})


def make_optimizer(recipe: Recipe, params) -> tuple:
    """(optimizer, scheduler stepped once per epoch) of ``recipe``."""
    if recipe.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    E, W = recipe.epochs, recipe.warmup_epochs
    if recipe.schedule == "step_half":
        half = max(1, E // 2)
        factor = lambda e: 1.0 if e < half else 0.1  # noqa: E731
    else:
        def factor(e):
            if e < W:
                return recipe.warmup_start + (1 - recipe.warmup_start) * e / W
            return 0.5 * (1 + math.cos(math.pi * (e - W) / max(1, E - W)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
