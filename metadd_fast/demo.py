"""The demo (``metadd-fast demo``, ``make demo``): what MetaDD and Robust DD do, on 2 CPU cores.

Digits at 32x32 with a known minority group: ``train_minority`` of every class's
training images and ``test_minority`` of its test images are inverted (1 - pixel).
DM distils through a width-32 ConvNet; the variants add MetaDD (CAM variance over
frozen pre-trained networks), Robust DD (DM's ``robust_alpha``) or both. Each
synthetic set is evaluated on networks held out from both the MetaDD set and the
distillation network. Steps, in order:

1. pre-train every MetaDD network until its test accuracy reaches ``pretrain_target``
   (asserted; a network whose CAM is smaller than 4x4 is refused);
2. per distillation seed and variant: set the MetaDD weight so that its gradient on
   the initial images is ``metadd_fraction`` of the method's (:func:`calibrate_metadd_weight`),
   distil, and measure the mean CAM variance over the MetaDD networks before and after;
3. evaluate each set on the held-out networks (``eval_seeds`` per set): accuracy on
   the whole test set, on its inverted (minority) images, and the k-means worst group;
4. write results.md / results.json (table, every setting, phase timings), the
   synthetic grids and a figure of the meta and heterogeneous CAM regions.
"""
from __future__ import annotations

import contextlib
import dataclasses
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
from .ops.backends import resolve
from .data import Dataset, class_batches, load_digits, with_inverted_minority
from .distill import DM
from .evaluate import evaluate_synthetic, test_clusters
from .metadd_loss import MetaDDLoss
from .models import MODELS, ConvNet, LeNet, get_model
from .results import (atomic_write_json, atomic_write_text, meta_regions, save_image_grid, save_meta_cam_figure,
                      save_synthetic)
from .training import predict, train_model

__all__ = ["DemoConfig", "DEMO_NETS", "VARIANTS", "calibrate_metadd_weight", "run_demo"]

# CPU-sized networks of the demo (DC's ConvNet at width 32; LeNet from the zoo). Their
# last feature maps at 32x32: D1 18x18, D2 9x9, MP 4x4, D4BN 2x2, LeNet 6x6.
DEMO_NETS = {
    "ConvNetD1-W32": partial(ConvNet, width=32, depth=1),
    "ConvNetD2-W32": partial(ConvNet, width=32, depth=2),
    "ConvNetMP-W32": partial(ConvNet, width=32, depth=3, pooling="maxpooling"),
    "ConvNetD4BN-W32": partial(ConvNet, width=32, depth=4, norm="batchnorm", pooling="maxpooling"),
    "LeNet": LeNet,
}

# Seeds of the inverted minority (train, test): far from the distillation seeds, whose
# real-image initialization draws the same permutations for the same seed.
MINORITY_SEEDS = (10_000, 10_001)

VARIANTS = {  # name -> (MetaDD on, Robust DD on)
    "base": (False, False),
    "+MetaDD": (True, False),
    "+Robust DD": (False, True),
    "+both": (True, True),
}


