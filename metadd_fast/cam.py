"""Fused class activation maps and their cross-architecture variance (SPEC section 1).

Custom ops, each with a fake (meta) implementation and an autograd formula that is
itself a custom op, so ``torch.compile(fullgraph=True)`` traces them
(:class:`~metadd_fast.oplib.FusedOp`; eager calls skip the dispatcher's Python layers):

- ``metadd_fast::cam_maps``: K feature maps and heads -> U (K, B, S_h*S_w), the
  normalized resized maps, plus the rectified raw maps R_k (B, H_k*W_k) that the
  backward needs (each 1/C_k of its features). Features are read once.
- ``metadd_fast::map_variance``: U -> v (B,), the per-image pixel mean of the
  variance across architectures.
- ``metadd_fast::cam_variance``: both in one op (one dispatch forward and one
  backward), for :func:`cam_variance`. MetaDDLoss uses the two parts separately.

U and v are in the accumulation dtype (float32, or float64 for float64 inputs).
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import backends, reference
from .cam_args import NORM_CODES, REDUCTIONS, CamArgs, check_label_range, parse_cam_args
from .checks import choice
from .oplib import FusedOp

__all__ = ["class_activation_maps", "cam_variance", "CAMVariance"]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cam_maps(features: list[Tensor], heads: list[Tensor], rows: list[Tensor], out_h: int, out_w: int, relu: bool,
              norm: int, eps: float, backend: str) -> tuple[Tensor, list[Tensor]]:
    return tuple(backends.kernels(backend).cam_maps_forward(features, heads, rows, out_h, out_w, relu, norm, eps))


def _cam_maps_fake(features, heads, rows, out_h, out_w, relu, norm, eps, backend):
    f0 = features[0]
    acc = _acc(f0.dtype)
    maps = f0.new_empty((len(features), f0.shape[0], out_h * out_w), dtype=acc)
    return maps, [f.new_empty((f.shape[0], f.shape[2] * f.shape[3]), dtype=acc) for f in features]


def _cam_maps_backward(grad_maps: Tensor, features: list[Tensor], heads: list[Tensor], rows: list[Tensor],
                       rects: list[Tensor], out_h: int, out_w: int, relu: bool, norm: int, eps: float,
                       feature_grad: list[bool], head_grad: list[bool], backend: str) -> tuple[list[Tensor], list[Tensor]]:
    impl = backends.kernels(backend)
    return tuple(impl.cam_maps_backward(grad_maps, features, heads, rows, rects, out_h, out_w, relu, norm, eps,
                                        feature_grad, head_grad))


def _cam_maps_backward_fake(grad_maps, features, heads, rows, rects, out_h, out_w, relu, norm, eps, feature_grad,
                            head_grad, backend):
    d_features = [torch.empty_like(f) if need else f.new_empty(0) for f, need in zip(features, feature_grad)]
    d_heads = [torch.empty_like(h) if need else h.new_empty(0) for h, need in zip(heads, head_grad)]
    return d_features, d_heads


def _save_maps(ctx, inputs, rects, *extra):
    """Saves what a CAM backward needs: the inputs, the rectified maps R_k and ``extra`` tensors."""
    features, heads, rows, out_h, out_w, relu, norm, eps, backend = inputs
    ctx.save_for_backward(*rows, *features, *heads, *rects, *extra)
    ctx.k = len(features)
    ctx.args = (out_h, out_w, relu, norm, eps)
    ctx.backend = backend
    ctx.feature_grad = [f.requires_grad for f in features]
    ctx.head_grad = [h.requires_grad for h in heads]


def _maps_grads(ctx, backward, grad) -> tuple:
    """Gradients of the op's arguments, by ``backward`` (a CAM backward taking ``grad`` and then
    the saved features, heads, rows, R_k and arguments)."""
    k = ctx.k
    saved = ctx.saved_tensors
    rows, features, heads, rest = saved[:k], saved[k:2 * k], saved[2 * k:3 * k], saved[3 * k:]
    d_features, d_heads = backward(*grad, list(features), list(heads), list(rows), list(rest[:k]), *ctx.args,
                                   ctx.feature_grad, ctx.head_grad, ctx.backend)
    d_features = [d if need else None for d, need in zip(d_features, ctx.feature_grad)]
    d_heads = [d if need else None for d, need in zip(d_heads, ctx.head_grad)]
    return d_features, d_heads, [None] * k, None, None, None, None, None, None


def _cam_maps_setup(ctx, inputs, output):
    _save_maps(ctx, inputs, output[1])


def _cam_maps_grad(ctx, backward, grad_maps, grad_rects):
    return _maps_grads(ctx, backward, (grad_maps.contiguous(),))


cam_maps_op = FusedOp("cam_maps", _cam_maps, _cam_maps_fake, _cam_maps_backward, _cam_maps_backward_fake,
                      _cam_maps_setup, _cam_maps_grad)


def _map_variance(maps: Tensor, backend: str) -> Tensor:
    return backends.kernels(backend).map_variance_forward(maps)


def _map_variance_fake(maps, backend):
    return maps.new_empty(maps.shape[1])


def _map_variance_backward(grad: Tensor, maps: Tensor, backend: str) -> Tensor:
    return backends.kernels(backend).map_variance_backward(grad, maps)


def _map_variance_backward_fake(grad, maps, backend):
    return torch.empty_like(maps)


def _map_variance_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.backend = inputs[1]


def _map_variance_grad(ctx, backward, grad):
    (maps,) = ctx.saved_tensors
    return backward(grad.contiguous(), maps, ctx.backend), None


map_variance_op = FusedOp("map_variance", _map_variance, _map_variance_fake, _map_variance_backward,
                          _map_variance_backward_fake, _map_variance_setup, _map_variance_grad)


def _cam_variance(features: list[Tensor], heads: list[Tensor], rows: list[Tensor], out_h: int, out_w: int,
                  relu: bool, norm: int, eps: float, backend: str) -> tuple[Tensor, Tensor, list[Tensor]]:
    maps, rects = _cam_maps(features, heads, rows, out_h, out_w, relu, norm, eps, backend)
    return _map_variance(maps, backend), maps, rects


def _cam_variance_fake(features, heads, rows, out_h, out_w, relu, norm, eps, backend):
    maps, rects = _cam_maps_fake(features, heads, rows, out_h, out_w, relu, norm, eps, backend)
    return maps.new_empty(maps.shape[1]), maps, rects


def _cam_variance_backward(grad: Tensor, maps: Tensor, features: list[Tensor], heads: list[Tensor],
                           rows: list[Tensor], rects: list[Tensor], out_h: int, out_w: int, relu: bool, norm: int,
                           eps: float, feature_grad: list[bool], head_grad: list[bool],
                           backend: str) -> tuple[list[Tensor], list[Tensor]]:
    return _cam_maps_backward(_map_variance_backward(grad, maps, backend), features, heads, rows, rects, out_h, out_w,
                              relu, norm, eps, feature_grad, head_grad, backend)


def _cam_variance_backward_fake(grad, maps, features, heads, rows, rects, *args):
    return _cam_maps_backward_fake(maps, features, heads, rows, rects, *args)


def _cam_variance_setup(ctx, inputs, output):
    _save_maps(ctx, inputs, output[2], output[1])


def _cam_variance_grad(ctx, backward, grad, grad_maps, grad_rects):
    return _maps_grads(ctx, backward, (grad.contiguous(), ctx.saved_tensors[-1]))


# The per-image variance v (B,) in one op: the maps U and R_k are outputs only so that the
# backward can use them (their gradients are not used).
cam_variance_op = FusedOp("cam_variance", _cam_variance, _cam_variance_fake, _cam_variance_backward,
                          _cam_variance_backward_fake, _cam_variance_setup, _cam_variance_grad)


def _backend_for(args: CamArgs, backend: Optional[str]) -> str:
    """The backend that runs ``args``, after the label range check if its kernels do not do it."""
    name = backends.resolve(backend, args.device)
    if name == "triton":
        from metadd_fast.kernels.cam_maps import MAX_MAP_PIXELS, supports

        if not all(supports(f.shape[2], f.shape[3], *args.out_size) for f in args.features):
            msg = f"the triton CAM kernels handle maps of at most {MAX_MAP_PIXELS} pixels"
            if backend == "triton":
                raise ValueError(f"features: {msg}, got {[tuple(f.shape[2:]) for f in args.features]}")
            warnings.warn(f"metadd_fast: {msg}; falling back to the reference implementation", RuntimeWarning)
            name = "reference"
    check_label_range(args, name)
    return name


def prepare_inputs(features: list, heads: list, rows: list) -> tuple:
    """(features, heads, rows) as the CAM ops take them: contiguous features (all float64 if
    any is), heads in the accumulation dtype, int64 rows."""
    if any(f.dtype == torch.float64 for f in features):
        features = [f.to(torch.float64) for f in features]
    acc = _acc(features[0].dtype)
    # Tensor calls cost ~1 us each from Python, so tensors already in form are passed as they are.
    return ([f if f.is_contiguous() else f.contiguous() for f in features],
            [h if h.dtype == acc and h.is_contiguous() else h.to(acc).contiguous() for h in heads],
            [r if r.dtype == torch.int64 else r.long() for r in rows])


def fused_maps(features: list, heads: list, rows: list, out_size: tuple, relu: bool, norm: str, eps: float,
               backend: str) -> Tensor:
    """U (K, B, S_h*S_w) through the ``cam_maps`` op from checked parts: per architecture the
    features (B, C, H, W), the head viewed as (R, C, QW) and the (B,) rows of that head
    each image uses. Any K >= 1."""
    maps, _ = cam_maps_op(*prepare_inputs(features, heads, rows), *out_size, relu, NORM_CODES[norm], eps, backend)
    return maps


def _fused_inputs(args: CamArgs) -> tuple:
    B = args.features[0].shape[0]
    rows = args.labels if args.labels is not None else torch.arange(B, device=args.device)
    heads = [w.reshape(shape) for w, shape in zip(args.weights, args.heads)]
    return prepare_inputs(args.features, heads, [rows] * len(heads))


def class_activation_maps(
    features: Sequence[Tensor],
    weights: Sequence[Tensor],
    labels: Optional[Tensor] = None,
    *,
    out_size=None,
    relu: bool = True,
    norm: str = "minmax",
    eps: float = 1e-8,
    backend: Optional[str] = None,
) -> Tensor:
    """Normalized class activation maps of K architectures, resized to one grid.

    features: K tensors (B, C_k, H_k, W_k), float16/bfloat16/float32/float64.
    weights: K tensors, each a linear head (N, C_k), a flatten head (N, C_k, H_k, W_k)
        or (N, C_k*H_k*W_k) (both with ``labels`` (B,) int), or per-sample channel
        weights (B, C_k) with ``labels=None``.
    Returns (K, B, S_h, S_w) in the features' dtype; ``out_size`` defaults to
    (max H_k, max W_k). ``backend``: None (CUDA -> "triton", CPU -> "cpp"),
    "triton", "cpp" or "reference".
    """
    args = parse_cam_args(features, weights, labels, out_size, relu, norm, eps)
    name = _backend_for(args, backend)
    if name == "reference":
        return reference.class_activation_maps(args.features, args.weights, args.labels, out_size=args.out_size,
                                               relu=relu, norm=norm, eps=args.eps)
    maps, _ = cam_maps_op(*_fused_inputs(args), *args.out_size, args.relu, NORM_CODES[args.norm], args.eps, name)
    dtype = functools.reduce(torch.promote_types, [f.dtype for f in args.features])
    return maps.view(maps.shape[0], maps.shape[1], *args.out_size).to(dtype)


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

    Same arguments as :func:`class_activation_maps`. ``reduction``: "mean" or "sum"
    over images (a scalar), or "none" for the per-image values (B,). The result is
    float32 (float64 for float64 inputs).
    """
    choice("reduction", reduction, REDUCTIONS)
    args = parse_cam_args(features, weights, labels, out_size, relu, norm, eps)
    name = _backend_for(args, backend)
    if name == "reference":
        return reference.cam_variance(args.features, args.weights, args.labels, out_size=args.out_size, relu=relu,
                                      norm=norm, eps=args.eps, reduction=reduction)
    v, _, _ = cam_variance_op(*_fused_inputs(args), *args.out_size, args.relu, NORM_CODES[args.norm], args.eps, name)
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
