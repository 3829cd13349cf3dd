"""Plain PyTorch versions of the public ops.

Each is written beside its op (``metadd_fast/ops/<op>.py``, ``metadd_fast/kmeans.py``) and
gathered here under the public names. They follow docs/ops.md step by step. Run in float64,
they are the oracle of the tests; ``backend="reference"`` runs them. They build the full
autograd graph (one CAM per architecture, resize, stack, variance) and do no argument
checking beyond what PyTorch itself does. The benchmarks' eager baselines are the fastest
plain-PyTorch formulations instead (benchmarks/workloads_*.py).
"""
from .kmeans import kmeans_reference as kmeans
from .ops.cam_maps import cam_maps_reference as class_activation_maps
from .ops.cam_maps import normalized_maps, raw_cam
from .ops.cam_variance import cam_variance_reference as cam_variance
from .ops.cvar import cvar_dual_reference as cvar_dual
from .ops.cvar import cvar_reference as cvar
from .ops.cvar import group_means
from .ops.cvar import metacam_cvar_reference as metacam_cvar
from .ops.map_variance import map_variance_reference as map_variance
from .ops.nearest_centroid import nearest_centroid_reference as nearest_centroid

__all__ = ["raw_cam", "normalized_maps", "class_activation_maps", "map_variance", "cam_variance", "group_means", "cvar",
           "cvar_dual", "metacam_cvar", "nearest_centroid", "kmeans"]
