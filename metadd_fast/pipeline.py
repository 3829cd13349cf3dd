"""End-to-end job behind ``metadd-fast distill``: a resumable distillation run (the demo: demo.py).

A run lives in an output folder: ``config.json`` (what was asked), ``state.pt``
(the distiller, saved atomically every ``checkpoint_every`` steps), cached
pre-trained networks, ``run.json`` (the settings the result depends on:
:mod:`metadd_fast.runinfo`), and at the end ``synthetic.pt`` (DC's format) with PNGs.
Restarting the same command continues from the last checkpoint. Every file of the folder
is read as data (JSON, or torch.load with weights_only=True: checkpoints hold tensors and
plain containers, networks their state_dicts), and checked before anything is written: a
folder that holds a different run, or a corrupt or foreign file, is refused with an
InputError that names the file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from . import data as datasets
from . import runinfo
from .ops.backends import resolve
from .distill import DISTILLERS, bn_teacher
from .errors import InputError, first_line, load_failure
from .metadd_loss import MetaDDLoss
from .models import get_model
from .results import atomic_save, atomic_write_json, load_json_object, save_cam_figure, save_image_grid, save_synthetic
from .training import train_model
from .zca import ZCA

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
    robust_weight: float = 1.0
    zca: bool = False
    seed: int = 0
    checkpoint_every: int = 25
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["metadd_models"] = list(self.metadd_models)
        return d


def _load_checkpoint(path: str, what: str):
    """A checkpoint read as data (torch.load with weights_only=True: tensors and plain
    containers only, so a crafted file cannot run code); InputError naming the file otherwise."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any read failure: a corrupt file, or one that names code to run
        refused, detail = load_failure(err)
        if refused:
            raise InputError(f"{path}: refused: the {what} holds more than tensors and plain containers "
                             f"({detail}); delete it to start over") from err
        raise InputError(f"{path}: corrupt {what} ({detail}); delete it to start over") from err


