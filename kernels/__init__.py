"""Triton kernels of metadd_fast (GPU; CPU tensors under TRITON_INTERPRET=1).

One module per op, each with its kernels and their launchers. The launchers
share their signatures with the C++ functions of ``metadd_fast._C``.
"""
from . import cam_maps, cvar, map_variance, nearest_centroid

LAUNCHER_MODULES = (cam_maps, map_variance, cvar, nearest_centroid)

__all__ = ["cam_maps", "map_variance", "cvar", "nearest_centroid", "LAUNCHER_MODULES"]
