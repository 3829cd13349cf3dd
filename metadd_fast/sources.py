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
- ``rows(idx)``: the images at global row indices ``idx`` (int64 (n,)), float32 (n, C, H, W),
  normalized, reading only those (an image folder decodes only their files), and ``labels()``:
  every row's class, int64 (N,). Global rows are ``dataset()``'s: every class's images in
  class order (a :class:`TensorSource`: its Dataset's own order). Zoo networks are trained
  on them a batch at a time (:func:`metadd_fast.training.train_model`);
- ``dataset()``: all of it as one in-memory :class:`~metadd_fast.data.Dataset` (small sources
  only: the in-memory pipeline reads it);
- ``save_index()``: write what the source keeps about the data set's files (an image
  folder's index) into its index folder; nothing for other sources. The engine calls it
  when it starts writing a run, so a refused run leaves nothing behind.

For the engine (which already calls sources this way): ``source(c)`` is
``class_images(c)``, and ``num_outputs`` (the networks' output count) is ``num_classes``.

Sources here:

- :class:`TensorSource`: an in-memory :class:`~metadd_fast.data.Dataset` (digits, CIFAR).
- :class:`RandomSource`: random images made on demand (scale tests without a data set); the
  same images as ``engine.RandomImageSource``.
- :class:`ImageFolderSource`: class sub-folders of images (ImageNet ``train/<wnid>/*.JPEG``,
  Tiny-ImageNet ``<wnid>/images/``, any class-per-folder layout), indexed once and decoded
  class by class on demand, in parallel, as uint8.
- :class:`WhitenedSource`: another source's images ZCA-whitened on demand (``--zca``), the
  ZCA fitted on every image of it in one streamed pass (:meth:`metadd_fast.zca.ZCA.fit_batches`).

:func:`open_source` opens one by data set name, as :func:`metadd_fast.data.load` loads one.
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import math
import operator
import os
import pathlib
import re
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from . import argcheck
from .data import _IMAGE_EXT, Dataset, load, normalize_pixels
from .errors import InputError, first_line
from .results import atomic_write
from .zca import ZCA, check_features

__all__ = ["Source", "TensorSource", "RandomSource", "ImageFolderSource", "WhitenedSource", "open_source",
           "folder_split", "decode_image", "IMAGENET_STATS"]

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class Source:
    """The interface (see the module's docstring). Subclasses set ``name``, ``num_classes``,
    ``counts``, ``shape``, ``mean``, ``std``, ``key`` and implement :meth:`class_images`;
    :meth:`rows`, :meth:`sample` (through :meth:`rows`) and :meth:`batches` have generic
    versions built on it, which a source that can read single images overrides (reading only
    what it returns)."""

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
        c = self._check_class(c)
        return self.rows(sum(self.counts[:c]) + self._draw(c, n, generator))

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The images at global rows ``idx`` (int64 (n,), each in [0, len(self))), float32
        (n, C, H, W) normalized, in the order of ``idx``. Generic version: each class among
        them read once (:meth:`class_images`)."""
        cls, within = self._locate(idx)
        out = torch.empty((len(cls), *self.shape), dtype=torch.float32)
        for c in cls.unique().tolist():
            at = cls == c
            out[at] = self.class_images(c)[within[at]]
        return out

    def labels(self) -> torch.Tensor:
        """The class of every global row, int64 (N,): class c's ``count(c)`` rows, in class order."""
        return torch.arange(self.num_classes).repeat_interleave(torch.tensor(self.counts, dtype=torch.int64))

    def save_index(self) -> None:
        """Write the source's index of the data set's files (nothing here: only an image folder has one)."""

    def batches(self, batch_size: int, classes: Optional[Sequence] = None) -> Iterator[tuple]:
        argcheck.positive_int("batch_size", batch_size)
        for c in self._classes(classes):
            rows = self._batch_rows(c)
            for start in range(0, rows.shape[0], batch_size):
                x = self._batch_images(rows[start:start + batch_size])
                yield x, torch.full((x.shape[0],), c, dtype=torch.int64)
            del rows

    def _batch_rows(self, c: int) -> torch.Tensor:
        """What :meth:`batches` slices for class ``c`` (a decoded source: its uint8 pixels)."""
        return self.class_images(c)

    def _batch_images(self, rows: torch.Tensor) -> torch.Tensor:
        """A slice of :meth:`_batch_rows` as normalized float32 images."""
        return rows

    def dataset(self) -> Dataset:
        images = torch.empty((len(self), *self.shape), dtype=torch.float32)
        labels = torch.empty(len(self), dtype=torch.int64)
        at = 0
        for x, y in self.batches(256):
            images[at:at + len(y)], labels[at:at + len(y)] = x, y
            at += len(y)
        return Dataset(self.name, images, labels, self.num_classes, tuple(self.mean), tuple(self.std))

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
        try:
            odd = isinstance(c, bool) or isinstance(c, torch.Tensor) and c.ndim != 0
            k = None if odd else operator.index(c)  # int, numpy integer, 0-d integer tensor
        except TypeError:
            k = None
        if k is None or not 0 <= k < self.num_classes:
            raise ValueError(f"class: expected an int in [0, {self.num_classes}), got {c!r}")
        return k

    def _classes(self, classes) -> list:
        return list(range(self.num_classes)) if classes is None else [self._check_class(c) for c in classes]

    def _locate(self, idx) -> tuple:
        """Global rows ``idx`` (checked: int (n,) in [0, len(self))) -> (class, index within the
        class), int64 (n,) each."""
        argcheck.labels("idx", idx, num_classes=len(self))
        idx, counts = idx.to(torch.int64), torch.tensor(self.counts, dtype=torch.int64)
        ends = counts.cumsum(0)
        cls = torch.searchsorted(ends, idx, right=True)
        return cls, idx - (ends - counts)[cls]

    def _draw(self, c: int, n: int, generator) -> torch.Tensor:
        """Indices (within class ``c``) of a draw of ``n`` images: randperm(n_c, generator)[:n]."""
        count = self.count(c)
        argcheck.positive_int("n", n)
        return torch.randperm(count, generator=generator)[:n]

    def _normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (n, C, H, W) -> float32 normalized with this source's mean and std."""
        return normalize_pixels(pixels, self.mean, self.std)


class TensorSource(Source):
    """An in-memory :class:`~metadd_fast.data.Dataset` (already normalized) behind the interface;
    ``class_images`` returns its rows of the class (a view, not a copy, when the labels are sorted:
    do not write to it), grouped by class once."""

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

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The Dataset's rows ``idx`` (its own order: global rows are the Dataset's)."""
        argcheck.labels("idx", idx, num_classes=len(self))
        return self.ds.images[idx]

    def labels(self) -> torch.Tensor:
        return self.ds.labels

    def dataset(self) -> Dataset:
        return self.ds


class RandomSource(Source):
    """``per_class`` random images of ``shape`` per class, made on demand, whose mean depends on
    the class (ImageNet-shaped scale tests without ImageNet): the images, and the key, of
    ``engine.RandomImageSource`` with the same arguments."""

    def __init__(self, num_classes: int, per_class: int, shape: tuple, seed: int = 0):
        argcheck.positive_int("num_classes", num_classes)
        argcheck.positive_int("per_class", per_class)
        self.num_classes, self.per_class, self.shape, self.seed = num_classes, per_class, tuple(shape), seed
        self.name, self.counts = "random", [per_class] * num_classes
        self.mean, self.std = (0.0,) * self.shape[0], (1.0,) * self.shape[0]
        self.key = f"random:{num_classes}:{per_class}:{self.shape}:{seed}"

    def class_images(self, c: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self._check_class(c))
        return torch.randn(self.per_class, *self.shape, generator=g) + torch.randn(1, *self.shape, generator=g)


_WNID = re.compile(r"n\d{8}")
INDEX_FORMAT = 1
STATS_SAMPLE = 1000
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _to_rgb(im):
    """Any PIL mode as 8-bit RGB: 16-bit grayscale (I;16*, and I, read as 16-bit) scaled by
    1/257 (0..65535 -> 0..255, rounded), F read as [0, 1], every other mode (L, P, RGBA, LA,
    CMYK, YCbCr, 1, ...) through PIL's convert("RGB"), which drops alpha."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT:
        v = np.clip(np.asarray(im).astype(np.float32), 0, 65535) / 257.0
        return Image.fromarray(np.rint(v).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        v = np.clip(np.nan_to_num(np.asarray(im, dtype=np.float32)), 0, 1) * 255.0
        return Image.fromarray(np.rint(v).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def decode_image(path: str, size: tuple, fit: str = "resize") -> np.ndarray:
    """The decode every image-folder image goes through, uint8 (H, W, 3) for ``size`` (H, W):

    1. ``Image.open(path)``, then ``im.draft("RGB", (W, H))``: a JPEG is decoded at the largest
       DCT-domain reduction (1/2, 1/4 or 1/8, in each direction) that keeps both sides >= (W, H)
       (none if 1/2 would not); other formats are read whole.
    2. To 8-bit RGB (:func:`_to_rgb`: 16-bit grayscale scaled by 1/257, alpha dropped, CMYK
       and palettes through PIL's convert). EXIF orientation is not applied (as ImageNet).
    3. ``fit="resize"``: ``im.resize((W, H), Image.BILINEAR)``, both sides scaled (the aspect
       ratio is not kept; the earlier loader's resize). ``fit="crop"``: the same resize of the
       largest centred box of aspect W:H (``resize(..., box=...)``): the shorter side scaled to
       its target, the longer one cropped about the centre.

    Any failure raises InputError naming the file ("not a readable image")."""
    from PIL import Image

    h, w = size
    try:
        with Image.open(path) as im:
            im.draft("RGB", (w, h))
            im = _to_rgb(im)
            box = None
            if fit == "crop":
                iw, ih = im.size
                scale = min(iw / w, ih / h)
                bw, bh = w * scale, h * scale
                box = ((iw - bw) / 2, (ih - bh) / 2, (iw + bw) / 2, (ih + bh) / 2)
            return np.asarray(im.resize((w, h), Image.BILINEAR, box=box))
    except MemoryError:
        raise
    except Exception as err:  # unidentified, truncated, corrupt, a decompression bomb, unsupported mode
        raise InputError(f"{path}: not a readable image ({type(err).__name__}: {first_line(err)})") from err


def _check_size(size) -> tuple:
    pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair)):
        raise ValueError(f"size: expected a positive int or (height, width), got {size!r}")
    return tuple(pair)


def _check_stats(mean, std) -> tuple:
    if (mean is None) != (std is None):
        raise ValueError("mean, std: give both or neither")
    if mean is None:
        return None
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise ValueError(f"mean, std: expected 3 finite values each, std > 0, got {mean}, {std}")
    return mean, std


def _stat(path: str) -> tuple:
    try:
        st = os.stat(path)
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err.strerror})") from err
    return st.st_size, st.st_mtime_ns


def _list_class(root: str, name: str) -> list:
    """[(path relative to root, size, mtime_ns)] of the images under class folder ``name`` (and its
    sub-folders; symbolic links to folders are not followed, as os.walk), sorted; names starting
    with "." are skipped. InputError for a class folder without images."""
    found, pending = [], [name]
    while pending:
        rel = pending.pop()
        folder = os.path.join(root, rel)
        try:
            with os.scandir(folder) as it:
                for e in it:
                    n = e.name
                    if n.startswith("."):
                        continue
                    if e.is_dir(follow_symlinks=False):
                        pending.append(f"{rel}/{n}")
                    elif n.lower().endswith(_IMAGE_EXT):
                        try:
                            st = e.stat()
                        except OSError as err:
                            raise InputError(f"{e.path}: cannot be read ({err.strerror})") from err
                        found.append((f"{rel}/{n}", st.st_size, st.st_mtime_ns))
        except OSError as err:
            raise InputError(f"{folder}: cannot be listed ({err.strerror})") from err
    if not found:
        raise InputError(f"{os.path.join(root, name)}: class folder without images ({', '.join(_IMAGE_EXT)})")
    found.sort()
    return found


class ImageFolderSource(Source):
    """Images in class sub-folders of ``root``, decoded class by class on demand.

    Layouts: ``root/<class>/**/<image>`` (ImageNet ``train/<wnid>/*.JPEG``, Tiny-ImageNet
    ``train/<wnid>/images/*.JPEG``, any class-per-folder tree; files whose names end in
    :data:`metadd_fast.data._IMAGE_EXT`, case-insensitive, others ignored), and Tiny-ImageNet's
    ``val/images/`` + ``val/val_annotations.txt`` (file, class per line).

    - Classes: the sorted folder names (ImageNet's wnids sorted: the standard class index), or
      ``classes`` (a val folder takes the train source's, which must match its folders).
    - Index: per class, the image files with their sizes and mtimes, listed when the source
      opens. With ``index_dir`` the index kept there as ``index_<split>.json`` is read: if it
      describes the same listing (names, sizes, mtimes) it is reused (``reindexed`` is None),
      else ``reindexed`` says why, and :meth:`save_index` writes the new one (atomically).
      Opening writes nothing. ``key`` holds a digest of the listing: a changed folder is
      other data.
    - Decode (:func:`decode_image`): JPEG DCT-domain downscaling, then a bilinear resize to
      ``size`` (int or (H, W); default the first image's size), ``fit`` "resize" (both sides)
      or "crop" (centre crop). ``workers`` threads (default: the CPUs this process may use)
      decode a class's files in parallel (PIL releases the GIL while it decodes and resizes).
      Pixels are uint8 (n, 3, H, W) (:meth:`class_pixels`); images are normalized per batch.
      ``cache_bytes`` (default 0) keeps that many bytes of decoded classes (uint8, least
      recently used dropped first), so :meth:`sample` and :meth:`rows` on a kept class decode
      nothing; on other classes they decode only the files they return.
    - Statistics: ``mean``/``std`` if given; ImageNet's when every class is a wnid
      (``n`` + 8 digits: ImageNet, Tiny-ImageNet); else those of a fixed sample of at most
      1,000 images (seed 0), decoded at ``size`` when ``mean``/``std`` are first read (opening
      decodes nothing; ``key`` names the sample, a function of the listing): never a pass over
      the whole folder.
    - Bad data: InputError naming the file or folder (an unreadable, truncated or corrupt
      image, when its class is decoded; a class folder without images, when the folder is
      indexed).
    """

    def __init__(self, root: str, size=None, *, split: str = "train", index_dir: Optional[str] = None,
                 classes: Optional[Sequence[str]] = None, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, workers: Optional[int] = None, fit: str = "resize",
                 cache_bytes: int = 0):
        if not isinstance(root, (str, os.PathLike)) or not os.path.isdir(root):
            raise InputError(f"root: {root} is not a folder")
        if fit not in ("resize", "crop"):
            raise ValueError(f"fit: expected 'resize' or 'crop', got {fit!r}")
        argcheck.optional(argcheck.positive_int, "workers", workers)
        argcheck.nonnegative_int("cache_bytes", cache_bytes)
        if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", split):
            raise ValueError(f"split: expected a plain name (it names the index file), got {split!r}")
        stats, size = _check_stats(mean, std), None if size is None else _check_size(size)
        self.root, self.split, self.fit = os.path.abspath(os.fspath(root)), split, fit
        self.workers, self.cache_bytes = workers or _workers(), cache_bytes
        self._pool, self._pool_pid, self._cache = None, None, collections.OrderedDict()
        base = os.path.basename(self.root)
        self.name = os.path.basename(os.path.dirname(self.root)) if base in ("train", "val", "test") else base
        self.classes, self.files, self.reindexed = self._index(classes, index_dir)
        self.num_classes, self.counts = len(self.classes), [len(f) for f in self.files]
        self.size = size or self._first_size()
        self.shape = (3, *self.size)
        if stats is not None:
            self._stats, self.stats_from = stats, "given"
        elif all(_WNID.fullmatch(c) for c in self.classes):
            self._stats, self.stats_from = IMAGENET_STATS, "imagenet"
        else:  # sampled when first read (nothing is decoded while the flags are checked)
            self._stats, self.stats_from = None, "sample"
        # the sampled statistics are a function of the listing and the size: the key names them
        stats_key = "sample" if self._stats is None else \
            f"{','.join(f'{v:.6g}' for v in self._stats[0])}:{','.join(f'{v:.6g}' for v in self._stats[1])}"
        self.key = f"folder:{self.name}:{self.split}:{self.listing}:{self.size[0]}x{self.size[1]}:{fit}:{stats_key}"

    @property
    def mean(self) -> tuple:
        return self._statistics()[0]

    @property
    def std(self) -> tuple:
        return self._statistics()[1]

    def _statistics(self) -> tuple:
        """(mean, std): given, ImageNet's, or those of the fixed sample, decoded on first use."""
        if self._stats is None:
            self._stats = self._sample_stats()
        return self._stats

    # -- the index -------------------------------------------------------------------------
    def _folders(self, classes) -> tuple:
        """(class names, {class: [(rel, size, mtime)]} or None): the folder's layout."""
        ann = os.path.join(self.root, "val_annotations.txt")
        try:
            subdirs = sorted(e.name for e in os.scandir(self.root) if not e.name.startswith(".") and e.is_dir())
        except OSError as err:
            raise InputError(f"root: {self.root} cannot be listed ({err.strerror})") from err
        if subdirs == ["images"] and os.path.isfile(ann):  # Tiny-ImageNet val
            return self._annotated(ann, classes)
        if not subdirs:
            raise InputError(f"root: {self.root} has no class sub-folders")
        if classes is None:
            return subdirs, None
        classes = [str(c) for c in classes]
        missing, extra = sorted(set(classes) - set(subdirs)), sorted(set(subdirs) - set(classes))
        if missing or extra or len(set(classes)) != len(classes):
            raise InputError(f"root: {self.root}'s class folders do not match the {len(classes)} classes given "
                             f"(missing: {', '.join(missing[:3]) or '-'}; "
                             f"not among them: {', '.join(extra[:3]) or '-'})")
        return classes, None

    def _annotated(self, ann: str, classes) -> tuple:
        by_class = collections.defaultdict(list)
        try:
            with open(ann) as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"{ann}: cannot be read ({err})") from err
        for i, line in enumerate(lines, 1):
            parts = line.split("\t")
            if not line.strip():
                continue
            if len(parts) < 2 or not parts[0] or "/" in parts[0] or parts[0].startswith("."):
                raise InputError(f"{ann}: line {i} is not '<file>\\t<class>...'")
            rel = f"images/{parts[0]}"
            by_class[parts[1]].append((rel, *_stat(os.path.join(self.root, rel))))
        names = sorted(by_class) if classes is None else [str(c) for c in classes]
        extra = sorted(set(by_class) - set(names))
        if extra:
            raise InputError(f"{ann}: class {extra[0]} is not among the {len(names)} classes given")
        for c in names:
            if not by_class.get(c):
                raise InputError(f"{ann}: no images of class {c}")
        self._annotations = ["val_annotations.txt", *_stat(ann)]
        return names, {c: sorted(by_class[c]) for c in names}

    def _index(self, classes, index_dir) -> tuple:
        self._annotations = None
        names, listed = self._folders(classes)
        if listed is None:
            listed = dict(zip(names, self._map(lambda c: _list_class(self.root, c), names)))
        files = [[f for f, _, _ in listed[c]] for c in names]
        # sizes and mtimes kept as int64 (n_c, 2) arrays until save_index: 16 bytes a file, not ~80 as ints
        self._stamps = [np.array([(s, m) for _, s, m in listed[c]], dtype=np.int64).reshape(-1, 2) for c in names]
        table = self._table(names, files)
        listing = [table[k] for k in ("classes", "files", "sizes", "mtimes", "annotations")]
        self.listing = hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()[:16]
        if index_dir is None:
            self.index_path, reason = None, "no index folder"
        else:
            self.index_path = os.path.join(index_dir, f"index_{self.split}.json")
            reason = self._stale(self.index_path, table)
        return names, files, reason

    def _table(self, names: list, files: list) -> dict:
        """The index as written: classes, per class its files, sizes and mtimes, the annotations."""
        return {"format": INDEX_FORMAT, "root": self.root, "split": self.split, "classes": names, "files": files,
                "sizes": [a[:, 0].tolist() for a in self._stamps], "mtimes": [a[:, 1].tolist() for a in self._stamps],
                "annotations": self._annotations}

    def save_index(self) -> None:
        """Write the index into ``index_dir`` as ``index_<split>.json`` (atomically; the folder
        made if need be), unless the one there describes this listing (``reindexed`` None) or
        there is no ``index_dir``."""
        if self.index_path is None or self.reindexed is None:
            return
        text = json.dumps(self._table(self.classes, self.files), separators=(",", ":"))
        atomic_write(self.index_path, lambda tmp: pathlib.Path(tmp).write_text(text))

    @staticmethod
    def _stale(path: str, table: dict) -> Optional[str]:
        """Why the index at ``path`` does not describe ``table``'s listing (None: it does)."""
        if not os.path.exists(path):
            return "no index"
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError):
            return "unreadable index"
        if not isinstance(old, dict) or old.get("format") != INDEX_FORMAT:
            return "index of another format"
        if old.get("root") != table["root"] or old.get("split") != table["split"]:
            return "index of another folder"
        if old.get("classes") != table["classes"]:
            return "classes changed"
        if old.get("annotations") != table["annotations"]:
            return "annotations changed"
        if old == table:
            return None
        try:
            before = {f: (s, m) for fs, ss, ms in zip(old["files"], old["sizes"], old["mtimes"])
                      for f, s, m in zip(fs, ss, ms)}
        except (KeyError, TypeError):
            return "unreadable index"
        now = {f: (s, m) for fs, ss, ms in zip(table["files"], table["sizes"], table["mtimes"])
               for f, s, m in zip(fs, ss, ms)}
        added, removed = len(now.keys() - before.keys()), len(before.keys() - now.keys())
        changed = sum(1 for f in now.keys() & before.keys() if now[f] != before[f])
        return f"{added} files added, {removed} removed, {changed} changed"

    def _first_size(self) -> tuple:
        from PIL import Image

        path = os.path.join(self.root, self.files[0][0])
        try:
            with Image.open(path) as im:
                return im.height, im.width
        except Exception as err:
            raise InputError(f"{path}: not a readable image ({type(err).__name__}: {first_line(err)})") from err

    def _sample_stats(self) -> tuple:
        """Per-channel (mean, std) of at most STATS_SAMPLE images (seed 0; all when fewer)."""
        total_n = len(self)
        pick = np.arange(total_n) if total_n <= STATS_SAMPLE else \
            np.sort(np.random.default_rng(0).choice(total_n, STATS_SAMPLE, replace=False))
        cls, within = self._locate(torch.from_numpy(pick))
        chosen = [self.files[c][i] for c, i in zip(cls.tolist(), within.tolist())]
        total, total_sq, n = np.zeros(3), np.zeros(3), 0
        for start in range(0, len(chosen), 256):
            px = self._decode(chosen[start:start + 256])
            x = px.to(torch.float64) / 255.0
            total += x.sum(dim=(0, 2, 3)).numpy()
            total_sq += (x * x).sum(dim=(0, 2, 3)).numpy()
            n += x.numel() // 3
        mean = total / n
        var = np.maximum(total_sq - n * mean * mean, 0) / max(n - 1, 1)
        return tuple(mean.tolist()), tuple(np.maximum(np.sqrt(var), 1e-6).tolist())

    # -- decoding --------------------------------------------------------------------------
    def _map(self, fn, items) -> list:
        """[fn(item)] over the decode threads, in order; the first error is raised."""
        items = list(items)
        if self.workers == 1 or len(items) <= 1:
            return [fn(x) for x in items]
        if self._pool is None or self._pool_pid != os.getpid():  # a forked child has none of the threads
            self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="metadd-decode")
            self._pool_pid = os.getpid()
        futures = [self._pool.submit(fn, x) for x in items]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def _decode(self, rels: list) -> torch.Tensor:
        """uint8 (n, 3, H, W) of these files (paths relative to root), decoded in parallel."""
        out = np.empty((len(rels), *self.shape), dtype=np.uint8)

        def run(span):
            for i in range(*span):
                out[i] = decode_image(os.path.join(self.root, rels[i]), self.size, self.fit).transpose(2, 0, 1)

        parts = min(len(rels), 4 * self.workers)
        bounds = [len(rels) * k // parts for k in range(parts + 1)] if parts else [0]
        self._map(run, zip(bounds[:-1], bounds[1:]))
        return torch.from_numpy(out)

    def class_pixels(self, c: int) -> torch.Tensor:
        """Every image of class ``c`` as decoded: uint8 (n_c, 3, H, W)."""
        c = self._check_class(c)
        if c in self._cache:
            self._cache.move_to_end(c)
            return self._cache[c]
        px = self._decode(self.files[c])
        if px.numel() <= self.cache_bytes:
            self._cache[c] = px
            while sum(v.numel() for v in self._cache.values()) > self.cache_bytes:
                self._cache.popitem(last=False)
        return px

    def class_images(self, c: int) -> torch.Tensor:
        return self._normalize(self.class_pixels(c))

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows of kept classes from their pixels, the others' files decoded (only those, in
        one parallel :meth:`_decode`); normalized."""
        cls, within = self._locate(idx)
        pixels = torch.empty((len(cls), *self.shape), dtype=torch.uint8)
        todo = []
        for k, (c, i) in enumerate(zip(cls.tolist(), within.tolist())):
            if c in self._cache:
                pixels[k] = self._cache[c][i]
            else:
                todo.append((k, self.files[c][i]))
        if todo:
            pixels[[k for k, _ in todo]] = self._decode([rel for _, rel in todo])
        return self._normalize(pixels)

    def _batch_rows(self, c: int) -> torch.Tensor:  # uint8: normalized one batch at a time
        return self.class_pixels(c)

    def _batch_images(self, rows: torch.Tensor) -> torch.Tensor:
        return self._normalize(rows)

    def paths(self, c: int) -> list:
        """The files of class ``c``, absolute, in index order (the rows of :meth:`class_pixels`)."""
        return [os.path.join(self.root, f) for f in self.files[self._check_class(c)]]

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the decode threads and drop kept classes (a later decode starts new threads)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._cache.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pool"], state["_cache"] = None, collections.OrderedDict()
        return state

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class WhitenedSource(Source):
    """``source``'s images ZCA-whitened as they are read (a distill ``--zca`` run): every
    method reads what ``source``'s reads (a chunk its own classes, :meth:`rows` only those
    rows) and whitens it. The ZCA (:attr:`zca`) is fitted on every image of ``source`` when
    first needed, in one pass over its batches of ``batch_size`` (at most one class decoded
    at a time; :meth:`metadd_fast.zca.ZCA.fit_batches`). Images of more than
    :data:`metadd_fast.zca.MAX_FEATURES` values are refused here, before any is read
    (InputError naming ``source``). Global rows, labels, counts, mean and std are ``source``'s."""

    def __init__(self, source: Source, strength: float = 0.1, batch_size: int = 256):
        argcheck.instance("source", source, Source, "a metadd_fast.sources.Source")
        check_features("source", source.shape)
        argcheck.positive_float("strength", strength)
        argcheck.positive_int("batch_size", batch_size)
        self.source, self.strength, self.batch_size, self._zca = source, float(strength), batch_size, None
        self.name, self.num_classes, self.counts = f"{source.name}+zca", source.num_classes, source.counts
        self.shape = tuple(source.shape)
        self.key = f"{source.key}+zca:{self.strength:g}"

    @property
    def mean(self) -> tuple:
        return tuple(self.source.mean)

    @property
    def std(self) -> tuple:
        return tuple(self.source.std)

    @property
    def zca(self) -> ZCA:
        """The ZCA fitted on every image of ``source`` (fitted on first use)."""
        if self._zca is None:
            self._zca = ZCA.fit_batches((x for x, _ in self.source.batches(self.batch_size)), self.strength)
        return self._zca

    def _whiten(self, x: torch.Tensor) -> torch.Tensor:
        return self.zca.whiten(x) if len(x) else x  # none read: nothing to whiten (nor to fit for)

    @property
    def num_outputs(self) -> int:
        return self.source.num_outputs

    def class_images(self, c: int) -> torch.Tensor:
        return self._whiten(self.source.class_images(c))

    def sample(self, c: int, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self._whiten(self.source.sample(c, n, generator))

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self._whiten(self.source.rows(idx))

    def labels(self) -> torch.Tensor:
        return self.source.labels()

    def _batch_rows(self, c: int) -> torch.Tensor:
        return self.source._batch_rows(c)

    def _batch_images(self, rows: torch.Tensor) -> torch.Tensor:
        return self._whiten(self.source._batch_images(rows))

    def dataset(self) -> Dataset:
        return self.zca.whiten_dataset(self.source.dataset())

    def save_index(self) -> None:
        self.source.save_index()


def folder_split(path: str, split: str) -> str:
    """The folder of ``split`` under an image-folder data set ``path``: "train": ``path/train``;
    "test" or "val": ``path/val``, else ``path/test``; ``path`` itself when it has none of
    train/, val/, test/ (it is then the class folders). InputError if the split is missing."""
    if split not in ("train", "test", "val"):
        raise ValueError(f"split: expected 'train', 'test' or 'val', got {split!r}")
    if not os.path.isdir(path):
        raise InputError(f"path: {path} is not a folder")
    wanted = ["train"] if split == "train" else ["val", "test"]
    for name in wanted:
        if os.path.isdir(os.path.join(path, name)):
            return os.path.join(path, name)
    if not any(os.path.isdir(os.path.join(path, d)) for d in ("train", "val", "test")):
        return path
    raise InputError(f"path: {path} has no {' or '.join(n + '/' for n in wanted)} folder")


def open_source(name: str, split: str = "train", *, path: Optional[str] = None, size=None,
                index_dir: Optional[str] = None, like: Optional[Source] = None, **folder) -> Source:
    """A source by data set name: "digits" and "cifar10"/"cifar100" load into memory (a
    :class:`TensorSource` of :func:`metadd_fast.data.load`'s Dataset); "folder" opens an
    :class:`ImageFolderSource` on :func:`folder_split` (``path``, ``split``), its index cached
    in ``index_dir`` (a run folder) as ``index_<split>.json``. ``like``: a train source whose
    classes, statistics and size a test/val folder takes (labels and normalization match).
    ``folder``: more ImageFolderSource arguments (classes, mean, std, workers, fit, cache_bytes)."""
    if name != "folder":
        if folder:
            raise ValueError(f"{', '.join(folder)}: image-folder arguments, not for {name!r}")
        if like is not None:
            size = size or like.shape[-1]
        return TensorSource(load(name, split, path=path, size=size))
    if path is None:
        raise InputError("path: the image-folder dataset needs its root folder")
    if like is not None:
        if not isinstance(like, ImageFolderSource):
            raise ValueError(f"like: expected an ImageFolderSource, got {type(like).__name__}")
        folder.setdefault("classes", like.classes)
        folder.setdefault("mean", like.mean)
        folder.setdefault("std", like.std)
        folder.setdefault("fit", like.fit)
        size = size or like.size
    return ImageFolderSource(folder_split(path, split), size, split=split, index_dir=index_dir, **folder)

