"""metadd_fast: fused GPU (Triton) and CPU (C++) kernels for dataset distillation.

Public ops follow ``SPEC.md``: :func:`class_activation_maps` and :func:`cam_variance`
(MetaDD). Every op takes ``backend=None|"triton"|"cpp"|"reference"``.
"""
from . import reference
from .backends import BACKENDS, available
from .cam import CAMVariance, cam_variance, class_activation_maps

__version__ = "0.1.0"

__all__ = ["BACKENDS", "available", "reference", "class_activation_maps", "cam_variance", "CAMVariance"]
