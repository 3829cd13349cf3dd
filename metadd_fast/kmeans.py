"""Nearest-centroid assignment and k-means without an N x M matrix (SPEC section 3).

``metadd_fast::nearest_centroid`` is a custom op (fake registered; no gradient). Its
kernels (C++ blocked matrix products on CPU, Triton tl.dot tiles on GPU) keep a
running best and second-best centroid per row. A row whose two best squared
distances are closer than the rounding bound of the float32 expansion
||x||^2 - 2 x.c + ||c||^2 is settled again in float64. So the index is that of the
float64 oracle, except where two centroids are within float64 rounding
(about 1e-13 relative), where ties go to the lowest index. Rows with NaN, Inf or
huge coordinates are always flagged, and so get the float64 direct-distance answer
of :func:`metadd_fast.reference.nearest_centroid` (NaN included).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from . import backends, checks, reference

__all__ = ["nearest_centroid", "kmeans"]



@torch.library.custom_op("metadd_fast::nearest_centroid", mutates_args=())
def _nearest_centroid(x: Tensor, centroids: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    acc = torch.float64 if x.dtype == torch.float64 or centroids.dtype == torch.float64 else torch.float32
    xa, ca = x.to(acc).contiguous(), centroids.to(acc).contiguous()
    cn = (ca * ca).sum(1)
    index, sqdist, refine = backends.kernels(backend).nearest_centroid_forward(xa, ca, cn, cn.max().sqrt())
    rows = refine.nonzero().flatten()
    if rows.numel():
        index[rows], sqdist[rows] = reference.nearest_centroid(xa[rows], ca)  # float64 direct distances
    return index, sqdist.to(x.dtype)


@_nearest_centroid.register_fake
def _(x, centroids, backend):
    return x.new_empty(x.shape[0], dtype=torch.int64), x.new_empty(x.shape[0])


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
            return reference.nearest_centroid(x, centroids)
        return torch.ops.metadd_fast.nearest_centroid(x.detach(), centroids.detach(), name)


def _kmeans_pp(x: Tensor, k: int, gen: torch.Generator, backend: Optional[str]) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii): each next centre drawn with probability
    proportional to the squared distance to the nearest centre so far."""
    N = x.shape[0]
    chosen = [int(torch.randint(N, (1,), generator=gen))]
    dist = nearest_centroid(x, x[chosen[0]][None], backend=backend)[1].double().cpu()
    for _ in range(1, k):
        total = float(dist.sum())
        if total > 0 and math.isfinite(total):
            nxt = int(torch.multinomial(dist / total, 1, generator=gen))
        else:  # every point sits on a centre: any point not chosen yet
            rest = torch.ones(N, dtype=torch.bool)
            rest[chosen] = False
            nxt = int(rest.nonzero()[int(torch.randint(int(rest.sum()), (1,), generator=gen))])
        chosen.append(nxt)
        dist = torch.minimum(dist, nearest_centroid(x, x[nxt][None], backend=backend)[1].double().cpu())
    return x[chosen].clone()


def _segment_sums(x: Tensor, index: Tensor, k: int, chunk: int = 1 << 16) -> tuple[Tensor, Tensor]:
    """Per-cluster float64 sums (k, D) and counts (k,), in row chunks (no Python loop over clusters)."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], chunk):
        sums.index_add_(0, index[s:s + chunk], x[s:s + chunk].double())
    return sums, torch.bincount(index, minlength=k)


def kmeans(x: Tensor, k: int, *, iters: int = 50, init: Union[str, Tensor] = "k-means++", seed: int = 0,
           tol: float = 1e-4, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on the fused nearest-centroid kernel.

    x: (N, D) floating; k in [1, N]. init: "k-means++", "random" (k distinct points) or a
    (k, D) tensor. Stops after ``iters`` iterations or when the squared centroid shift
    falls below ``tol`` times the mean per-feature variance of x. An empty cluster is
    re-seeded at the point farthest from its centroid (largest first, ties by lower
    index), deterministically. The same seed gives the same result.
    Returns (centroids (k, D) in x's dtype, index (N,) int64).
    """
    checks.floating_tensor("x", x, "(rows, D)")
    N = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    if not 1 <= k <= N:
        raise ValueError(f"k: expected 1 <= k <= N = {N}, got {k}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters: expected a positive int, got {iters!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol: expected a non-negative float, got {tol!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    gen = torch.Generator().manual_seed(seed)
    x = x.detach()
    with torch.no_grad():
        if isinstance(init, Tensor):
            if tuple(init.shape) != (k, x.shape[1]):
                raise ValueError(f"init: expected centroids of shape ({k}, {x.shape[1]}), got {tuple(init.shape)}")
            checks.same_device([("x", x), ("init", init)])
            C = init.detach().to(x.dtype).clone()
        else:
            checks.choice("init", init, ("k-means++", "random"))
            C = _kmeans_pp(x, k, gen, backend) if init == "k-means++" else x[torch.randperm(N, generator=gen)[:k]]
        threshold = tol * float(x.double().var(dim=0, unbiased=False).mean())
        for _ in range(iters):
            index, sqdist = nearest_centroid(x, C, backend=backend)
            sums, counts = _segment_sums(x, index, k)
            empty = (counts == 0).nonzero().flatten()
            if empty.numel():
                far = torch.sort(sqdist.double(), descending=True, stable=True).indices[: empty.numel()]
                sums.index_add_(0, index[far], -x[far].double())
                counts.index_add_(0, index[far], -torch.ones_like(far))
                sums[empty] = x[far].double()
                counts[empty] = 1
            new = (sums / counts.clamp(min=1)[:, None]).to(x.dtype)
            shift = float(((new.double() - C.double()) ** 2).sum())
            C = new
            if shift <= threshold:
                break
        index, _ = nearest_centroid(x, C, backend=backend)
    return C, index
