"""MetaDDLoss: K frozen networks turned into one differentiable loss on the synthetic images.

    loss_fn = MetaDDLoss([convnet, resnet, vgg, alexnet])
    loss = task_loss + lam * loss_fn(images, labels)
    loss.backward()

memory="keep": one forward per model; autograd keeps every model's activations.
memory="stream" (default): the images go through in chunks sized by a memory budget
(:mod:`metadd_fast.metadd_budget`), so the peak is the budget, not the K graphs of
the whole batch:

- mean over images (``alpha=None``): each image's loss term depends on that image
  alone, so each chunk runs all K models with their graphs, and the image gradient
  of the chunk is taken at once, in the forward call; ``backward`` scales it by the
  incoming gradient. One forward and one backward per model and image: no re-run.
- CVaR (``alpha``): the tail is known only once every image's variance is. A first
  pass runs each model alone under no_grad and keeps only its CAM maps U_k
  (B, S_h*S_w); the loss and dloss/dU come from those. The backward re-runs one model
  at a time, only on the images whose CVaR weight is non-zero, and pushes its
  gradient into the images.

The chunks come from the graph bytes per image measured on the first call and a budget:
``memory_budget`` (MB), or by default half the device's free memory. When the whole
batch's graph fits the budget, stream mode runs it in one pass, as memory="keep" does
(so the default splits only where memory is short); ``chunk_size`` sets the chunk directly.

The networks are submodules (``.networks``), so ``.to()``, ``.cuda()``, ``.double()`` and
``torch.compile`` of the loss reach them, but frozen ones: ``parameters()`` and ``modules()``
of the loss (or of a module holding it) do not list them, ``train()``/``eval()`` and
``apply()`` do not reach them, and ``state_dict()`` leaves them out unless
``save_networks=True``. They run in eval mode with requires_grad off, and their modes and
flags are restored afterwards; no parameter gradient is ever computed.
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .adapters import CAMTarget, cam_target
from . import argcheck
from .errors import InputError, InputTypeError, first_line
from .ops import backends, checks
from .ops.cam_args import NORMS
from .ops.cam_maps import cam_maps_of_parts
from .ops.cvar import check_alpha, cvar
from .ops.map_variance import map_variance
from .metadd_budget import chunk_images, saved_bytes
from . import precision as _precision

__all__ = ["MetaDDLoss"]


@contextlib.contextmanager
def _frozen(models):
    """Eval mode and requires_grad off for the block; the previous state, each submodule's mode
    and each parameter's flag, restored after."""
    modes = [(sub, sub.training) for m in models for sub in m.modules()]
    flags = [(p, p.requires_grad) for m in models for p in m.parameters()]
    for m in models:
        m.eval()
        m.requires_grad_(False)
    try:
        yield
    finally:
        for sub, training in modes:
            sub.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


class _FrozenNetworks(nn.ModuleList):
    """The K networks of a MetaDDLoss: submodules that ``.to()``/``.half()``/``.cuda()`` (``_apply``)
    and ``repr`` reach, kept out of what would train, re-initialize or save them: ``named_modules``
    (hence ``parameters()``, ``buffers()``, ``modules()`` of every module above) yields this
    container alone, ``train()`` and ``apply()`` stop here, and ``state_dict()`` holds them only
    with ``save``; loading a state dict without them leaves them as they are."""

    def __init__(self, networks, save: bool):
        super().__init__(networks)
        self.save = save
        self.register_load_state_dict_pre_hook(_keep_unsaved_networks)

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        if memo is None:
            memo = set()
        if self not in memo or not remove_duplicate:
            memo.add(self)
            yield prefix, self

    def train(self, mode: bool = True):
        self.training = mode  # the networks keep their own modes (the loss runs them in eval mode)
        return self

    def apply(self, fn):
        fn(self)
        return self

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        if self.save:
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        return OrderedDict() if destination is None else destination


