"""Benchmark workloads of the CVaR op (see workloads_cam.py for the module interface).

Robust DD: per-real-image losses grouped by their nearest synthetic image. The eager
provider is eager_cvar: group means by index_add and bincount, the tail by torch.topk
(a partial selection, not a full sort: eager_choices.py).
"""
from __future__ import annotations

import math

import torch

import metadd_fast as mf
from providers import pick

ALPHA = 0.1
# name -> (N values, number of groups or None)
WORKLOADS = {
    "dc_cifar10_ipc50_groups": (50_000, 500),  # CIFAR-10 train set, 500 synthetic images
    "values_1e6": (1_000_000, None),
    "imagenet_ipc50_groups": (1_281_167, 50_000),  # ImageNet-1k train set, 50k synthetic images
    "values_1e7_groups_1e5": (10_000_000, 100_000),
}
CPU_WORKLOADS = ["dc_cifar10_ipc50_groups", "values_1e6", "imagenet_ipc50_groups"]


def eager_cvar(values, alpha: float, groups, num_groups):
    """CVaR in plain PyTorch: (1/a) (sum of the f largest L + (a - f) L_(f+1)), a = alpha n (at
    least 1), f = floor(a), L the values or the means of the non-empty groups."""
    if groups is None:
        L = values
    else:
        sums = values.new_zeros(num_groups).index_add(0, groups, values)
        counts = torch.bincount(groups, minlength=num_groups)
        L = (sums / counts.clamp(min=1))[counts > 0]
    n = L.numel()
    a = alpha * n
    a = max(float(round(a)) if abs(a - round(a)) < 1e-9 else a, 1.0)
    f = math.floor(a)
    top = torch.topk(L, min(f + 1, n)).values
    out = top[:f].sum() / a
    return out + (a - f) / a * top[f] if f < n and a > f else out


def _eager(values, groups, num_groups):
    return eager_cvar(values, ALPHA, groups, num_groups)


def _fused(values, groups, num_groups):
    return mf.cvar(values, ALPHA, groups, num_groups)


OPS = {"cvar": (_eager, _fused)}


def make_inputs(name: str, device: str = "cpu", dtype=torch.float32, seed: int = 0):
    N, num_groups = WORKLOADS[name]
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(N, generator=g).to(device, dtype).requires_grad_()
    groups = torch.randint(0, num_groups, (N,), generator=g).to(device) if num_groups else None
    return values, groups, num_groups


def run(op: str, provider: str, inputs):
    values, groups, num_groups = inputs
    return pick(OPS, op, provider)(values, groups, num_groups)


def leaves(inputs):
    return inputs[0]


def min_bytes(inputs, mode: str) -> int:
    """Forward: values and group ids read once. Backward: the group ids (without groups, the
    values) read once to find the tail, and the gradient written once. Full: forward + the
    gradient written."""
    values, groups, _ = inputs
    v = values.numel() * values.element_size()
    g = groups.numel() * groups.element_size() if groups is not None else 0
    return {"forward": v + g, "backward": (g or v) + v, "full": v + g + v}[mode]
