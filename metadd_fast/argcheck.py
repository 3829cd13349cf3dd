"""Argument checks of the library's public API, all run before any work.

Every check raises :class:`~metadd_fast.errors.InputTypeError` (a ``TypeError``) for a value
of the wrong type and :class:`~metadd_fast.errors.InputError` (a ``ValueError``) for a value
out of range, both ``InputError``, with one message: ``"<name>: expected <what>, got <given>"``.
So programs catch them as TypeError/ValueError or all at once as InputError, and the command
line reports them on one line (status 2).

The rules (docs/api_checks.md lists them per entry point): a bool is a bool; a count is an
int (never a bool or a float) in its range; a float is a real number (not a bool), finite
and in its range; a tensor has the dtype, dimensions and device the call needs; an argument
that does nothing in a configuration is refused (:func:`no_effect`); a size that would need
more memory than the device holds is refused before allocating (:func:`allocation`).
Each check returns the value normalized (``int``, ``float``, ...), so a caller can write
``ipc = argcheck.positive_int("ipc", ipc)``.

The tensor checks build on the op layer's (:mod:`metadd_fast.ops.checks`), which raise the
same errors.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence

import torch

from .errors import InputError, InputTypeError
from .ops.checks import allocation, choice, floating_tensor, index_range, integer as integer_tensor, same_device

__all__ = ["InputError", "InputTypeError", "MAX_COUNT", "MAX_SEED", "type_error", "value_error", "boolean",
           "integer", "positive_int", "nonnegative_int", "seed", "real", "finite_float", "positive_float",
           "nonnegative_float", "fraction", "choice", "optional", "instance", "function", "module", "no_effect",
           "string", "image_size", "device", "tensor", "images", "labels", "dataset", "same_device", "allocation"]

MAX_COUNT = 1 << 62  # larger counts cannot be held by any tensor index (int64)
MAX_SEED = 1 << 63  # torch generators and numpy take any seed in [0, 2**63)


def type_error(name: str, expected: str, value) -> InputTypeError:
    """``name: expected <expected>, got <type of value>``."""
    return InputTypeError(f"{name}: expected {expected}, got {_type_name(value)}")


def value_error(name: str, expected: str, value) -> InputError:
    """``name: expected <expected>, got <repr of value>``."""
    return InputError(f"{name}: expected {expected}, got {_short_repr(value)}")


def _type_name(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---- scalars -------------------------------------------------------------------------------------


def boolean(name: str, value) -> bool:
    """True or False (not 0/1, not None)."""
    if not isinstance(value, bool):
        raise type_error(name, "a bool", value)
    return value


def _num(v) -> str:
    """A bound as people read it: 2**62 rather than 4611686018427387904, 0 rather than 0.0."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, int) and abs(v) > 1 << 32:
        for k, rest in ((v.bit_length() - 1, ""), (v.bit_length(), " - 1")):
            if v == (1 << k) - bool(rest):
                return f"2**{k}{rest}"
    return str(v)


def _bounds(low, high, low_open: bool = False, high_open: bool = False) -> str:
    low, high = (None if b is None else _num(b) for b in (low, high))
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


def integer(name: str, value, low: Optional[int] = None, high: Optional[int] = None, *,
            top: int = MAX_COUNT, expected: Optional[str] = None) -> int:
    """An int (Python or numpy integer, never a bool or a float) in [low, high]; never above
    ``top`` (2**62: what an int64 index holds), which messages do not mention. ``expected``:
    the message's wording of the range (default: from low and high)."""
    expected = expected or " ".join(filter(None, ("an int", _bounds(low, high))))
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise type_error(name, expected, value)
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high) or value > top:
        raise value_error(name, expected + (f" and <= {_num(top)}" if value > top and high is None else ""), value)
    return value


def positive_int(name: str, value, high: int = MAX_COUNT) -> int:
    """A count: an int in [1, high] ("a positive int", as the command line words it)."""
    if high >= MAX_COUNT:
        return integer(name, value, 1, None, top=high, expected="a positive int")
    return integer(name, value, 1, high, top=high)


