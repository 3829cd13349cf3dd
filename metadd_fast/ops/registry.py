"""Registration of the ops with ``torch.library`` and their dispatch (docs/ops.md section 8).

Every op is defined once in the ``metadd_fast`` namespace when the package is imported:
a schema, a CPU kernel (C++), a CUDA kernel (Triton), a fake kernel (shapes and dtypes
only, for meta/fake tensors and torch.compile), and, for a differentiable op, one
autograd formula whose backward calls the op's backward, itself a registered op with
per-device kernels and its own autograd (double backward, or a clear error).

``backend="triton"`` on CPU tensors (the Triton interpreter, in tests) runs under
:class:`TritonOnCPU`, a dispatch mode that sends ``metadd_fast`` ops to their Triton
kernels. The autograd formula records whether it was active in the forward and runs
the backward op under it again, so such a call stays on Triton through its backward.

In eager mode the Python layers of a registered autograd formula (the generated
autograd.Function, redispatch) cost more than the kernels at DC shapes, so a
:class:`FusedOp` call with plain tensors and nothing tracing runs the same setup and
gradient formula through one plain ``torch.autograd.Function`` that calls the
device's kernels directly. Both paths compute with the same kernels and formula.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode

from . import backends

__all__ = ["LIBRARY", "KernelOp", "FusedOp", "TritonOnCPU", "dispatch_context", "untraced"]

LIBRARY = torch.library.Library("metadd_fast", "DEF")

_TRITON_KERNELS: dict = {}  # OpOverload -> its Triton kernel, for TritonOnCPU
_NO_MODE = contextlib.nullcontext()  # reentrant: one for every call


class TritonOnCPU(TorchDispatchMode):
    """Runs ``metadd_fast`` ops on CPU tensors with their Triton kernels (TRITON_INTERPRET=1)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _TRITON_KERNELS.get(func, func)(*args, **(kwargs or {}))


def _triton_on_cpu_active() -> bool:
    return isinstance(_get_current_dispatch_mode(), TritonOnCPU)


def dispatch_context(name: str, device: torch.device):
    """The context to call the ops in for the resolved backend ``name`` (docs/ops.md section 8):
    :class:`TritonOnCPU` for ``"triton"`` on CPU tensors, else a null context."""
    return TritonOnCPU() if name == "triton" and device.type == "cpu" else _NO_MODE


def device_kernels(device: torch.device):
    """The launcher namespace that runs on ``device`` in the current dispatch context."""
    return backends.TRITON if device.type == "cuda" or _triton_on_cpu_active() else backends.CPP


class KernelOp:
    """``metadd_fast::<name>``: its schema, per-device kernels and fake kernel, registered now.

    schema: the argument and return part, e.g. ``"(Tensor x) -> Tensor"``. kernel(launchers)
    returns the op's kernel built on a launcher namespace (``metadd_fast._C`` for the CPU,
    the Triton launchers for CUDA); a backend missing here registers no kernel. Calling
    the KernelOp calls the op.
    """

    def __init__(self, name: str, schema: str, kernel: Callable, fake: Callable):
        LIBRARY.define(name + schema)
        self.name = name
        self.op = getattr(getattr(torch.ops.metadd_fast, name), "default")
        self.kernels = {}
        if backends.available("cpp"):
            self.kernels["cpu"] = kernel(backends.CPP)
            LIBRARY.impl(name, self.kernels["cpu"], "CPU")
        if backends.available("triton"):
            self.kernels["cuda"] = kernel(backends.TRITON)
            LIBRARY.impl(name, self.kernels["cuda"], "CUDA")
            _TRITON_KERNELS[self.op] = self.kernels["cuda"]
        torch.library.register_fake(f"metadd_fast::{name}", fake, lib=LIBRARY)

    def __call__(self, *args):
        return self.op(*args)

    def kernel(self, device: torch.device) -> Optional[Callable]:
        """The kernel that the dispatcher would run for tensors on ``device`` here."""
        if device.type == "cpu" and _triton_on_cpu_active():
            return _TRITON_KERNELS.get(self.op)
        return self.kernels.get(device.type)


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


