"""The comparison behind ``metadd-fast demo`` and ``metadd-fast study`` (one runner; the demo
is the study at small settings, :func:`demo_config`).

Task: digits at 32x32 with a known minority group: ``train_minority`` of every class's
training images and ``test_minority`` of its test images are inverted (1 - pixel). A
validation split (``val_share`` of each class) is carved from the training split; it only
decides when pre-training stops. Steps:

1. pre-train the MetaDD networks (``metadd_nets``, in the loss) and the held-out CAM networks
   (``heldout_cam_nets``, never in a loss) on train minus validation, one epoch at a time,
   until the validation accuracy reaches ``pretrain_target`` (RuntimeError if one does not
   within ``pretrain_max_epochs``; a CAM smaller than 4x4 is refused); cached in
   ``networks.pt``;
2. one cell per (variant, seed): the synthetic set of the variant (:data:`VARIANTS`: the
   initial images, random real images, a k-center coreset, or DM with or without MetaDD and
   Robust DD, all from the seed's same initial images), its CAM variance under the MetaDD
   networks and under the held-out CAM networks, and its accuracy on held-out networks
   trained on it (``eval_archs``: none distils or serves MetaDD), on the whole test split,
   its inverted (minority) images and the rest (majority). Each finished cell is written to
   ``cells/<variant>_seed<s>.json`` (and its set to ``.pt``) atomically, so a killed run
   resumes at the first unfinished cell;
3. tables (per variant: mean, sd, 95% CI, n; paired against each reference: mean difference,
   its sd and CI, paired t-test and Wilcoxon p) to ``results.md`` / ``results.json``, and
   ``results.png`` (means and paired differences with 95% CIs).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import cam_target
from .augment import DEFAULT_STRATEGY, DiffAugment
from .data import Dataset, class_batches, load_digits, with_inverted_minority
from .distill import DM
from .errors import InputError
from .evaluate import evaluate_synthetic, test_clusters
from .grouping import embed
from .metadd_loss import MetaDDLoss
from .models import MODELS, ConvNet, LeNet, ResNet18, get_model
from .ops.nearest_centroid import nearest_centroid
from .results import atomic_save, atomic_write_json, load_checkpoint, load_into, load_json_object, save_synthetic
from .stats import paired, summary
from .training import accuracy, train_model

__all__ = ["StudyConfig", "NETS", "VARIANTS", "COMPARISONS", "demo_config", "calibrate_metadd_weight",
           "kcenter", "run_study"]

# CPU-sized networks (DC's ConvNet at width 32, a ResNet-18 at width 16, the zoo's LeNet). Their
# last feature maps at 32x32: D1 18x18, D2 9x9, MP 4x4, D4BN 2x2, ResNet18-W16 4x4, LeNet 6x6.
NETS = {
    "ConvNetD1-W32": partial(ConvNet, width=32, depth=1),
    "ConvNetD2-W32": partial(ConvNet, width=32, depth=2),
    "ConvNetMP-W32": partial(ConvNet, width=32, depth=3, pooling="maxpooling"),
    "ConvNetD4BN-W32": partial(ConvNet, width=32, depth=4, norm="batchnorm", pooling="maxpooling"),
    "ResNet18-W16": partial(ResNet18, width=16, norm="batchnorm"),
    "LeNet": LeNet,
}

# Seeds of the inverted minority (train, test) and of the validation split: far from the
# distillation seeds, whose real-image initialization draws the same permutations for the same seed.
MINORITY_SEEDS = (10_000, 10_001)
VAL_SEED = 10_002
RANDOM_REAL_SEED = 20_000  # random real images of seed s: drawn with RANDOM_REAL_SEED + s

VARIANTS = {  # name -> (kind, MetaDD on, Robust DD on)
    "initial": ("initial", False, False),  # DM's initial images (real, drawn with the seed): 0 iterations
    "random real": ("random", False, False),  # an independent draw of real images
    "k-center": ("kcenter", False, False),  # greedy k-center coreset per class in a random distill_arch
    "base": ("dm", False, False),
    "+MetaDD": ("dm", True, False),
    "+Robust DD": ("dm", False, True),
    "+both": ("dm", True, True),
}

# (variant, reference) pairs compared seed by seed, where both are run.
COMPARISONS = (("+MetaDD", "base"), ("+Robust DD", "base"), ("+both", "base"), ("base", "initial"),
               ("+Robust DD", "k-center"), ("k-center", "initial"), ("random real", "initial"))

# Per-cell metrics of the tables: key -> (label, scale, unit).
METRICS = {"acc": ("held-out acc", 100, "%"), "minority": ("minority (inverted) acc", 100, "%"),
           "majority": ("majority acc", 100, "%"),
           "cam_heldout": ("CAM variance, held-out nets (x1e3)", 1e3, ""),
           "cam_metadd": ("CAM variance, MetaDD nets (x1e3)", 1e3, "")}


@dataclass
class StudyConfig:
    """Every setting of a study; the defaults are ``metadd-fast study``'s (the demo: :func:`demo_config`)."""

    size: int = 32
    train_minority: float = 0.1
    test_minority: float = 0.5
    val_share: float = 0.1
    limit_per_class: Optional[int] = None  # keep the first n images of each class (tests)
    ipc: int = 10
    iterations: int = 150
    batch_real: int = 32
    distill_arch: str = "ConvNetW32"
    metadd_nets: tuple = ("ConvNetD1-W32", "ConvNetD2-W32", "ConvNetMP-W32")
    heldout_cam_nets: tuple = ("ResNet18-W16", "LeNet")
    pretrain_target: float = 0.85
    pretrain_max_epochs: int = 15
    pretrain_lr: float = 0.01
    metadd_fraction: float = 0.5
    calibration_probes: int = 4
    robust_alpha: float = 0.3
    robust_groups: str = "class"
    eval_archs: tuple = ("ConvNetD4BN-W32", "ResNet18-W16", "LeNet")
    eval_epochs: int = 150
    eval_batch: int = 32
    eval_lr: float = 0.01
    eval_augment: Optional[str] = DEFAULT_STRATEGY  # DSA while training the evaluation networks; None: off
    seeds: int = 8
    eval_seeds: int = 1
    variants: tuple = tuple(VARIANTS)

    def __post_init__(self):
        for name in ("metadd_nets", "heldout_cam_nets", "eval_archs", "variants"):
            setattr(self, name, tuple(getattr(self, name)))
        for name in ("size", "ipc", "iterations", "batch_real", "pretrain_max_epochs", "calibration_probes",
                     "eval_epochs", "eval_batch", "seeds", "eval_seeds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.limit_per_class is not None and (isinstance(self.limit_per_class, bool) or
                                                 not isinstance(self.limit_per_class, int) or self.limit_per_class < 2):
            raise ValueError(f"limit_per_class: expected None or an int >= 2, got {self.limit_per_class!r}")
        for name in ("train_minority", "test_minority", "val_share", "pretrain_target", "robust_alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= (0.5 if name == "val_share" else 1):
                raise ValueError(f"{name}: expected a number in (0, {0.5 if name == 'val_share' else 1}], got {v!r}")
        for name in ("metadd_fraction", "pretrain_lr", "eval_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ValueError(f"{name}: expected a positive number, got {v!r}")
        if self.robust_groups not in ("class", "all"):
            raise ValueError(f"robust_groups: expected 'class' or 'all', got {self.robust_groups!r}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants or len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants: expected distinct names among {', '.join(VARIANTS)}, got {list(self.variants)}")
        for field in ("metadd_nets", "heldout_cam_nets", "eval_archs", "distill_arch"):
            names = getattr(self, field)
            for name in (names,) if isinstance(names, str) else names:
                if name not in NETS and name not in MODELS:
                    raise ValueError(f"{field}: {name!r} is not a study network ({', '.join(NETS)}) or zoo model")
        if self.eval_augment is not None:
            try:
                DiffAugment(self.eval_augment)
            except (ValueError, TypeError) as err:
                raise ValueError(f"eval_augment: {str(err).partition(': ')[2]}") from err
        for name in ("metadd_nets", "heldout_cam_nets"):
            if len(getattr(self, name)) < 2:
                raise ValueError(f"{name}: a CAM variance needs at least 2 networks, got {list(getattr(self, name))}")
        if not self.eval_archs:
            raise ValueError("eval_archs: expected at least one network, got none")
        for name in ("eval_archs", "heldout_cam_nets"):
            shared = set(getattr(self, name)) & {*self.metadd_nets, self.distill_arch}
            if shared:
                raise ValueError(f"{name}: {sorted(shared)} also distil or serve MetaDD; they must be held out")


def demo_config(**overrides) -> StudyConfig:
    """The demo's settings (``metadd-fast demo``, ``make demo``: about 2 minutes on 2 quiet
    cores): 3 seeds, 30 iterations, 30 evaluation epochs without augmentation, and the
    variants initial, k-center, base, +MetaDD, +Robust DD. ``overrides``: any field."""
    kw = dict(iterations=30, pretrain_max_epochs=12, eval_epochs=30, eval_augment=None, seeds=3,
              variants=("initial", "k-center", "base", "+MetaDD", "+Robust DD"))
    kw.update(overrides)
    return StudyConfig(**kw)


def build(name: str, ds: Dataset) -> nn.Module:
    """A study network (:data:`NETS`) or zoo model for ``ds``'s images."""
    make = NETS.get(name)
    if make is None:
        return get_model(name, ds.channel, ds.num_classes, ds.im_size)
    return make(channel=ds.channel, num_classes=ds.num_classes, im_size=ds.im_size)


def _limited(ds: Dataset, per_class: Optional[int]) -> Dataset:
    if per_class is None:
        return ds
    keep = torch.cat([idx[:per_class] for idx in class_batches(ds)]).sort().values
    return dataclasses.replace(ds, images=ds.images[keep], labels=ds.labels[keep])


def _split(ds: Dataset, share: float, seed: int) -> tuple:
    """(rest, validation): round(share * n_c) images of every class c (at least 1) drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    val = torch.cat([idx[torch.randperm(len(idx), generator=g)[:max(1, round(share * len(idx)))]]
                     for idx in class_batches(ds)])
    mask = torch.zeros(len(ds), dtype=torch.bool)
    mask[val] = True
    part = lambda m: dataclasses.replace(ds, images=ds.images[m], labels=ds.labels[m])  # noqa: E731
    return part(~mask), part(mask)


def load_task(cfg: StudyConfig) -> tuple:
    """(train, val, test, minority (len(test),) bool, clusters (len(test),) int64): digits with the
    inverted minority; val carved from the training split (with its inverted images at the
    training share); the test images' k-means clusters (worst-group accuracy), computed once."""
    train, _ = with_inverted_minority(_limited(load_digits("train", cfg.size), cfg.limit_per_class),
                                      cfg.train_minority, seed=MINORITY_SEEDS[0])
    train, val = _split(train, cfg.val_share, VAL_SEED)
    test, minority = with_inverted_minority(_limited(load_digits("test", cfg.size), cfg.limit_per_class),
                                            cfg.test_minority, seed=MINORITY_SEEDS[1])
    return train, val, test, minority, test_clusters(test)


def pretrain(names, cfg: StudyConfig, train: Dataset, val: Dataset, first_seed: int, progress: bool = True) -> tuple:
    """(networks in eval mode, report): each trained one epoch at a time (a fresh SGD per epoch
    at ``pretrain_lr``, batch 64) until its VALIDATION accuracy reaches ``pretrain_target``;
    RuntimeError if one does not within ``pretrain_max_epochs``, ValueError if its CAM is
    smaller than 4x4."""
    nets, report = [], {}
    for i, name in enumerate(names):
        torch.manual_seed(first_seed + i)
        net = build(name, train)
        with torch.no_grad():
            fmap = tuple(cam_target(net.eval()).run(train.images[:1])[0].shape[2:])
        if min(fmap) < 4:
            raise ValueError(f"{name} gives {fmap[0]}x{fmap[1]} CAMs at {train.im_size}; the study needs 4x4 or larger")
        acc, epochs = 0.0, 0
        bar = tqdm(total=cfg.pretrain_max_epochs, desc=f"pre-train {name}", disable=not progress, leave=False)
        while acc < cfg.pretrain_target and epochs < cfg.pretrain_max_epochs:
            train_model(net, train.images, train.labels, epochs=1, lr=cfg.pretrain_lr, batch_size=64,
                        seed=(first_seed + i) * 1000 + epochs)
            epochs += 1
            acc = accuracy(net, val.images, val.labels)
            bar.update(1)
            bar.set_postfix(val_acc=f"{acc:.3f}")
        bar.close()
        if acc < cfg.pretrain_target:
            raise RuntimeError(f"{name} reached {100 * acc:.1f}% validation accuracy after {epochs} epochs, below "
                               f"the target {100 * cfg.pretrain_target:.0f}%")
        nets.append(net.eval().requires_grad_(False))
        report[name] = {"cam": list(fmap), "epochs": epochs, "val_acc": acc}
    return nets, report


def _pretrained(cfg: StudyConfig, train: Dataset, val: Dataset, out: str, progress: bool) -> tuple:
    """(MetaDD networks, held-out CAM networks, report), from ``out/networks.pt`` when it holds
    them for these settings (read as data), else trained (:func:`pretrain`) and saved there."""
    path = os.path.join(out, "networks.pt")
    key = {k: getattr(cfg, k) for k in ("size", "train_minority", "val_share", "limit_per_class", "pretrain_target",
                                        "pretrain_max_epochs", "pretrain_lr")}
    key.update(metadd_nets=list(cfg.metadd_nets), heldout_cam_nets=list(cfg.heldout_cam_nets))
    groups = (("metadd", cfg.metadd_nets, 1000), ("heldout", cfg.heldout_cam_nets, 2000))
    saved = load_checkpoint(path, "pre-trained networks") if os.path.exists(path) else None
    if isinstance(saved, dict) and saved.get("key") == key:
        nets = {}
        for what, names, seed in groups:
            torch.manual_seed(seed)
            nets[what] = [build(n, train) for n in names]
            for net, sd in zip(nets[what], saved[what]):
                load_into(net, sd, path, "pre-trained network")
                net.eval().requires_grad_(False)
        return nets["metadd"], nets["heldout"], saved["report"]
    metadd, r1 = pretrain(cfg.metadd_nets, cfg, train, val, 1000, progress)
    heldout, r2 = pretrain(cfg.heldout_cam_nets, cfg, train, val, 2000, progress)
    report = {**r1, **r2}
    atomic_save({"key": key, "metadd": [n.state_dict() for n in metadd], "heldout": [n.state_dict() for n in heldout],
                 "report": report}, path)
    return metadd, heldout, report


def calibrate_metadd_weight(make_method: Callable[[], DM], metadd: MetaDDLoss, fraction: float,
                            probes: int = 4) -> dict:
    """:meth:`MetaDDLoss.starting_weight` for a distiller: the MetaDD weight w with
    w * ||d metadd / d x|| = fraction * ||d method / d x|| at the initial synthetic images x.
    ``make_method()`` builds the distiller without MetaDD (the same seed as the run, so the same
    initial images); its gradient norm is the mean over ``probes`` steps, each from x (a fresh
    random network per step in DM), read from ``images.grad`` after ``step()``. Returns
    starting_weight's {"weight", "fraction", "method_grad_norm", "metadd_grad_norm"} and "probes"."""
    method = make_method()
    start = method.images.detach().clone()
    grads = []
    for _ in range(probes):
        method.step()
        if method.images.grad is None:
            raise RuntimeError("make_method: its step() left no gradient on the images")
        grads.append(float(method.images.grad.norm()))
        with torch.no_grad():
            method.images.copy_(start)
    return {**metadd.starting_weight(start, method.labels, grads, fraction), "probes": probes}


def kcenter(features: torch.Tensor, k: int, first: int = 0) -> torch.Tensor:
    """Greedy k-center (Gonzalez; the coreset of Sener & Savarese): indices (k,) int64 into
    ``features`` (n, D), starting from index ``first``, each next the point farthest from the
    chosen ones (squared Euclidean distance, ties to the lowest index)."""
    if not 1 <= k <= features.shape[0]:
        raise ValueError(f"k: expected 1 <= k <= {features.shape[0]}, got {k}")
    x = features.float()
    chosen = [first]
    dist = nearest_centroid(x, x[first][None])[1]
    for _ in range(1, k):
        nxt = int(dist.argmax())
        chosen.append(nxt)
        dist = torch.minimum(dist, nearest_centroid(x, x[nxt][None])[1])
    return torch.tensor(chosen, dtype=torch.int64)


def _dm(cfg: StudyConfig, train: Dataset, seed: int, robust: bool, **kw) -> DM:
    return DM(train, cfg.ipc, batch_real=cfg.batch_real, arch=cfg.distill_arch,
              robust_alpha=cfg.robust_alpha if robust else None, robust_groups=cfg.robust_groups, seed=seed, **kw)


def make_set(cfg: StudyConfig, variant: str, seed: int, train: Dataset, metadd: MetaDDLoss,
             progress: bool = False) -> tuple:
    """(images, labels, info) of one cell: the variant's synthetic set for ``seed``. Every kind
    starts from, or is, DM's initial images of the seed except "random real" (an independent
    draw) and "k-center" (greedy k-center per class in a random ``distill_arch`` network
    initialized with the seed, from the class's first initial image)."""
    kind, use_metadd, robust = VARIANTS[variant]
    info = {}
    if kind == "random":
        g = torch.Generator().manual_seed(RANDOM_REAL_SEED + seed)
        pick = torch.cat([idx[torch.randperm(len(idx), generator=g)[:cfg.ipc]] for idx in class_batches(train)])
        return train.images[pick].clone(), train.labels[pick].clone(), info
    if kind == "kcenter":
        init = _dm(cfg, train, seed, False)
        torch.manual_seed(seed)
        net = build(cfg.distill_arch, train)
        pick = []
        for c, idx in enumerate(class_batches(train)):
            first = int((train.images[idx] == init.images[c * cfg.ipc].detach()).flatten(1).all(1).nonzero()[0])
            pick.append(idx[kcenter(embed(net.embed, train.images[idx]), cfg.ipc, first)])
        pick = torch.cat(pick)
        return train.images[pick].clone(), train.labels[pick].clone(), info
    weight = 0.0
    if use_metadd:
        info["calibration"] = calibrate_metadd_weight(partial(_dm, cfg, train, seed, robust), metadd,
                                                      cfg.metadd_fraction, cfg.calibration_probes)
        weight = info["calibration"]["weight"]
    d = _dm(cfg, train, seed, robust, metadd=metadd if use_metadd else None, metadd_weight=weight)
    if kind == "dm":
        for _ in tqdm(range(cfg.iterations), desc=f"distill {variant} seed {seed}", disable=not progress,
                      leave=False):
            d.step()
    info["metadd_weight"] = weight
    return d.images.detach().clone(), d.labels.clone(), info


def _slug(variant: str) -> str:
    return variant.strip("+").replace("+", "_").replace(" ", "_").replace("-", "").lower()


def cell_path(out: str, variant: str, seed: int, ext: str = "json") -> str:
    return os.path.join(out, "cells", f"{_slug(variant)}_seed{seed}.{ext}")


def run_cell(cfg: StudyConfig, variant: str, seed: int, task: tuple, metadd: MetaDDLoss, heldout: MetaDDLoss,
             progress: bool = False) -> dict:
    """One cell's record (JSON-able): per-arch and mean accuracies, minority/majority, both CAM
    variances, the MetaDD weight and its calibration, and the wall/CPU seconds of its parts."""
    train, _, test, minority, clusters = task
    t, c = time.perf_counter(), time.process_time()
    images, labels, info = make_set(cfg, variant, seed, train, metadd, progress)
    make_s = (time.perf_counter() - t, time.process_time() - c)
    with torch.no_grad():
        cam = {"cam_metadd": float(metadd(images, labels)), "cam_heldout": float(heldout(images, labels))}
    t, c = time.perf_counter(), time.process_time()
    factories = {a: NETS.get(a, partial(get_model, a)) for a in cfg.eval_archs}
    res = evaluate_synthetic(images, labels, test, factories, seeds=cfg.eval_seeds, epochs=cfg.eval_epochs,
                             lr=cfg.eval_lr, batch_size=cfg.eval_batch, augment=cfg.eval_augment,
                             clusters=clusters, minority=minority, progress=False)
    eval_s = (time.perf_counter() - t, time.process_time() - c)
    record = {"variant": variant, "seed": seed, "per_arch_acc": {a: statistics.fmean(res[a]["acc"]) for a in res},
              **{k: statistics.fmean(statistics.fmean(res[a][k]) for a in res) for k in ("minority", "majority")},
              **cam, **info, "seconds": {"make_wall": make_s[0], "make_cpu": make_s[1], "evaluate_wall": eval_s[0],
                                         "evaluate_cpu": eval_s[1]}}
    record["acc"] = statistics.fmean(record["per_arch_acc"].values())
    record["worst_group"] = statistics.fmean(statistics.fmean(res[a]["worst_group"]) for a in res)
    record["images"] = (images, labels)
    return record


def _read_cell(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    return load_json_object(path, "study cell", "delete it to recompute the cell")


@contextlib.contextmanager
def _phase(clock: dict, name: str):
    t, c = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        w = clock.setdefault(name, [0.0, 0.0])
        w[0] += time.perf_counter() - t
        w[1] += time.process_time() - c


def run_study(out: str, cfg: Optional[StudyConfig] = None, *, progress: bool = True, title: str = "study") -> dict:
    """Run (or resume) the comparison in ``out``; returns the report written to results.json.
    A folder holding another study's config.json is refused (InputError naming it)."""
    cfg = cfg or StudyConfig()
    os.makedirs(os.path.join(out, "cells"), exist_ok=True)
    cfg_path, want = os.path.join(out, "config.json"), dataclasses.asdict(cfg)
    want = {k: list(v) if isinstance(v, tuple) else v for k, v in want.items()}
    if os.path.exists(cfg_path):
        have = load_json_object(cfg_path, "study config", f"delete {out} or use another --out")
        if have != want:
            diff = sorted(k for k in set(want) | set(have) if have.get(k) != want.get(k))
            raise InputError(f"out: {out} holds a different study (differs in {', '.join(diff)}); use another --out")
    else:
        atomic_write_json(want, cfg_path)
    clock, t0 = {}, time.perf_counter()
    with _phase(clock, "load data"):
        task = load_task(cfg)
    with _phase(clock, "pre-train networks"):
        metadd_nets, heldout_nets, pretrain_report = _pretrained(cfg, task[0], task[1], out, progress)
    metadd, heldout = MetaDDLoss(metadd_nets), MetaDDLoss(heldout_nets)
    cells = [(v, s) for s in range(cfg.seeds) for v in cfg.variants]
    records = {}
    for v, s in cells:
        r = _read_cell(cell_path(out, v, s))
        if r is not None:
            records[(v, s)] = r
    with tqdm(total=len(cells), initial=len(records), desc=title, disable=not progress) as bar:
        for v, s in cells:
            if (v, s) in records:
                continue
            bar.set_postfix(cell=f"{v} seed {s}")
            with _phase(clock, "cells"):
                r = run_cell(cfg, v, s, task, metadd, heldout, progress)
            images, labels = r.pop("images")
            save_synthetic(cell_path(out, v, s, "pt"), images, labels)
            atomic_write_json(r, cell_path(out, v, s))  # written last: the cell counts as done
            records[(v, s)] = r
            bar.update(1)
    report = _report(cfg, records, pretrain_report)
    report.update(timings_this_process={k: {"wall_s": w, "cpu_s": c} for k, (w, c) in clock.items()},
                  total_wall_s_this_process=time.perf_counter() - t0, torch_threads=torch.get_num_threads())
    from .study_report import write_report

    write_report(out, cfg, report, title)
    return report


def _report(cfg: StudyConfig, records: dict, pretrain_report: dict) -> dict:
    """Per-variant summaries and paired comparisons of every metric, from the cells' records."""
    per = {v: {k: [records[(v, s)][k] for s in range(cfg.seeds)] for k in METRICS} for v in cfg.variants}
    for v in cfg.variants:
        per[v]["per_arch_acc"] = {a: [records[(v, s)]["per_arch_acc"][a] for s in range(cfg.seeds)]
                                  for a in cfg.eval_archs}
        per[v]["metadd_weight"] = [records[(v, s)].get("metadd_weight", 0.0) for s in range(cfg.seeds)]
    summaries = {v: {k: summary(per[v][k]) for k in METRICS} for v in cfg.variants}
    for v in cfg.variants:
        summaries[v].update({f"acc {a}": summary(x) for a, x in per[v]["per_arch_acc"].items()})
    comparisons = [{"variant": a, "reference": b, **{k: paired(per[a][k], per[b][k]) for k in METRICS}}
                   for a, b in COMPARISONS if a in cfg.variants and b in cfg.variants]
    cell_seconds = {k: sum(r["seconds"][k] for r in records.values()) for k in next(iter(records.values()))["seconds"]}
    return {"config": dataclasses.asdict(cfg), "pretrain": pretrain_report, "per_seed": per, "summary": summaries,
            "comparisons": comparisons, "cell_seconds": cell_seconds}
