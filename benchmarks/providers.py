"""The three providers of every benchmark: eager reference, torch.compile(reference), fused."""
from __future__ import annotations

import torch

PROVIDERS = ("eager", "compile", "fused")
_compiled: dict = {}


def pick(ops: dict, op: str, provider: str):
    """The loss function of ``op`` (ops[op] = (reference, fused)) for one provider."""
    ref, fused = ops[op]
    if provider == "eager":
        return ref
    if provider == "compile":
        if op not in _compiled:
            _compiled[op] = torch.compile(ref)
        return _compiled[op]
    return fused
