"""The cross-architecture variance of K maps (docs/ops.md section 2).

``metadd_fast::map_variance``: U (K, B, P) float32/float64 -> v (B,), per image the
pixel mean of the population variance across the K maps. Its backward
``metadd_fast::map_variance_backward`` is linear in the upstream gradient and in U, so
it is differentiable again through itself (any order).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends, checks
from .registry import KernelOp, dispatch_context, register_double_backward

__all__ = ["map_variance"]


def _fake(maps):
    return maps.new_empty(maps.shape[1])


def _backward_fake(grad, maps):
    return torch.empty_like(maps)


map_variance_op = KernelOp("map_variance", "(Tensor maps) -> Tensor", lambda k: k.map_variance_forward, _fake)
map_variance_backward = KernelOp("map_variance_backward", "(Tensor grad, Tensor maps) -> Tensor",
                                 lambda k: k.map_variance_backward, _backward_fake)


def _double_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _double_grad(ctx, gg):
    """dU = g_b * 2/(K P) (U - mean_k U) is linear in g and in U (a centering, self-adjoint):
    d/dU = backward(g, gg), d/dg_b = sum_{k,p} gg * backward(1, U)."""
    grad, maps = ctx.saved_tensors
    gg = gg.contiguous()
    op = torch.ops.metadd_fast.map_variance_backward
    d_grad = (gg * op(torch.ones_like(grad), maps)).sum((0, 2)) if ctx.needs_input_grad[0] else None
    d_maps = op(grad, gg) if ctx.needs_input_grad[1] else None
    return d_grad, d_maps


register_double_backward(map_variance_backward, _double_setup, _double_grad)


def map_variance(maps: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """v (B,): per image, the mean over the P pixels of the population variance of the K maps.

    maps: (K, B, P) float32 or float64 (the accumulation dtype of :func:`cam_maps_of_parts`).
    """
    checks.floating_tensor("maps", maps, "(K, B, P)")
    if maps.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"maps: expected float32 or float64, got {maps.dtype}")
    name = backends.resolve(backend, maps.device)
    if name == "reference":
        return map_variance_reference(maps)
    with dispatch_context(name, maps.device):
        return map_variance_op(maps if maps.is_contiguous() else maps.contiguous())


def map_variance_reference(maps: Tensor) -> Tensor:
    """Plain PyTorch: the population variance over the K maps, averaged over the P pixels."""
    return maps.var(dim=0, unbiased=False).mean(dim=-1)
