"""Triton kernel of the nearest-centroid assignment (docs/ops.md section 5).

  nearest_centroid_forward(x (N, D), c (M, D), cn (M,), cmax ()) -> [index (N,) int64,
      sqdist (N,), refine (N,) bool]

Same contract as metadd_fast._C: one program per BLOCK_N rows keeps a running best
and second-best of e_j = ||c_j||^2 - 2 x.c_j over centroid tiles (tl.dot, IEEE
float32 or float64 accumulation), so no N x M matrix is written; ties go to the
lower index. sqdist is recomputed directly as sum_d (x - c_index)^2, and refine
flags rows whose top-2 gap is not provably above the expansion's rounding bound
4 (D + 2) u (2 ||x|| cmax + cmax^2): ties, NaN, Inf and overflow (huge coordinates)
all land there, as the gap or the bound is then 0, NaN or Inf. Inputs may have any
strides (the launcher reads contiguous copies); offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import device_guard, tl_dtype


@triton.jit
def _nearest_centroid_kernel(
    p_x, p_c, p_cn, p_cmax, p_idx, p_sq, p_refine, N, M, D, bound_scale,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Moves: reads x once per centroid tile from L2 (N*D*sizeof(x) from DRAM once), the
    # centroids once per row block (M*D*sizeof(c) each, L2-resident), writes N*(8 + sizeof + 1).
    o_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_best = tl.full([BLOCK_N], float("inf"), dtype=ACC)
    b_second = tl.full([BLOCK_N], float("inf"), dtype=ACC)
    b_idx = tl.zeros([BLOCK_N], dtype=tl.int64)
    for m0 in range(0, M, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_m = o_m < M
        b_dot = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m_d = o_d < D
            b_x = tl.load(p_x + o_n[:, None] * D + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
            b_c = tl.load(p_c + o_m[:, None] * D + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)
            b_dot += tl.dot(b_x.to(ACC), tl.trans(b_c.to(ACC)), input_precision="ieee", out_dtype=ACC)
        b_cn = tl.load(p_cn + o_m, mask=m_m, other=0.0)
        b_e = tl.where(m_m[None, :], b_cn[None, :] - 2.0 * b_dot, float("inf"))
        c1 = tl.min(b_e, axis=1)
        j1 = tl.argmin(b_e, axis=1, tie_break_left=True).to(tl.int64) + m0
        c2 = tl.min(tl.where(o_m[None, :] == j1[:, None], float("inf"), b_e), axis=1)
        better = c1 < b_best  # strict: ties keep the lower index of an earlier tile
        b_second = tl.where(better, tl.minimum(b_best, c2), tl.minimum(b_second, c1))
        b_idx = tl.where(better, j1, b_idx)
        b_best = tl.where(better, c1, b_best)
    b_sq = tl.zeros([BLOCK_N], dtype=ACC)
    b_xn = tl.zeros([BLOCK_N], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m = m_n[:, None] & (o_d < D)[None, :]
        b_x = tl.load(p_x + o_n[:, None] * D + o_d[None, :], mask=m, other=0.0).to(ACC)
        b_c = tl.load(p_c + b_idx[:, None] * D + o_d[None, :], mask=m, other=0.0).to(ACC)
        b_sq += tl.sum((b_x - b_c) * (b_x - b_c), axis=1)
        b_xn += tl.sum(b_x * b_x, axis=1)
    cmax = tl.load(p_cmax).to(ACC)
    bound = bound_scale * (2.0 * tl.sqrt(b_xn) * cmax + cmax * cmax)
    tl.store(p_idx + o_n, b_idx, mask=m_n)
    tl.store(p_sq + o_n, b_sq, mask=m_n)
    tl.store(p_refine + o_n, ~((b_second - b_best) > bound) | (b_sq != b_sq) | (b_sq == float("inf")), mask=m_n)


def nearest_centroid_forward(x, c, cn, cmax):
    x, c, cn = x.contiguous(), c.contiguous(), cn.contiguous()
    N, D = x.shape
    M = c.shape[0]
    index = torch.empty(N, device=x.device, dtype=torch.int64)
    sqdist = torch.empty(N, device=x.device, dtype=x.dtype)
    refine = torch.empty(N, device=x.device, dtype=torch.bool)
    u = torch.finfo(x.dtype).eps / 2
    block_n, block_m = 64, 64
    block_d = max(16, min(64, triton.next_power_of_2(D)))
    with device_guard(x):
        _nearest_centroid_kernel[(triton.cdiv(N, block_n),)](
            x, c, cn, cmax, index, sqdist, refine, N, M, D, 4.0 * (D + 2) * u,
            ACC=tl_dtype(x.dtype), BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d)
    return [index, sqdist, refine]
