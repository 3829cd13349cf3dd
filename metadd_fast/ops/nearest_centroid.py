"""Nearest-centroid assignment without an N x M matrix (docs/ops.md section 5).

``metadd_fast::nearest_centroid`` (no gradient): its kernels (C++ blocked matrix products
on CPU, Triton tl.dot tiles on GPU) keep a running best and second-best centroid per
row. A row whose two best squared distances are closer than the rounding bound of the
float32 expansion ||x||^2 - 2 x.c + ||c||^2 is settled again with float64 direct
distances: in C++ row by row (csrc/nearest_centroid.cpp, the CPU kernel, O(1) extra
memory), by :func:`nearest_centroid_reference` in bounded blocks for the CUDA kernel
built here. So the index is
that of the float64 oracle, except where two centroids are within float64 rounding
(about 1e-13 relative), where ties go to the lowest index.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends, checks
from .registry import KernelOp, dispatch_context

__all__ = ["nearest_centroid"]

def _kernel(impl):
    """The op's kernel on the Triton launchers ``impl`` (its CPU kernel is in C++)."""

    def nearest_centroid(x, centroids):
        acc = torch.float64 if x.dtype == torch.float64 or centroids.dtype == torch.float64 else torch.float32
        xa, ca = x.to(acc).contiguous(), centroids.to(acc).contiguous()
        cn = (ca * ca).sum(1)
        index, sqdist, refine = impl.nearest_centroid_forward(xa, ca, cn, cn.max().sqrt())
        rows = refine.nonzero().flatten()
        if rows.numel():  # flagged rows: the float64 direct-distance answer, never the norm expansion
            index[rows], exact = nearest_centroid_reference(xa[rows], ca)
            sqdist[rows] = exact.to(acc)
        return index, sqdist.to(x.dtype)

    return nearest_centroid


def _fake(x, centroids):
    return x.new_empty(x.shape[0], dtype=torch.int64), x.new_empty(x.shape[0])


nearest_centroid_op = KernelOp("nearest_centroid", "(Tensor x, Tensor centroids) -> (Tensor, Tensor)", _kernel, _fake)


def nearest_centroid(x: Tensor, centroids: Tensor, *, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """index[i] = argmin_j ||x_i - c_j||^2 (ties: lowest j) and sqdist[i], that minimum.

    x: (N, D), centroids: (M, D), floating, one device. Returns (index (N,) int64,
    sqdist (N,) in x's dtype). Memory beyond inputs and outputs is O(N + M) plus a
    small per-thread tile, whatever N * M is. No gradient flows through it.
    """
    checks.floating_tensor("x", x, "(rows, D)")
    checks.floating_tensor("centroids", centroids, "(rows, D)")
    if x.shape[1] != centroids.shape[1]:
        raise ValueError(f"centroids: expected D = {x.shape[1]} columns like x, got {centroids.shape[1]}")
    device = checks.same_device([("x", x), ("centroids", centroids)])
    name = backends.resolve(backend, device)
    with torch.no_grad():
        if name == "reference":
            return nearest_centroid_reference(x, centroids)
        with dispatch_context(name, device):
            return nearest_centroid_op(x.detach(), centroids.detach())


_BLOCK = 1 << 20  # elements of one float64 block of the direct distances (8 MB)


def nearest_centroid_reference(x: torch.Tensor, centroids: torch.Tensor):
    """(index (N,) int64, sqdist (N,) in x's dtype): the float64 direct-distance answer,

        d = ((x[:, None] - c[None]) ** 2).sum(-1) in float64;  index = d.argmin(1);  sqdist = d[i, index],

    computed in bounded blocks (at most ``_BLOCK`` elements of (rows, centroids, D) at a time).
    So ties go to the lowest index, and NaN is argmin's: a NaN distance counts as the smallest
    (a row with a NaN gets index 0; a centroid with a NaN is every row's answer when it has the
    lowest index of the NaN ones); Inf - Inf is NaN. This is the test oracle and the exact
    re-check of the fused kernels' flagged rows (docs/ops.md section 5)."""
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
