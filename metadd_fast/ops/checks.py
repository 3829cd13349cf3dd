"""Argument checks shared by the public ops (docs/ops.md section 6).

Every check raises ``TypeError`` or ``ValueError`` naming the argument, what was
expected and what was given, before any kernel runs: the library's
:class:`~metadd_fast.errors.InputTypeError` and :class:`~metadd_fast.errors.InputError`,
so the command line and programs catch op errors like every other bad input.
"""
from __future__ import annotations

import functools
import os
from typing import Iterable, Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

from ..errors import InputError, InputTypeError

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor_list(name: str, value) -> list[torch.Tensor]:
    """``value`` as a list of tensors; TypeError unless it is a list or tuple of tensors."""
    if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
        raise InputTypeError(f"{name}: expected a list or tuple of tensors, got {type(value).__name__}")
    for i, t in enumerate(value):
        if not isinstance(t, torch.Tensor):
            raise InputTypeError(f"{name}[{i}]: expected a torch.Tensor, got {type(t).__name__}")
    return list(value)


def floating(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOATING:
        raise InputTypeError(f"{name}: expected a floating tensor (float16, bfloat16, float32, float64), got {t.dtype}")


def floating_tensor(name: str, t, layout: str, allow_empty: bool = False) -> None:
    """A floating tensor with the dimensions of ``layout``, e.g. "(B, C, H, W)"; non-empty
    unless ``allow_empty``."""
    if not isinstance(t, torch.Tensor):
        raise InputTypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    floating(name, t)
    ndim = layout.count(",") + (not layout.endswith(",)"))
    if t.dim() != ndim:
        raise InputError(f"{name}: expected a {ndim}-D {layout} tensor, got shape {tuple(t.shape)}")
    if not allow_empty:
        nonempty(name, t)


def integer(name: str, t: torch.Tensor) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise InputTypeError(f"{name}: expected an integer tensor, got {t.dtype}")


def nonempty(name: str, t: torch.Tensor) -> None:
    if t.numel() == 0:
        raise InputError(f"{name}: expected a non-empty tensor, got shape {tuple(t.shape)}")


def same_device(named: Iterable[tuple[str, torch.Tensor]]) -> torch.device:
    """The one device of all named tensors; ValueError naming the first that differs."""
    named = list(named)
    first_name, first = named[0]
    device = first.device
    for name, t in named[1:]:
        if t.device != device:
            raise InputError(f"{name}: expected a tensor on {device} (like {first_name}), got {t.device}")
    return device


def choice(name: str, value, choices: Sequence):
    """``value`` if it is one of ``choices`` (compared by type and value, so a tensor or a
    list is refused, not compared elementwise)."""
    if not any(type(value) is type(c) and value == c for c in choices):
        raise InputError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def index_range(name: str, t: torch.Tensor, upper: int) -> None:
    """Values of the integer tensor ``t`` lie in [0, upper). Skipped where the values are not
    known: while tracing for torch.compile, on meta and fake tensors."""
    if torch.compiler.is_compiling() or t.numel() == 0 or t.device.type == "meta" or is_fake(t):
        return
    lo, hi = (int(v) for v in torch.aminmax(t))
    if lo < 0 or hi >= upper:
        raise InputError(f"{name}: expected values in [0, {upper}), got values in [{lo}, {hi}]")


@functools.lru_cache(maxsize=None)
def device_memory(device: torch.device) -> int:
    """Bytes a tensor on ``device`` could hold at most: the GPU's memory, the host's physical
    memory for CPU tensors, the int64 limit elsewhere (meta)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 2 ** 63 - 1


SMALL_ALLOCATION = 1 << 26  # 64 MB: every device holds it


def allocation(name: str, nbytes: int, device: torch.device, what: str) -> None:
    """ValueError naming ``name`` when ``what`` (bytes counted with Python ints, so no product
    overflows) would need more than ``device`` holds or than int64 can count: checked before
    anything is allocated. Skipped while tracing for torch.compile, and for requests under
    ``SMALL_ALLOCATION`` bytes, which every device holds (they cost a system call per op call)."""
    if nbytes < SMALL_ALLOCATION or torch.compiler.is_compiling():
        return
    limit = device_memory(torch.device(device))
    if nbytes > limit:
        raise InputError(f"{name}: {what} would need {nbytes} bytes, more than the {limit} bytes {device} can hold")
