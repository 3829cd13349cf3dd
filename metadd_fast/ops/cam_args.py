"""Validation of the CAM ops' arguments and the weight kinds (docs/ops.md sections 1 and 6)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import checks

NORMS = ("minmax", "max", "none")
NORM_CODES = {"none": 0, "max": 1, "minmax": 2}
REDUCTIONS = ("mean", "sum", "none")


class CamArgs(NamedTuple):
    """Checked arguments. ``heads[k]`` is ``(R_k, C_k, QW_k)``: the weight viewed as
    R rows of C channels by QW pixels (QW = H*W for a flatten head, else 1)."""

    features: list
    weights: list
    heads: list
    labels: Optional[torch.Tensor]
    out_size: tuple
    relu: bool
    norm: str
    eps: float
    device: torch.device


def _head(k: int, feature: torch.Tensor, weight: torch.Tensor, labelled: bool) -> tuple:
    B, C, H, W = feature.shape
    shape = tuple(weight.shape)
    if not labelled:
        if shape == (B, C):
            return (B, C, 1)
        raise ValueError(
            f"weights[{k}]: without labels, expected per-sample channel weights of shape ({B}, {C}); got {shape} "
            f"(pass labels= for a linear or flatten classifier head)")
    if weight.dim() == 2 and shape[1] == C:
        return (shape[0], C, 1)
    if (weight.dim() == 2 and shape[1] == C * H * W) or (weight.dim() == 4 and shape[1:] == (C, H, W)):
        return (shape[0], C, H * W)
    raise ValueError(
        f"weights[{k}]: expected a linear head (N, {C}) or a flatten head (N, {C}, {H}, {W}) / (N, {C * H * W}) "
        f"for features[{k}] of shape {tuple(feature.shape)}; got {shape}")


def _out_size(out_size, features) -> tuple:
    if out_size is None:
        return (max(f.shape[2] for f in features), max(f.shape[3] for f in features))
    if isinstance(out_size, bool) or not isinstance(out_size, (int, tuple, list, torch.Size)):
        raise TypeError(f"out_size: expected None, an int or a pair of ints, got {type(out_size).__name__}")
    size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in size):
        raise TypeError(f"out_size: expected a pair of ints, got {out_size!r}")
    if min(size) <= 0:
        raise ValueError(f"out_size: expected positive sizes, got {size}")
    return size


def parse_cam_args(features, weights, labels, out_size, relu, norm, eps) -> CamArgs:
    """Check every argument of ``class_activation_maps``/``cam_variance`` (docs/ops.md section 6), but
    the range of the labels: see :func:`check_label_range`."""
    features = checks.tensor_list("features", features)
    weights = checks.tensor_list("weights", weights)
    if len(features) < 2:
        raise ValueError(f"features: expected K >= 2 architectures, got {len(features)}")
    if len(weights) != len(features):
        raise ValueError(f"weights: expected one per architecture ({len(features)} features), got {len(weights)}")
    # Each check first tests the common case; the messages are built only for a failure.
    B = features[0].shape[0] if features[0].dim() == 4 else None
    for k, f in enumerate(features):
        if f.dim() != 4 or f.dtype not in checks.FLOATING or f.shape[0] != B or not f.numel():
            checks.floating_tensor(f"features[{k}]", f, "(B, C, H, W)")
            raise ValueError(f"features[{k}]: batch size {f.shape[0]} differs from features[0]'s {B}")
    for k, w in enumerate(weights):
        if w.dtype not in checks.FLOATING:
            checks.floating(f"weights[{k}]", w)
    tensors = features + weights
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels: expected None or an integer tensor, got {type(labels).__name__}")
        checks.integer("labels", labels)
        if tuple(labels.shape) != (B,):
            raise ValueError(f"labels: expected shape ({B},), got {tuple(labels.shape)}")
        tensors.append(labels)
    device = features[0].device
    if any(t.device != device for t in tensors):
        names = [f"features[{k}]" for k in range(len(features))] + [f"weights[{k}]" for k in range(len(weights))]
        checks.same_device(zip(names + ["labels"], tensors))
    if not isinstance(relu, bool):
        raise TypeError(f"relu: expected a bool, got {type(relu).__name__}")
    checks.choice("norm", norm, NORMS)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
    heads = [_head(k, f, w, labels is not None) for k, (f, w) in enumerate(zip(features, weights))]
    size = _out_size(out_size, features)
    if size[0] * size[1] > 1 << 24:  # beyond any CAM grid: check what the maps would need
        itemsize = 8 if any(f.dtype == torch.float64 for f in features) else 4
        checks.allocation("out_size", len(features) * B * size[0] * size[1] * itemsize, device,
                          f"maps of {len(features)} x {B} x {size[0]} x {size[1]}")
    return CamArgs(features, weights, heads, labels, size, relu, norm, float(eps), device)


def check_label_range(args: CamArgs, backend: str) -> None:
    """Labels in [0, rows of every head). The C++ kernels check them as they read the head
    rows (same message), so only the other backends read them here."""
    if args.labels is not None and backend != "cpp":
        checks.index_range("labels", args.labels, min(h[0] for h in args.heads))


def parse_cam_part(k: int, feature, weight, labels) -> tuple:
    """(feature, weight, labels, head layout (R, C, QW)) of architecture ``k`` after the checks
    of :func:`parse_cam_args`, but the range of the labels; ``labels`` may be None."""
    checks.floating_tensor(f"features[{k}]", feature, "(B, C, H, W)")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weights[{k}]: expected a tensor, got {type(weight).__name__}")
    checks.floating(f"weights[{k}]", weight)
    named = [(f"features[{k}]", feature), (f"weights[{k}]", weight)]
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels: expected None or an integer tensor, got {type(labels).__name__}")
        checks.integer("labels", labels)
        if tuple(labels.shape) != (feature.shape[0],):
            raise ValueError(f"labels: expected shape ({feature.shape[0]},), got {tuple(labels.shape)}")
        named.append(("labels", labels))
    checks.same_device(named)
    return feature, weight, labels, _head(k, feature, weight, labels is not None)
