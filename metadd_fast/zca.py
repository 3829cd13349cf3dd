"""Regularised ZCA whitening of images, as KIP and MTT use it for CIFAR-style runs.

``zca = ZCA.fit(train_images)`` fits on the training images (N, C, H, W), flattened to
D = C*H*W features; ``ZCA.fit_batches(batches)`` fits on the same images streamed as
batches (a source's :meth:`~metadd_fast.sources.Source.batches`: one batch in memory at a
time). Both accumulate the mean mu (D,) and the covariance S = U diag(s) U^T in float64 in
one pass (:func:`_moments`): with c the first batch's mean, the sums of x - c and of
(x - c)(x - c)^T, then mu = c + d and S = (sum (x - c)(x - c)^T - N d d^T) / (N - 1) with
d = mean of x - c. The shift keeps d small, so the subtraction loses little precision (the
unshifted one-pass formula cancels badly for pixels far from 0); the images are read once.
With the regulariser lam = strength * trace(S) / D (KIP's form, free of the pixel scale;
MTT uses kornia's ``ZCAWhitening(eps=0.1)``, an absolute eps on [0, 1] pixels),
``zca.whiten(x) = (x - mu) U diag((s + lam)^-1/2) U^T`` and ``zca.unwhiten`` is its exact
inverse. The whitened covariance of the training images is
U diag(s / (s + lam)) U^T: the identity up to the regulariser. ``state_dict()`` holds
tensors only (``torch.load(weights_only=True)`` reads it back with :meth:`ZCA.from_state_dict`).
D is at most :data:`MAX_FEATURES` (:func:`check_features`).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from . import argcheck
from .errors import InputError
from .data import Dataset

__all__ = ["ZCA", "MAX_FEATURES", "check_features"]

MAX_FEATURES = 64 * 64 * 3  # a D x D float64 matrix: 1.2 GB at this size; larger images are refused


def check_features(name: str, shape) -> None:
    """InputError naming ``name`` if images of ``shape`` (C, H, W) have more than
    :data:`MAX_FEATURES` values: their D x D covariance is not fitted."""
    D = int(torch.Size(shape).numel())
    if D > MAX_FEATURES:
        raise InputError(f"{name}: ZCA needs a {D} x {D} covariance ({'x'.join(map(str, shape))} images); images "
                         f"of more than {MAX_FEATURES} values (64x64x3) are refused")


def _check_images(name: str, x, features=None, finite: bool = False) -> None:
    argcheck.images(name, x, finite=finite)
    if features is not None and x[0].numel() != features:
        raise InputError(f"{name}: expected images of {features} values (the fitted C*H*W), got "
                         f"{tuple(x.shape[1:])}")


def _moments(rows: Iterable[Tensor]) -> tuple:
    """(N, mean (D,), covariance (D, D)) of the rows of ``rows`` (an iterable of (n, D) floating
    tensors), float64, in one pass shifted by the first batch's mean (the module's docstring)."""
    n, shift, total, outer = 0, None, None, None
    for x in rows:
        x = x.double()
        if shift is None:
            shift = x.mean(0)
            total = torch.zeros_like(shift)
            outer = torch.zeros(shift.numel(), shift.numel(), dtype=torch.float64, device=x.device)
        x = x - shift
        total += x.sum(0)
        outer.addmm_(x.T, x)
        n += x.shape[0]
    if n < 2:
        return n, None, None
    d = total / n
    return n, shift + d, (outer - n * torch.outer(d, d)) / (n - 1)


class ZCA:
    """A fitted whitening: mean (D,), whiten (D, D) and unwhiten (D, D) float64 matrices."""

    def __init__(self, mean: Tensor, whiten: Tensor, unwhiten: Tensor, strength: float):
        self.mean, self.whiten_matrix, self.unwhiten_matrix, self.strength = mean, whiten, unwhiten, strength

    @classmethod
    def fit(cls, images: Tensor, strength: float = 0.1, chunk: int = 4096) -> "ZCA":
        """Fit on ``images`` (N >= 2, C, H, W), ``chunk`` rows at a time; strength > 0 scales
        the regulariser."""
        _check_images("images", images, finite=True)
        argcheck.positive_float("strength", strength)
        argcheck.positive_int("chunk", chunk)
        if images.shape[0] < 2:
            raise InputError(f"images: expected at least 2 images to fit a covariance, got {images.shape[0]}")
        check_features("images", images.shape[1:])
        return cls._from_moments("images", _moments(images.reshape(images.shape[0], -1).split(chunk)), strength)

    @classmethod
    def fit_batches(cls, batches: Iterable[Tensor], strength: float = 0.1) -> "ZCA":
        """Fit on the images of ``batches`` (an iterable of (n, C, H, W) floating, finite tensors
        of one shape, at least 2 images in all), read once, one batch at a time."""
        argcheck.positive_float("strength", strength)
        try:
            batches = iter(batches)
        except TypeError:
            raise argcheck.type_error("batches", "an iterable of (n, C, H, W) image batches", batches) from None

        def rows():
            features = None
            for x in batches:
                _check_images("batches", x, features, finite=True)
                if features is None:
                    check_features("batches", x.shape[1:])
                    features = x[0].numel()
                yield x.reshape(x.shape[0], -1)

        return cls._from_moments("batches", _moments(rows()), strength)

    @classmethod
    def _from_moments(cls, name: str, moments: tuple, strength: float) -> "ZCA":
        """The ZCA of (N, mean, covariance) (:func:`_moments`); InputError naming ``name`` if
        fewer than 2 images or a zero covariance."""
        n, mean, cov = moments
        if n < 2:
            raise InputError(f"{name}: expected at least 2 images to fit a covariance, got {n}")
        s, U = torch.linalg.eigh(cov)
        s = s.clamp(min=0)
        lam = float(strength) * float(s.sum()) / mean.numel()
        if lam <= 0:
            raise InputError(f"{name}: all images are equal (zero covariance); nothing to whiten")
        whiten = (U * (s + lam).rsqrt()) @ U.T
        unwhiten = (U * (s + lam).sqrt()) @ U.T
        return cls(mean, whiten, unwhiten, float(strength))

    def _apply(self, x: Tensor, matrix: Tensor, center: bool) -> Tensor:
        _check_images("x", x, self.mean.numel())
        flat = x.reshape(x.shape[0], -1).double()
        m = self.mean.to(flat.device)
        out = (flat - m) @ matrix.to(flat.device) if center else flat @ matrix.to(flat.device) + m
        return out.to(x.dtype).reshape(x.shape)

    def whiten(self, x: Tensor) -> Tensor:
        """(N, C, H, W) images -> their ZCA-whitened images, same shape and dtype (differentiable)."""
        return self._apply(x, self.whiten_matrix, True)

    def unwhiten(self, x: Tensor) -> Tensor:
        """The inverse of :meth:`whiten`: ZCA-space images back to the space they were fitted in."""
        return self._apply(x, self.unwhiten_matrix, False)

    def whiten_dataset(self, ds: Dataset, chunk: int = 4096) -> Dataset:
        """``ds`` with whitened images (float32), fitted mean/std kept for plotting after unwhiten."""
        argcheck.dataset("ds", ds)
        argcheck.positive_int("chunk", chunk)
        images = torch.cat([self.whiten(c) for c in ds.images.split(chunk)])
        return Dataset(ds.name + "+zca", images, ds.labels, ds.num_classes, ds.mean, ds.std)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "whiten": self.whiten_matrix, "unwhiten": self.unwhiten_matrix,
                "strength": torch.tensor(self.strength, dtype=torch.float64)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ZCA":
        """The ZCA of :meth:`state_dict`; InputError naming ``state`` if it is not one."""
        argcheck.instance("state", state, dict, "a ZCA.state_dict()")
        if set(state) != {"mean", "whiten", "unwhiten", "strength"}:
            raise InputError(f"state: expected a ZCA.state_dict() (mean, whiten, unwhiten, strength), got "
                                      f"keys {', '.join(map(str, state)) or 'none'}")
        D = argcheck.tensor("state['mean']", state["mean"], shape=(None,)).shape[0]
        argcheck.tensor("state['whiten']", state["whiten"], shape=(D, D))
        argcheck.tensor("state['unwhiten']", state["unwhiten"], shape=(D, D))
        argcheck.tensor("state['strength']", state["strength"], shape=())
        argcheck.positive_float("state['strength']", float(state["strength"]))
        return cls(state["mean"], state["whiten"], state["unwhiten"], float(state["strength"]))
