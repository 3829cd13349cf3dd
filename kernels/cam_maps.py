"""Triton kernels of the fused CAM op, one architecture per launch (docs/ops.md section 1).

Shapes, for one architecture with B images:
  A     (B, C, H, W)  features, float16/bfloat16/float32/float64, contiguous
  Wt    (R, C, QW)    weights in the accumulation dtype; QW = H*W for a flatten
                      head, 1 for a linear head or per-sample weights
  rows  (B,) int64    weight row of each image (its label, or the image index)
  U     (B, SH*SW)    resized normalized map, accumulation dtype (float32, or float64)
  Rm    (B, H*W)      rectified raw map, saved for the backward (1/C of the features)

The forward reads A once; the backward writes dA once and reads A only for
the weight gradient. The weight rows W[rows] are gathered in the kernels,
never materialized. One program handles one image's whole map, so maps are
limited to MAX_MAP_PIXELS pixels (64x64); larger ones use the reference.

The bilinear resize is a gather: each output pixel reads its 2x2 taps of R (forward),
each map pixel sums the outputs whose taps it is (backward), with ATen's tap weights,
so a NaN or Inf stays as local as in F.interpolate and no (P x Q) matrix is formed.
The launchers take every tensor with any strides (and int32 or int64 rows).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import acc_dtype, as_index, device_guard, tl_dtype

MAX_MAP_PIXELS = 4096
_TILE = 4096  # elements of one 2-D register tile


def supports(H: int, W: int, out_h: int, out_w: int) -> bool:
    """Whether these kernels handle an H x W map resized to out_h x out_w."""
    return H * W <= MAX_MAP_PIXELS


@triton.jit
def _taps(o_out, N_IN: tl.constexpr, N_OUT: tl.constexpr, ACC: tl.constexpr):
    """(i0, i1, l0, l1): the two input taps of output index o_out of a 1-D bilinear resize
    (align_corners=False, antialias=False) and their weights, computed as ATen does."""
    scale = tl.full((), N_IN, ACC) / tl.full((), N_OUT, ACC)
    src = tl.maximum(scale * (o_out.to(ACC) + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), N_IN - 1)  # floor, as src >= 0
    l1 = tl.minimum(tl.maximum(src - i0.to(ACC), 0.0), 1.0)
    i1 = i0 + (i0 < N_IN - 1).to(tl.int32)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def _tap_of(o_out, i_in, N_IN: tl.constexpr, N_OUT: tl.constexpr, ACC: tl.constexpr):
    """(is_tap, weight): whether input index i_in is a tap of output index o_out, and its weight
    (both weights when the two taps coincide at the last index, as ATen adds them)."""
    i0, i1, l0, l1 = _taps(o_out, N_IN, N_OUT, ACC)
    return (i_in == i0) | (i_in == i1), tl.where(i_in == i0, l0, 0.0) + tl.where(i_in == i1, l1, 0.0)


@triton.jit
def _first_output(i_in, N_IN: tl.constexpr, N_OUT: tl.constexpr):
    """A lower bound of the first output index whose taps include input index i_in (0 for
    i_in <= 1, whose taps the clamped outputs near 0 include); the outputs that include
    it then lie in [first, first + _output_span(N_IN, N_OUT))."""
    return tl.where(i_in <= 1, 0, tl.maximum(((2 * i_in - 1) * N_OUT) // (2 * N_IN) - 2, 0))


@triton.jit
def _map_stats(b_r, m_q, eps, NORM: tl.constexpr, ACC: tl.constexpr):
    """(lo, hi, denom, n_lo, n_hi) of a rectified map, n = (r - lo) / denom.

    NORM: 0 none (lo=0, denom=1), 1 max (lo=0), 2 minmax. NaN propagates as in
    torch.amin/amax; n_lo/n_hi count the pixels tied at lo/hi.
    """
    has_nan = tl.sum(((b_r != b_r) & m_q).to(tl.int32), axis=0) > 0
    lo = tl.min(tl.where(m_q, b_r, float("inf")), axis=0)
    hi = tl.max(tl.where(m_q, b_r, float("-inf")), axis=0)
    lo = tl.where(has_nan, float("nan"), lo)
    hi = tl.where(has_nan, float("nan"), hi)
    n_lo = tl.sum(((b_r == lo) & m_q).to(ACC), axis=0)
    n_hi = tl.sum(((b_r == hi) & m_q).to(ACC), axis=0)
    zero = tl.zeros_like(hi)
    if NORM == 2:
        denom = hi - lo + eps
    elif NORM == 1:
        lo = zero
        denom = hi + eps
    else:
        lo = zero
        denom = zero + 1.0
    return lo, hi, denom, n_lo, n_hi


@triton.jit
def _cam_map_fwd_kernel(
    p_a, p_w, p_rows, p_u, p_rm, C, eps,
    H: tl.constexpr, W: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, QW: tl.constexpr,
    RELU: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # Moves: reads B*C*H*W*sizeof(A) once, plus the weight rows C*QW per image
    # (L2-resident across the images of a class); writes B*(SH*SW + H*W)*sizeof(ACC).
    i_b = tl.program_id(0).to(tl.int64)
    o_q = tl.arange(0, BLOCK_Q)
    m_q = o_q < H * W
    o_c = tl.arange(0, BLOCK_C).to(tl.int64)  # int64 offsets: C*H*W may pass 2^31
    i_row = tl.load(p_rows + i_b)
    p_a_b = p_a + i_b * C * (H * W)
    p_w_b = p_w + i_row * C * QW
    b_z = tl.zeros([BLOCK_Q], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        m_c = c0 + o_c < C
        m_cq = m_c[:, None] & m_q[None, :]
        b_a = tl.load(p_a_b + (c0 + o_c)[:, None] * (H * W) + o_q[None, :], mask=m_cq, other=0.0).to(ACC)
        if QW == 1:
            b_w = tl.load(p_w_b + c0 + o_c, mask=m_c, other=0.0).to(ACC)
            b_z += tl.sum(b_a * b_w[:, None], axis=0)
        else:
            b_w = tl.load(p_w_b + (c0 + o_c)[:, None] * QW + o_q[None, :], mask=m_cq, other=0.0).to(ACC)
            b_z += tl.sum(b_a * b_w, axis=0)
    if RELU:
        b_z = tl.where(b_z < 0, 0.0, b_z)  # keeps NaN, as torch.relu
    p_r_b = p_rm + i_b * (H * W)
    tl.store(p_r_b + o_q, b_z, mask=m_q)
    lo, hi, denom, n_lo, n_hi = _map_stats(b_z, m_q, eps, NORM, ACC)
    p_u_b = p_u + i_b * (SH * SW)
    if SH == H and SW == W:
        tl.store(p_u_b + o_q, (b_z - lo) / denom, mask=m_q)
    else:
        tl.debug_barrier()  # the map R stored above is gathered by every thread of the program
        for p0 in range(0, SH * SW, BLOCK_P):
            o_p = p0 + tl.arange(0, BLOCK_P)
            m_p = o_p < SH * SW
            h0, h1, lh0, lh1 = _taps(o_p // SW, H, SH, ACC)
            w0, w1, lw0, lw1 = _taps(o_p % SW, W, SW, ACC)
            n00 = (tl.load(p_r_b + h0 * W + w0, mask=m_p, other=0.0) - lo) / denom
            n01 = (tl.load(p_r_b + h0 * W + w1, mask=m_p, other=0.0) - lo) / denom
            n10 = (tl.load(p_r_b + h1 * W + w0, mask=m_p, other=0.0) - lo) / denom
            n11 = (tl.load(p_r_b + h1 * W + w1, mask=m_p, other=0.0) - lo) / denom
            b_u = lh0 * (lw0 * n00 + lw1 * n01) + lh1 * (lw0 * n10 + lw1 * n11)
            tl.store(p_u_b + o_p, b_u, mask=m_p)


@triton.jit
def _cam_map_bwd_kernel(
    p_du, p_rm, p_dz, eps,
    H: tl.constexpr, W: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    RELU: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_QG: tl.constexpr, SPAN_H: tl.constexpr, BLOCK_SW: tl.constexpr,
):
    # dU (B, SH*SW) -> dZ (B, H*W), the gradient wrt the raw map. The resize adjoint is a
    # gather: map pixel q = (h, w), BLOCK_QG at a time, sums the outputs in its
    # SPAN_H x BLOCK_SW window whose taps it is; the sum goes to dZ, read back below.
    # Moves: reads B*(SH*SW + H*W)*sizeof(ACC) (dU from L1/L2 about 4 times), writes B*H*W*sizeof(ACC).
    i_b = tl.program_id(0).to(tl.int64)
    o_q = tl.arange(0, BLOCK_Q)
    m_q = o_q < H * W
    b_r = tl.load(p_rm + i_b * (H * W) + o_q, mask=m_q, other=0.0)
    p_du_b = p_du + i_b * (SH * SW)
    p_dz_b = p_dz + i_b * (H * W)
    if SH == H and SW == W:
        b_g = tl.load(p_du_b + o_q, mask=m_q, other=0.0)
    else:
        for q0 in range(0, H * W, BLOCK_QG):
            o_g = q0 + tl.arange(0, BLOCK_QG)
            m_g = o_g < H * W
            i_h = o_g // W
            i_w = o_g % W
            b_ow = _first_output(i_w, W, SW)[:, None] + tl.arange(0, BLOCK_SW)[None, :]
            tap_w, b_ww = _tap_of(b_ow, i_w[:, None], W, SW, ACC)
            m_w = m_g[:, None] & (b_ow < SW) & tap_w
            oh0 = _first_output(i_h, H, SH)
            b_acc = tl.zeros([BLOCK_QG], dtype=ACC)
            for j in range(SPAN_H):
                oh = oh0 + j
                tap_h, b_wh = _tap_of(oh, i_h, H, SH, ACC)
                m = m_w & (tap_h & (oh < SH))[:, None]
                b_du = tl.load(p_du_b + oh[:, None] * SW + b_ow, mask=m, other=0.0)
                b_acc += tl.sum(tl.where(m, (b_wh[:, None] * b_ww) * b_du, 0.0), axis=1)
            tl.store(p_dz_b + o_g, b_acc, mask=m_g)
        tl.debug_barrier()  # the sums stored above are read back by every thread of the program
        b_g = tl.load(p_dz_b + o_q, mask=m_q, other=0.0)
    if NORM != 0:
        lo, hi, denom, n_lo, n_hi = _map_stats(b_r, m_q, eps, NORM, ACC)
        b_n = (b_r - lo) / denom
        g_lo = tl.sum(tl.where(m_q, b_g * (b_n - 1.0), 0.0), axis=0) / denom
        g_hi = -tl.sum(tl.where(m_q, b_g * b_n, 0.0), axis=0) / denom
        b_g = b_g / denom + tl.where(b_r == hi, g_hi / n_hi, 0.0)
        if NORM == 2:
            b_g += tl.where(b_r == lo, g_lo / n_lo, 0.0)
    if RELU:
        b_g = tl.where(b_r > 0, b_g, 0.0)
    tl.debug_barrier()  # every thread has read dZ before it is overwritten
    tl.store(p_dz_b + o_q, b_g, mask=m_q)


@triton.jit
def _cam_feature_grad_kernel(
    p_dz, p_w, p_rows, p_da, C,
    Q: tl.constexpr, QW: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    # dA[b, c, q] = dZ[b, q] * W[rows[b], c, q or 0]; grid (B, cdiv(C, BLOCK_C)).
    # Moves: writes B*C*Q*sizeof(A) once, reads B*Q*sizeof(ACC) and the weight rows.
    i_b = tl.program_id(0).to(tl.int64)
    o_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    o_q = tl.arange(0, BLOCK_Q)
    m_c = o_c < C
    m_q = o_q < Q
    m_cq = m_c[:, None] & m_q[None, :]
    i_row = tl.load(p_rows + i_b)
    b_dz = tl.load(p_dz + i_b * Q + o_q, mask=m_q, other=0.0)
    if QW == 1:
        b_w = tl.load(p_w + i_row * C + o_c, mask=m_c, other=0.0)
        b_da = b_w[:, None] * b_dz[None, :]
    else:
        b_w = tl.load(p_w + i_row * C * QW + o_c[:, None] * QW + o_q[None, :], mask=m_cq, other=0.0)
        b_da = b_w * b_dz[None, :]
    tl.store(p_da + i_b * C * Q + o_c[:, None] * Q + o_q[None, :], b_da.to(p_da.dtype.element_ty), mask=m_cq)


@triton.jit
def _cam_weight_grad_kernel(
    p_dz, p_a, p_order, p_start, p_dw, C,
    Q: tl.constexpr, QW: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    # dW[r, c, q] = sum over images b of row r of dZ[b, q] * A[b, c, q] (summed over q when QW == 1).
    # Grid (R, cdiv(C, BLOCK_C)); the images of row r are order[start[r]:start[r+1]],
    # in increasing index: deterministic, no atomics.
    # Moves: reads B*C*Q*sizeof(A) + B*Q*sizeof(ACC), writes R*C*QW*sizeof(ACC).
    i_r = tl.program_id(0).to(tl.int64)
    o_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    o_q = tl.arange(0, BLOCK_Q)
    m_c = o_c < C
    m_q = o_q < Q
    m_cq = m_c[:, None] & m_q[None, :]
    b_acc = tl.zeros([BLOCK_C, BLOCK_Q], dtype=ACC)
    for i in range(tl.load(p_start + i_r), tl.load(p_start + i_r + 1)):
        i_b = tl.load(p_order + i).to(tl.int64)
        b_dz = tl.load(p_dz + i_b * Q + o_q, mask=m_q, other=0.0)
        b_a = tl.load(p_a + i_b * C * Q + o_c[:, None] * Q + o_q[None, :], mask=m_cq, other=0.0).to(ACC)
        b_acc += b_a * b_dz[None, :]
    if QW == 1:
        tl.store(p_dw + i_r * C + o_c, tl.sum(b_acc, axis=1), mask=m_c)
    else:
        tl.store(p_dw + i_r * C * QW + o_c[:, None] * QW + o_q[None, :], b_acc, mask=m_cq)


def _blocks(C: int, Q: int, P: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_Q, BLOCK_P): a channel tile of about _TILE elements, the whole map, and
    chunks of output pixels for the resize gather."""
    block_q = triton.next_power_of_2(Q)
    block_c = min(triton.next_power_of_2(C), max(1, _TILE // block_q))
    return block_c, block_q, min(triton.next_power_of_2(P), 1024)


def _output_span(n_in: int, n_out: int) -> int:
    """How many consecutive output indices, from _first_output, can include one input index
    among their two taps: 2 n_out / n_in from the interpolation, n_out / (2 n_in) more for the
    clamped outputs near 0, and a margin for floor rounding."""
    return -(-3 * n_out // n_in) + 4


def _gather_blocks(H: int, W: int, out_h: int, out_w: int) -> dict:
    """Block sizes of the backward's resize gather: BLOCK_QG map pixels by a BLOCK_SW window of
    output columns, about _TILE / 4 elements (a larger tile spills at 7x7 -> 224x224 on sm_90:
    benchmarks/gpu_resources.py), over SPAN_H output rows."""
    block_sw = triton.next_power_of_2(_output_span(W, out_w))
    block_qg = min(triton.next_power_of_2(H * W), max(1, _TILE // 4 // block_sw))
    return dict(BLOCK_QG=block_qg, SPAN_H=_output_span(H, out_h), BLOCK_SW=block_sw)


def _cam_map_forward(A, Wt, rows, out_h: int, out_w: int, relu: bool, norm: int, eps: float):
    """(U (B, out_h*out_w), Rm (B, H*W)) of one architecture, in the accumulation dtype."""
    B, C, H, W = A.shape
    acc = acc_dtype(A.dtype)
    A, Wt, rows = A.contiguous(), Wt.to(acc).contiguous(), as_index(rows)
    U = torch.empty(B, out_h * out_w, device=A.device, dtype=acc)
    Rm = torch.empty(B, H * W, device=A.device, dtype=acc)
    block_c, block_q, block_p = _blocks(C, H * W, out_h * out_w)
    with device_guard(A):
        _cam_map_fwd_kernel[(B,)](
            A, Wt, rows, U, Rm, C, eps, H=H, W=W, SH=out_h, SW=out_w, QW=Wt.shape[2],
            RELU=relu, NORM=norm, ACC=tl_dtype(acc), BLOCK_C=block_c, BLOCK_Q=block_q, BLOCK_P=block_p,
        )
    return [U, Rm]


def _cam_map_backward(dU, A, Wt, rows, Rm, out_h: int, out_w: int, relu: bool, norm: int, eps: float,
                     need_feature_grad: bool, need_weight_grad: bool, num_rows: int):
    """(dA or an empty tensor, dW (num_rows, C, QW) in the accumulation dtype or an empty tensor)."""
    B, C, H, W = A.shape
    Q, QW = H * W, Wt.shape[2]
    A, Wt, rows = A.contiguous(), Wt.to(Rm.dtype).contiguous(), as_index(rows)
    dU, Rm = dU.contiguous(), Rm.contiguous()
    acc = tl_dtype(Rm.dtype)
    block_c, block_q, _ = _blocks(C, Q, out_h * out_w)
    dZ = torch.empty_like(Rm)
    dA = torch.empty_like(A) if need_feature_grad else A.new_empty(0)
    dW = torch.empty(num_rows, C, QW, device=A.device, dtype=Rm.dtype) if need_weight_grad else Wt.new_empty(0)
    with device_guard(A):
        _cam_map_bwd_kernel[(B,)](
            dU, Rm, dZ, eps, H=H, W=W, SH=out_h, SW=out_w, RELU=relu, NORM=norm, ACC=acc,
            BLOCK_Q=block_q, **_gather_blocks(H, W, out_h, out_w),
        )
        grid_c = triton.cdiv(C, block_c)
        if need_feature_grad:
            _cam_feature_grad_kernel[(B, grid_c)](
                dZ, Wt, rows, dA, C, Q=Q, QW=QW, ACC=acc, BLOCK_C=block_c, BLOCK_Q=block_q)
        if need_weight_grad:
            sorted_rows, order = torch.sort(rows, stable=True)
            start = torch.searchsorted(sorted_rows, torch.arange(num_rows + 1, device=A.device))
            _cam_weight_grad_kernel[(num_rows, grid_c)](
                dZ, A, order, start, dW, C, Q=Q, QW=QW, ACC=acc, BLOCK_C=block_c, BLOCK_Q=block_q)
    return [dA, dW]


def cam_maps_forward(features, heads, rows, out_h: int, out_w: int, relu: bool, norm: int, eps: float):
    """(U (K, B, out_h*out_w), [R_k (B, H_k*W_k)]) of K architectures, in the accumulation dtype."""
    out = [_cam_map_forward(A, Wt, r, out_h, out_w, relu, norm, eps) for A, Wt, r in zip(features, heads, rows)]
    return torch.stack([u for u, _ in out]), [rm for _, rm in out]


def cam_maps_backward(dU, features, heads, rows, rects, out_h: int, out_w: int, relu: bool, norm: int, eps: float,
                      feature_grad, head_grad):
    """([dA_k or an empty tensor], [dW_k (heads[k]'s shape) or an empty tensor]) from dU (K, B, P)."""
    out = [_cam_map_backward(dU[k], A, Wt, rows[k], rects[k], out_h, out_w, relu, norm, eps, feature_grad[k],
                             head_grad[k], Wt.shape[0])
           for k, (A, Wt) in enumerate(zip(features, heads))]
    return [da for da, _ in out], [dw for _, dw in out]
