"""The op layer of metadd_fast (docs/ops.md): one module per op, each registered with
``torch.library`` (schema, CPU kernel in C++, CUDA kernel in Triton, fake kernel,
autograd) when this package is imported, and its checked public function.

- :mod:`.cam_maps`: ``class_activation_maps`` (``metadd_fast::cam_maps``)
- :mod:`.map_variance`: ``map_variance`` (``metadd_fast::map_variance``)
- :mod:`.cam_variance`: ``cam_variance``, ``CAMVariance`` (``metadd_fast::cam_variance``)
- :mod:`.cvar`: ``cvar``, ``cvar_dual``, ``metacam_cvar``, ``CVaR`` (``metadd_fast::cvar``, ``cvar_dual``)
- :mod:`.nearest_centroid`: ``nearest_centroid`` (``metadd_fast::nearest_centroid``)

:mod:`.registry` holds the registration and dispatch, :mod:`.backends` the kernels per
device and what ``backend=`` selects, :mod:`.checks` / :mod:`.cam_args` the argument checks.
"""
from .backends import BACKENDS, available
from .cam_maps import class_activation_maps
from .cam_variance import CAMVariance, cam_variance
from .cvar import CVaR, cvar, cvar_dual, metacam_cvar
from .map_variance import map_variance
from .nearest_centroid import nearest_centroid

__all__ = ["BACKENDS", "available", "class_activation_maps", "map_variance", "cam_variance", "CAMVariance", "cvar",
           "cvar_dual", "metacam_cvar", "CVaR", "nearest_centroid"]
