"""CAM adapters: find a network's last feature map and classifier head.

``cam_target(model, layer=None, head=None)`` returns a :class:`CAMTarget`. The
layer and head are found in this order:

1. ``layer=``/``head=`` given as module names or modules (torch-cam's habit);
2. the zoo's ``cam_layer``/``cam_head`` attributes (metadd_fast.models);
3. torchvision/timm attribute patterns: ``layer4``+``fc`` (ResNet), ``inception5b``+``fc``
   (GoogLeNet), ``features``+``classifier`` (VGG, AlexNet, MobileNet, EfficientNet,
   DenseNet), ``forward_features``-style timm models through rule 4;
4. a probe on the first batch: the module that finishes last with a 4-D output
   whose map has more than one pixel, and the last ``nn.Linear`` run.

A map of one pixel (DC's VGG11 or torchvision's MobileNetV2 at 32x32) makes every CAM
constant, so the probe refuses it (ValueError naming the network); a map that is
constant over its pixels on the probe batch gets a warning naming the network.

The head kind is then checked numerically on that first batch: a linear layer
that maps the global average of the map to the logits is a ``"linear"`` head,
one that maps the flattened map is a ``"flatten"`` head, and anything else
(an MLP, a ReLU or dropout in between) uses Grad-CAM weights.
"""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["CAMTarget", "cam_target"]

ModuleRef = Union[str, nn.Module, None]
_PATTERNS = (("layer4", "fc"), ("inception5b", "fc"), ("features", "classifier"))


def _resolve(model: nn.Module, ref: ModuleRef, what: str) -> Optional[nn.Module]:
    if ref is None or isinstance(ref, nn.Module):
        return ref
    if isinstance(ref, str):
        try:
            return model.get_submodule(ref)
        except AttributeError as err:
            raise ValueError(f"{what}: {type(model).__name__} has no submodule {ref!r}") from err
    raise TypeError(f"{what}: expected a module name, a module or None, got {type(ref).__name__}")


def _last_linear(module: Optional[nn.Module]) -> Optional[nn.Linear]:
    if module is None:
        return None
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


class CAMTarget:
    """One frozen network seen as (feature map A, CAM weights).

    kind: "linear" (weights (N, C): linear head after global average pooling),
    "flatten" (weights (N, C, H, W): flatten + linear head) or "gradcam" (per-image
    weights (B, C): the spatial mean of d score / d A). Decided on the first batch, with
    ``classes``: the labels it takes, the head's rows (or the logits' for Grad-CAM).
    """

    def __init__(self, model: nn.Module, layer: Optional[nn.Module], head: Optional[nn.Module]):
        self.model, self.layer, self.head = model, layer, head
        self.kind: Optional[str] = None
        self.weights_vary: Optional[bool] = None  # whether Grad-CAM weights depend on A (decided by probe)
        self.classes: Optional[int] = None  # classes its CAM can take as labels (decided by probe)
        self.name = type(model).__name__  # in messages; MetaDDLoss names it models[k] (Class)

    def __repr__(self) -> str:
        return f"CAMTarget({type(self.model).__name__}, kind={self.kind or 'undecided'})"

    def run(self, images: Tensor, leaf: bool = False) -> tuple[Tensor, Tensor]:
        """(A (B, C, H, W), logits (B, N)) from one forward pass of the model. With ``leaf``,
        A is a new leaf that requires grad (the rest of the model runs from it), for
        Grad-CAM weights without a graph back to the images."""
        captured = []

        def hook(module, inputs, output):
            if leaf:
                output = output.detach().requires_grad_()
            captured.append(output)
            return output

        hook = self.layer.register_forward_hook(hook)
        try:
            logits = self.model(images)
        finally:
            hook.remove()
        if not captured:
            raise ValueError(f"layer: {type(self.layer).__name__} did not run in {type(self.model).__name__}.forward")
        return captured[-1], logits

    def probe(self, images: Tensor) -> None:
        """Decide the layer (if still unknown) and the head kind on a few images."""
        if self.kind is not None:
            return
        with torch.no_grad():
            if self.layer is None:
                self.layer, last_linear = _probe_modules(self.model, images)
                self.head = self.head or last_linear
            A, logits = self.run(images)
        if A.dim() != 4:
            raise ValueError(f"layer: expected a 4-D (B, C, H, W) feature map from {type(self.layer).__name__}, "
                             f"got shape {tuple(A.shape)}")
        _check_map(self.name, A, images.shape[2:])
        self.kind = _head_kind(_last_linear(self.head), A, logits)
        self.classes = logits.shape[-1] if self.kind == "gradcam" else _last_linear(self.head).out_features
        self.weights_vary = self._gradcam_weights_vary(images)

    def _gradcam_weights_vary(self, images: Tensor) -> bool:
        """Whether the Grad-CAM weights depend on A. They do not (almost everywhere) when the
        part of the network after A is piecewise linear in A (linear layers, ReLU, max-pooling,
        flatten, and dropout and batch norm in eval mode): the score's gradient is then piecewise
        constant, so the weights' derivative is zero and taking them as constants changes no
        gradient while sparing the second-order graph through the head. Checked numerically on
        the probe batch: the derivative of a fixed random projection of the weights is exactly zero."""
        with torch.enable_grad():
            A, logits = self.run(images, leaf=True)
            w = self.gradcam_weights(A, logits, logits.argmax(1), create_graph=True)
            if not w.requires_grad:
                return False
            g = torch.Generator(device=w.device).manual_seed(0)
            v = torch.randn(w.shape, generator=g, device=w.device, dtype=w.dtype)
            (d,) = torch.autograd.grad((w * v).sum(), A, allow_unused=True)
        return d is not None and bool((d != 0).any())

    def head_weight(self, A: Tensor) -> Tensor:
        """The class-indexed head weight, detached (the network is frozen): (N, C) for
        "linear", (N, C, H, W) for "flatten"."""
        w = _last_linear(self.head).weight.detach()
        return w if self.kind == "linear" else w.reshape(w.shape[0], *A.shape[1:])

    def gradcam_weights(self, A: Tensor, logits: Tensor, labels: Tensor, create_graph: bool) -> Tensor:
        """(B, C) Grad-CAM channel weights: the spatial mean of d logit[y] / d A. With
        ``create_graph`` they keep a graph back to A, unless the probe found that they do not
        depend on A (``weights_vary`` False: a piecewise-linear head)."""
        score = logits.gather(1, labels[:, None]).sum()
        (grad,) = torch.autograd.grad(score, A, create_graph=create_graph and self.weights_vary is not False)
        return grad.mean(dim=(2, 3))


