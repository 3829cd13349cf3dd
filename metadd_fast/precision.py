"""Precision of MetaDDLoss's frozen networks: "fp32" (as given), "bf16" or "fp16" (torch.autocast).

Under "bf16"/"fp16" the K networks' forward runs under ``torch.autocast(device, dtype)``
(their backward follows the dtypes the forward recorded); the fused CAM ops read the
low-precision features and accumulate in float32, and the image gradient comes back in
the images' dtype (autocast's casts are differentiable). docs/precision.md gives the
measured speed and the gradient's error against fp32.

Where the device has no fast support for the dtype, :func:`check` warns once per
(device type, precision) and runs anyway: on a CPU without AVX512-BF16 or AMX-BF16,
bfloat16 runs through conversions to float32 (slower than fp32); float16 on a CPU
without AVX512-FP16 or AMX-FP16 likewise (the CPU's fast low precision is bf16); on a
CUDA device without bfloat16 support (before compute capability 8.0), bf16 is emulated.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Optional

import torch

__all__ = ["PRECISIONS", "autocast", "check", "cpu_flags", "fast_on"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_CPU_FAST = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
_warned: set = set()


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU's feature flags (the ``flags`` line of /proc/cpuinfo; empty where unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def fast_on(precision: str, device: torch.device) -> bool:
    """Whether ``device`` computes ``precision`` natively (fp32 always does)."""
    if precision == "fp32":
        return True
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in _CPU_FAST[precision])
    if device.type == "cuda" and precision == "bf16":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cuda"


def check(precision: str, images: torch.Tensor) -> None:
    """Refuse what ``precision`` cannot do with ``images``; warn once where it runs slowly."""
    if precision == "fp32":
        return
    if images.dtype == torch.float64:
        raise ValueError(f"precision: {precision!r} runs float32 networks in low precision; "
                         f"got float64 images (use precision='fp32' for float64)")
    key = (images.device.type, precision)
    if key in _warned or fast_on(precision, images.device):
        return
    _warned.add(key)
    what = {"cpu": f"this CPU has none of {', '.join(_CPU_FAST[precision])}" if precision in _CPU_FAST else "",
            "cuda": "this GPU has no native bfloat16 (compute capability < 8.0)"}.get(images.device.type, "")
    warnings.warn(f"precision={precision!r}: {what or 'no fast support on ' + images.device.type}; the networks "
                  f"still run under autocast({PRECISIONS[precision]}), through conversions, likely slower than "
                  f"'fp32'", RuntimeWarning, stacklevel=3)


def autocast(precision: str, device_type: str):
    """The autocast context of ``precision`` on ``device_type`` (nothing for "fp32")."""
    dtype: Optional[torch.dtype] = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)
