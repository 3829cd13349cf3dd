"""Class-indexed real-data sources: one interface for every data set the engine reads.

A source answers, without holding the whole data set in memory:

- ``num_classes``; ``counts`` (images per class, a list) and ``count(c)``; ``shape`` (C, H, W);
  ``mean`` / ``std`` (per channel, pixel scale [0, 1]) with which its images are normalized;
  ``name``; ``key`` (a string that changes whenever the images could: it goes into a run's
  identity, so a run never resumes on other data);
- ``class_images(c)``: every image of class ``c``, float32 (n_c, C, H, W), normalized;
- ``sample(c, n, generator)``: ``n`` images of class ``c`` drawn without replacement, the
  ones at ``torch.randperm(n_c, generator=generator)[:n]`` (all n_c, in that order, when
  ``n >= n_c``): the same draw the in-memory distillers make;
- ``batches(batch_size, classes=None)``: (images, labels) over the given classes (default:
  all) in class order, at most ``batch_size`` images each and never two classes in one batch;
  labels are global class indices. At most one class is decoded at a time;
- ``dataset()``: all of it as one in-memory :class:`~metadd_fast.data.Dataset` (small sources
  only: zoo networks are trained on it, and the in-memory pipeline reads it).

For the engine (which already calls sources this way): ``source(c)`` is
``class_images(c)``, and ``num_outputs`` (the networks' output count) is ``num_classes``.

Sources here:

- :class:`TensorSource`: an in-memory :class:`~metadd_fast.data.Dataset` (digits, CIFAR).
- :class:`RandomSource`: random images made on demand (scale tests without a data set); the
  same images as ``engine.RandomImageSource``.
- :class:`ImageFolderSource`: class sub-folders of images (ImageNet ``train/<wnid>/*.JPEG``,
  Tiny-ImageNet ``<wnid>/images/``, any class-per-folder layout), indexed once and decoded
  class by class on demand, in parallel, as uint8.

:func:`open_source` opens one by data set name, as :func:`metadd_fast.data.load` loads one.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import torch

from .data import CIFAR_STATS, Dataset, load
from .errors import InputError

__all__ = ["Source", "TensorSource", "RandomSource", "ImageFolderSource", "open_source", "IMAGENET_STATS"]

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class Source:
    """The interface (see the module's docstring). Subclasses set ``name``, ``num_classes``,
    ``counts``, ``shape``, ``mean``, ``std``, ``key`` and implement :meth:`class_images`;
    :meth:`sample` and :meth:`batches` have generic versions built on it, which a source
    that can read single images overrides (reading only what it returns)."""

    name: str
    num_classes: int
    counts: list
    shape: tuple
    mean: tuple
    std: tuple
    key: str

    # -- the interface -------------------------------------------------------------------
    def class_images(self, c: int) -> torch.Tensor:
        raise NotImplementedError

    def count(self, c: int) -> int:
        return self.counts[self._check_class(c)]

    def sample(self, c: int, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        idx = self._draw(c, n, generator)
        return self.class_images(c)[idx]

    def batches(self, batch_size: int, classes: Optional[Sequence] = None) -> Iterator[tuple]:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        for c in self._classes(classes):
            images = self.class_images(c)
            for start in range(0, images.shape[0], batch_size):
                x = images[start:start + batch_size]
                yield x, torch.full((x.shape[0],), c, dtype=torch.int64)
            del images

    def dataset(self) -> Dataset:
        images, labels = [], []
        for x, y in self.batches(max(1, max(self.counts, default=1))):
            images.append(x)
            labels.append(y)
        if not images:
            raise InputError(f"{self.name}: no images")
        return Dataset(self.name, torch.cat(images), torch.cat(labels), self.num_classes, tuple(self.mean),
                       tuple(self.std))

    # -- engine compatibility --------------------------------------------------------------
    @property
    def num_outputs(self) -> int:
        return self.num_classes

    def __call__(self, c: int) -> torch.Tensor:
        return self.class_images(c)

    def __len__(self) -> int:
        return sum(self.counts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key})"

    # -- helpers ---------------------------------------------------------------------------
    def _check_class(self, c) -> int:
        if isinstance(c, bool) or not isinstance(c, int) and not (isinstance(c, torch.Tensor) and c.ndim == 0):
            raise ValueError(f"class: expected an int in [0, {self.num_classes}), got {c!r}")
        c = int(c)
        if not 0 <= c < self.num_classes:
            raise ValueError(f"class: expected an int in [0, {self.num_classes}), got {c}")
        return c

    def _classes(self, classes) -> list:
        return list(range(self.num_classes)) if classes is None else [self._check_class(c) for c in classes]

    def _draw(self, c: int, n: int, generator) -> torch.Tensor:
        """Indices (within class ``c``) of a draw of ``n`` images: randperm(n_c, generator)[:n]."""
        count = self.count(c)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n: expected a positive int, got {n!r}")
        return torch.randperm(count, generator=generator)[:n]

    def _normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (n, C, H, W) -> float32 normalized with this source's mean and std."""
        m = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        s = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return ((pixels.float() / 255.0) - m) / s


class TensorSource(Source):
    """An in-memory :class:`~metadd_fast.data.Dataset` (already normalized) behind the interface;
    ``class_images`` returns views of its rows, grouped by class once."""

    def __init__(self, ds: Dataset):
        if not isinstance(ds, Dataset):
            raise TypeError(f"ds: expected a metadd_fast.data.Dataset, got {type(ds).__name__}")
        self.ds = ds
        self.name, self.num_classes, self.shape = ds.name, ds.num_classes, tuple(ds.images.shape[1:])
        self.mean, self.std = tuple(ds.mean), tuple(ds.std)
        order = torch.argsort(ds.labels, stable=True)
        counts = torch.bincount(ds.labels, minlength=ds.num_classes)
        self.counts = counts.tolist()
        self._index = list(torch.split(order, self.counts))
        self._contiguous = bool(torch.equal(order, torch.arange(len(order))))
        self.key = f"dataset:{ds.name}:{len(ds)}:{self.shape}"  # as engine.DatasetSource's

    def class_images(self, c: int) -> torch.Tensor:
        idx = self._index[self._check_class(c)]
        if self._contiguous:  # labels sorted: a view, no copy
            return self.ds.images[int(idx[0]):int(idx[0]) + len(idx)] if len(idx) else self.ds.images[:0]
        return self.ds.images[idx]

    def sample(self, c: int, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.ds.images[self._index[self._check_class(c)][self._draw(c, n, generator)]]

    def dataset(self) -> Dataset:
        return self.ds


class RandomSource(Source):
    """``per_class`` random images of ``shape`` per class, made on demand, whose mean depends on
    the class (ImageNet-shaped scale tests without ImageNet): the images, and the key, of
    ``engine.RandomImageSource`` with the same arguments."""

    def __init__(self, num_classes: int, per_class: int, shape: tuple, seed: int = 0):
        for name, value in (("num_classes", num_classes), ("per_class", per_class)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.num_classes, self.per_class, self.shape, self.seed = num_classes, per_class, tuple(shape), seed
        self.name, self.counts = "random", [per_class] * num_classes
        self.mean, self.std = (0.0,) * self.shape[0], (1.0,) * self.shape[0]
        self.key = f"random:{num_classes}:{per_class}:{self.shape}:{seed}"

    def class_images(self, c: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self._check_class(c))
        return torch.randn(self.per_class, *self.shape, generator=g) + torch.randn(1, *self.shape, generator=g)


class ImageFolderSource(Source):
    """Class sub-folders of ``root`` (sorted names are the classes, or ``classes=``), images
    decoded class by class on demand to uint8 ``size`` x ``size`` and normalized per batch with
    ``mean``/``std`` (default: ImageNet's for wnid-named classes, else a bounded sample). The
    index (per class: files, sizes, mtimes) is cached as ``<index_dir>/index_<split>.json``.
    In progress: the constructor's signature is final."""

    def __init__(self, root: str, size=None, *, split: str = "train", index_dir: Optional[str] = None,
                 classes: Optional[Sequence[str]] = None, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, workers: Optional[int] = None):
        raise NotImplementedError("ImageFolderSource: in progress")

    def class_pixels(self, c: int) -> torch.Tensor:
        """Every image of class ``c`` as decoded: uint8 (n_c, C, H, W)."""
        raise NotImplementedError


def open_source(name: str, split: str = "train", *, path: Optional[str] = None, size=None,
                index_dir: Optional[str] = None, classes: Optional[Sequence[str]] = None,
                mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                workers: Optional[int] = None) -> Source:
    """A source by data set name: "digits" and "cifar10"/"cifar100" load into memory (a
    :class:`TensorSource`, as :func:`metadd_fast.data.load`); "folder" opens an
    :class:`ImageFolderSource` on ``path`` (see :func:`folder_split`), its index cached in
    ``index_dir`` (a run folder) as ``index_<split>.json``."""
    if name != "folder":
        return TensorSource(load(name, split, path=path, size=size))
    raise NotImplementedError("folder sources: in progress")
