"""k-means without an N x M matrix, on the fused nearest-centroid op (docs/ops.md section 5)."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from . import argcheck
from .ops import checks
from .ops.backends import BACKENDS
from .ops.nearest_centroid import nearest_centroid

__all__ = ["kmeans"]


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

    x: (N, D) floating, finite; k in [1, N]. init: "k-means++", "random" (k distinct points) or a
    (k, D) tensor. Stops after ``iters`` iterations or when the squared centroid shift
    falls below ``tol`` times the mean per-feature variance of x. An empty cluster is
    re-seeded at the point farthest from its centroid (largest first, ties by lower
    index), deterministically. The same seed gives the same result.
    Returns (centroids (k, D) in x's dtype, index (N,) int64).
    """
    argcheck.tensor("x", x, shape=(None, None), finite=True)
    N = x.shape[0]
    k = argcheck.integer("k", k, 1, N)
    argcheck.positive_int("iters", iters)
    argcheck.nonnegative_float("tol", tol)
    seed = argcheck.seed("seed", seed)
    argcheck.choice("backend", backend, (None, *BACKENDS))
    if isinstance(init, Tensor):
        argcheck.tensor("init", init, shape=(k, x.shape[1]), finite=True)
        checks.same_device([("x", x), ("init", init)])
    else:
        argcheck.choice("init", init, ("k-means++", "random"))
    gen = torch.Generator().manual_seed(seed)
    x = x.detach()
    with torch.no_grad():
        if isinstance(init, Tensor):
            C = init.detach().to(x.dtype).clone()
        else:
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


def kmeans_reference(x: torch.Tensor, init: torch.Tensor, iters: int = 50, tol: float = 1e-4):
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