@dataclass
class DemoConfig:
    """Every setting of the demo; the defaults are the run of record."""

    size: int = 32
    train_minority: float = 0.1
    test_minority: float = 0.5
    limit_per_class: Optional[int] = None  # keep the first n images of each class (tests)
    ipc: int = 10
    iterations: int = 30
    batch_real: int = 32
    distill_arch: str = "ConvNetW32"
    metadd_nets: tuple = ("ConvNetD1-W32", "ConvNetD2-W32", "ConvNetMP-W32")
    pretrain_target: float = 0.85
    pretrain_max_epochs: int = 12
    pretrain_lr: float = 0.01
    metadd_fraction: float = 0.5
    calibration_probes: int = 4
    robust_alpha: float = 0.3
    eval_archs: tuple = ("LeNet", "ConvNetD4BN-W32")
    eval_epochs: int = 30
    eval_batch: int = 16
    eval_lr: float = 0.01
    distill_seeds: int = 3
    eval_seeds: int = 1
    variants: tuple = tuple(VARIANTS)
    figure_images: int = 4

    def __post_init__(self):
        self.metadd_nets, self.eval_archs, self.variants = (tuple(self.metadd_nets), tuple(self.eval_archs),
                                                            tuple(self.variants))
        for name in ("ipc", "iterations", "batch_real", "pretrain_max_epochs", "calibration_probes",
                     "eval_epochs", "eval_batch", "distill_seeds", "eval_seeds", "figure_images"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        for name in ("train_minority", "test_minority", "pretrain_target", "robust_alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"{name}: expected a number in (0, 1], got {v!r}")
        if isinstance(self.metadd_fraction, bool) or not isinstance(self.metadd_fraction, (int, float)) \
                or not self.metadd_fraction > 0:
            raise ValueError(f"metadd_fraction: expected a positive number, got {self.metadd_fraction!r}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"variants: expected some of {', '.join(VARIANTS)}, got {list(self.variants)}")
        for name in (*self.metadd_nets, *self.eval_archs, self.distill_arch):
            if name not in DEMO_NETS and name not in MODELS:
                raise ValueError(f"{name}: not a demo network ({', '.join(DEMO_NETS)}) or zoo model")
        if len(self.metadd_nets) < 2:
            raise ValueError(f"metadd_nets: MetaDD needs at least 2 networks, got {list(self.metadd_nets)}")
        shared = set(self.eval_archs) & {*self.metadd_nets, self.distill_arch}
        if shared:
            raise ValueError(f"eval_archs: {sorted(shared)} also distil or serve MetaDD; evaluation needs "
                             f"held-out networks")


def _build(name: str, ds: Dataset) -> nn.Module:
    make = DEMO_NETS.get(name)
    if make is None:
        return get_model(name, ds.channel, ds.num_classes, ds.im_size)
    return make(channel=ds.channel, num_classes=ds.num_classes, im_size=ds.im_size)


def _limited(ds: Dataset, per_class: Optional[int]) -> Dataset:
    if per_class is None:
        return ds
    keep = torch.cat([idx[:per_class] for idx in class_batches(ds)]).sort().values
    return dataclasses.replace(ds, images=ds.images[keep], labels=ds.labels[keep])


def _group_accuracy(model: nn.Module, test: Dataset, minority: torch.Tensor) -> dict:
    correct = (predict(model, test.images) == test.labels).float()
    return {"test_acc": float(correct.mean()), "minority_acc": float(correct[minority].mean()),
            "majority_acc": float(correct[~minority].mean())}


def pretrain_metadd_nets(cfg: DemoConfig, train: Dataset, test: Dataset, minority: torch.Tensor,
                         progress: bool = True) -> tuple:
    """(networks, report): each MetaDD network trained one epoch at a time (a fresh SGD per epoch
    at ``pretrain_lr``, batch 64) until its test accuracy reaches ``pretrain_target``;
    RuntimeError if one does not within ``pretrain_max_epochs``, ValueError if its CAM is
    smaller than 4x4."""
    nets, report = [], {}
    for i, name in enumerate(cfg.metadd_nets):
        torch.manual_seed(1000 + i)
        net = _build(name, train)
        with torch.no_grad():
            fmap = tuple(cam_target(net.eval()).run(train.images[:1])[0].shape[2:])
        if min(fmap) < 4:
            raise ValueError(f"metadd_nets: {name} gives {fmap[0]}x{fmap[1]} CAMs at {train.im_size}; "
                             f"the demo needs 4x4 or larger")
        acc, epochs = {"test_acc": 0.0}, 0
        bar = tqdm(total=cfg.pretrain_max_epochs, desc=f"pre-train {name}", disable=not progress, leave=False)
        while acc["test_acc"] < cfg.pretrain_target and epochs < cfg.pretrain_max_epochs:
            train_model(net, train.images, train.labels, epochs=1, lr=cfg.pretrain_lr, batch_size=64,
                        seed=1000 * i + epochs)
            epochs += 1
            acc = _group_accuracy(net, test, minority)
            bar.update(1)
            bar.set_postfix(acc=f"{acc['test_acc']:.3f}")
        bar.close()
        print(f"MetaDD network {name}: CAM {fmap[0]}x{fmap[1]}, {epochs} epochs, test accuracy "
              f"{100 * acc['test_acc']:.1f}% (inverted {100 * acc['minority_acc']:.1f}%, "
              f"target {100 * cfg.pretrain_target:.0f}%)")
        if acc["test_acc"] < cfg.pretrain_target:
            raise RuntimeError(f"MetaDD network {name} reached {100 * acc['test_acc']:.1f}% test accuracy after "
                               f"{epochs} epochs, below the target {100 * cfg.pretrain_target:.0f}%")
        nets.append(net.eval())
        report[name] = {"cam": list(fmap), "epochs": epochs, **acc}
    return nets, report


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


def _cam_stats(metadd: MetaDDLoss, images: torch.Tensor, labels: torch.Tensor) -> tuple:
    """(mean CAM variance over the MetaDD networks (MetaDD's loss), meta share: the mean of the
    per-pixel minimum of the maps over the mean of the maps), and the maps (K, B, S_h, S_w)."""
    x = images.detach()
    with torch.no_grad():
        variance = float(metadd(x, labels))
        out_size = metadd._prepare(x)
        U = metadd.maps_no_grad(x, labels, out_size, resolve(metadd.backend, x.device))
    maps = U.view(U.shape[0], U.shape[1], *out_size)
    meta, _ = meta_regions(maps)
    return variance, float(meta.mean() / maps.mean().clamp_min(1e-12)), maps


@contextlib.contextmanager
def _timed(clock: dict, phase: str):
    """Adds the block's wall and process CPU seconds to clock["wall"][phase] and clock["cpu"][phase]."""
    t, c = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        clock["wall"][phase] = clock["wall"].get(phase, 0.0) + time.perf_counter() - t
        clock["cpu"][phase] = clock["cpu"].get(phase, 0.0) + time.process_time() - c


def _slug(variant: str) -> str:
    return variant.strip("+").replace("+", "_").replace(" ", "_").lower()


def _ms(values: list) -> str:
    return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.pstdev(values):.1f}"


def _summary(cfg: DemoConfig, runs: dict) -> dict:
    """Per variant: per-run lists (distillation seed x evaluation seed) and their mean/std."""
    out = {}
    for v, r in runs.items():
        per_run = {k: [statistics.fmean(r["eval"][a][k][j] for a in cfg.eval_archs)
                       for j in range(len(r["eval"][cfg.eval_archs[0]]["acc"]))]
                   for k in ("acc", "minority", "majority", "worst_group")}
        out[v] = {"per_arch_acc": {a: r["eval"][a]["acc"] for a in cfg.eval_archs}, **per_run,
                  "cam_variance_before": r["cam_before"], "cam_variance_after": r["cam_after"],
                  "meta_share_before": r["meta_before"], "meta_share_after": r["meta_after"],
                  "metadd_weight": r["weights"]}
    return out


def _table(cfg: DemoConfig, s: dict) -> str:
    archs = list(cfg.eval_archs)
    head = ["variant", *archs, "mean acc", "inverted (minority) acc", "k-means worst group",
            "CAM variance before → after (x1e3)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, r in s.items():
        cam = (f"{1e3 * statistics.fmean(r['cam_variance_before']):.2f} → "
               f"{1e3 * statistics.fmean(r['cam_variance_after']):.2f} ± {1e3 * statistics.pstdev(r['cam_variance_after']):.2f}")
        cells = [v, *[_ms(r["per_arch_acc"][a]) for a in archs], _ms(r["acc"]), _ms(r["minority"]),
                 _ms(r["worst_group"]), cam]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _findings(s: dict) -> list:
    """One sentence per variant and metric against base: the difference of the means, and
    whether it is within the seed spread (|difference| <= std(base) + std(variant))."""
    if "base" not in s:
        return []
    lines = []
    metrics = (("acc", "mean accuracy", 100, "points"), ("minority", "inverted-digit accuracy", 100, "points"),
               ("worst_group", "k-means worst-group accuracy", 100, "points"),
               ("cam_variance_after", "CAM variance after distillation", 1e3, "x1e-3"))
    for v, r in s.items():
        if v == "base":
            continue
        for key, what, scale, unit in metrics:
            b, x = s["base"][key], r[key]
            diff = statistics.fmean(x) - statistics.fmean(b)
            spread = statistics.pstdev(x) + statistics.pstdev(b)
            if min(len(x), len(b)) < 2:
                verdict = "one run: no seed spread to compare with"
            else:
                verdict = "within the seed spread" if abs(diff) <= spread else "larger than the seed spread"
            lines.append(f"{v} vs base, {what}: {scale * diff:+.2f} {unit} ({verdict}, "
                         f"std sum {scale * spread:.2f})")
    return lines


def run_demo(out: str = "demo_out", cfg: Optional[DemoConfig] = None, *, progress: bool = True) -> dict:
    """Run the demo (see the module docstring) and write its files to ``out``; returns the
    summary written to results.json."""
    cfg = cfg or DemoConfig()
    os.makedirs(out, exist_ok=True)
    clock = {"wall": {}, "cpu": {}}
    t0 = time.perf_counter()
    with _timed(clock, "load data"):
        train, _ = with_inverted_minority(_limited(load_digits("train", cfg.size), cfg.limit_per_class),
                                          cfg.train_minority, seed=MINORITY_SEEDS[0])
        test, minority = with_inverted_minority(_limited(load_digits("test", cfg.size), cfg.limit_per_class),
                                                cfg.test_minority, seed=MINORITY_SEEDS[1])
        clusters = test_clusters(test)
    with _timed(clock, "pre-train MetaDD networks"):
        nets, pretrain = pretrain_metadd_nets(cfg, train, test, minority, progress)
    metadd = MetaDDLoss(nets)
    eval_nets = {a: DEMO_NETS.get(a, partial(get_model, a)) for a in cfg.eval_archs}
    runs = {v: {"eval": {}, "cam_before": [], "cam_after": [], "meta_before": [], "meta_after": [],
                "weights": [], "calibration": []} for v in cfg.variants}
    figure_maps = {}
    for seed in range(cfg.distill_seeds):
        for v in cfg.variants:
            use_metadd, robust = VARIANTS[v]
            r = runs[v]
            make = partial(DM, train, cfg.ipc, batch_real=cfg.batch_real, arch=cfg.distill_arch,
                           robust_alpha=cfg.robust_alpha if robust else None, seed=seed)
            weight = 0.0
            if use_metadd:
                with _timed(clock, "calibrate MetaDD weight"):
                    cal = calibrate_metadd_weight(make, metadd, cfg.metadd_fraction, cfg.calibration_probes)
                weight = cal["weight"]
                r["calibration"].append(cal)
                print(f"{v} seed {seed}: ||grad method|| {cal['method_grad_norm']:.4g}, ||grad MetaDD|| "
                      f"{cal['metadd_grad_norm']:.4g} -> weight {weight:.4g} (fraction {cfg.metadd_fraction})")
            r["weights"].append(weight)
            distiller = make(metadd=metadd if use_metadd else None, metadd_weight=weight)
            with _timed(clock, "CAM statistics"):
                before = distiller.images.detach().clone()
                var, share, maps_before = _cam_stats(metadd, before, distiller.labels)
            r["cam_before"].append(var)
            r["meta_before"].append(share)
            with _timed(clock, f"distill {v}"):
                for _ in tqdm(range(cfg.iterations), desc=f"distill {v} seed {seed}", disable=not progress,
                              leave=False):
                    distiller.step()
            images, labels = distiller.images.detach().clone(), distiller.labels
            with _timed(clock, "CAM statistics"):
                var, share, maps_after = _cam_stats(metadd, images, labels)
            r["cam_after"].append(var)
            r["meta_after"].append(share)
            name = f"{_slug(v)}_seed{seed}"
            save_synthetic(os.path.join(out, "synthetic", f"{name}.pt"), images, labels)
            if seed == 0:
                save_image_grid(os.path.join(out, f"synthetic_{_slug(v)}.png"), train.denormalize(images), labels,
                                f"DM {v}, digits 32x32 with inverted minority, IPC {cfg.ipc}, seed 0")
                figure_maps[v] = (before, maps_before, images, maps_after)
            with _timed(clock, f"evaluate {v}"):
                res = evaluate_synthetic(images, labels, test, eval_nets, seeds=cfg.eval_seeds,
                                         epochs=cfg.eval_epochs, lr=cfg.eval_lr, batch_size=cfg.eval_batch,
                                         augment=None, clusters=clusters, minority=minority, progress=progress)
            for a, ra in res.items():
                for k in ("acc", "minority", "majority", "worst_group"):
                    r["eval"].setdefault(a, {}).setdefault(k, []).extend(ra[k])
    with _timed(clock, "figures"):
        figures = _save_figures(cfg, out, train, figure_maps)
    summary = _summary(cfg, runs)
    table = _table(cfg, summary)
    findings = _findings(summary)
    total = time.perf_counter() - t0
    note = _note(cfg, pretrain, total)
    report = {"config": dataclasses.asdict(cfg), "pretrain": pretrain, "results": summary,
              "calibration": {v: runs[v]["calibration"] for v in cfg.variants}, "findings": findings,
              "timings_wall_s": clock["wall"], "timings_cpu_s": clock["cpu"], "total_wall_s": total,
              "torch_threads": torch.get_num_threads(), "figures": figures, "note": note}
    atomic_write_json(report, os.path.join(out, "results.json"))
    timings = "\n".join(f"- {k}: {w:.1f} s wall, {clock['cpu'][k]:.1f} s CPU" for k, w in clock["wall"].items())
    text = (f"{table}\n\n{note}\n\nFindings (difference of means against base; 'within the seed spread' when it "
            f"is at most the sum of the two standard deviations):\n\n" + "\n".join(f"- {x}" for x in findings) +
            f"\n\nPhase timings ({torch.get_num_threads()} threads):\n\n{timings}\n")
    atomic_write_text(text, os.path.join(out, "results.md"))
    print(text)
    return report


def _note(cfg: DemoConfig, pretrain: dict, total: float) -> str:
    nets = ", ".join(f"{n} ({r['cam'][0]}x{r['cam'][1]} CAM, {r['epochs']} epochs, {100 * r['test_acc']:.1f}% test)"
                     for n, r in pretrain.items())
    runs = cfg.distill_seeds * cfg.eval_seeds
    return (f"Digits at {cfg.size}x{cfg.size}; {100 * cfg.train_minority:.0f}% of every class inverted (1 - pixel) in "
            f"the training split, {100 * cfg.test_minority:.0f}% in the test split. DM through {cfg.distill_arch} "
            f"(fresh random network per step), IPC {cfg.ipc}, {cfg.iterations} iterations, {cfg.batch_real} real "
            f"images per class per step, initialized from real images. MetaDD networks (pre-trained on the training "
            f"split to at least {100 * cfg.pretrain_target:.0f}% test accuracy, then frozen): {nets}. MetaDD weight: "
            f"its gradient on the initial images set to {cfg.metadd_fraction} x the method's (mean over "
            f"{cfg.calibration_probes} random networks), per seed. Robust DD: DM with robust_alpha={cfg.robust_alpha}. "
            f"Evaluation on held-out networks {', '.join(cfg.eval_archs)}: {cfg.eval_epochs} epochs, batch "
            f"{cfg.eval_batch}, lr {cfg.eval_lr}, no augmentation. Every cell is mean ± std (population) over {runs} "
            f"runs: {cfg.distill_seeds} distillation seeds x {cfg.eval_seeds} evaluation seed(s); 'mean acc', "
            f"'inverted' and 'worst group' average the held-out networks within a run first. Worst group: the lowest "
            f"accuracy over 10 k-means clusters of the test pixels. CAM variance: MetaDD's loss (mean over images and "
            f"pixels of the variance across the MetaDD networks' normalized CAMs), before (the real initial images) "
            f"and after distillation. Total {total:.0f} s wall.")


def _save_figures(cfg: DemoConfig, out: str, train: Dataset, figure_maps: dict) -> list:
    """demo_cam_regions.png: for the first images of the first classes, the CAM regions at the
    initial images, after DM and after DM + MetaDD (seed 0)."""
    if "+MetaDD" not in figure_maps:
        return []
    before, maps_before, after, maps_after = figure_maps["+MetaDD"]
    labels = torch.arange(train.num_classes).repeat_interleave(cfg.ipc)
    pick = torch.stack([(labels == c).nonzero()[0, 0] for c in range(min(cfg.figure_images, train.num_classes))])
    stages = [("initial", train.denormalize(before[pick]), maps_before[:, pick])]
    if "base" in figure_maps:
        _, _, base, maps_base = figure_maps["base"]
        stages.append(("DM", train.denormalize(base[pick]), maps_base[:, pick]))
    stages.append(("DM+MetaDD", train.denormalize(after[pick]), maps_after[:, pick]))
    path = os.path.join(out, "demo_cam_regions.png")
    save_meta_cam_figure(path, stages, list(cfg.metadd_nets),
                         "normalized CAMs, meta region (minimum over networks) and what each network adds alone")
    return [path]
