"""Cross-architecture evaluation of a synthetic set, and worst-group accuracy (robust DD).

For each architecture and seed: train a fresh network on the synthetic images under a
recipe (:mod:`metadd_fast.recipes`; ``default``: SGD, momentum 0.9, wd 5e-4, lr / 10 at
half, DSA, 300 epochs), with hard labels or, given a teacher (``soft_labels=``), with the teacher's
temperature-softened outputs on the same augmented images (:mod:`metadd_fast.soft_labels`),
then test on the real test split.

The test split is a :class:`~metadd_fast.data.Dataset` or a class-streaming source
(a :class:`metadd_fast.sources.Source`: ``batches(batch_size)``, ``num_classes``, ``shape``,
``len``; an image folder is decoded one class at a time); it is read in batches of
``test_batch_size``, and only per-cluster counts are kept, so memory does not grow with it.

Worst-group accuracy: the test set is split into k-means clusters (fixed seed) of a fixed
low-resolution view of its images (each side average-pooled to at most ``view_size`` = 32
pixels; images of 32 x 32 or less are used as they are), fitted on at most ``fit_max``
images (all of them when there are fewer: then the clusters are k-means on the flattened
pixels, as before) and every image assigned to its nearest centre, in batches
(:func:`metadd_fast.kmeans.kmeans`, ``nearest_centroid``). The lowest per-cluster
accuracy is reported. Where the test set has a known minority group (``minority=``, a
bool mask), the accuracy on it and on the rest is reported too.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import argcheck
from .augment import DiffAugment, check_strategy
from .data import Dataset
from .errors import InputError, InputTypeError
from .kmeans import kmeans
from .models import MODELS, get_model
from .ops.nearest_centroid import nearest_centroid
from .recipes import RECIPES, Recipe, resolve
from .student import train_student

if TYPE_CHECKING:
    from .sources import Source

__all__ = ["test_clusters", "test_batches", "test_info", "cluster_view", "load_teacher", "check_teacher",
           "evaluate_synthetic", "format_table"]

FROM_RECIPE = "recipe"  # augment=FROM_RECIPE: the recipe's augmentation (None: no augmentation)


def test_info(test) -> tuple:
    """(num_classes, (C, H, W), number of images) of a Dataset or a class source."""
    from .sources import Source

    argcheck.instance("test", test, (Dataset, Source), "a Dataset or a class source")
    if isinstance(test, Dataset):
        return test.num_classes, tuple(test.images.shape[1:]), len(test)
    return test.num_classes, tuple(test.shape), len(test)


def test_batches(test, batch_size: int) -> Iterator[tuple]:
    """(images (b, C, H, W) float32 normalized, labels (b,) int64) of the test split, in order."""
    if isinstance(test, Dataset):
        yield from zip(test.images.split(batch_size), test.labels.split(batch_size))
    else:
        yield from test.batches(batch_size)


def cluster_view(x: torch.Tensor, view_size: int = 32) -> torch.Tensor:
    """(B, D) rows k-means clusters: x (B, C, H, W) with each side average-pooled to at most
    ``view_size`` (unchanged when H, W <= view_size), flattened."""
    H, W = x.shape[2:]
    if H > view_size or W > view_size:
        x = F.adaptive_avg_pool2d(x, (min(H, view_size), min(W, view_size)))
    return x.flatten(1)


def test_clusters(test, k: int = 10, seed: int = 0, *, view_size: int = 32, fit_max: int = 10000,
                  batch_size: int = 1024) -> torch.Tensor:
    """Cluster id (N,) int64 of every test image, in the order of :func:`test_batches`: k-means
    (``seed``) on the :func:`cluster_view` of at most ``fit_max`` images (a fixed random
    subset when there are more), then each image's nearest centre. Memory: ``fit_max`` view
    rows and N ids."""
    argcheck.positive_int("k", k)
    argcheck.positive_int("fit_max", fit_max)
    argcheck.positive_int("batch_size", batch_size)
    _, _, N = test_info(test)
    k = min(k, N)
    if N <= fit_max:
        return kmeans(torch.cat([cluster_view(x, view_size) for x, _ in test_batches(test, batch_size)]),
                      k, seed=seed)[1]
    keep = torch.zeros(N, dtype=torch.bool)
    keep[torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:fit_max]] = True
    rows, start = [], 0
    for x, _ in test_batches(test, batch_size):
        rows.append(cluster_view(x[keep[start:start + len(x)]], view_size))
        start += len(x)
    centres = kmeans(torch.cat(rows), k, seed=seed)[0]
    return torch.cat([nearest_centroid(cluster_view(x, view_size), centres)[0]
                      for x, _ in test_batches(test, batch_size)])


def load_teacher(spec: str, test, *, train: Optional[Source] = None, cache: Optional[str] = None,
                 flag: str = "soft_labels", seed: int = 0, epochs: int = 15, data_key: str = "") -> nn.Module:
    """The teacher of a spec (``[torchvision:|timm:]ARCH=PATH``, or a zoo ARCH trained on
    ``train``, a class source read a batch at a time, and cached in ``cache``:
    :func:`metadd_fast.model_sources.load_model`) for the test split's images and classes,
    checked (:func:`check_teacher`)."""
    from .model_sources import load_model, parse_spec

    num_classes, shape, _ = test_info(test)
    net = load_model(parse_spec(spec, flag), flag, channel=shape[0], num_classes=num_classes, im_size=shape[1:],
                     seed=seed, train=train, cache=cache, epochs=epochs, data_key=data_key)
    check_teacher(net, num_classes, shape, flag)
    return net


@torch.no_grad()
def check_teacher(teacher: nn.Module, num_classes: int, shape: tuple, flag: str = "soft_labels") -> None:
    """ValueError naming ``flag`` unless ``teacher`` maps (1, *shape) images to (1, num_classes)."""
    if not isinstance(teacher, nn.Module):
        raise InputTypeError(f"{flag}: expected an nn.Module or a network spec, got {type(teacher).__name__}")
    was_training = teacher.training
    try:
        teacher.eval()
        out = teacher(torch.zeros(1, *shape, device=next(teacher.parameters()).device))
    except RuntimeError as err:  # a map pooled below 1x1, wrong channels, wrong flattened size
        raise InputError(f"{flag}: the teacher cannot take {'x'.join(map(str, shape))} images "
                         f"({str(err).strip().splitlines()[0][:200]})") from None
    finally:
        teacher.train(was_training)
    if tuple(out.shape) != (1, num_classes):
        raise InputError(f"{flag}: the teacher gives {tuple(out.shape)[1:]} outputs, but the data set has "
                         f"{num_classes} classes")


Archs = Union[Sequence[str], Mapping[str, Callable]]


def evaluate_synthetic(images: torch.Tensor, labels: torch.Tensor, test, archs: Archs, *,
                       seeds: int = 3, epochs: Optional[int] = None, lr: Optional[float] = None,
                       batch_size: Optional[int] = None, augment=FROM_RECIPE,
                       clusters: Optional[torch.Tensor] = None, minority: Optional[torch.Tensor] = None,
                       progress: bool = True, recipe: Union[str, Recipe] = "default",
                       soft_labels: Union[nn.Module, str, None] = None, temperature: Optional[float] = None,
                       cutmix_alpha: Optional[float] = None, train: Optional[Source] = None,
                       teacher_cache: Optional[str] = None, test_batch_size: int = 1024) -> dict:
    """{arch: {"acc": [per seed], "mean", "std", "worst_group": [per seed], "worst_group_mean"}},
    plus "minority"/"majority" (per seed) and their means when ``minority`` (N,) bool is given.
    images (N, C, H, W) float of the test set's C, H, W; labels (N,) int in [0, test.num_classes).
    test: a Dataset or a class source (see the module's docstring).
    archs: zoo names, or {name: factory(channel=, num_classes=, im_size=) -> nn.Module}.
    recipe: a preset name (:data:`metadd_fast.recipes.RECIPES`) or a Recipe; ``epochs``, ``lr``,
    ``batch_size``, ``augment`` (a DSA strategy, "rrc_flip" or None), ``temperature`` and
    ``cutmix_alpha`` override it when given. soft_labels: a teacher nn.Module, or a spec for
    :func:`load_teacher` (a zoo name is trained on ``train``, a class source, and cached in ``teacher_cache``);
    None: hard labels."""
    rec = _recipe(recipe, epochs=epochs, lr=lr, batch_size=batch_size, temperature=temperature,
                  cutmix_alpha=cutmix_alpha)
    if augment != FROM_RECIPE:
        if isinstance(augment, str) and augment != "rrc_flip":
            check_strategy("augment", augment)
        elif augment is not None and not isinstance(augment, (str, DiffAugment)):
            raise argcheck.type_error("augment", "None, a DSA strategy, 'rrc_flip' or a DiffAugment", augment)
        rec = dataclasses.replace(rec, augment=augment)
    num_classes, shape, n_test = test_info(test)
    _check_args(images, labels, num_classes, shape, archs, seeds, rec.epochs)
    argcheck.positive_int("test_batch_size", test_batch_size)
    argcheck.boolean("progress", progress)
    if isinstance(soft_labels, str):
        soft_labels = load_teacher(soft_labels, test, train=train, cache=teacher_cache)
    elif soft_labels is not None:
        check_teacher(soft_labels, num_classes, shape)
    if minority is not None:
        argcheck.tensor("minority", minority, dtype=torch.bool, shape=(n_test,))
    if clusters is not None:
        argcheck.tensor("clusters", clusters, dtype="integer", shape=(n_test,))
    clusters = test_clusters(test, batch_size=test_batch_size) if clusters is None else clusters
    factories = archs if isinstance(archs, Mapping) else {a: None for a in archs}
    out = {}
    jobs = [(a, s) for a in factories for s in range(seeds)]
    for arch, seed in tqdm(jobs, desc="evaluate", disable=not progress, leave=False):
        torch.manual_seed(seed)
        make = factories[arch]
        model = make(channel=shape[0], num_classes=num_classes, im_size=shape[1:]) if make else \
            get_model(arch, shape[0], num_classes, shape[1:])
        train_student(model, images, labels, rec, teacher=soft_labels, seed=seed)
        r = out.setdefault(arch, {"acc": [], "worst_group": []})
        hits, totals, minority_hits = _test(model, test, clusters, minority, test_batch_size)
        r["acc"].append(float(hits.sum() / totals.sum()))
        r["worst_group"].append(float((hits[totals > 0] / totals[totals > 0]).min()))
        if minority is not None:
            n_min = int(minority.sum())
            r.setdefault("minority", []).append(minority_hits / n_min if n_min else math.nan)
            r.setdefault("majority", []).append((float(hits.sum()) - minority_hits) / (n_test - n_min)
                                                if n_test > n_min else math.nan)
    for r in out.values():
        r["mean"] = statistics.fmean(r["acc"])
        r["std"] = statistics.pstdev(r["acc"])
        r["worst_group_mean"] = statistics.fmean(r["worst_group"])
        for key in ("minority", "majority"):
            if key in r:
                r[f"{key}_mean"] = statistics.fmean(r[key])
    return out


@torch.no_grad()
def _test(model: nn.Module, test, clusters: torch.Tensor, minority: Optional[torch.Tensor], batch_size: int):
    """(correct per cluster (K,) float64, images per cluster (K,) float64, correct minority images)
    of ``model`` on the test split, read in batches."""
    model.eval()
    device = next(model.parameters()).device
    K = int(clusters.max()) + 1
    hits = torch.zeros(K, dtype=torch.float64)
    totals = torch.zeros(K, dtype=torch.float64)
    minority_hits, start = 0.0, 0
    for x, y in test_batches(test, batch_size):
        correct = (model(x.to(device)).argmax(1).cpu() == y).double()
        ids = clusters[start:start + len(y)]
        hits += torch.bincount(ids, weights=correct, minlength=K)
        totals += torch.bincount(ids, minlength=K).double()
        if minority is not None:
            minority_hits += float(correct[minority[start:start + len(y)]].sum())
        start += len(y)
    return hits, totals, minority_hits


def _recipe(recipe, **overrides) -> Recipe:
    for name in ("epochs", "batch_size"):
        argcheck.optional(argcheck.positive_int, name, overrides[name])
    for name in ("lr", "temperature"):
        argcheck.optional(argcheck.positive_float, name, overrides[name])
    argcheck.optional(argcheck.nonnegative_float, "cutmix_alpha", overrides["cutmix_alpha"])
    if isinstance(recipe, Recipe):
        return dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    argcheck.choice("recipe", recipe, tuple(RECIPES))
    return resolve(recipe, **overrides)


def _check_args(images, labels, num_classes: int, shape: tuple, archs, seeds, epochs) -> None:
    argcheck.positive_int("seeds", seeds)
    argcheck.positive_int("epochs", epochs)
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
    if images.dim() != 4 or tuple(images.shape[1:]) != shape:
        raise InputError(f"images: expected (N, {', '.join(map(str, shape))}) like the test set, "
                         f"got {tuple(images.shape)}")
    if labels.shape != images.shape[:1] or labels.is_floating_point() or images.shape[0] == 0:
        raise InputError(f"labels: expected (N,) ints for N = {images.shape[0]} >= 1 images, got "
                         f"{tuple(labels.shape)} {labels.dtype}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise InputError(f"labels: expected values in [0, {num_classes}), got {int(labels.min())}.."
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