def nonnegative_int(name: str, value, high: int = MAX_COUNT) -> int:
    """An int in [0, high]."""
    return integer(name, value, 0, None if high >= MAX_COUNT else high, top=high)


def seed(name: str, value) -> int:
    """A random seed: an int in [0, 2**63)."""
    return integer(name, value, 0, MAX_SEED - 1, top=MAX_SEED - 1)


def real(name: str, value, low: Optional[float] = None, high: Optional[float] = None, *,
         low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (int or float, never a bool) in the range given by ``low``/``high``
    (closed unless ``low_open``/``high_open``)."""
    expected = " ".join(filter(None, ("a finite float", _bounds(low, high, low_open, high_open))))
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise type_error(name, expected, value)
    try:
        value = float(value)
    except OverflowError:  # an int beyond any float
        raise value_error(name, expected, value) from None
    if (not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low))
            or (high is not None and (value >= high if high_open else value > high))):
        raise value_error(name, expected, value)
    return value


def finite_float(name: str, value) -> float:
    """A finite float (NaN and infinities refused)."""
    return real(name, value)


def positive_float(name: str, value) -> float:
    """A finite float > 0 (learning rates, temperatures)."""
    return real(name, value, 0.0, low_open=True)


def nonnegative_float(name: str, value) -> float:
    """A finite float >= 0 (loss weights: 0 turns a term off)."""
    return real(name, value, 0.0)


def fraction(name: str, value) -> float:
    """A float in (0, 1] (CVaR tails, fractions of a set)."""
    return real(name, value, 0.0, 1.0, low_open=True)


def optional(check: Callable, name: str, value, *args, **kwargs):
    """None, or ``value`` passed by ``check(name, value, *args, **kwargs)``."""
    return None if value is None else check(name, value, *args, **kwargs)


def instance(name: str, value, types, expected: str):
    """``value`` if it is an instance of ``types``; InputTypeError saying ``expected`` otherwise."""
    if not isinstance(value, types):
        raise type_error(name, expected, value)
    return value


def function(name: str, value, expected: str = "a callable"):
    if not callable(value):
        raise type_error(name, expected, value)
    return value


def module(name: str, value) -> torch.nn.Module:
    """A torch.nn.Module."""
    return instance(name, value, torch.nn.Module, "a torch.nn.Module")


def no_effect(name: str, value, default, when: str) -> None:
    """Refuse an argument that does nothing in the configuration (``when`` says which): ``value``
    must be ``default`` (its default) there."""
    if value is default or (type(value) is type(default) and value == default):
        return
    raise InputError(f"{name}: has no effect {when}; expected {default!r} (the default), got {_short_repr(value)}")


def string(name: str, value, expected: str = "a non-empty str") -> str:
    if not isinstance(value, str):
        raise type_error(name, expected, value)
    if not value:
        raise value_error(name, expected, value)
    return value


def image_size(name: str, value, low: int = 1, high: int = 4096) -> tuple:
    """An image side or an (H, W) pair: ints in [low, high]; returns (H, W)."""
    expected = f"an int or a pair (H, W) of ints in [{low}, {high}]"
    pair = (value, value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    if not isinstance(pair, (tuple, list, torch.Size)) or len(pair) != 2:
        raise type_error(name, expected, value) if not isinstance(pair, (tuple, list, torch.Size)) \
            else value_error(name, expected, value)
    for s in pair:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise type_error(name, expected, value)
        if not low <= s <= high:
            raise value_error(name, expected, value)
    return tuple(int(s) for s in pair)


def device(name: str, value) -> Optional[torch.device]:
    """None, or a device this machine has: a name ("cpu", "cuda:0"), a torch.device or a CUDA index."""
    if value is None:
        return None
    expected = "None, a device name such as 'cpu' or 'cuda:0', or a torch.device"
    if isinstance(value, bool) or not isinstance(value, (str, torch.device, int)):
        raise type_error(name, expected, value)
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise value_error(name, expected, value) from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise InputError(f"{name}: expected a device this machine has, got {_short_repr(value)} "
                         f"({torch.cuda.device_count()} CUDA devices here)")
    return dev


# ---- tensors ---------------------------------------------------------------------------------------


def tensor(name: str, t, *, dtype: str = "floating", shape: Optional[Sequence[Optional[int]]] = None,
           device: Optional[torch.device] = None, nonempty: bool = True, finite: bool = False) -> torch.Tensor:
    """A tensor of the kind ``dtype`` ("floating", "integer", "any" or a torch.dtype), with
    ``len(shape)`` dimensions of the sizes given (None: any), on ``device`` (if given);
    non-empty unless ``nonempty=False``; free of NaN and Inf with ``finite=True``."""
    if not isinstance(t, torch.Tensor):
        raise type_error(name, "a torch.Tensor", t)
    if isinstance(dtype, torch.dtype):
        if t.dtype != dtype:
            raise InputTypeError(f"{name}: expected a {dtype} tensor, got {t.dtype}")
    elif dtype == "floating":
        if not t.dtype.is_floating_point:
            raise InputTypeError(f"{name}: expected a floating tensor, got {t.dtype}")
    elif dtype == "integer":
        integer_tensor(name, t)
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
            raise InputError(f"{name}: expected a tensor of shape {want}, got shape {tuple(t.shape)}")
    if nonempty and t.numel() == 0:
        raise InputError(f"{name}: expected a non-empty tensor, got shape {tuple(t.shape)}")
    if device is not None and t.device != torch.device(device):
        raise InputError(f"{name}: expected a tensor on {torch.device(device)}, got one on {t.device}")
    if finite and t.dtype.is_floating_point and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
        raise InputError(f"{name}: expected finite values, got NaN or Inf")
    return t


def images(name: str, t, *, channels: Optional[int] = None, min_size: int = 1, device=None,
           finite: bool = False) -> torch.Tensor:
    """A non-empty floating (B, C, H, W) tensor with ``channels`` channels (if given), H and W at
    least ``min_size``, on ``device`` (if given), finite with ``finite=True``."""
    floating_tensor(name, t, "(B, C, H, W)")
    if channels is not None and t.shape[1] != channels:
        raise InputError(f"{name}: expected {channels} channels (dim 1 of (B, C, H, W)), got shape {tuple(t.shape)}")
    if min(t.shape[2:]) < min_size:
        raise InputError(f"{name}: expected images of at least {min_size}x{min_size} pixels, "
                         f"got shape {tuple(t.shape)}")
    return tensor(name, t, device=device, finite=finite)


def labels(name: str, t, *, n: Optional[int] = None, num_classes: Optional[int] = None,
           device=None) -> torch.Tensor:
    """An integer (n,) tensor (any length if ``n`` is None) with values in [0, num_classes)
    (if given), on ``device`` (if given). The range is checked on the values' true min and max."""
    tensor(name, t, dtype="integer", shape=(n,), device=device, nonempty=False)
    if num_classes is not None:
        index_range(name, t, num_classes)
    return t


def dataset(name: str, value):
    """A :class:`metadd_fast.data.Dataset` whose images are a floating (N, C, H, W) tensor (or
    uint8 pixels, normalized per batch by ``Dataset.take``; N may be 0 for a chunk of classes
    whose images a method never reads) and whose labels are (N,) ints in [0, num_classes)."""
    from .data import Dataset

    instance(name, value, Dataset, "a metadd_fast.data.Dataset")
    if not isinstance(value.images, torch.Tensor) or value.images.dtype != torch.uint8:
        floating_tensor(f"{name}.images", value.images, "(N, C, H, W)", allow_empty=True)
    tensor(f"{name}.images", value.images, dtype="any", shape=(None, None, None, None), nonempty=False)
    classes = positive_int(f"{name}.num_classes", value.num_classes)
    labels(f"{name}.labels", value.labels, n=value.images.shape[0], num_classes=classes)
    return value
