"""The demo (``metadd-fast demo``, ``make demo``): the study (:mod:`metadd_fast.study`) at small
settings (:func:`~metadd_fast.study.demo_config`: about 2 minutes on 2 quiet cores), plus
the pictures: a grid of each variant's synthetic set and the meta / heterogeneous CAM
regions of the initial images, DM's and DM + MetaDD's (seed 0), drawn from the saved cells."""
from __future__ import annotations

import os
from typing import Optional

import torch

from .metadd_loss import MetaDDLoss
from .ops.backends import resolve
from .results import load_synthetic, meta_regions, save_image_grid, save_meta_cam_figure
from .study import StudyConfig, _pretrained, _slug, cell_path, demo_config, load_task, run_study

__all__ = ["run_demo", "cam_stats"]


def cam_stats(metadd: MetaDDLoss, images: torch.Tensor, labels: torch.Tensor) -> tuple:
    """(meta share: the mean of the per-pixel minimum of the maps over the mean of the maps,
    the maps (K, B, S_h, S_w)) of ``metadd``'s networks on ``images``."""
    x = images.detach()
    with torch.no_grad():
        out_size = metadd._prepare(x)
        U = metadd.maps_no_grad(x, labels, out_size, resolve(metadd.backend, x.device))
    maps = U.view(U.shape[0], U.shape[1], *out_size)
    meta, _ = meta_regions(maps)
    return float(meta.mean() / maps.mean().clamp_min(1e-12)), maps


def run_demo(out: str = "demo_out", cfg: Optional[StudyConfig] = None, *, progress: bool = True,
             figure_images: int = 4) -> dict:
    """Run (or resume) the demo in ``out``: :func:`~metadd_fast.study.run_study` with the demo's
    settings, then synthetic_<variant>.png (seed 0) and demo_cam_regions.png. Returns the report."""
    cfg = cfg or demo_config()
    report = run_study(out, cfg, progress=progress, title="demo")
    train, val = load_task(cfg)[:2]
    metadd_nets, _, _ = _pretrained(cfg, train, val, out, progress=False)
    metadd = MetaDDLoss(metadd_nets)
    sets = {v: load_synthetic(cell_path(out, v, 0, "pt")) for v in cfg.variants}
    for v, (images, labels) in sets.items():
        save_image_grid(os.path.join(out, f"synthetic_{_slug(v)}.png"), train.denormalize(images), labels,
                        f"{v}, digits 32x32 with inverted minority, IPC {cfg.ipc}, seed 0")
    stages = [(name, v) for name, v in (("initial", "initial"), ("DM", "base"), ("DM+MetaDD", "+MetaDD"))
              if v in sets]
    if len(stages) > 1:
        labels = sets[stages[0][1]][1]
        pick = torch.stack([(labels == c).nonzero()[0, 0] for c in range(min(figure_images, train.num_classes))])
        rows = []
        for name, v in stages:
            images = sets[v][0]
            _, maps = cam_stats(metadd, images, labels)
            rows.append((name, train.denormalize(images[pick]), maps[:, pick]))
        save_meta_cam_figure(os.path.join(out, "demo_cam_regions.png"), rows, list(cfg.metadd_nets),
                             "normalized CAMs, meta region (minimum over networks) and what each network adds alone")
    return report
