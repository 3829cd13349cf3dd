"""metadd_fast: fused GPU (Triton) and CPU (C++) kernels for dataset distillation.

The op layer (:mod:`metadd_fast.ops`, contract in docs/ops.md):
:func:`class_activation_maps` and :func:`cam_variance` (MetaDD), :func:`cvar`,
:func:`cvar_dual` and :func:`metacam_cvar` (robust DD), :func:`nearest_centroid`;
each registered as a ``torch.library`` op when this package is imported. Every op
takes ``backend=None|"triton"|"cpp"|"reference"``; :mod:`metadd_fast.reference` holds
their plain-PyTorch versions. The application: :func:`kmeans`, :class:`MetaDDLoss` (the
memory-lean multi-architecture loss on images), :mod:`grouping`, :mod:`models`,
:mod:`distill`, :mod:`engine` and the CLI (``python -m metadd_fast.cli``).
"""
from . import ops, reference
from .ops import (BACKENDS, CAMVariance, CVaR, available, cam_variance, class_activation_maps, cvar, cvar_dual,
                  metacam_cvar, nearest_centroid)
from .kmeans import kmeans
from .adapters import CAMTarget, cam_target
from .metadd_loss import MetaDDLoss
# Not cli: `python -m metadd_fast.cli` would then find it imported before it runs (a runpy warning).
from . import distill, engine, grouping, models

__version__ = "0.1.0"

__all__ = ["BACKENDS", "available", "reference", "ops", "class_activation_maps", "cam_variance", "CAMVariance",
           "cvar", "cvar_dual", "metacam_cvar", "CVaR", "nearest_centroid", "kmeans", "CAMTarget", "cam_target",
           "MetaDDLoss", "grouping", "models", "distill", "engine"]