def _keep_unsaved_networks(module: _FrozenNetworks, state_dict, prefix, *args) -> None:
    """A state dict that does not hold the networks (saved with save_networks=False) loads
    without touching them: their own tensors stand in for the missing entries."""
    if not any(key.startswith(prefix) for key in state_dict):
        state_dict.update(nn.ModuleList.state_dict(module, prefix=prefix, keep_vars=True))


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
    images (a default for ``forward``'s ``groups``; with ``alpha`` only). memory: "stream" or
    "keep". chunk_size: images per chunk in stream mode. memory_budget: MB for stream mode's
    chunks. backend: as the fused ops. save_networks: whether ``state_dict()`` holds the
    networks' weights (default False: a checkpoint of a module holding the loss stays small).
    precision: "fp32" (default; the networks as they are, under any enclosing autocast),
    "bf16" or "fp16": the networks' forward under torch.autocast of that dtype, the CAM ops
    accumulating in float32, the image gradient in the images' dtype
    (:mod:`metadd_fast.precision`, docs/precision.md).
    """

    def __init__(self, models: Sequence, *, mode: str = "cam", out_size=None, relu: bool = True,
                 norm: str = "minmax", eps: float = 1e-8, alpha: Optional[float] = None,
                 groups: Optional[Tensor] = None, num_groups: Optional[int] = None, memory: str = "stream",
                 chunk_size: Optional[int] = None, memory_budget: Optional[float] = None,
                 backend: Optional[str] = None, save_networks: bool = False, precision: str = "fp32"):
        super().__init__()
        if isinstance(models, (nn.Module, CAMTarget)) or not isinstance(models, (list, tuple)):
            raise InputTypeError(f"models: expected a list of networks, got {type(models).__name__}")
        if len(models) < 2:
            raise InputError(f"models: expected K >= 2 networks, got {len(models)}")
        for k, m in enumerate(models):
            argcheck.instance(f"models[{k}]", m, (nn.Module, CAMTarget), "an nn.Module or a CAMTarget")
        checks.choice("mode", mode, ("cam", "gradcam"))
        checks.choice("memory", memory, ("stream", "keep"))
        checks.choice("norm", norm, NORMS)
        argcheck.boolean("relu", relu)
        argcheck.boolean("save_networks", save_networks)
        eps = argcheck.nonnegative_float("eps", eps)
        out_size = argcheck.optional(argcheck.image_size, "out_size", out_size)
        checks.choice("precision", precision, tuple(_precision.PRECISIONS))
        if alpha is not None:
            check_alpha(alpha)
        else:
            for name, value in (("groups", groups), ("num_groups", num_groups)):
                argcheck.no_effect(name, value, None, "without alpha (a CVaR over groups needs the tail fraction)")
        num_groups = argcheck.optional(argcheck.positive_int, "num_groups", num_groups)
        if groups is not None:
            argcheck.instance("groups", groups, Tensor, "None or an integer tensor")
            checks.integer("groups", groups)
        chunk_size = argcheck.optional(argcheck.positive_int, "chunk_size", chunk_size)
        memory_budget = argcheck.optional(argcheck.positive_float, "memory_budget", memory_budget)
        if memory == "keep":
            argcheck.no_effect("chunk_size", chunk_size, None, "with memory='keep' (it sets stream mode's chunks)")
            argcheck.no_effect("memory_budget", memory_budget, None, "with memory='keep' (it sets stream mode's chunks)")
        elif chunk_size is not None:
            argcheck.no_effect("memory_budget", memory_budget, None, "with chunk_size (which sets the chunks itself)")
        self.targets = [cam_target(m) for m in models]
        for k, t in enumerate(self.targets):  # probe errors and warnings name the network
            t.name = f"models[{k}] ({type(t.model).__name__})"
        self.networks = _FrozenNetworks([t.model for t in self.targets], save_networks)
        self.mode, self.memory, self.chunk_size, self.backend = mode, memory, chunk_size, backend
        self.memory_budget, self.precision = memory_budget, precision
        self.out_size, self.relu, self.norm, self.eps = out_size, relu, norm, eps
        self.alpha, self.groups, self.num_groups = alpha, groups, num_groups
        self._map_sizes: dict = {}
        self._graph_sizes: dict = {}

    def extra_repr(self) -> str:
        names = ", ".join(type(t.model).__name__ for t in self.targets)
        return f"[{names}], mode={self.mode!r}, memory={self.memory!r}, alpha={self.alpha}, precision={self.precision!r}"

    @property
    def models(self) -> list:
        return [t.model for t in self.targets]

    def starting_weight(self, images: Tensor, labels: Tensor, method_grad, fraction: float = 0.5) -> dict:
        """The weight ``w`` of this term (``loss = method_loss + w * metadd(images, labels)``) whose
        gradient at ``images`` (the initial synthetic images) is ``fraction`` of the method's:
        ``w * ||d metadd / d images|| = fraction * ||d method_loss / d images||``.

        method_grad: the method's gradient with respect to ``images`` (a tensor), its norm (a
        float), or a list of either (their norms' mean: methods that draw a random network per
        step, as DM and DC do). fraction: a positive float (0.5: the demo's). Returns {"weight",
        "fraction", "method_grad_norm", "metadd_grad_norm"}; ``images`` is left unchanged.
        """
        fraction = argcheck.positive_float("fraction", fraction)
        grads = method_grad if isinstance(method_grad, (list, tuple)) else [method_grad]
        if not grads:
            raise InputError("method_grad: expected a gradient, a norm or a list of them, got an empty list")
        norms = [float(g.detach().double().norm()) if isinstance(g, Tensor) else g for g in grads]
        if not all(isinstance(n, (int, float)) and not isinstance(n, bool) and 0 < n < math.inf for n in norms):
            raise InputError(f"method_grad: expected gradients with finite non-zero norms, got norms {norms}")
        x = images.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(self(x, labels), x)
        metadd_norm = float(g.double().norm())
        if not 0 < metadd_norm < math.inf:
            raise InputError(f"images: the term's gradient on them has norm {metadd_norm}; no weight makes it a "
                             f"fraction of the method's")
        method_norm = sum(norms) / len(norms)
        return {"weight": fraction * method_norm / metadd_norm, "fraction": fraction, "method_grad_norm": method_norm,
                "metadd_grad_norm": metadd_norm}

    # ---- pieces ---------------------------------------------------------------------------

    def _parts(self, t: CAMTarget, images: Tensor, labels: Tensor, create_graph: bool):
        """(A, weight in the form of docs/ops.md section 1, labels or None) of one model on ``images``."""
        if self._gradcam(t):
            return _gradcam_parts(t, images, labels, create_graph, self.precision)
        with _precision.autocast(self.precision, images.device.type):
            A, _ = t.run(images)
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

    def _check_call(self, images, labels, groups) -> Optional[Tensor]:
        """The call's arguments against each other and the networks' placement; ``groups`` or
        the default given to the constructor."""
        checks.floating_tensor("images", images, "(B, C, H, W)")
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels: expected an integer tensor, got {type(labels).__name__}")
        checks.integer("labels", labels)
        if tuple(labels.shape) != (images.shape[0],):
            raise InputError(f"labels: expected shape ({images.shape[0]},), got {tuple(labels.shape)}")
        checks.same_device([("images", images), ("labels", labels)])
        if groups is not None and self.alpha is None:
            raise InputError("groups: a CVaR over groups needs the loss's alpha (the tail fraction); "
                             "got groups with alpha=None")
        amp = torch.is_autocast_enabled(images.device.type)
        for t in self.targets:
            p = next((p for p in (*t.model.parameters(), *t.model.buffers()) if p.is_floating_point()), None)
            if p is not None and (p.device != images.device or (p.dtype != images.dtype and not amp)):
                raise InputError(f"images: {images.dtype} on {images.device}, but {t.name} holds {p.dtype} on "
                                 f"{p.device}; move the loss and its networks with .to(images) (or the images)")
        return self.groups if groups is None else groups

    def _prepare(self, images: Tensor) -> tuple:
        """Probe every model once per input shape: head kinds, classes and the common map size.
        The probe sees the first two images with non-finite pixels set to 0 (what it decides
        belongs to the networks, not to the pixels)."""
        key = tuple(images.shape[1:])
        if key not in self._map_sizes:
            probe = torch.nan_to_num(images[:2].detach(), nan=0.0, posinf=0.0, neginf=0.0)
            with _frozen(self.models), torch.no_grad():
                sizes = []
                for t in self.targets:
                    _check_channels(t, images)
                    try:
                        t.probe(probe)
                        sizes.append(tuple(t.run(probe[:1])[0].shape[2:]))
                    except RuntimeError as err:  # the network's own forward refused the images
                        raise InputError(f"images: {t.name} cannot run on images of shape (C, H, W) = {key}: "
                                         f"{first_line(err)}") from err
            if len({t.classes for t in self.targets}) > 1:
                raise InputError("models: expected networks that score the same classes, got "
                                 + ", ".join(f"{t.classes} for {t.name}" for t in self.targets))
            self._map_sizes[key] = sizes
        if self.out_size is not None:
            return self.out_size
        sizes = self._map_sizes[key]
        return max(h for h, _ in sizes), max(w for _, w in sizes)

    def _classes(self) -> int:
        """Classes the networks score (labels index them; all the same, checked by the probe)."""
        return self.targets[0].classes

    def _graph_bytes(self, images: Tensor, labels: Tensor, out_size, backend: str) -> list:
        """Graph bytes per image of each model's pass with create_graph (as in :meth:`_variances`
        and :meth:`images_grad`), measured once per input shape, dtype and autocast state on
        (at most) 2 images."""
        key = (tuple(images.shape[1:]), images.dtype, images.device, _autocast_state(images.device.type),
               self.precision)
        if key not in self._graph_sizes:
            n = min(2, images.shape[0])
            x, y = torch.nan_to_num(images[:n].detach(), nan=0.0, posinf=0.0, neginf=0.0), labels[:n]
            sizes = []
            with _frozen(self.models), torch.enable_grad():
                for t in self.targets:
                    run = lambda: self._maps([self._parts(t, x.requires_grad_(), y, create_graph=True)],  # noqa: E731
                                             out_size, backend)
                    sizes.append(saved_bytes(t.model, run) / n)
            self._graph_sizes[key] = sizes
        return self._graph_sizes[key]

    def _chunk(self, images: Tensor, labels: Tensor, out_size, backend: str, together: bool) -> Optional[int]:
        """Images per chunk in stream mode: ``chunk_size``, or what the budget allows when the K
        models run on a chunk ``together`` (their graphs summed) or one at a time (the largest);
        None (one pass, every graph kept, as memory="keep") when the whole batch fits the budget."""
        if self.chunk_size is not None:
            return self.chunk_size
        sizes = self._graph_bytes(images, labels, out_size, backend)
        B, K = images.shape[0], len(self.targets)
        P = out_size[0] * out_size[1]
        whole_fixed = images.numel() * images.element_size() + K * B * P * 8
        fixed = images.numel() * images.element_size() + (0 if together else 2 * K * B * P * 8)
        per_image = sum(sizes) if together else max(sizes)
        return chunk_images(B, int(per_image), int(B * sum(sizes)), fixed, whole_fixed, self.memory_budget,
                            images.device)

    # ---- the two memory modes -----------------------------------------------------------

    def _variances(self, images: Tensor, labels: Tensor, out_size, backend: str) -> Tensor:
        """v (B,): every model's graph kept, one forward each."""
        with _frozen(self.models):
            parts = [self._parts(t, images, labels, create_graph=True) for t in self.targets]
        return self._variance(self._maps(parts, out_size, backend), backend)

    def maps_no_grad(self, images: Tensor, labels: Tensor, out_size, backend: str,
                     chunk: Optional[int] = None) -> Tensor:
        """U (K, B, P) with one model alive at a time, ``chunk`` images at a time (default
        ``chunk_size``, else all), and no graph kept (the CVaR stream's first pass)."""
        B = images.shape[0]
        chunk = chunk or self.chunk_size or B
        U = None
        with _frozen(self.models):
            for k, t in enumerate(self.targets):
                for idx in torch.arange(B, device=images.device).split(chunk):
                    with torch.set_grad_enabled(self._gradcam(t)):
                        A, W, y = self._parts(t, images[idx].detach(), labels[idx], create_graph=False)
                    with torch.no_grad():
                        u = self._maps([(A.detach(), W.detach(), y)], out_size, backend)[0]
                    if U is None:
                        U = u.new_empty(len(self.targets), B, u.shape[-1])
                    U[k, idx] = u
        return U

    def images_grad(self, images: Tensor, labels: Tensor, dU: Tensor, out_size, backend: str, amp,
                    chunk: int) -> Tensor:
        """d loss / d images from dU (K, B, P), one model at a time, ``chunk`` images at a time,
        only for images with dU != 0."""
        grad = torch.zeros_like(images)
        active = (dU != 0).flatten(2).any(-1).any(0).nonzero().flatten()
        with _frozen(self.models), _autocast(amp), torch.enable_grad():
            for k, t in enumerate(self.targets):
                for idx in active.split(chunk):
                    x = images[idx].detach().requires_grad_()
                    u = self._maps([self._parts(t, x, labels[idx], create_graph=True)], out_size, backend)[0]
                    (g,) = torch.autograd.grad(u, x, dU[k, idx].to(u.dtype))
                    grad.index_add_(0, idx, g.to(grad.dtype))
        return grad

    def forward(self, images: Tensor, labels: Tensor, groups: Optional[Tensor] = None) -> Tensor:
        """Scalar loss, differentiable with respect to ``images`` (B, C, H, W). In stream mode
        without ``alpha``, the image gradient is computed here when ``images`` requires grad
        (call under ``torch.no_grad()`` for the loss value alone)."""
        groups = self._check_call(images, labels, groups)
        _precision.check(self.precision, images)
        backend = backends.resolve(self.backend, images.device)
        out_size = self._prepare(images)
        K, B, P = len(self.targets), images.shape[0], out_size[0] * out_size[1]
        checks.allocation("out_size", 2 * K * B * P * 8, images.device, f"CAM maps of {K} x {B} x {out_size} pixels")
        checks.index_range("labels", labels, self._classes())  # all of them, before any chunk runs
        together = self.alpha is None
        chunk = self._chunk(images, labels, out_size, backend, together) if self.memory == "stream" else None
        if not (torch.is_grad_enabled() and images.requires_grad):  # the value alone, no graph kept
            with torch.no_grad():
                U = self.maps_no_grad(images, labels, out_size, backend, chunk)
                return self._reduce(self._variance(U, backend), groups, backend)
        if chunk is None:  # memory="keep", or a stream whose whole graph fits its budget
            return self._reduce(self._variances(images, labels, out_size, backend), groups, backend)
        if together:
            return _Chunked.apply(images, labels, self, out_size, backend, chunk)
        return _Streamed.apply(images, labels, groups, self, out_size, backend, chunk)


