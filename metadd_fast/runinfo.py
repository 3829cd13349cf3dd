"""What a run's result depends on besides its configuration, kept in ``<out>/run.json``.

A distillation's synthetic set is bit-identical between runs only under the same settings:
the seed, the intra-op thread count (a float sum split over more threads is added in
another order), the deterministic-algorithm settings, the device type and the CPU's vector
instructions (the kernels PyTorch picks), and the library versions. The world size is
recorded too but does not change the result (ranks equal one process at equal threads).

:func:`collect` gathers these settings, :func:`note` keeps the first launch's under
``"environment"`` in ``run.json`` and, on a resume whose settings differ, warns in one line
naming what changed (:class:`ResumeWarning`) and appends the new settings to ``"resumes"``,
so the record says the result was made under mixed settings.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import warnings
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .results import atomic_write_json, load_json_object

__all__ = ["ResumeWarning", "collect", "changes", "note"]

# The settings that change the result; "world_size" is recorded but does not.
RESULT_KEYS = ("seed", "threads", "deterministic", "deterministic_warn_only", "cudnn_deterministic",
               "cudnn_benchmark", "float32_matmul_precision", "device_type", "cpu_capability", "versions")


class ResumeWarning(UserWarning):
    """A run resumed under settings other than those it started with (its result may then
    differ from an uninterrupted run's)."""


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect(seed: int, device: Optional[str] = None, group=None) -> dict:
    """This process's settings (a JSON object). In a ``torch.distributed`` run every rank of
    ``group`` must call it: ``threads`` is then the ranks' thread counts, one int when they
    agree, else the list by rank."""
    from . import __version__

    threads = torch.get_num_threads()
    world = 1
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size(group)
        every = [None] * world
        dist.all_gather_object(every, threads, group=group)
        threads = every[0] if len(set(every)) == 1 else every
    return {"seed": seed, "threads": threads, "world_size": world,
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "device_type": torch.device(device or "cpu").type,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "versions": {"metadd_fast": __version__, "torch": torch.__version__, "numpy": np.__version__,
                         "triton": _version("triton"), "python": platform.python_version()}}


def changes(old: dict, new: dict) -> list:
    """What differs between two :func:`collect` records among the settings that change the
    result, as ``"name old -> new"`` strings (versions per package)."""
    out = []
    for key in RESULT_KEYS:
        a, b = old.get(key), new.get(key)
        if key == "versions" and isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k} {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{key} {a} -> {b}")
    return out


def note(path: str, env: dict) -> list:
    """Record ``env`` (from :func:`collect`) in the run description ``path`` (``run.json``,
    created if absent, other keys kept): the first launch's settings under ``"environment"``.
    A later launch whose settings differ warns once (:class:`ResumeWarning`, one line naming
    what changed) and is appended to ``"resumes"``. Returns the changes (empty if none)."""
    run = load_json_object(path, "run description", "delete it or use --restart") if os.path.exists(path) else {}
    first = run.get("environment")
    if not isinstance(first, dict):
        run["environment"] = env
        atomic_write_json(run, path)
        return []
    changed = changes(first, env)
    if changed:
        warnings.warn(f"resuming {os.path.dirname(os.path.abspath(path))} under other settings than it started "
                      f"with ({', '.join(changed)}): the result may differ from an uninterrupted run's",
                      ResumeWarning, stacklevel=2)
        run["resumes"] = [*run.get("resumes", []), env]
        atomic_write_json(run, path)
    return changed