def _probe_modules(model: nn.Module, images: Tensor) -> tuple[nn.Module, Optional[nn.Linear]]:
    finished, linears = [], []

    def hook(module, inputs, output):
        if isinstance(output, Tensor) and output.dim() == 4 and output.shape[2] * output.shape[3] > 1:
            finished.append(module)
        if isinstance(module, nn.Linear):
            linears.append(module)

    hooks = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        model(images)
    finally:
        for h in hooks:
            h.remove()
    if not finished:
        raise ValueError(f"cam_target: found no 4-D feature map with more than one pixel in {type(model).__name__}; "
                         f"pass layer= (a module name or module)")
    return finished[-1], (linears[-1] if linears else None)


def _check_map(name: str, A: Tensor, image_size) -> None:
    """Refuse a 1x1 feature map, warn about one constant over its pixels: either gives a constant
    CAM, which adds nothing to MetaDD's cross-architecture variance but its weight."""
    H, W = A.shape[2:]
    size = "x".join(str(int(s)) for s in image_size)
    if H * W == 1:
        raise ValueError(f"models: {name} gives a 1x1 CAM map on {size} images (its CAM is constant); use "
                         f"larger images, pass layer= (an earlier feature map) or leave it out")
    if bool((A.amax(dim=(2, 3)) == A.amin(dim=(2, 3))).all()):
        warnings.warn(f"{name}: its {H}x{W} CAM feature map is constant over its pixels on the probe batch "
                      f"({size} images), so its CAM is constant", stacklevel=3)


def _head_kind(linear: Optional[nn.Linear], A: Tensor, logits: Tensor) -> str:
    if linear is None or logits.dim() != 2:
        return "gradcam"
    C, H, W = A.shape[1:]
    tol = dict(rtol=1e-4, atol=1e-4 * float(logits.abs().max()) + 1e-6)
    with torch.no_grad():
        if linear.in_features == C and torch.allclose(linear(A.mean(dim=(2, 3))), logits, **tol):
            return "linear"
        if linear.in_features == C * H * W and torch.allclose(linear(A.flatten(1)), logits, **tol):
            return "flatten"
    return "gradcam"


def cam_target(model: nn.Module, layer: ModuleRef = None, head: ModuleRef = None) -> CAMTarget:
    """Adapter of ``model`` for CAM losses; see the module docstring for how layers are found."""
    if isinstance(model, CAMTarget):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    layer_m, head_m = _resolve(model, layer, "layer"), _resolve(model, head, "head")
    if layer_m is None and isinstance(getattr(model, "cam_layer", None), str):
        layer_m = model.get_submodule(model.cam_layer)
        head_m = head_m or (model.get_submodule(model.cam_head) if model.cam_head else None)
    if layer_m is None:
        for layer_name, head_name in _PATTERNS:
            if hasattr(model, layer_name) and hasattr(model, head_name):
                layer_m, head_m = getattr(model, layer_name), head_m or getattr(model, head_name)
                break
    return CAMTarget(model, layer_m, head_m)
