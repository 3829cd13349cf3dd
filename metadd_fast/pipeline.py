"""End-to-end job behind ``metadd-fast distill``: a resumable distillation run (the demo: demo.py).

A run lives in an output folder: ``config.json`` (what was asked), ``state.pt``
(the distiller, saved atomically every ``checkpoint_every`` steps), cached
pre-trained networks, and at the end ``synthetic.pt`` (DC's format) with PNGs.
Restarting the same command continues from the last checkpoint; a folder that
holds a different run, or a corrupt checkpoint, is refused with a clear message.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm.auto import tqdm

from . import data as datasets
from .backends import resolve
from .distill import DISTILLERS, bn_teacher
from .metadd_loss import MetaDDLoss
from .models import get_model
from .results import atomic_save, save_cam_figure, save_image_grid, save_synthetic
from .training import train_model

__all__ = ["DistillConfig", "run_distill", "pretrained_models"]


@dataclass
class DistillConfig:
    dataset: str = "digits"
    data_path: Optional[str] = None
    size: int = 16
    method: str = "dm"
    ipc: int = 10
    iterations: int = 200
    lr: Optional[float] = None
    batch_real: int = 128
    arch: str = "ConvNet"
    metadd_weight: float = 0.0
    metadd_models: tuple = ("ConvNet", "ConvNetD1", "AlexNet", "LeNet")
    metadd_alpha: Optional[float] = None
    pretrain_epochs: int = 15
    robust_alpha: Optional[float] = None
    seed: int = 0
    checkpoint_every: int = 25
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["metadd_models"] = list(self.metadd_models)
        return d


def _load_checkpoint(path: str, what: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # any read failure means a corrupt file
        raise ValueError(f"{path}: corrupt {what} ({type(err).__name__}: {err}); delete it to start over") from err


def pretrained_models(names, train: datasets.Dataset, epochs: int, seed: int, cache: str, progress: bool = True):
    """Zoo networks trained on the real data (MetaDD's frozen models), cached in ``cache``."""
    models = []
    for i, name in enumerate(names):
        torch.manual_seed(seed + i)
        models.append(get_model(name, train.channel, train.num_classes, train.im_size))
    key = {"names": list(names), "epochs": epochs, "seed": seed, "im_size": list(train.im_size)}
    if os.path.exists(cache):
        saved = _load_checkpoint(cache, "pre-trained networks")
        if saved.get("key") == key:
            for m, sd in zip(models, saved["state_dicts"]):
                m.load_state_dict(sd)
            return [m.eval() for m in models]
    for i, m in enumerate(tqdm(models, desc="pre-train MetaDD networks", disable=not progress)):
        train_model(m, train.images, train.labels, epochs=epochs, seed=seed + i)
    atomic_save({"key": key, "state_dicts": [m.state_dict() for m in models]}, cache)
    return models


def run_distill(cfg: DistillConfig, out: str, *, progress: bool = True, shared_cache: Optional[str] = None) -> dict:
    """Distill (resuming from ``out`` if it holds this run). Returns {"images", "labels", "seconds"}."""
    os.makedirs(out, exist_ok=True)
    cfg_path, state_path = os.path.join(out, "config.json"), os.path.join(out, "state.pt")
    want = cfg.to_json()
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            try:
                have = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{cfg_path}: corrupt run config ({err}); delete {out} to start over") from err
        if have != want:
            diff = sorted(k for k in want if have.get(k) != want[k])
            raise ValueError(f"out: {out} holds a different run (differs in {', '.join(diff)}); "
                             f"use another --out or --restart")
    else:
        with open(cfg_path + ".tmp", "w") as f:
            json.dump(want, f, indent=1)
        os.replace(cfg_path + ".tmp", cfg_path)
    if cfg.method not in DISTILLERS:
        raise ValueError(f"method: expected one of {', '.join(DISTILLERS)}, got {cfg.method!r}")
    train = datasets.load(cfg.dataset, "train", path=cfg.data_path, size=cfg.size)
    cache = shared_cache or out
    metadd = None
    if cfg.metadd_weight:
        models = pretrained_models(cfg.metadd_models, train, cfg.pretrain_epochs, cfg.seed,
                                   os.path.join(cache, "metadd_models.pt"), progress)
        metadd = MetaDDLoss(models, alpha=cfg.metadd_alpha)
    kw = dict(lr=cfg.lr, batch_real=cfg.batch_real, arch=cfg.arch, metadd=metadd, metadd_weight=cfg.metadd_weight,
              robust_alpha=cfg.robust_alpha, seed=cfg.seed)
    if cfg.method == "sre2l":
        teacher_path = os.path.join(cache, "teacher.pt")
        if os.path.exists(teacher_path):
            teacher = _load_checkpoint(teacher_path, "teacher")
        else:
            teacher = bn_teacher(train, seed=cfg.seed)
            atomic_save(teacher, teacher_path)
        kw["teacher"] = teacher
    distiller = DISTILLERS[cfg.method](train, cfg.ipc, **kw)
    if os.path.exists(state_path):
        state = _load_checkpoint(state_path, "checkpoint")
        if not isinstance(state, dict) or "distiller" not in state or \
                state["distiller"]["images"].shape != distiller.images.shape:
            raise ValueError(f"{state_path}: checkpoint does not match this run; delete it to start over")
        distiller.load_state_dict(state["distiller"])
    start = time.perf_counter()
    bar = tqdm(total=cfg.iterations, initial=distiller.iteration, desc=f"distill {os.path.basename(out)}",
               disable=not progress)
    while distiller.iteration < cfg.iterations:
        terms = distiller.step()
        bar.update(1)
        bar.set_postfix({k: f"{v:.3g}" for k, v in terms.items()})
        if distiller.iteration % cfg.checkpoint_every == 0 or distiller.iteration == cfg.iterations:
            atomic_save({"distiller": distiller.state_dict()}, state_path)
    bar.close()
    images, labels = distiller.images.detach(), distiller.labels
    save_synthetic(os.path.join(out, "synthetic.pt"), images, labels)
    save_image_grid(os.path.join(out, "synthetic.png"), train.denormalize(images), labels,
                    f"{cfg.method.upper()} on {cfg.dataset}, IPC {cfg.ipc}")
    if metadd is not None:
        _save_cams(os.path.join(out, "cams.png"), metadd, images, labels, train, list(cfg.metadd_models))
    return {"images": images, "labels": labels, "seconds": time.perf_counter() - start}


def _save_cams(path, metadd: MetaDDLoss, images, labels, train, names, per_class: int = 1) -> None:
    """Normalized CAMs of the first synthetic image of each of the first 6 classes."""
    pick = torch.cat([(labels == c).nonzero().flatten()[:per_class] for c in labels.unique()[:6]])
    x, y = images[pick], labels[pick]
    out_size = metadd._prepare(x)
    with torch.no_grad():
        U = metadd.maps_no_grad(x, y, out_size, resolve(metadd.backend, x.device))
    save_cam_figure(path, train.denormalize(x), U.view(U.shape[0], U.shape[1], *out_size), names,
                    "normalized CAM per architecture")
