"""Small helpers shared by the Triton launchers."""
from __future__ import annotations

import contextlib

import torch
import triton.language as tl


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    """The triton.language dtype of a float32 or float64 torch dtype."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def as_index(t: torch.Tensor) -> torch.Tensor:
    """An integer index tensor (int32 or int64, any strides, storage offset or stride-0
    expansion) as the kernels read it: contiguous int64 (copied only when it is not)."""
    return t.to(torch.int64).contiguous()


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU (a no-op for CPU tensors under TRITON_INTERPRET=1)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
