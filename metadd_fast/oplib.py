"""Differentiable custom ops with an eager fast path.

Every differentiable op of this package is a ``torch.library`` custom op with a fake
implementation and an autograd formula whose backward is a custom op too, so
``torch.compile(fullgraph=True)``, ``opcheck`` and AOT autograd see through it.

In eager mode the custom-op layers (the Python autograd wrapper, redispatch, the
dynamo-disable wrapper) cost about 45 us per call on the CPU, more than the kernels
themselves at DC shapes (B = 10: 5-30 us). So :class:`FusedOp` runs the same
implementation, context setup and gradient formula through a plain
``torch.autograd.Function`` when nothing is tracing: not inside torch.compile, no
dispatch mode (fake or functional tensors), no torch.func transform, only plain tensors. Both paths compute
with the same functions; only the dispatch differs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["FusedOp", "untraced"]


def _flatten(args: tuple) -> tuple:
    """(layout, flat): list arguments spread out (layout[i] = their length, None for others)."""
    layout, flat = [], []
    for a in args:
        if isinstance(a, (list, tuple)):
            layout.append(len(a))
            flat.extend(a)
        else:
            layout.append(None)
            flat.append(a)
    return tuple(layout), flat


def _unflatten(layout: tuple, flat) -> tuple:
    out, i = [], 0
    for n in layout:
        if n is None:
            out.append(flat[i])
            i += 1
        else:
            out.append(list(flat[i:i + n]))
            i += n
    return tuple(out)


def _flatten_grads(layout: tuple, grads: tuple) -> list:
    flat = []
    for n, g in zip(layout, grads):
        if n is None:
            flat.append(g)
        else:
            flat.extend(g if g is not None else [None] * n)
    return flat


def untraced(flat) -> bool:
    """True in plain eager mode: no tracing, no dispatch mode, no torch.func transform, no
    tensor subclasses."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    return all(type(t) is torch.Tensor for t in flat if isinstance(t, torch.Tensor))


def _eager_function(impl: Callable, setup_context: Callable, grad: Callable) -> type:
    # setup_context is called from forward (the classic form): a separate setup_context
    # staticmethod makes Function.apply bind arguments through inspect.signature, ~30 us a call.
    class EagerOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, layout, *flat):
            inputs = _unflatten(layout, flat)
            output = impl(*inputs)
            ctx.layout = layout
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return (None, *_flatten_grads(ctx.layout, grad(ctx, *grads)))

    return EagerOp


class FusedOp:
    """``metadd_fast::<name>`` and ``metadd_fast::<name>_backward`` as custom ops.

    impl / backward_impl: the implementations, with type annotations (they give the
    schemas); fake / backward_fake: their meta versions. setup_context(ctx, inputs,
    output) saves what the gradient needs; grad(ctx, backward, *grads) returns one
    gradient per op argument (a list for a list argument), calling ``backward`` with
    backward_impl's arguments. Calling the FusedOp runs the op.
    """

    def __init__(self, name: str, impl: Callable, fake: Callable, backward_impl: Callable, backward_fake: Callable,
                 setup_context: Callable, grad: Callable):
        self.op = torch.library.custom_op(f"metadd_fast::{name}", impl, mutates_args=())
        self.op.register_fake(fake)
        self.backward_op = torch.library.custom_op(f"metadd_fast::{name}_backward", backward_impl, mutates_args=())
        self.backward_op.register_fake(backward_fake)
        self.op.register_autograd(lambda ctx, *g: grad(ctx, self.backward_op, *g), setup_context=setup_context)
        self._impl = impl
        self._eager = _eager_function(impl, setup_context, lambda ctx, *g: grad(ctx, backward_impl, *g))

    def __call__(self, *args):
        layout, flat = _flatten(args)
        if not untraced(flat):
            return self.op(*args)
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in flat):
            return self._eager.apply(layout, *flat)
        return self._impl(*args)  # nothing to differentiate