@torch.compiler.disable
def _gradcam_parts(t: CAMTarget, images: Tensor, labels: Tensor, create_graph: bool, precision: str) -> tuple:
    """(A, Grad-CAM weights (B, C), None) of one network on ``images``, its forward under
    ``precision``'s autocast. Eager under torch.compile: the weights are d score / d A, and a
    compiled region does not expose its inner map A to autograd."""
    with _precision.autocast(precision, images.device.type):
        A, logits = t.run(images, leaf=not create_graph)
    return A, t.gradcam_weights(A, logits, labels, create_graph), None


def _check_channels(t: CAMTarget, images: Tensor) -> None:
    """The images' channels against the network's first convolution, where it has one."""
    conv = next((m for m in t.model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if conv is not None and conv.in_channels != images.shape[1]:
        raise InputError(f"images: expected {conv.in_channels} channels (the input of {t.name}), got "
                         f"{images.shape[1]} (shape {tuple(images.shape)})")


class _Chunked(torch.autograd.Function):
    """Mean over images: every model on one chunk at a time; the image gradient of each chunk
    taken in the forward (the loss is linear in the per-image terms), scaled in the backward."""

    @staticmethod
    def forward(ctx, images, labels, loss_fn: MetaDDLoss, out_size, backend, chunk):
        B = images.shape[0]
        grad = torch.zeros_like(images)
        loss = 0.0
        for start in range(0, B, chunk):
            part = slice(start, start + chunk)
            with torch.enable_grad():
                x = images[part].detach().requires_grad_()
                term = loss_fn._variances(x, labels[part], out_size, backend).sum() / B
                (g,) = torch.autograd.grad(term, x)
            grad[part] = g
            loss = loss + term.detach()
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return _no_double_backward(grad * grad_loss), None, None, None, None, None


class _Streamed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, labels, groups, loss_fn: MetaDDLoss, out_size, backend, chunk):
        U = loss_fn.maps_no_grad(images, labels, out_size, backend, chunk)
        with torch.enable_grad():
            leaf = U.detach().requires_grad_()
            loss = loss_fn._reduce(loss_fn._variance(leaf, backend), groups, backend)
            (dU,) = torch.autograd.grad(loss, leaf)
        ctx.save_for_backward(images, labels, dU)
        ctx.loss_fn, ctx.out_size, ctx.backend, ctx.chunk = loss_fn, out_size, backend, chunk
        ctx.amp = _autocast_state(images.device.type)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad):
        images, labels, dU = ctx.saved_tensors
        g = ctx.loss_fn.images_grad(images, labels, dU * grad, ctx.out_size, ctx.backend, ctx.amp, ctx.chunk)
        return _no_double_backward(g), None, None, None, None, None, None


_NO_DOUBLE_BACKWARD = (b"MetaDDLoss(memory='stream'): double backward (the gradient of a gradient) is not implemented; "
                       b"use memory='keep' with backend='reference' for higher-order gradients (docs/ops.md section 7)")


def _no_double_backward(g: Tensor) -> Tensor:
    """``g`` as it is; under create_graph=True (grad mode on in a backward), with a graph whose own
    backward raises: a gradient of this gradient is an error, never a silent first-order result."""
    if torch.is_grad_enabled():
        return torch._C._functions.DelayedError(_NO_DOUBLE_BACKWARD, 1)(g.detach().requires_grad_())
    return g
