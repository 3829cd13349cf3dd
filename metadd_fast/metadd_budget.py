"""Memory budget of MetaDDLoss's stream mode: how many images one chunk may hold.

A chunk's working memory is the autograd graph of the models that run on it at once.
That graph is measured, not guessed: :func:`saved_bytes` counts the tensors autograd
saves for the backward of one pass (each storage once, the model's own parameters
and buffers left out), on a probe of a few images; divided by the probe's size it
gives bytes per image, for any network, device or dtype. The backward holds gradient
buffers and workspaces beside the saved tensors: ``HEADROOM`` times the saved bytes
covers them (the largest overshoot measured, ResNet18's backward at 32x32 on chunks of
two images on the CPU, was 2.0x; whole batches stay near 1.0x).

:func:`chunk_images` plans a call from its budget: the budget given (``memory_budget``, in
MB), or by default ``FREE_SHARE`` of the memory free on the device (``torch.cuda.mem_get_info``
on CUDA, ``MemAvailable`` of /proc/meminfo on the CPU). When the whole batch's graph (what
``memory="keep"`` holds, times ``HEADROOM``) fits the budget, the call runs in one pass, as
``memory="keep"`` does: splitting would only cost time. Otherwise it is split into chunks
of as many images as the budget holds. Where the free memory is unknown and no budget is
given, the call runs in one pass.
"""
from __future__ import annotations

import itertools
import warnings
from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["FREE_SHARE", "HEADROOM", "saved_bytes", "free_bytes", "chunk_images"]

FREE_SHARE = 0.5  # default budget: this share of the device's free memory ("fits comfortably")
HEADROOM = 2.0  # peak of a pass with its backward / the bytes its graph saves
MB = 10**6


def saved_bytes(model: nn.Module, run: Callable[[], object]) -> int:
    """Bytes of the tensors that autograd saves while ``run()`` builds a graph: each storage
    counted once, ``model``'s parameters and buffers left out. The graph is freed on return."""
    own = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    seen: dict = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def free_bytes(device: torch.device) -> Optional[int]:
    """Free memory of ``device`` in bytes: CUDA's free memory, the CPU's MemAvailable; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def chunk_images(batch: int, per_image: int, whole_graph: int, fixed: int, whole_fixed: int,
                 budget_mb: Optional[float], device: torch.device) -> Optional[int]:
    """None when the whole batch runs in one pass (``whole_fixed + HEADROOM * whole_graph`` bytes
    fit the budget, or no budget is known), else images per chunk, in [1, batch], so that
    ``fixed + chunk * HEADROOM * per_image`` bytes fit it.

    batch: images in the call. per_image: saved graph bytes per image of what runs on one chunk.
    whole_graph: saved graph bytes of memory="keep" on the whole batch. fixed / whole_fixed:
    bytes held whatever the chunk (maps, their gradient, the image gradient) when split / in one
    pass. budget_mb: the budget in MB (10**6 bytes), or None for the default (see the module doc).
    """
    if budget_mb is not None:
        budget = budget_mb * MB
    else:
        budget = free_bytes(device)
        if budget is None:
            return None
        budget *= FREE_SHARE
    if whole_fixed + HEADROOM * whole_graph <= budget:
        return None
    per_image = HEADROOM * max(per_image, 1)
    chunk = int((budget - fixed) // per_image)
    if chunk < 1 and budget_mb is not None:
        warnings.warn(f"memory_budget: {budget_mb} MB is below the {(fixed + per_image) / MB:.1f} MB that one image "
                      f"needs; running one image at a time", stacklevel=3)
    return max(1, min(batch, chunk))
