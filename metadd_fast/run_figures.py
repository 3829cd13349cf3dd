"""The pictures a distill run leaves in its folder: ``synthetic.png`` (a grid of the first
classes' synthetic images) and, with MetaDD, ``cams.png`` (each network's normalized CAM of
the first synthetic image of the first 6 classes)."""
from __future__ import annotations

import torch

from .data import denormalize
from .metadd_loss import MetaDDLoss
from .ops.backends import resolve
from .results import save_cam_figure, save_image_grid

__all__ = ["save_synthetic_grid", "save_cams"]


def save_synthetic_grid(path: str, images: torch.Tensor, ipc: int, mean, std, title: str,
                        classes: int = 10, per_class: int = 10) -> None:
    """PNG of the first ``classes`` classes x ``per_class`` images of a synthetic set ordered by
    class (``ipc`` per class; normalized with ``mean``/``std``), so a 1,000-class set stays
    readable (only the images shown are read from a memory-mapped set)."""
    n = min(classes, images.shape[0] // ipc)
    pick = torch.tensor([c * ipc + j for c in range(n) for j in range(min(ipc, per_class))])
    save_image_grid(path, denormalize(images[pick].float(), mean, std),
                    pick.div(ipc, rounding_mode="floor"), title)


def save_cams(path: str, metadd: MetaDDLoss, images: torch.Tensor, ipc: int, mean, std, names,
              classes: int = 6, to_networks=None) -> None:
    """PNG: the first synthetic image of each of the first ``classes`` classes and its
    normalized CAM under each MetaDD network (labels = class indices). ``to_networks``: what
    the networks see of an image, if not the image itself (a ZCA run's whitening)."""
    pick = torch.arange(min(classes, images.shape[0] // ipc)) * ipc
    x = images[pick].float()
    seen = (to_networks(x) if to_networks is not None else x).to(next(metadd.models[0].parameters()).device)
    y = pick.div(ipc, rounding_mode="floor").to(seen.device)
    out_size = metadd._prepare(seen)
    with torch.no_grad():
        U = metadd.maps_no_grad(seen, y, out_size, resolve(metadd.backend, seen.device))
    save_cam_figure(path, denormalize(x, mean, std), U.view(U.shape[0], U.shape[1], *out_size), list(names),
                    "normalized CAM per architecture")
