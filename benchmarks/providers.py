"""The providers of every benchmark (eager reference, torch.compile(reference), fused) and the
timed call of each mode (forward, backward, full)."""
from __future__ import annotations

import os

import torch
from measure import Call

PROVIDERS = ("eager", "compile", "fused")
MODES = ("forward", "backward", "full")
_compiled: dict = {}


def pick(ops: dict, op: str, provider: str):
    """The loss function of ``op`` (ops[op] = (reference, fused)) for one provider."""
    ref, fused = ops[op]
    if provider == "eager":
        return ref
    if provider == "compile":
        if op not in _compiled:
            _compiled[op] = torch.compile(ref, backend=os.environ.get("METADD_COMPILE_BACKEND", "inductor"))
        return _compiled[op]
    return fused


def timed_call(mod, op: str, provider: str, mode: str, inputs) -> Call:
    """The Call timed for one mode of a workloads module ``mod``:

    - "forward": ``mod.run`` under no_grad, so no graph is kept;
    - "full": ``mod.run``, then the gradient to ``mod.leaves(inputs)``;
    - "backward": that gradient alone; the setup, untimed, builds a fresh graph before each
      call (retain_graph would not do: torch.compile's backward donates its buffers).
    """
    if mode == "forward":
        def forward():
            with torch.no_grad():
                return mod.run(op, provider, inputs)
        return Call(forward)
    leaves = mod.leaves(inputs)
    if mode == "full":
        return Call(lambda: torch.autograd.grad(mod.run(op, provider, inputs), leaves))
    if mode != "backward":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    graph = {}

    def build():
        graph["loss"] = mod.run(op, provider, inputs)

    return Call(lambda: torch.autograd.grad(graph.pop("loss"), leaves), setup=build)
