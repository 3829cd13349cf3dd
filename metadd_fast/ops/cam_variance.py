"""MetaDD's cross-architecture CAM variance in one op (docs/ops.md section 3).

``metadd_fast::cam_variance``: :mod:`cam_maps <metadd_fast.ops.cam_maps>` then
:mod:`map_variance <metadd_fast.ops.map_variance>` in one dispatch forward and one
backward. The maps U and R_k are outputs only so that the backward can use them (their
gradients are not used). v and U are in the accumulation dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from torch import Tensor, nn

from .cam_args import NORM_CODES, REDUCTIONS, parse_cam_args
from .cam_maps import (MAPS_SCHEMA_ARGS, backend_for, cam_maps_backward_fake, cam_maps_fake, cam_maps_reference,
                       fused_inputs)
from .checks import choice
from .registry import KernelOp, dispatch_context, not_twice_differentiable, register_double_backward

__all__ = ["cam_variance", "CAMVariance"]


def _kernel(k):
    def cam_variance_kernel(features, heads, rows, out_h, out_w, relu, norm, eps):
        maps, rects = k.cam_maps_forward(features, heads, rows, out_h, out_w, relu, norm, eps)
        return k.map_variance_forward(maps), maps, rects

    return cam_variance_kernel


def _backward_kernel(k):
    def cam_variance_backward_kernel(grad, maps, *args):
        return tuple(k.cam_maps_backward(k.map_variance_backward(grad, maps), *args))

    return cam_variance_backward_kernel


def _fake(*args):
    maps, rects = cam_maps_fake(*args)
    return maps.new_empty(maps.shape[1]), maps, rects


def _backward_fake(grad, maps, *args):
    return cam_maps_backward_fake(maps, *args)


cam_variance_op = KernelOp("cam_variance", f"({MAPS_SCHEMA_ARGS}) -> (Tensor, Tensor, Tensor[])", _kernel, _fake)
cam_variance_backward = KernelOp(
    "cam_variance_backward",
    "(Tensor grad, Tensor maps, Tensor[] features, Tensor[] heads, Tensor[] rows, Tensor[] rects, SymInt out_h, "
    "SymInt out_w, bool relu, int norm, float eps, bool[] feature_grad, bool[] head_grad) -> (Tensor[], Tensor[])",
    _backward_kernel, _backward_fake)


register_double_backward(cam_variance_backward, *not_twice_differentiable("cam_variance"))


def cam_variance(
    features: Sequence[Tensor],
    weights: Sequence[Tensor],
    labels: Optional[Tensor] = None,
    *,
    out_size=None,
    relu: bool = True,
    norm: str = "minmax",
    eps: float = 1e-8,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    """MetaDD loss: per-pixel variance of the K normalized CAMs, averaged over pixels.

    Same arguments as :func:`~metadd_fast.class_activation_maps`. ``reduction``: "mean" or
    "sum" over images (a scalar), or "none" for the per-image values (B,). The result is
    float32 (float64 for float64 inputs).
    """
    choice("reduction", reduction, REDUCTIONS)
    args = parse_cam_args(features, weights, labels, out_size, relu, norm, eps)
    name = backend_for(args, backend)
    if name == "reference":
        return cam_variance_reference(args.features, args.weights, args.labels, out_size=args.out_size, relu=relu,
                                      norm=norm, eps=args.eps, reduction=reduction)
    with dispatch_context(name, args.device):
        v, _, _ = cam_variance_op(*fused_inputs(args), *args.out_size, args.relu, NORM_CODES[args.norm], args.eps)
    if reduction == "mean":
        return v.mean()
    if reduction == "sum":
        return v.sum()
    return v


class CAMVariance(nn.Module):
    """``nn.Module`` form of :func:`cam_variance`: ``loss = CAMVariance()(features, weights, labels)``."""

    def __init__(self, *, out_size=None, relu: bool = True, norm: str = "minmax", eps: float = 1e-8,
                 reduction: str = "mean", backend: Optional[str] = None):
        super().__init__()
        choice("norm", norm, tuple(NORM_CODES))
        choice("reduction", reduction, REDUCTIONS)
        self.options = dict(out_size=out_size, relu=relu, norm=norm, eps=eps, reduction=reduction, backend=backend)

    def forward(self, features: Sequence[Tensor], weights: Sequence[Tensor], labels: Optional[Tensor] = None) -> Tensor:
        return cam_variance(features, weights, labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


# --- the plain-PyTorch reference ------------------------------------------------------------

def cam_variance_reference(
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
    maps = cam_maps_reference(features, weights, labels, out_size=out_size, relu=relu, norm=norm, eps=eps)
    v = maps.var(dim=0, unbiased=False).mean(dim=(1, 2))
    if reduction == "mean":
        return v.mean()
    if reduction == "sum":
        return v.sum()
    return v
