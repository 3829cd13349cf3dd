"""Cross-architecture evaluation of a synthetic set, and worst-group accuracy (robust DD).

For each architecture and seed: train a fresh network on the synthetic images
(``training.train_model``: SGD, momentum 0.9, wd 5e-4, lr / 10 at half), test on the
real test split. Worst-group accuracy: the test set is split into k-means clusters
(of its pixels, fixed seed) and the lowest per-cluster accuracy is reported. Where
the test set has a known minority group (``minority=``, a bool mask), the accuracy
on it and on the rest is reported too.
"""
from __future__ import annotations

import statistics
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from . import argcheck
from .errors import InputError
from .augment import DEFAULT_STRATEGY, DiffAugment, check_strategy
from .data import Dataset
from .kmeans import kmeans
from .models import MODELS, get_model
from .training import predict, train_model

__all__ = ["test_clusters", "evaluate_synthetic", "format_table"]


def test_clusters(test: Dataset, k: int = 10, seed: int = 0) -> torch.Tensor:
    """Cluster id (N,) of every test image: k-means on the flattened pixels."""
    argcheck.instance("test", test, Dataset, "a Dataset")
    argcheck.positive_int("k", k)
    return kmeans(test.images.flatten(1), min(k, len(test)), seed=seed)[1]


Archs = Union[Sequence[str], Mapping[str, Callable]]


def evaluate_synthetic(images: torch.Tensor, labels: torch.Tensor, test: Dataset, archs: Archs, *,
                       seeds: int = 3, epochs: int = 300, lr: float = 0.01, batch_size: int = 256,
                       augment: Optional[str] = DEFAULT_STRATEGY, clusters: Optional[torch.Tensor] = None,
                       minority: Optional[torch.Tensor] = None, progress: bool = True) -> dict:
    """{arch: {"acc": [per seed], "mean", "std", "worst_group": [per seed], "worst_group_mean"}},
    plus "minority"/"majority" (per seed) and their means when ``minority`` (N,) bool is given.
    images (N, C, H, W) float of the test set's C, H, W; labels (N,) int in [0, test.num_classes).
    archs: zoo names, or {name: factory(channel=, num_classes=, im_size=) -> nn.Module}."""
    _check_args(images, labels, test, archs, seeds, epochs)
    _check_options(test, lr, batch_size, augment, clusters, minority, progress)
    clusters = test_clusters(test) if clusters is None else clusters
    factories = archs if isinstance(archs, Mapping) else {a: None for a in archs}
    aug = DiffAugment(augment) if augment else None
    out = {}
    jobs = [(a, s) for a in factories for s in range(seeds)]
    for arch, seed in tqdm(jobs, desc="evaluate", disable=not progress, leave=False):
        torch.manual_seed(seed)
        make = factories[arch]
        model = make(channel=test.channel, num_classes=test.num_classes, im_size=test.im_size) if make else \
            get_model(arch, test.channel, test.num_classes, test.im_size)
        train_model(model, images, labels, epochs=epochs, lr=lr, batch_size=batch_size, augment=aug, seed=seed)
        correct = (predict(model, test.images) == test.labels).float()
        per_cluster = [float(correct[clusters == c].mean()) for c in clusters.unique()]
        r = out.setdefault(arch, {"acc": [], "worst_group": []})
        r["acc"].append(float(correct.mean()))
        r["worst_group"].append(min(per_cluster))
        if minority is not None:
            r.setdefault("minority", []).append(float(correct[minority].mean()))
            r.setdefault("majority", []).append(float(correct[~minority].mean()))
    for r in out.values():
        r["mean"] = statistics.fmean(r["acc"])
        r["std"] = statistics.pstdev(r["acc"])
        r["worst_group_mean"] = statistics.fmean(r["worst_group"])
        for key in ("minority", "majority"):
            if key in r:
                r[f"{key}_mean"] = statistics.fmean(r[key])
    return out


def _check_options(test: Dataset, lr, batch_size, augment, clusters, minority, progress) -> None:
    argcheck.positive_float("lr", lr)
    argcheck.positive_int("batch_size", batch_size)
    if augment is not None:
        check_strategy("augment", augment)
    argcheck.boolean("progress", progress)
    if clusters is not None:
        argcheck.tensor("clusters", clusters, dtype="integer", shape=(len(test),))
    if minority is not None:
        argcheck.tensor("minority", minority, dtype=torch.bool, shape=(len(test),))


def _check_args(images, labels, test: Dataset, archs, seeds, epochs) -> None:
    argcheck.positive_int("seeds", seeds)
    argcheck.positive_int("epochs", epochs)
    argcheck.dataset("test", test)
    expected = "a non-empty sequence of zoo network names or a mapping of factories"
    if isinstance(archs, (str, bytes)) or not isinstance(archs, (Sequence, Mapping)):
        raise argcheck.type_error("archs", expected, archs)
    if len(archs) == 0:
        raise argcheck.value_error("archs", expected, archs)
    for a in archs:
        if not isinstance(archs, Mapping):
            argcheck.choice("archs", a, tuple(MODELS))
        else:
            argcheck.function(f"archs[{a!r}]", archs[a], "a factory(channel=, num_classes=, im_size=)")
    argcheck.tensor("images", images, finite=True)
    argcheck.tensor("labels", labels, dtype="any", nonempty=False)
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(test.images.shape[1:]):
        raise InputError(f"images: expected (N, {', '.join(map(str, test.images.shape[1:]))}) like the test set, "
                         f"got {tuple(images.shape)}")
    if labels.shape != images.shape[:1] or labels.is_floating_point() or images.shape[0] == 0:
        raise InputError(f"labels: expected (N,) ints for N = {images.shape[0]} >= 1 images, got "
                         f"{tuple(labels.shape)} {labels.dtype}")
    if int(labels.min()) < 0 or int(labels.max()) >= test.num_classes:
        raise InputError(f"labels: expected values in [0, {test.num_classes}), got {int(labels.min())}.."
                         f"{int(labels.max())}")


def format_table(results: dict) -> str:
    """Markdown table: one row per variant, accuracy mean +- std per architecture, worst group."""
    variants = list(results)
    archs = list(next(iter(results.values())))
    head = "| variant | " + " | ".join(archs) + " | mean | worst-group (mean over archs) |"
    rows = [head, "|" + "---|" * (len(archs) + 3)]
    for v in variants:
        r = results[v]
        cells = [f"{100 * r[a]['mean']:.1f} ± {100 * r[a]['std']:.1f}" for a in archs]
        mean = statistics.fmean(r[a]["mean"] for a in archs)
        worst = statistics.fmean(r[a]["worst_group_mean"] for a in archs)
        rows.append(f"| {v} | " + " | ".join(cells) + f" | {100 * mean:.1f} | {100 * worst:.1f} |")
    return "\n".join(rows)
