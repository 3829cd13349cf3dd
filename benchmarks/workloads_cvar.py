"""Benchmark workloads of the CVaR op (see workloads_cam.py for the module interface).

Robust DD: per-real-image losses grouped by their nearest synthetic image.
"""
from __future__ import annotations

import torch

import metadd_fast as mf
from providers import pick
from metadd_fast import reference

ALPHA = 0.1
# name -> (N values, number of groups or None)
WORKLOADS = {
    "dc_cifar10_ipc50_groups": (50_000, 500),  # CIFAR-10 train set, 500 synthetic images
    "values_1e6": (1_000_000, None),
    "imagenet_ipc50_groups": (1_281_167, 50_000),  # ImageNet-1k train set, 50k synthetic images
    "values_1e7_groups_1e5": (10_000_000, 100_000),
}
CPU_WORKLOADS = ["dc_cifar10_ipc50_groups", "values_1e6", "imagenet_ipc50_groups"]


def _reference(values, groups, num_groups):
    return reference.cvar(values, ALPHA, groups, num_groups)


def _fused(values, groups, num_groups):
    return mf.cvar(values, ALPHA, groups, num_groups)


OPS = {"cvar": (_reference, _fused)}


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
