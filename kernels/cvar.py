"""Triton kernels of the CVaR tail loss (docs/ops.md section 4).

Launchers share their signatures with metadd_fast._C:
  cvar_group_stats(values (N,), groups (N,) int64, num_groups) -> [sums float64, counts int64]
  cvar_tail(L (n,) float32/64, counts (n,) int64 or None, alpha) -> [CVaR (), w (n,)], w = dCVaR/dL;
      with counts, L holds float64 group sums and the CVaR is over the means of the non-empty groups
  cvar_values_grad(grad (), w, counts or None, groups or None, like) -> d values (like's dtype)
  cvar_dual_forward(values, eta (), alpha) -> [loss (), count above eta ()]
  cvar_dual_backward(grad (), values, eta, alpha, above) -> [d values, d eta]

The tail is ordered by torch.sort(descending=True, stable=True): ties rank by lower
index and NaN ranks first, as docs/ops.md section 4 and torch.sort say. The fraction a = alpha*n
(at least 1: below 1 the tail is the largest entry alone) is computed on the device
(n, the number of non-empty groups, is data), so no op synchronizes with the host.
The dual counts v as above eta where !(v - eta <= 0), NaN included, as autograd
through relu(values - eta) does. Launchers take any strides and int32 or int64 ids.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import acc_dtype, as_index, device_guard, tl_dtype

BLOCK = 1024


@triton.jit
def _group_stats_kernel(p_v, p_g, p_sums, p_counts, N, BLOCK: tl.constexpr):
    # Moves: reads N*(sizeof(v) + 8) bytes once; float64/int64 atomics into 16*num_groups bytes.
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    b_v = tl.load(p_v + o, mask=m, other=0.0).to(tl.float64)
    b_g = tl.load(p_g + o, mask=m, other=0)
    tl.atomic_add(p_sums + b_g, b_v, mask=m)
    tl.atomic_add(p_counts + b_g, tl.full([BLOCK], 1, tl.int64), mask=m)


@triton.jit
def _tail_weights_kernel(p_sorted, p_order, p_rank, p_af, p_w, p_part, n, HAS_RANK: tl.constexpr,
                         BLOCK: tl.constexpr):
    # Entry r of the descending order gets w = 1/a (rank <= f), (a - f)/a (rank = f + 1), else 0;
    # rank is 1-based among valid entries (0 marks an empty group). Writes w[order[r]] and
    # the block's partial sum of w * L in float64.
    # Moves: reads n*(sizeof(L) + 8 [+ 8]), writes n*sizeof(L) + 8 per block.
    i_blk = tl.program_id(0)
    o = i_blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    b_l = tl.load(p_sorted + o, mask=m, other=0.0).to(tl.float64)
    if HAS_RANK:
        b_rank = tl.load(p_rank + o, mask=m, other=0).to(tl.float64)
    else:
        b_rank = (o + 1).to(tl.float64)
    a = tl.load(p_af)
    f = tl.load(p_af + 1)
    b_w = tl.where(b_rank <= f, 1.0 / a, tl.where(b_rank == f + 1.0, (a - f) / a, 0.0))
    b_w = tl.where(b_rank > 0.5, b_w, 0.0)
    tl.store(p_w + tl.load(p_order + o, mask=m, other=0), b_w.to(p_w.dtype.element_ty), mask=m)
    tl.store(p_part + i_blk, tl.sum(tl.where(m & (b_w != 0.0), b_w * b_l, 0.0), axis=0))


@triton.jit
def _values_grad_kernel(p_grad, p_w, p_counts, p_g, p_out, N, HAS_GROUPS: tl.constexpr, OUT: tl.constexpr,
                        BLOCK: tl.constexpr):
    # d values_i = grad * w[g_i] / count[g_i] (or grad * w_i). Moves: reads N*(8 + 8) (gathers from
    # the per-group arrays), writes N*sizeof(values).
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    g = tl.load(p_grad)
    if HAS_GROUPS:
        b_g = tl.load(p_g + o, mask=m, other=0)
        b_out = g * tl.load(p_w + b_g, mask=m, other=0.0) / tl.load(p_counts + b_g, mask=m, other=1).to(g.dtype)
    else:
        b_out = g * tl.load(p_w + o, mask=m, other=0.0)
    tl.store(p_out + o, b_out.to(OUT).to(p_out.dtype.element_ty), mask=m)  # via float32 unless float64


@triton.jit
def _dual_fwd_kernel(p_v, p_eta, p_part, N, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # Per block: sum of max(v - eta, 0) (NaN kept) and the count of v > eta, in float64.
    # Moves: reads N*sizeof(v), writes 16 bytes per block.
    i_blk = tl.program_id(0)
    o = i_blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    b_d = tl.load(p_v + o, mask=m, other=0.0).to(ACC) - tl.load(p_eta).to(ACC)
    above = m & ~(b_d <= 0)  # NaN included
    b_relu = tl.where(above, b_d, 0.0)
    tl.store(p_part + 2 * i_blk, tl.sum(b_relu.to(tl.float64), axis=0))
    tl.store(p_part + 2 * i_blk + 1, tl.sum(above.to(tl.float64), axis=0))


@triton.jit
def _dual_bwd_kernel(p_v, p_eta, p_scale, p_out, N, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # d values_i = grad / (alpha N) where !(v_i - eta <= 0). Moves: reads and writes N*sizeof(v).
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    b_v = tl.load(p_v + o, mask=m, other=0.0).to(ACC)
    b_out = tl.where(~(b_v - tl.load(p_eta).to(ACC) <= 0), tl.load(p_scale).to(ACC), 0.0)
    tl.store(p_out + o, b_out.to(p_out.dtype.element_ty), mask=m)


def cvar_group_stats(values, groups, num_groups: int):
    values, groups = values.contiguous(), as_index(groups)
    N = values.numel()
    sums = torch.zeros(num_groups, device=values.device, dtype=torch.float64)
    counts = torch.zeros(num_groups, device=values.device, dtype=torch.int64)
    with device_guard(values):
        _group_stats_kernel[(triton.cdiv(N, BLOCK),)](values, groups, sums, counts, N, BLOCK=BLOCK)
    return [sums, counts]


def tail_fraction(n: torch.Tensor, alpha: float) -> torch.Tensor:
    """[a, f] float64 on n's device: a = alpha * n (snapped to an integer within 1e-9, at least 1),
    f = floor(a)."""
    a = alpha * n.to(torch.float64)
    r = torch.round(a)
    a = torch.where((a - r).abs() < 1e-9, r, a).clamp(min=1.0)
    return torch.stack([a, torch.floor(a)])


def cvar_tail(L, counts, alpha: float):
    L = L.contiguous()
    n_all = L.numel()
    valid = None if counts is None else counts > 0
    if valid is not None:
        L = L / counts.clamp(min=1)
    sorted_l, order = torch.sort(L, descending=True, stable=True)
    if valid is None:
        rank = None
        af = tail_fraction(torch.tensor(n_all, device=L.device), alpha)
    else:
        v_sorted = valid[order]
        rank = torch.cumsum(v_sorted, 0) * v_sorted
        af = tail_fraction(valid.sum(), alpha)
    w = torch.empty_like(L)
    grid = triton.cdiv(n_all, BLOCK)
    part = torch.empty(grid, device=L.device, dtype=torch.float64)
    with device_guard(L):
        _tail_weights_kernel[(grid,)](sorted_l, order, rank if rank is not None else order, af, w, part, n_all,
                                      HAS_RANK=rank is not None, BLOCK=BLOCK)
    return [part.sum().to(L.dtype), w]


def cvar_values_grad(grad, w, counts, groups, like):
    N = like.numel()
    out = torch.empty(like.shape, device=like.device, dtype=like.dtype)
    has_groups = groups is not None
    w = w.contiguous()
    if has_groups:
        counts, groups = as_index(counts), as_index(groups)
    with device_guard(like):
        _values_grad_kernel[(triton.cdiv(N, BLOCK),)](
            grad, w, counts if has_groups else w, groups if has_groups else w, out, N, HAS_GROUPS=has_groups,
            OUT=tl_dtype(acc_dtype(like.dtype)), BLOCK=BLOCK)
    return out


def cvar_dual_forward(values, eta, alpha: float):
    values = values.contiguous()
    N = values.numel()
    acc = acc_dtype(values.dtype)
    grid = triton.cdiv(N, BLOCK)
    part = torch.empty(grid, 2, device=values.device, dtype=torch.float64)
    with device_guard(values):
        _dual_fwd_kernel[(grid,)](values, eta, part, N, ACC=tl_dtype(acc), BLOCK=BLOCK)
    total = part.sum(0)
    return [(eta.to(torch.float64) + total[0] / (alpha * N)).to(acc), total[1].to(acc)]


def cvar_dual_backward(grad, values, eta, alpha: float, above):
    values = values.contiguous()
    N = values.numel()
    scale = grad.to(torch.float64) / (alpha * N)
    out = torch.empty_like(values)
    with device_guard(values):
        _dual_bwd_kernel[(triton.cdiv(N, BLOCK),)](values, eta, scale, out, N, ACC=tl_dtype(acc_dtype(values.dtype)),
                                                   BLOCK=BLOCK)
    d_eta = grad.to(torch.float64) * (1.0 - above.to(torch.float64) / (alpha * N))
    return [out, d_eta.to(eta.dtype)]
