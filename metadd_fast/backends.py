"""Which kernels run: CUDA tensors -> Triton, CPU tensors -> C++, ``backend=`` to force one.

Both fused backends expose the same launcher functions (``cam_maps_forward``,
``map_variance_forward``, ``cvar_tail``, ... and their backwards);
``kernels(name)`` returns the namespace that holds them.
"""
from __future__ import annotations

import importlib
import os
import types
import warnings
from typing import Optional

import torch

from . import checks

BACKENDS = ("triton", "cpp", "reference")

_loaded: dict[str, object] = {}


def _load(name: str):
    """The backend's kernel namespace, or the ImportError that prevents it (cached)."""
    if name not in _loaded:
        try:
            if name == "cpp":
                _loaded[name] = importlib.import_module("metadd_fast._C")
            else:
                mods = importlib.import_module("metadd_fast.kernels").LAUNCHER_MODULES
                ns = types.SimpleNamespace(**{k: getattr(m, k) for m in mods for k in dir(m) if not k.startswith("_")})
                _loaded[name] = ns
        except ImportError as err:  # not built / triton not installed
            _loaded[name] = err
    return _loaded[name]


def available(name: str) -> bool:
    """Whether the ``"triton"`` or ``"cpp"`` backend can be imported here."""
    return not isinstance(_load(name), ImportError)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels(name: str):
    """The launcher namespace of a fused backend (raises if it is missing)."""
    mod = _load(name)
    if isinstance(mod, ImportError):
        raise RuntimeError(f"backend={name!r} is not available: {mod}")
    return mod


def resolve(backend: Optional[str], device: torch.device) -> str:
    """The backend to run on ``device``.

    ``None`` picks Triton for CUDA and C++ for CPU tensors, and falls back to the
    reference with a warning when that backend is missing. A forced backend that
    cannot run raises a ValueError (wrong device) or RuntimeError (not installed).
    """
    if backend is None:
        name = "triton" if device.type == "cuda" else "cpp" if device.type == "cpu" else None
        if name is not None and available(name):
            return name
        why = f"{name} backend unavailable: {_load(name)}" if name else f"no fused backend for {device.type}"
        warnings.warn(f"metadd_fast: {why}; falling back to the reference implementation", RuntimeWarning)
        return "reference"
    checks.choice("backend", backend, BACKENDS)
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"backend: 'cpp' runs on CPU tensors, got tensors on {device}")
    if backend == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"backend: 'triton' runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported), got tensors on {device}")
    if backend != "reference":
        kernels(backend)
    return backend
