"""Soft-label training of a student (SRe2L's "relabel", done online as RDED, EDC and DD-Ranking do).

Every student batch goes through ONE augmentation, drawn from a seeded ``torch.Generator``:
SRe2L's ``RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))`` and a horizontal
flip with p = 0.5, per image, then optionally CutMix (Yun et al. 2019; SRe2L's and RDED's
``mix_aug``: lambda ~ Beta(alpha, alpha), one box for the batch, pasted from a permuted
batch). The teacher (eval mode, ``no_grad``) and the student see the same augmented
tensor, and the student minimizes

    KL(softmax(teacher / T) || softmax(student / T)) * T^2        (batch mean)

Nothing of the teacher is stored: its outputs are computed per batch and dropped.
Written for torch alone (torchvision does not import with the CPU torch here): the crop
box is drawn as torchvision draws it (10 tries at a random area and log-uniform aspect
ratio, else a centre crop of the clamped ratio), the crop is resized bilinearly with
antialiasing (``F.interpolate``), as torchvision's tensor path does.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["crop_box", "random_resized_crop_flip", "cutmix", "mix_targets", "kd_loss", "SoftLabelAugment",
           "teacher_logits"]

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)


def crop_box(height: int, width: int, gen: torch.Generator, scale=SCALE, ratio=RATIO) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of one RandomResizedCrop box, drawn as torchvision draws it."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=gen))
        aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop_flip(x: Tensor, gen: torch.Generator, size: Optional[Tuple[int, int]] = None,
                             scale=SCALE) -> Tensor:
    """x (B, C, H, W) float -> (B, C, *size) (default: H, W): a box per image resized
    bilinearly (antialiased), then flipped left-right with p = 0.5 per image."""
    B, _, H, W = x.shape
    size = tuple(size or (H, W))
    out = []
    for i in range(B):
        top, left, h, w = crop_box(H, W, gen, scale)
        patch = x[i:i + 1, :, top:top + h, left:left + w]
        patch = F.interpolate(patch, size=size, mode="bilinear", align_corners=False, antialias=True)
        if float(torch.rand(1, generator=gen)) < 0.5:
            patch = patch.flip(3)
        out.append(patch)
    return torch.cat(out)


def cutmix(x: Tensor, gen: torch.Generator, alpha: float = 1.0) -> Tuple[Tensor, Tensor, float]:
    """(mixed, perm, lam): one box of area about (1 - lam0) H W, lam0 ~ Beta(alpha, alpha), cut
    from x[perm] and pasted into x at the same place. ``lam`` is the share of every image's
    pixels that are still its own (recomputed from the box after clipping to the image)."""
    B, _, H, W = x.shape
    lam0 = float(np.random.default_rng(int(torch.randint(1 << 62, (1,), generator=gen))).beta(alpha, alpha))
    perm = torch.randperm(B, generator=gen).to(x.device)
    cut = math.sqrt(1.0 - lam0)
    ch, cw = int(H * cut), int(W * cut)
    cy, cx = int(torch.randint(H, (1,), generator=gen)), int(torch.randint(W, (1,), generator=gen))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    return mixed, perm, 1.0 - (y1 - y0) * (x1 - x0) / (H * W)


def mix_targets(targets: Tensor, perm: Tensor, lam: float) -> Tensor:
    """Targets of a CutMix batch, mixed by area: lam * targets + (1 - lam) * targets[perm]
    (targets (B, K) probabilities: one-hot hard labels or soft labels)."""
    return lam * targets + (1.0 - lam) * targets[perm]


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) * T^2, the mean over the batch (B, K)."""
    T = float(temperature)
    return F.kl_div(F.log_softmax(student_logits / T, dim=1), F.log_softmax(teacher_logits.detach() / T, dim=1),
                    reduction="batchmean", log_target=True) * (T * T)


class SoftLabelAugment:
    """The student batch's augmentation: ``aug(x, gen) -> (x_aug, perm, lam)``; perm is None
    and lam 1.0 without CutMix. ``crop``: RandomResizedCrop + flip on (scale as SRe2L's),
    ``cutmix_alpha``: CutMix's Beta parameter (0: off)."""

    def __init__(self, crop: bool = True, cutmix_alpha: float = 0.0, scale=SCALE):
        self.crop, self.cutmix_alpha, self.scale = crop, float(cutmix_alpha), tuple(scale)

    def __call__(self, x: Tensor, gen: torch.Generator):
        if self.crop:
            x = random_resized_crop_flip(x, gen, scale=self.scale)
        if self.cutmix_alpha > 0:
            return cutmix(x, gen, self.cutmix_alpha)
        return x, None, 1.0


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: Tensor) -> Tensor:
    """The teacher's logits on x, in eval mode under no_grad (nothing kept)."""
    teacher.eval()
    return teacher(x)
