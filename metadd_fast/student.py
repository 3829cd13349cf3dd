"""Training a student on a synthetic set under a recipe (:mod:`metadd_fast.recipes`), with hard
labels (cross-entropy) or soft labels from a teacher (:mod:`metadd_fast.soft_labels`).

Per epoch: a shuffled order (seeded), batches of ``recipe.batch_size``; each batch goes
through the recipe's augmentation once (DSA per image, or RandomResizedCrop + flip), then
CutMix if the recipe has it. Hard labels: cross-entropy against the one-hot labels, mixed
by CutMix's area. Soft labels: the teacher's logits on the very tensor the student gets,
``kd_loss`` at the recipe's temperature. The scheduler steps once per epoch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .augment import DiffAugment
from .recipes import RRC_FLIP, Recipe, make_optimizer
from .soft_labels import SoftLabelAugment, kd_loss, mix_targets, teacher_logits

__all__ = ["train_student"]


def train_student(model: nn.Module, images, labels: torch.Tensor, recipe: Recipe, *,
                  teacher: Optional[nn.Module] = None, seed: int = 0, progress: bool = False,
                  desc: str = "student") -> nn.Module:
    """Train ``model`` in place on images and labels (N,) int64 (used when ``teacher`` is None);
    returns it in eval mode. ``images``: (N, C, H, W) float, or a row reader: ``len()`` and
    ``rows(idx)`` -> the float images at row indices ``idx`` (int64, on the CPU), such as a
    :class:`metadd_fast.sources.Source`, which reads only each batch (an image folder decodes
    only its files). The same batches either way. The teacher runs in eval mode under no_grad."""
    g = torch.Generator().manual_seed(seed)
    opt, sched = make_optimizer(recipe, model.parameters())
    dsa = recipe.augment if isinstance(recipe.augment, DiffAugment) else \
        DiffAugment(recipe.augment) if recipe.augment not in (None, RRC_FLIP) else None
    aug = SoftLabelAugment(crop=recipe.augment == RRC_FLIP, cutmix_alpha=recipe.cutmix_alpha)
    read, n, device = _batch_reader(images)
    labels = labels.detach()
    model.train()
    for _ in tqdm(range(recipe.epochs), desc=desc, disable=not progress, leave=False):
        for idx in torch.randperm(n, generator=g).to(device).split(recipe.batch_size):
            x = read(idx)
            if dsa is not None:
                x = dsa(x, int(torch.randint(1 << 30, (1,), generator=g)), siamese=False)
            x, perm, lam = aug(x, g)
            out = model(x)
            if teacher is not None:
                loss = kd_loss(out, teacher_logits(teacher, x), recipe.temperature)
            else:
                target = labels[idx] if perm is None else \
                    mix_targets(F.one_hot(labels[idx], out.shape[1]).to(out.dtype), perm, lam)
                loss = F.cross_entropy(out, target)  # class indices, or probabilities mixed by CutMix
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def _batch_reader(images) -> tuple:
    """(read(idx) -> the images at rows ``idx``, N, the device of the indices): a tensor's rows,
    or a row reader's ``rows``."""
    if isinstance(images, torch.Tensor):
        images = images.detach()
        return images.__getitem__, images.shape[0], images.device
    return images.rows, len(images), torch.device("cpu")
