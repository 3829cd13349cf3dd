"""Triton kernels of the cross-architecture map variance (docs/ops.md section 2).

U (K, B, P) float32/float64 -> v (B,): v[b] = (1/P) sum_p (1/K) sum_k (U[k,b,p] - m[b,p])^2,
m the mean over k, computed in two passes over the k-block held in registers. The launchers
take U (and the gradient) with any strides; offsets are int64 (K*B*P may pass 2^31).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import device_guard, tl_dtype

_TILE = 4096


@triton.jit
def _map_variance_fwd_kernel(p_u, p_v, B, K: tl.constexpr, P: tl.constexpr, ACC: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    # Moves: reads K*B*P*sizeof(ACC), writes B*sizeof(ACC).
    i_b = tl.program_id(0).to(tl.int64)
    o_k = tl.arange(0, BLOCK_K).to(tl.int64)
    m_k = o_k < K
    b_total = tl.zeros([BLOCK_P], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        o_p = p0 + tl.arange(0, BLOCK_P)
        m = m_k[:, None] & (o_p < P)[None, :]
        b_u = tl.load(p_u + o_k[:, None] * B * P + i_b * P + o_p[None, :], mask=m, other=0.0)
        b_d = tl.where(m, b_u - (tl.sum(b_u, axis=0) / K)[None, :], 0.0)
        b_total += tl.sum(b_d * b_d, axis=0)
    tl.store(p_v + i_b, tl.sum(b_total, axis=0) / (K * P))


@triton.jit
def _map_variance_bwd_kernel(p_g, p_u, p_gu, B, K: tl.constexpr, P: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    # dU[k, b, p] = g[b] * 2 / (K P) * (U[k, b, p] - m[b, p]).
    # Moves: reads K*B*P*sizeof(ACC), writes K*B*P*sizeof(ACC).
    i_b = tl.program_id(0).to(tl.int64)
    o_k = tl.arange(0, BLOCK_K).to(tl.int64)
    m_k = o_k < K
    coef = tl.load(p_g + i_b) * 2.0 / (K * P)
    for p0 in range(0, P, BLOCK_P):
        o_p = p0 + tl.arange(0, BLOCK_P)
        m = m_k[:, None] & (o_p < P)[None, :]
        o_u = o_k[:, None] * B * P + i_b * P + o_p[None, :]
        b_u = tl.load(p_u + o_u, mask=m, other=0.0)
        b_d = b_u - (tl.sum(b_u, axis=0) / K)[None, :]
        tl.store(p_gu + o_u, coef * b_d, mask=m)


def _blocks(K: int, P: int) -> tuple[int, int]:
    block_k = triton.next_power_of_2(K)
    return block_k, min(triton.next_power_of_2(P), max(1, _TILE // block_k))


def map_variance_forward(U: torch.Tensor) -> torch.Tensor:
    """v (B,) in U's dtype from the maps U (K, B, P)."""
    U = U.contiguous()
    K, B, P = U.shape
    v = torch.empty(B, device=U.device, dtype=U.dtype)
    block_k, block_p = _blocks(K, P)
    with device_guard(U):
        _map_variance_fwd_kernel[(B,)](U, v, B, K=K, P=P, ACC=tl_dtype(U.dtype), BLOCK_K=block_k, BLOCK_P=block_p)
    return v


def map_variance_backward(grad: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """dU (K, B, P) from d loss / d v (B,)."""
    U, grad = U.contiguous(), grad.contiguous()
    K, B, P = U.shape
    gU = torch.empty_like(U)
    block_k, block_p = _blocks(K, P)
    with device_guard(U):
        _map_variance_bwd_kernel[(B,)](grad, U, gU, B, K=K, P=P, BLOCK_K=block_k, BLOCK_P=block_p)
    return gU
