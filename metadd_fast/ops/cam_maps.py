"""The fused class activation maps of K architectures (docs/ops.md section 1).

``metadd_fast::cam_maps``: K feature maps and heads -> U (K, B, S_h*S_w), the normalized
resized maps in the accumulation dtype (float32, or float64 for float64 inputs), plus
the rectified raw maps R_k (B, H_k*W_k) that the backward needs (each 1/C_k of its
features). Features are read once. ``metadd_fast::cam_maps_backward`` is its gradient;
it has no second derivative here (a clear error, docs/ops.md section 7).
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends, checks
from .cam_args import NORM_CODES, CamArgs, check_label_range, parse_cam_args, parse_cam_part
from .registry import KernelOp, dispatch_context, not_twice_differentiable, register_double_backward

__all__ = ["class_activation_maps", "cam_maps_of_parts"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


MAPS_SCHEMA_ARGS = "Tensor[] features, Tensor[] heads, Tensor[] rows, SymInt out_h, SymInt out_w, bool relu, int norm, float eps"


def cam_maps_fake(features, heads, rows, out_h, out_w, relu, norm, eps):
    f0 = features[0]
    acc = acc_dtype(f0.dtype)
    maps = f0.new_empty((len(features), f0.shape[0], out_h * out_w), dtype=acc)
    return maps, [f.new_empty((f.shape[0], f.shape[2] * f.shape[3]), dtype=acc) for f in features]


def cam_maps_backward_fake(grad, features, heads, rows, rects, out_h, out_w, relu, norm, eps, feature_grad, head_grad):
    d_features = [torch.empty_like(f) if need else f.new_empty(0) for f, need in zip(features, feature_grad)]
    d_heads = [torch.empty_like(h) if need else h.new_empty(0) for h, need in zip(heads, head_grad)]
    return d_features, d_heads


cam_maps_op = KernelOp("cam_maps", f"({MAPS_SCHEMA_ARGS}) -> (Tensor, Tensor[])",
                           lambda k: lambda *args: tuple(k.cam_maps_forward(*args)), cam_maps_fake)
cam_maps_backward = KernelOp(
    "cam_maps_backward",
    "(Tensor grad, Tensor[] features, Tensor[] heads, Tensor[] rows, Tensor[] rects, SymInt out_h, SymInt out_w, "
    "bool relu, int norm, float eps, bool[] feature_grad, bool[] head_grad) -> (Tensor[], Tensor[])",
    lambda k: lambda *args: tuple(k.cam_maps_backward(*args)), cam_maps_backward_fake)


register_double_backward(cam_maps_backward, *not_twice_differentiable("cam_maps"))


def check_map_size(features: Sequence[Tensor], out_size: tuple, backend: Optional[str], name: str) -> str:
    """``name`` ("reference" when the Triton kernels cannot hold these maps: an error if
    Triton was forced, a warning if it was picked)."""
    if name != "triton":
        return name
    from metadd_fast.kernels.cam_maps import MAX_MAP_PIXELS, supports

    if all(supports(f.shape[2], f.shape[3], *out_size) for f in features):
        return name
    msg = f"the triton CAM kernels handle maps of at most {MAX_MAP_PIXELS} pixels"
    if backend == "triton":
        raise ValueError(f"features: {msg}, got {[tuple(f.shape[2:]) for f in features]}")
    warnings.warn(f"metadd_fast: {msg}; falling back to the reference implementation", RuntimeWarning)
    return "reference"


def backend_for(args: CamArgs, backend: Optional[str]) -> str:
    """The backend that runs ``args``, after the label range check if its kernels do not do it."""
    name = check_map_size(args.features, args.out_size, backend, backends.resolve(backend, args.device))
    check_label_range(args, name)
    return name


def prepare_inputs(features: list, heads: list, rows: list) -> tuple:
    """(features, heads, rows) as the CAM ops take them: contiguous features (all float64 if
    any is), heads in the accumulation dtype, int64 rows."""
    if any(f.dtype == torch.float64 for f in features):
        features = [f.to(torch.float64) for f in features]
    acc = acc_dtype(features[0].dtype)
    # Tensor calls cost ~1 us each from Python, so tensors already in form are passed as they are.
    return ([f if f.is_contiguous() else f.contiguous() for f in features],
            [h if h.dtype == acc and h.is_contiguous() else h.to(acc).contiguous() for h in heads],
            [r if r.dtype == torch.int64 and r.is_contiguous() else r.long().contiguous() for r in rows])


def fused_inputs(args: CamArgs) -> tuple:
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
    name = backend_for(args, backend)
    if name == "reference":
        return cam_maps_reference(args.features, args.weights, args.labels, out_size=args.out_size,
                                               relu=relu, norm=norm, eps=args.eps)
    with dispatch_context(name, args.device):
        maps, _ = cam_maps_op(*fused_inputs(args), *args.out_size, args.relu, NORM_CODES[args.norm], args.eps)
    dtype = functools.reduce(torch.promote_types, [f.dtype for f in args.features])
    return maps.view(maps.shape[0], maps.shape[1], *args.out_size).to(dtype)


def cam_maps_of_parts(parts: Sequence[tuple], out_size: tuple, relu: bool, norm: str, eps: float,
                      backend: Optional[str]) -> Tensor:
    """U (K, B, S_h*S_w) in the accumulation dtype from per-architecture parts (features
    (B, C_k, H_k, W_k), weights, labels (B,) or None), K >= 1, checked as
    :func:`class_activation_maps` checks its arguments (labels' range and map size included).
    For :class:`~metadd_fast.MetaDDLoss`, whose architectures may each use labels or not."""
    checked = [parse_cam_part(k, *part) for k, part in enumerate(parts)]
    features = [A for A, _, _, _ in checked]
    device = checks.same_device([(f"features[{k}]", A) for k, A in enumerate(features)])
    name = check_map_size(features, out_size, backend, backends.resolve(backend, device))
    if name == "reference":
        acc = acc_dtype(torch.float64 if any(A.dtype == torch.float64 for A in features) else features[0].dtype)
        raw = [raw_cam(A.to(acc), W.to(acc), y) for A, W, y in parts]  # in the accumulation dtype, as the kernels
        return normalized_maps(raw, out_size, relu, norm, eps).flatten(2)
    rows = []
    for k, (A, W, y, layout) in enumerate(checked):
        if y is not None and name != "cpp":  # the C++ kernels check the rows as they read them
            checks.index_range("labels", y, layout[0])
        rows.append(y if y is not None else torch.arange(A.shape[0], device=device))
    heads = [W.reshape(layout) for _, W, _, layout in checked]
    with dispatch_context(name, device):
        maps, _ = cam_maps_op(*prepare_inputs(features, heads, rows), *out_size, relu, NORM_CODES[norm], float(eps))
    return maps


# --- the plain-PyTorch reference (float64 test oracle, benchmarks' autograd baseline) -----------

def raw_cam(feature: torch.Tensor, weight: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    """Raw class activation map z (B, H, W) of one architecture.

    feature: (B, C, H, W). weight: (N, C) linear head, (N, C, H, W) or (N, C*H*W)
    flatten head (both with ``labels`` (B,)), or (B, C) per-sample weights
    (``labels=None``).
    """
    B, C, H, W = feature.shape
    if labels is None:
        return torch.einsum("bc,bchw->bhw", weight, feature)
    if weight.dim() == 2 and weight.shape[1] == C:
        return torch.einsum("bc,bchw->bhw", weight[labels], feature)
    return torch.einsum("bchw,bchw->bhw", weight.reshape(-1, C, H, W)[labels], feature)


def normalized_maps(raw, out_size, relu: bool = True, norm: str = "minmax", eps: float = 1e-8) -> torch.Tensor:
    """Steps 2-4 of docs/ops.md section 1 on K raw maps (B, H_k, W_k): rectify, normalize, resize, stack."""
    maps = []
    for r in raw:
        if relu:
            r = torch.relu(r)
        if norm == "minmax":
            lo = r.amin(dim=(1, 2), keepdim=True)
            hi = r.amax(dim=(1, 2), keepdim=True)
            r = (r - lo) / (hi - lo + eps)
        elif norm == "max":
            r = r / (r.amax(dim=(1, 2), keepdim=True) + eps)
        u = F.interpolate(r[:, None], size=tuple(out_size), mode="bilinear", align_corners=False)
        maps.append(u[:, 0])
    return torch.stack(maps)


def cam_maps_reference(
    features: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    labels: Optional[torch.Tensor] = None,
    *,
    out_size=None,
    relu: bool = True,
    norm: str = "minmax",
    eps: float = 1e-8,
) -> torch.Tensor:
    """Stack of the K normalized, resized CAMs: (K, B, S_h, S_w)."""
    if out_size is None:
        out_size = (max(f.shape[2] for f in features), max(f.shape[3] for f in features))
    elif isinstance(out_size, int):
        out_size = (out_size, out_size)
    raw = [raw_cam(feature, weight, labels) for feature, weight in zip(features, weights)]
    return normalized_maps(raw, out_size, relu, norm, eps)
