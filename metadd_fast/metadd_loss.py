"""MetaDDLoss: K frozen networks turned into one differentiable loss on the synthetic images.

    loss_fn = MetaDDLoss([convnet, resnet, vgg, alexnet])
    loss = task_loss + lam * loss_fn(images, labels)
    loss.backward()

memory="keep": one forward per model; autograd keeps every model's activations.
memory="stream" (default): a first pass runs each model alone under no_grad and
keeps only its CAM maps U_k (B, S_h*S_w); the loss and dloss/dU come from those.
The backward re-runs one model at a time and pushes its gradient into the images,
so peak activation memory is that of the largest single model, not the sum over K.
With ``alpha`` (CVaR over images or groups), the backward re-runs only the images
whose CVaR weight is non-zero. ``chunk_size`` splits both passes into image chunks.

Models stay frozen: they run in eval mode with requires_grad off, and their modes
and flags are restored afterwards; no parameter gradient is ever computed.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .adapters import CAMTarget, cam_target
from .ops import backends, checks
from .ops.cam_args import NORMS
from .ops.cam_maps import cam_maps_of_parts
from .ops.cvar import check_alpha, cvar
from .ops.map_variance import map_variance

__all__ = ["MetaDDLoss"]


@contextlib.contextmanager
def _frozen(models):
    """Eval mode and requires_grad off for the block; the previous state restored after."""
    states = [(m.training, [p.requires_grad for p in m.parameters()]) for m in models]
    for m in models:
        m.eval()
        m.requires_grad_(False)
    try:
        yield
    finally:
        for m, (training, flags) in zip(models, states):
            m.train(training)
            for p, flag in zip(m.parameters(), flags):
                p.requires_grad_(flag)


def _autocast_state(device_type: str):
    if torch.is_autocast_enabled(device_type):
        return device_type, torch.get_autocast_dtype(device_type)
    return None


def _autocast(state):
    return torch.autocast(state[0], dtype=state[1]) if state else contextlib.nullcontext()


class MetaDDLoss(nn.Module):
    """Cross-architecture CAM-variance loss (MetaDD), optionally a CVaR over images or groups.

    models: K >= 2 networks (nn.Module or :class:`CAMTarget`). mode: "cam" (head weights,
    Grad-CAM where the head is not linear) or "gradcam" (Grad-CAM for every model).
    out_size, relu, norm, eps: as :func:`metadd_fast.cam_variance`. alpha: None (mean
    over images) or the CVaR tail fraction; groups/num_groups: CVaR over groups of
    images (a default for ``forward``'s ``groups``). memory: "stream" or "keep".
    chunk_size: images per chunk in stream mode. backend: as the fused ops.
    """

    def __init__(self, models: Sequence, *, mode: str = "cam", out_size=None, relu: bool = True,
                 norm: str = "minmax", eps: float = 1e-8, alpha: Optional[float] = None,
                 groups: Optional[Tensor] = None, num_groups: Optional[int] = None, memory: str = "stream",
                 chunk_size: Optional[int] = None, backend: Optional[str] = None):
        super().__init__()
        if isinstance(models, (nn.Module, CAMTarget)) or not isinstance(models, (list, tuple)):
            raise TypeError(f"models: expected a list of networks, got {type(models).__name__}")
        if len(models) < 2:
            raise ValueError(f"models: expected K >= 2 networks, got {len(models)}")
        checks.choice("mode", mode, ("cam", "gradcam"))
        checks.choice("memory", memory, ("stream", "keep"))
        checks.choice("norm", norm, NORMS)
        if alpha is not None:
            check_alpha(alpha)
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size: expected None or a positive int, got {chunk_size!r}")
        # Plain list: the frozen models are not submodules (no parameters of this loss).
        self.targets = [cam_target(m) for m in models]
        for k, t in enumerate(self.targets):  # probe errors and warnings name the network
            t.name = f"models[{k}] ({type(t.model).__name__})"
        self.mode, self.memory, self.chunk_size, self.backend = mode, memory, chunk_size, backend
        self.out_size, self.relu, self.norm, self.eps = out_size, relu, norm, eps
        self.alpha, self.groups, self.num_groups = alpha, groups, num_groups
        self._map_sizes: dict = {}

    def extra_repr(self) -> str:
        names = ", ".join(type(t.model).__name__ for t in self.targets)
        return f"[{names}], mode={self.mode!r}, memory={self.memory!r}, alpha={self.alpha}"

    @property
    def models(self) -> list:
        return [t.model for t in self.targets]

    # ---- pieces ---------------------------------------------------------------------------

    def _parts(self, t: CAMTarget, images: Tensor, labels: Tensor, create_graph: bool):
        """(A, weight in the form of docs/ops.md section 1, labels or None) of one model on ``images``."""
        A, logits = t.run(images, leaf=not create_graph and self._gradcam(t))
        if self._gradcam(t):
            return A, t.gradcam_weights(A, logits, labels, create_graph), None
        return A, t.head_weight(A), labels

    def _gradcam(self, t: CAMTarget) -> bool:
        return self.mode == "gradcam" or t.kind == "gradcam"

    def _maps(self, parts, out_size, backend: str) -> Tensor:
        """U (K, B, S_h*S_w) from per-model parts, checked (labels' range, map size)."""
        return cam_maps_of_parts(parts, out_size, self.relu, self.norm, self.eps, backend)

    def _variance(self, U: Tensor, backend: str) -> Tensor:
        return map_variance(U, backend=backend)

    def _reduce(self, v: Tensor, groups: Optional[Tensor], backend: str) -> Tensor:
        if self.alpha is None:
            return v.mean()
        num_groups = self.num_groups if groups is not None else None
        return cvar(v, self.alpha, groups, num_groups, backend=backend)

    def _prepare(self, images: Tensor) -> tuple:
        """Probe every model once per input shape: head kinds and the common map size."""
        key = tuple(images.shape[1:])
        if key not in self._map_sizes:
            probe = images[:2].detach()
            with _frozen(self.models), torch.no_grad():
                sizes = []
                for t in self.targets:
                    t.probe(probe)
                    sizes.append(tuple(t.run(probe[:1])[0].shape[2:]))
            self._map_sizes[key] = sizes
        if self.out_size is not None:
            return (self.out_size, self.out_size) if isinstance(self.out_size, int) else tuple(self.out_size)
        sizes = self._map_sizes[key]
        return max(h for h, _ in sizes), max(w for _, w in sizes)

    def _chunks(self, index: Tensor):
        return index.split(self.chunk_size or max(1, index.numel()))

    # ---- the two memory modes -----------------------------------------------------------

    def _keep(self, images, labels, groups, out_size, backend):
        with _frozen(self.models):
            parts = [self._parts(t, images, labels, create_graph=True) for t in self.targets]
        return self._reduce(self._variance(self._maps(parts, out_size, backend), backend), groups, backend)

    def maps_no_grad(self, images: Tensor, labels: Tensor, out_size, backend: str) -> Tensor:
        """U (K, B, P) with one model alive at a time and no graph kept (stream's first pass)."""
        B = images.shape[0]
        U = None
        with _frozen(self.models):
            for k, t in enumerate(self.targets):
                for idx in self._chunks(torch.arange(B, device=images.device)):
                    with torch.set_grad_enabled(self._gradcam(t)):
                        A, W, y = self._parts(t, images[idx].detach(), labels[idx], create_graph=False)
                    with torch.no_grad():
                        u = self._maps([(A.detach(), W.detach(), y)], out_size, backend)[0]
                    if U is None:
                        U = u.new_empty(len(self.targets), B, u.shape[-1])
                    U[k, idx] = u
        return U

    def images_grad(self, images: Tensor, labels: Tensor, dU: Tensor, out_size, backend: str, amp) -> Tensor:
        """d loss / d images from dU (K, B, P), one model at a time, only for images with dU != 0."""
        grad = torch.zeros_like(images)
        active = (dU != 0).flatten(2).any(-1).any(0).nonzero().flatten()
        with _frozen(self.models), _autocast(amp), torch.enable_grad():
            for k, t in enumerate(self.targets):
                for idx in self._chunks(active):
                    x = images[idx].detach().requires_grad_()
                    u = self._maps([self._parts(t, x, labels[idx], create_graph=True)], out_size, backend)[0]
                    (g,) = torch.autograd.grad(u, x, dU[k, idx].to(u.dtype))
                    grad.index_add_(0, idx, g.to(grad.dtype))
        return grad

    def forward(self, images: Tensor, labels: Tensor, groups: Optional[Tensor] = None) -> Tensor:
        """Scalar loss, differentiable with respect to ``images`` (B, C, H, W)."""
        checks.floating_tensor("images", images, "(B, C, H, W)")
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels: expected an integer tensor, got {type(labels).__name__}")
        checks.integer("labels", labels)
        if tuple(labels.shape) != (images.shape[0],):
            raise ValueError(f"labels: expected shape ({images.shape[0]},), got {tuple(labels.shape)}")
        groups = self.groups if groups is None else groups
        backend = backends.resolve(self.backend, images.device)
        out_size = self._prepare(images)
        if self.memory == "keep":
            return self._keep(images, labels, groups, out_size, backend)
        return _Streamed.apply(images, labels, groups, self, out_size, backend)


class _Streamed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, labels, groups, loss_fn: MetaDDLoss, out_size, backend):
        U = loss_fn.maps_no_grad(images, labels, out_size, backend)
        with torch.enable_grad():
            leaf = U.detach().requires_grad_()
            loss = loss_fn._reduce(loss_fn._variance(leaf, backend), groups, backend)
            (dU,) = torch.autograd.grad(loss, leaf)
        ctx.save_for_backward(images, labels, dU)
        ctx.loss_fn, ctx.out_size, ctx.backend = loss_fn, out_size, backend
        ctx.amp = _autocast_state(images.device.type)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad):
        images, labels, dU = ctx.saved_tensors
        g = ctx.loss_fn.images_grad(images, labels, dU * grad, ctx.out_size, ctx.backend, ctx.amp)
        if torch.is_grad_enabled():  # create_graph=True: g has no graph; say so rather than drop the second order
            g = torch._C._functions.DelayedError(_NO_DOUBLE_BACKWARD, 1)(g.detach().requires_grad_())
        return g, None, None, None, None, None


_NO_DOUBLE_BACKWARD = (b"MetaDDLoss(memory='stream'): double backward (the gradient of a gradient) is not implemented; "
                       b"use memory='keep' with backend='reference' for higher-order gradients (docs/ops.md section 7)")