def _eager_function(setup_context: Callable, grad: Callable) -> type:
    # setup_context is called from forward (the classic form): a separate setup_context
    # staticmethod makes Function.apply bind arguments through inspect.signature, ~30 us a call.
    class EagerOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, layout, kernel, backward, device, *flat):
            inputs = _unflatten(layout, flat)
            output = kernel(*inputs)
            ctx.layout, ctx.backward, ctx.device = layout, backward, device
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            # create_graph=True: the registered backward op, whose autograd gives the second order.
            backward = ctx.backward.op if torch.is_grad_enabled() else ctx.backward.kernel(ctx.device)
            return (None, None, None, None, *_flatten_grads(ctx.layout, grad(ctx, backward, *grads)))

    return EagerOp


class FusedOp:
    """A differentiable op: ``forward`` and its ``backward`` (both :class:`KernelOp`), with
    autograd registered once.

    setup_context(ctx, inputs, output) saves what the gradient needs; grad(ctx, backward,
    *grads) is the one gradient formula: it returns one gradient per op argument (a list
    for a list argument), calling ``backward`` with the backward op's arguments.
    double_grad(ctx, *grads) is registered as the backward op's own autograd formula, with
    setup ``double_setup`` (both receive the backward op's inputs). Calling the FusedOp runs the op.
    """

    def __init__(self, forward: KernelOp, backward: KernelOp, setup_context: Callable, grad: Callable,
                 double_setup: Callable, double_grad: Callable):
        self.forward, self.backward, self.op = forward, backward, forward.op

        def setup(ctx, inputs, output):
            setup_context(ctx, inputs, output)
            ctx.triton_on_cpu = _triton_on_cpu_active()

        def registered_grad(ctx, *grads):
            with TritonOnCPU() if ctx.triton_on_cpu else _NO_MODE:
                return grad(ctx, backward.op, *grads)

        def double_setup_mode(ctx, inputs, output):
            double_setup(ctx, inputs, output)
            ctx.triton_on_cpu = _triton_on_cpu_active()

        def registered_double_grad(ctx, *grads):
            with TritonOnCPU() if ctx.triton_on_cpu else _NO_MODE:
                return double_grad(ctx, *grads)

        torch.library.register_autograd(f"metadd_fast::{forward.name}", registered_grad, setup_context=setup,
                                        lib=LIBRARY)
        torch.library.register_autograd(f"metadd_fast::{backward.name}", registered_double_grad,
                                        setup_context=double_setup_mode, lib=LIBRARY)

        self._eager = _eager_function(setup_context, grad)

    def __call__(self, *args):
        layout, flat = _flatten(args)
        if not untraced(flat):
            return self.op(*args)
        device = next(t.device for t in flat if isinstance(t, torch.Tensor))
        kernel = self.forward.kernels.get(device.type)
        if kernel is None or self.backward.kernels.get(device.type) is None:
            return self.op(*args)  # the dispatcher says what is missing
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in flat):
            return self._eager.apply(layout, kernel, self.backward, device, *flat)
        return kernel(*args)  # nothing to differentiate


def linear_in_grad(backward_op_name: str) -> tuple[Callable, Callable]:
    """(setup, double_grad) for a backward op that is linear in its first argument (a 0-d
    upstream gradient) and piecewise constant in the others (their derivative is zero
    almost everywhere): the gradient wrt ``grad`` is sum(gg * backward(1, ...))."""

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*[t if isinstance(t, torch.Tensor) else None for t in inputs])
        ctx.scalars = [None if isinstance(t, torch.Tensor) else t for t in inputs]

    def double_grad(ctx, *ggs):
        saved = [s if t is None else t for t, s in zip(ctx.saved_tensors, ctx.scalars)]
        op = getattr(torch.ops.metadd_fast, backward_op_name)
        unit = op(torch.ones_like(saved[0]), *saved[1:])
        unit = unit if isinstance(unit, (tuple, list)) else (unit,)
        d_grad = sum((gg * u).sum() for gg, u in zip(ggs, unit) if gg is not None)
        return (d_grad.to(saved[0].dtype).reshape(saved[0].shape), *[None] * (len(saved) - 1))

    return setup, double_grad


def not_twice_differentiable(op_name: str) -> tuple[Callable, Callable]:
    """(setup, double_grad) for a backward op without a second derivative here: a clear error
    when a gradient of the gradient is asked for, never a silent first-order result."""

    def setup(ctx, inputs, output):
        pass

    def double_grad(ctx, *grads):
        raise NotImplementedError(
            f"metadd_fast.{op_name}: double backward (the gradient of a gradient, create_graph=True) is not "
            f"implemented for this op; use backend='reference' for higher-order gradients (docs/ops.md section 7)")

    return setup, double_grad
