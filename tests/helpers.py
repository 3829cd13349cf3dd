"""Shared test helpers: random CAM cases and error measures against the float64 reference."""
from __future__ import annotations

import socket

import torch

NUM_CLASSES = 5


def free_port() -> int:
    """A free TCP port on the loopback interface, for a torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when either is non-finite or ref is zero."""
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return float("inf")
    scale = ref.norm()
    assert scale > 0, "reference is zero: the comparison could not fail"
    return float((out - ref).norm() / scale)


def make_case(B: int, archs, kinds, dtype=torch.float32, weight_dtype=None, labelled=None):
    """Random features and weights for K architectures.

    archs: K tuples (C, H, W). kinds: K of "linear", "flatten", "flatten2d", "sample".
    Returns (features, weights, labels), leaves with requires_grad.
    """
    weight_dtype = weight_dtype or dtype
    labelled = any(k != "sample" for k in kinds) if labelled is None else labelled
    labels = torch.randint(0, NUM_CLASSES, (B,)) if labelled else None
    features, weights = [], []
    for (C, H, W), kind in zip(archs, kinds):
        features.append(torch.randn(B, C, H, W).to(dtype).requires_grad_())
        shape = {"linear": (NUM_CLASSES, C), "flatten": (NUM_CLASSES, C, H, W),
                 "flatten2d": (NUM_CLASSES, C * H * W), "sample": (B, C)}[kind]
        weights.append(torch.randn(shape).to(weight_dtype).requires_grad_())
    return features, weights, labels


def grads_err(got, want) -> float:
    """Largest relative error over a set of gradients.

    All gradients together are compared as one vector, and each one alone when its
    norm is at least 1e-3 of the largest: a gradient that is zero up to eps-level
    terms (a map with one positive pixel normalizes to 1 - eps/max) has no
    meaningful relative error of its own in float32, but still counts in the total.
    """
    flat = lambda ts: torch.cat([t.detach().double().flatten() for t in ts])  # noqa: E731
    errs = [rel_err(flat(got), flat(want))]
    top = max(float(w.norm()) for w in want)
    errs += [rel_err(g, w) for g, w in zip(got, want) if float(w.norm()) >= 1e-3 * top]
    return max(errs)


def as_float64(tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def grads(out: torch.Tensor, inputs, grad_output: torch.Tensor):
    return torch.autograd.grad(out, inputs, grad_output)
