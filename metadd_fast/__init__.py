"""metadd_fast: fused GPU (Triton) and CPU (C++) kernels for dataset distillation.

Public ops follow ``SPEC.md``: :func:`class_activation_maps` and :func:`cam_variance`
(MetaDD), :func:`cvar`, :func:`cvar_dual` and :func:`metacam_cvar` (robust DD),
:func:`nearest_centroid` and :func:`kmeans` (robust-DD grouping), and
:class:`MetaDDLoss`, the memory-lean multi-architecture loss on images.
Every op takes ``backend=None|"triton"|"cpp"|"reference"``.
"""
from . import reference
from .backends import BACKENDS, available
from .cam import CAMVariance, cam_variance, class_activation_maps
from .cvar import CVaR, cvar, cvar_dual, metacam_cvar
from .kmeans import kmeans, nearest_centroid
from .adapters import CAMTarget, cam_target
from .metadd_loss import MetaDDLoss

__version__ = "0.1.0"

__all__ = ["BACKENDS", "available", "reference", "class_activation_maps", "cam_variance", "CAMVariance", "cvar",
           "cvar_dual", "metacam_cvar", "CVaR", "nearest_centroid", "kmeans", "CAMTarget", "cam_target", "MetaDDLoss"]