def _load_into(module: nn.Module, state_dict, path: str, what: str) -> None:
    """``module.load_state_dict(state_dict)``; InputError naming ``path`` if it does not fit."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise InputError(f"{path}: the {what} does not fit this run ({first_line(err)}); "
                         f"delete it to start over") from err


def _cached_models(path: str, key: dict) -> Optional[list]:
    """The state_dicts of MetaDD's pre-trained networks cached in ``path`` for ``key``, or None
    (no cache, or one made for other networks, which is then rebuilt)."""
    if not os.path.exists(path):
        return None
    saved = _load_checkpoint(path, "pre-trained networks")
    if not isinstance(saved, dict) or not isinstance(saved.get("state_dicts"), list):
        raise InputError(f"{path}: expected {{'key': ..., 'state_dicts': [...]}}; delete it to start over")
    return saved["state_dicts"] if saved.get("key") == key else None


def pretrained_models(names, train: datasets.Dataset, epochs: int, seed: int, cache: str, progress: bool = True):
    """Zoo networks trained on the real data (MetaDD's frozen models), cached in ``cache``
    (their state_dicts, read back as data)."""
    models = []
    for i, name in enumerate(names):
        torch.manual_seed(seed + i)
        models.append(get_model(name, train.channel, train.num_classes, train.im_size))
    key = {"names": list(names), "epochs": epochs, "seed": seed, "im_size": list(train.im_size)}
    saved = _cached_models(cache, key)
    if saved is not None and len(saved) == len(models):
        for m, sd in zip(models, saved):
            _load_into(m, sd, cache, "pre-trained network")
        return [m.eval() for m in models]
    for i, m in enumerate(tqdm(models, desc="pre-train MetaDD networks", disable=not progress)):
        train_model(m, train.images, train.labels, epochs=epochs, seed=seed + i)
    atomic_save({"key": key, "state_dicts": [m.state_dict() for m in models]}, cache)
    return models


def _teacher(train: datasets.Dataset, seed: int, path: str) -> nn.Module:
    """SRe2L's BatchNorm teacher, cached in ``path`` as its state_dict."""
    if os.path.exists(path):
        teacher = bn_teacher(train, epochs=0, seed=seed)  # the architecture, untrained
        _load_into(teacher, _load_checkpoint(path, "teacher"), path, "teacher")
        return teacher.eval()
    teacher = bn_teacher(train, seed=seed)
    atomic_save(teacher.state_dict(), path)
    return teacher


def _read_config(path: str, want: dict, out: str) -> None:
    """Refuse a run folder whose config.json is unreadable or describes another run."""
    have = load_json_object(path, "run config", f"delete {out} or use --restart")
    if have != want:
        diff = sorted(k for k in want if have.get(k) != want[k])
        raise InputError(f"out: {out} holds a different run (differs in {', '.join(diff) or 'extra keys'}); "
                         f"use another --out or --restart")


def _read_state(path: str, shape: tuple) -> Optional[dict]:
    """The distiller's checkpoint in ``path`` (None if there is none), checked against the
    synthetic set's ``shape``."""
    if not os.path.exists(path):
        return None
    state = _load_checkpoint(path, "checkpoint")
    images = state.get("distiller", {}).get("images") if isinstance(state, dict) and \
        isinstance(state.get("distiller"), dict) else None
    if not isinstance(images, torch.Tensor) or tuple(images.shape) != shape:
        raise InputError(f"{path}: checkpoint does not match this run (expected synthetic images of shape "
                         f"{shape}); delete it to start over")
    return state["distiller"]


def run_distill(cfg: DistillConfig, out: str, *, progress: bool = True, shared_cache: Optional[str] = None,
                train: Optional[datasets.Dataset] = None) -> dict:
    """Distill (resuming from ``out`` if it holds this run). Returns {"images", "labels", "seconds"}.
    ``train``: the training split if already loaded. Everything the folder holds is read and
    checked before anything is written to it (InputError naming the file otherwise)."""
    if cfg.method not in DISTILLERS:
        raise ValueError(f"method: expected one of {', '.join(DISTILLERS)}, got {cfg.method!r}")
    if train is None:
        train = datasets.load(cfg.dataset, "train", path=cfg.data_path, size=cfg.size)
    cfg_path, state_path = os.path.join(out, "config.json"), os.path.join(out, "state.pt")
    want = cfg.to_json()
    if os.path.exists(cfg_path):
        _read_config(cfg_path, want, out)
    state = _read_state(state_path, (train.num_classes * cfg.ipc, *train.images.shape[1:]))
    cache = shared_cache or out
    if not os.path.exists(cfg_path):
        atomic_write_json(want, cfg_path)
    runinfo.note(os.path.join(out, "run.json"), runinfo.collect(cfg.seed))  # and warns on a changed resume
    zca = None
    if cfg.zca:  # distill in ZCA space (docs/methods.md); zca.pt holds the transform
        zca = ZCA.fit(train.images)
        atomic_save(zca.state_dict(), os.path.join(out, "zca.pt"))
        train = zca.whiten_dataset(train)
    metadd = None
    if cfg.metadd_weight:
        models = pretrained_models(cfg.metadd_models, train, cfg.pretrain_epochs, cfg.seed,
                                   os.path.join(cache, "metadd_models.pt"), progress)
        metadd = MetaDDLoss(models, alpha=cfg.metadd_alpha)
    kw = dict(lr=cfg.lr, batch_real=cfg.batch_real, arch=cfg.arch, metadd=metadd, metadd_weight=cfg.metadd_weight,
              robust_alpha=cfg.robust_alpha, robust_weight=cfg.robust_weight, seed=cfg.seed)
    if cfg.method == "sre2l":
        kw["teacher"] = _teacher(train, cfg.seed, os.path.join(cache, "teacher.pt"))
    distiller = DISTILLERS[cfg.method](train, cfg.ipc, **kw)
    if state is not None:
        _load_into(distiller, state, state_path, "checkpoint")
    start = time.perf_counter()
    with tqdm(total=cfg.iterations, initial=distiller.iteration, desc=f"distill {os.path.basename(out)}",
              disable=not progress) as bar:  # closed on failure too, so an error message starts its own line
        while distiller.iteration < cfg.iterations:
            terms = distiller.step()
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in terms.items()})
            if distiller.iteration % cfg.checkpoint_every == 0 or distiller.iteration == cfg.iterations:
                atomic_save({"distiller": distiller.state_dict()}, state_path)
    images, labels = distiller.images.detach(), distiller.labels
    if zca is not None:  # saved un-whitened, in the dataset's normalized space like every run
        images = zca.unwhiten(images)
    save_synthetic(os.path.join(out, "synthetic.pt"), images, labels)
    save_image_grid(os.path.join(out, "synthetic.png"), train.denormalize(images), labels,
                    f"{cfg.method.upper()} on {cfg.dataset}, IPC {cfg.ipc}")
    if metadd is not None:
        _save_cams(os.path.join(out, "cams.png"), metadd, distiller.images.detach(), labels, train,
                   list(cfg.metadd_models))
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
