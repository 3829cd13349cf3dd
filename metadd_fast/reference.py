"""Plain PyTorch versions of the public ops, step by step as ``SPEC.md`` writes them.

Run in float64, these are the oracle of the tests; ``backend="reference"`` runs them. They
build the full autograd graph (one CAM per architecture, resize, stack, variance) and do no
argument checking beyond what PyTorch itself does. The benchmarks' eager baselines are the
fastest plain-PyTorch formulations instead (benchmarks/workloads_*.py).
"""
from __future__ import annotations

from typing import Optional, Sequence

import math

import torch
import torch.nn.functional as F

__all__ = ["raw_cam", "normalized_maps", "class_activation_maps", "cam_variance", "group_means", "cvar", "cvar_dual", "metacam_cvar",
           "nearest_centroid", "kmeans"]


def raw_cam(feature: torch.Tensor, weight: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    """Raw class activation map z (B, H, W) of one architecture.

    feature: (B, C, H, W). weight: (N, C) linear head, (N, C, H, W) or (N, C*H*W)
    flatten head (both with ``labels`` (B,)), or (B, C) per-sample weights
    (``labels=None``).
    """
    B, C, H, W = feature.shape
    if labels is None:
        return torch.einsum("bc,bchw->bhw", weight, feature)
    if weight.dim() == 2 and weight.shape[1] == C:
        return torch.einsum("bc,bchw->bhw", weight[labels], feature)
    return torch.einsum("bchw,bchw->bhw", weight.reshape(-1, C, H, W)[labels], feature)


def normalized_maps(raw, out_size, relu: bool = True, norm: str = "minmax", eps: float = 1e-8) -> torch.Tensor:
    """Steps 2-4 of the SPEC on K raw maps (B, H_k, W_k): rectify, normalize, resize, stack."""
    maps = []
    for r in raw:
        if relu:
            r = torch.relu(r)
        if norm == "minmax":
            lo = r.amin(dim=(1, 2), keepdim=True)
            hi = r.amax(dim=(1, 2), keepdim=True)
            r = (r - lo) / (hi - lo + eps)
        elif norm == "max":
            r = r / (r.amax(dim=(1, 2), keepdim=True) + eps)
        u = F.interpolate(r[:, None], size=tuple(out_size), mode="bilinear", align_corners=False)
        maps.append(u[:, 0])
    return torch.stack(maps)


def class_activation_maps(
    features: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    labels: Optional[torch.Tensor] = None,
    *,
    out_size=None,
    relu: bool = True,
    norm: str = "minmax",
    eps: float = 1e-8,
) -> torch.Tensor:
    """Stack of the K normalized, resized CAMs: (K, B, S_h, S_w)."""
    if out_size is None:
        out_size = (max(f.shape[2] for f in features), max(f.shape[3] for f in features))
    elif isinstance(out_size, int):
        out_size = (out_size, out_size)
    raw = [raw_cam(feature, weight, labels) for feature, weight in zip(features, weights)]
    return normalized_maps(raw, out_size, relu, norm, eps)


def cam_variance(
    features: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    labels: Optional[torch.Tensor] = None,
    *,
    out_size=None,
    relu: bool = True,
    norm: str = "minmax",
    eps: float = 1e-8,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean over pixels of the population variance across architectures, per image, then reduced."""
    maps = class_activation_maps(features, weights, labels, out_size=out_size, relu=relu, norm=norm, eps=eps)
    v = maps.var(dim=0, unbiased=False).mean(dim=(1, 2))
    if reduction == "mean":
        return v.mean()
    if reduction == "sum":
        return v.sum()
    return v


def group_means(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Means L_j (n,) of the non-empty groups, in increasing group id."""
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(0, groups, values)
    counts = torch.bincount(groups, minlength=num_groups)
    nonempty = counts > 0
    return sums[nonempty] / counts[nonempty].to(values.dtype)


def cvar(values: torch.Tensor, alpha: float, groups: Optional[torch.Tensor] = None,
         num_groups: Optional[int] = None) -> torch.Tensor:
    """Upper-tail CVaR: (1/a) (sum_{r<=f} L_(r) + (a - f) L_(f+1)), a = alpha n (at least 1: below
    1 the tail is the largest L alone), f = floor(a), L sorted descending with ties by lower index
    (SPEC section 2)."""
    if groups is None:
        L = values
    else:
        L = group_means(values, groups, num_groups if num_groups is not None else int(groups.max()) + 1)
    n = L.numel()
    a = alpha * n
    if abs(a - round(a)) < 1e-9:
        a = float(round(a))
    a = max(a, 1.0)
    f = math.floor(a)
    top = torch.sort(L, descending=True, stable=True).values
    out = top[:f].sum() / a
    if f < n and a > f:
        out = out + (a - f) / a * top[f]
    return out


def cvar_dual(values: torch.Tensor, eta, alpha: float) -> torch.Tensor:
    """Rockafellar-Uryasev form: eta + (1/(alpha N)) sum_i max(values_i - eta, 0)."""
    return eta + torch.relu(values - eta).sum() / (alpha * values.numel())


def metacam_cvar(features, weights, labels, alpha: float, groups=None, num_groups=None, **cam_options):
    """CVaR over images (or groups) of the per-image CAM variance."""
    v = cam_variance(features, weights, labels, reduction="none", **cam_options)
    return cvar(v, alpha, groups, num_groups)


_BLOCK = 1 << 22  # elements of one float64 block of the direct distances


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor):
    """(index (N,) int64, sqdist (N,) in x's dtype): the float64 direct-distance answer,

        d = ((x[:, None] - c[None]) ** 2).sum(-1) in float64;  index = d.argmin(1);  sqdist = d[i, index],

    computed in bounded blocks (at most ``_BLOCK`` elements of (rows, centroids, D) at a time).
    So ties go to the lowest index, and NaN is argmin's: a NaN distance counts as the smallest
    (a row with a NaN gets index 0; a centroid with a NaN is every row's answer when it has the
    lowest index of the NaN ones); Inf - Inf is NaN. This is the test oracle and the exact
    re-check of the fused kernels' flagged rows."""
    x64, c64 = x.double(), centroids.double()
    N, M, D = x.shape[0], c64.shape[0], x.shape[1]
    rows = max(1, _BLOCK // max(1, M))
    cols = max(1, _BLOCK // max(1, min(rows, N) * D))
    index, sqdist = [], []
    for r in range(0, N, rows):
        xr = x64[r:r + rows]
        d = torch.cat([((xr[:, None] - c64[None, s:s + cols]) ** 2).sum(-1) for s in range(0, M, cols)], 1)
        i = d.argmin(1)
        index.append(i)
        sqdist.append(d.gather(1, i[:, None])[:, 0])
    return torch.cat(index), torch.cat(sqdist).to(x.dtype)


def kmeans(x: torch.Tensor, init: torch.Tensor, iters: int = 50, tol: float = 1e-4):
    """Lloyd's algorithm as a plain loop, one cluster at a time, from the centroids ``init``
    (an empty cluster keeps its centroid). Returns (centroids, index)."""
    C = init.clone()
    threshold = tol * float(x.var(dim=0, unbiased=False).mean())
    for _ in range(iters):
        index = torch.cdist(x, C).argmin(dim=1)
        new = torch.stack([x[index == j].mean(dim=0) if (index == j).any() else C[j] for j in range(C.shape[0])])
        shift = float(((new - C) ** 2).sum())
        C = new
        if shift <= threshold:
            break
    return C, torch.cdist(x, C).argmin(dim=1)
