"""Registration of the ops with ``torch.library`` and their dispatch (docs/ops.md section 8).

Every op is defined once in the ``metadd_fast`` namespace when the package is imported:
its schema and fake kernel (shapes and dtypes only, for meta/fake tensors and
torch.compile) here, its CUDA kernel (Triton) here, and, from C++ (``metadd_fast._C``,
``TORCH_LIBRARY_IMPL`` in ``csrc/<op>.cpp``, as torchvision's ``csrc/ops``), its CPU kernel
and, for a differentiable op, its autograd: one node whose backward calls the op's
backward, itself a registered op with per-device kernels. An eager CPU call so crosses no
Python between the argument checks and the kernels. A backward op's own derivative
(double backward, or a clear error) is registered here with :func:`register_double_backward`.

``backend="triton"`` on CPU tensors (the Triton interpreter, in tests) runs under
:class:`TritonOnCPU`, a dispatch mode that sends ``metadd_fast`` ops to their Triton
kernels. The C++ autograd keeps the dispatch modes of the forward and restores them for
the backward (``csrc/autograd_util.h``), so such a call stays on Triton through its backward.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode

from . import backends

__all__ = ["LIBRARY", "KernelOp", "TritonOnCPU", "dispatch_context", "register_double_backward", "linear_in_grad",
           "not_twice_differentiable"]

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
    """``metadd_fast::<name>``: its schema and fake kernel, and its CUDA kernel, registered now
    (its CPU kernel and autograd come from ``metadd_fast._C``).

    schema: the argument and return part, e.g. ``"(Tensor x) -> Tensor"``. kernel(launchers)
    returns the op's kernel built on a launcher namespace (the Triton launchers); without
    Triton no CUDA kernel is registered. Calling the KernelOp calls the op: in eager mode
    through ``metadd_fast._C.call_<name>`` where there is one (the same dispatcher call,
    entered unboxed: cheaper than ``torch.ops``), and through ``torch.ops`` while
    torch.compile traces.
    """

    def __init__(self, name: str, schema: str, kernel: Callable, fake: Callable):
        LIBRARY.define(name + schema)
        self.name = name
        self.op = getattr(getattr(torch.ops.metadd_fast, name), "default")
        self.eager = getattr(backends.CPP, f"call_{name}", None) if backends.available("cpp") else None
        if backends.available("triton"):
            triton_kernel = kernel(backends.TRITON)
            LIBRARY.impl(name, triton_kernel, "CUDA")
            _TRITON_KERNELS[self.op] = triton_kernel
        torch.library.register_fake(f"metadd_fast::{name}", fake, lib=LIBRARY)

    def __call__(self, *args):
        if self.eager is None or torch.compiler.is_compiling():
            return self.op(*args)
        return self.eager(*args)


def register_double_backward(backward: KernelOp, setup: Callable, double_grad: Callable) -> None:
    """Registers the derivative of a backward op (what a gradient of a gradient, create_graph=True,
    runs): ``setup(ctx, inputs, output)`` and ``double_grad(ctx, *grads)``, as
    ``torch.library.register_autograd`` takes them, run again under :class:`TritonOnCPU`
    when the backward op ran under it."""

    def setup_mode(ctx, inputs, output):
        setup(ctx, inputs, output)
        ctx.triton_on_cpu = _triton_on_cpu_active()

    def grad_mode(ctx, *grads):
        with TritonOnCPU() if ctx.triton_on_cpu else _NO_MODE:
            return double_grad(ctx, *grads)

    torch.library.register_autograd(f"metadd_fast::{backward.name}", grad_mode, setup_context=setup_mode, lib=LIBRARY)


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
