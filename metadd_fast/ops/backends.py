"""The kernels behind the ops, per device, and what ``backend=`` selects (docs/ops.md section 8).

Each op has one CPU kernel (C++, registered by ``metadd_fast._C``) and one CUDA kernel
(built on the Triton launchers of ``metadd_fast.kernels``), both loaded when the package
is imported; the launcher namespaces below are those of both devices. ``backend=None`` lets the dispatcher pick by device; ``"cpp"`` and
``"triton"`` only check that the device matches, except that ``"triton"`` on CPU
tensors (the Triton interpreter, ``TRITON_INTERPRET=1``) runs the Triton kernels under
:class:`~metadd_fast.ops.registry.TritonOnCPU`; ``"reference"`` runs plain PyTorch.
"""
from __future__ import annotations

import os
import types
import warnings
from typing import Optional

import torch

from . import checks

BACKENDS = ("triton", "cpp", "reference")


def _load_cpp():
    try:
        from metadd_fast import _C
    except ImportError as err:  # not built
        return err
    return _C


def _load_triton(cpp):
    if isinstance(cpp, ImportError):  # the ops' autograd, on every device, is registered by metadd_fast._C
        return ImportError(f"metadd_fast._C, which registers the ops' autograd, is not built: {cpp}")
    try:
        from metadd_fast.kernels import LAUNCHER_MODULES
    except ImportError as err:  # triton not installed
        return err
    return types.SimpleNamespace(**{k: getattr(m, k) for m in LAUNCHER_MODULES for k in dir(m) if not k.startswith("_")})


# The launcher namespaces (same function names and signatures in both), or the ImportError.
# Importing metadd_fast._C registers the CPU kernels and the autograd of the ops (csrc/<op>.cpp).
CPP = _load_cpp()
TRITON = _load_triton(CPP)
_LOADED = {"cpp": CPP, "triton": TRITON}


# The fused backend of each device type, and (backend=None's answer) those whose kernels are here.
_FUSED = {"cpu": "cpp", "cuda": "triton"}
_DEFAULT = {device: name for device, name in _FUSED.items() if not isinstance(_LOADED[name], ImportError)}


def available(name: str) -> bool:
    """Whether the ``"triton"`` or ``"cpp"`` kernels could be imported here."""
    return not isinstance(_LOADED[name], ImportError)


def unavailable_reason(name: str) -> str:
    """Why ``name``'s kernels are missing ("" if they are available)."""
    return "" if available(name) else str(_LOADED[name])


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(backend: Optional[str], device: torch.device) -> str:
    """The backend that runs on ``device``: "triton", "cpp", "reference" (or "meta" for meta tensors).

    ``None`` picks Triton for CUDA and C++ for CPU tensors, and falls back to the
    reference with a warning when those kernels are missing. A forced backend that
    cannot run raises a ValueError (wrong device) or RuntimeError (not installed).
    """
    if backend is None:
        if device.type in _DEFAULT:  # the common case, without a call
            return _DEFAULT[device.type]
        if device.type == "meta":  # shapes only: the ops' fake kernels
            return "meta"
        name = _FUSED.get(device.type)
        if name is not None and available(name):
            return name
        why = f"{name} backend unavailable: {_LOADED[name]}" if name else f"no fused backend for {device.type}"
        warnings.warn(f"metadd_fast: {why}; falling back to the reference implementation", RuntimeWarning)
        return "reference"
    checks.choice("backend", backend, BACKENDS)
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"backend: 'cpp' runs on CPU tensors, got tensors on {device}")
    if backend == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"backend: 'triton' runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported), got tensors on {device}")
    if backend != "reference" and not available(backend):
        raise RuntimeError(f"backend={backend!r} is not available: {_LOADED[backend]}")
    return backend
