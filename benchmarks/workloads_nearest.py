"""Benchmark workloads of nearest_centroid (see workloads_cam.py for the module interface).

Robust-DD grouping: real-image embeddings x (N, D) against synthetic-image
embeddings (M, D). The eager provider is eager_nearest_centroid: argmin of
||c||^2 - 2 x c^T in row chunks (so the (chunk, M) block fits), faster than torch.cdist
(eager_choices.py); on CPU scikit-learn's pairwise_distances_argmin is a fourth provider.
"""
from __future__ import annotations

import torch
from providers import PROVIDERS as BASE_PROVIDERS
from providers import pick

import metadd_fast as mf

WORKLOADS = {
    "cifar10_50k_by_500_d128": (50_000, 500, 128),
    "tiny_100k_by_2k_d256": (100_000, 2_000, 256),
    "imagenet_1m_by_50k_d512": (1_000_000, 50_000, 512),  # GPU
}
CPU_WORKLOADS = ["cifar10_50k_by_500_d128", "tiny_100k_by_2k_d256"]
MODES = ("forward",)
PROVIDERS = BASE_PROVIDERS + (("sklearn",) if not torch.cuda.is_available() else ())


def eager_nearest_centroid(x, c, chunk: int = 4096):
    """(index, sqdist): argmin_j ||c_j||^2 - 2 x.c_j per row chunk, then the direct distance."""
    cn = (c * c).sum(1)
    index = torch.cat([(cn - 2 * x[s:s + chunk] @ c.T).argmin(1) for s in range(0, x.shape[0], chunk)])
    return index, ((x - c[index]) ** 2).sum(1)


def _eager(x, c):
    return eager_nearest_centroid(x, c)


def _fused(x, c):
    return mf.nearest_centroid(x, c)


OPS = {"nearest_centroid": (_eager, _fused)}


def make_inputs(name: str, device: str = "cpu", dtype=torch.float32, seed: int = 0):
    N, M, D = WORKLOADS[name]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g).to(device, dtype), torch.randn(M, D, generator=g).to(device, dtype)


def run(op: str, provider: str, inputs):
    x, c = inputs
    if provider == "sklearn":
        from sklearn.metrics import pairwise_distances_argmin

        return pairwise_distances_argmin(x.numpy(), c.numpy())
    return pick(OPS, op, provider)(x, c)


def leaves(inputs):
    return ()  # an assignment: nothing to differentiate (MODES has forward only)


def min_bytes(inputs, mode: str) -> int:
    """x and the centroids read once; index (8 B) and sqdist written once per row."""
    x, c = inputs
    return (x.numel() + c.numel()) * x.element_size() + x.shape[0] * (8 + x.element_size())
