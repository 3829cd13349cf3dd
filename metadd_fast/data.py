"""Datasets as tensors: the embedded default (scikit-learn's digits) and local real data.

Every loader returns a :class:`Dataset` of normalized float32 images (N, C, H, W)
and int64 labels. Nothing is downloaded: CIFAR and image folders are read from a
local path, read as data (no file can run code), and a missing, corrupt or unexpected
file raises an :class:`~metadd_fast.errors.InputError` (a ValueError) that names it.

- ``load_digits(split, size)``: the 1,797 8x8 digits of scikit-learn, resized to
  ``size`` (16 or 32), with a fixed stratified 70/30 train/test split.
- ``with_inverted_minority(ds, share, seed)``: a known minority group, a share of
  every class's images inverted (1 - pixel), for robust-DD experiments.
- ``load_cifar(path, split, name)``: CIFAR-10/100 "python version" batches, from
  the extracted folder or the .tar.gz archive.
- ``load_image_folder(root, size)``: class sub-folders of images (ImageNet
  train layout; Tiny-ImageNet's ``<class>/images/`` too), read with PIL.
"""
from __future__ import annotations

import codecs
import io
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import argcheck
from .errors import InputError

__all__ = ["Dataset", "normalize_pixels", "denormalize", "load_digits", "with_inverted_minority", "load_cifar",
           "load_image_folder", "load",
           "class_batches"]

_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class Dataset:
    """images (N, C, H, W): float32 normalized with mean/std per channel, or uint8 pixels
    (decoded image folders) normalized per batch by :meth:`take`; labels (N,) int64."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple
    std: tuple

    @property
    def channel(self) -> int:
        return self.images.shape[1]

    @property
    def im_size(self) -> tuple:
        return tuple(self.images.shape[2:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def take(self, idx) -> torch.Tensor:
        """The images at ``idx``, normalized float32: the stored rows (float storage), or uint8
        pixels through :func:`normalize_pixels` (only the rows taken are converted)."""
        x = self.images[idx]
        return normalize_pixels(x, self.mean, self.std) if x.dtype == torch.uint8 else x

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Images back to [0, 1] pixel scale (clamped), for saving and plotting."""
        return denormalize(x, self.mean, self.std)


def denormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalized images (N, C, H, W) back to [0, 1] pixel scale (clamped), for saving and plotting."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x * s + m).clamp(0, 1)


def normalize_pixels(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 pixels (n, C, H, W) -> float32 (pixels / 255 - mean) / std per channel: the one
    formula for decoded images, whether normalized per class or per batch."""
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return pixels.float().div_(255.0).sub_(m).div_(s)  # in place: one float copy at the peak


def _normalized(name, pixels: torch.Tensor, labels, num_classes, mean=None, std=None) -> Dataset:
    """pixels in [0, 1] (N, C, H, W) -> a Dataset normalized with the given (or its own) statistics."""
    if mean is None:
        mean = tuple(pixels.mean(dim=(0, 2, 3)).tolist())
        std = tuple(pixels.std(dim=(0, 2, 3)).clamp(min=1e-6).tolist())
    m = torch.tensor(mean)[:, None, None]
    s = torch.tensor(std)[:, None, None]
    return Dataset(name, ((pixels - m) / s).float().contiguous(), torch.as_tensor(labels, dtype=torch.int64),
                   num_classes, mean, std)


def _check_split(split: str) -> None:
    argcheck.choice("split", split, ("train", "test"))


DIGITS_MAX_SIZE = 1024  # 1,797 float32 images of 1024 x 1024: 7.5 GB; the command line's --size bound too


def load_digits(split: str = "train", size: int = 16) -> Dataset:
    """scikit-learn's digits, 1 channel, resized to size x size (bilinear); fixed 70/30 split."""
    _check_split(split)
    argcheck.integer("size", size, 8, DIGITS_MAX_SIZE)
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    pixels = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    labels = torch.tensor(d.target, dtype=torch.int64)
    # Fixed stratified split: within each class, every 10 images in a fixed shuffle give 3 to test.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        members = order[labels[order] == c]
        test[members[torch.arange(len(members)) % 10 < 3]] = True
    keep = test if split == "test" else ~test
    train_pixels = pixels[~test]
    mean = tuple(train_pixels.mean(dim=(0, 2, 3)).tolist())
    std = tuple(train_pixels.std(dim=(0, 2, 3)).tolist())
    return _normalized("digits", pixels[keep], labels[keep], 10, mean, std)


def with_inverted_minority(ds: Dataset, share: float, seed: int = 0) -> tuple:
    """(dataset, minority (N,) bool): a copy of ``ds`` in which round(share * n_c) images of
    every class c, drawn with ``seed``, are inverted in pixel space (1 - pixel), then
    normalized with ``ds``'s own mean and std. ``ds`` is not modified."""
    argcheck.dataset("ds", ds)
    argcheck.real("share", share, 0.0, 1.0)
    g = torch.Generator().manual_seed(argcheck.seed("seed", seed))
    minority = torch.zeros(len(ds), dtype=torch.bool)
    for idx in class_batches(ds):
        minority[idx[torch.randperm(len(idx), generator=g)[: round(share * len(idx))]]] = True
    mean = torch.tensor(ds.mean, dtype=ds.images.dtype)[:, None, None]
    std = torch.tensor(ds.std, dtype=ds.images.dtype)[:, None, None]
    images = ds.images.clone()
    images[minority] = ((1 - ds.denormalize(ds.images[minority])) - mean) / std
    return Dataset(ds.name, images, ds.labels.clone(), ds.num_classes, ds.mean, ds.std), minority


CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class _BatchUnpickler(pickle.Unpickler):
    """Reads a CIFAR batch as data: dicts, lists, bytes, str, numbers and numpy arrays. The
    only globals it resolves are the ones numpy array (and scalar) reconstruction names, so a
    crafted file cannot call anything else."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
        ("numpy._core.multiarray", "scalar"): np.int64(0).__reduce__()[0],
        ("numpy.core.multiarray", "scalar"): np.int64(0).__reduce__()[0],
        ("numpy._core.numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0],  # protocol 5
        ("numpy.core.numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol 2 spells bytes
    }

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name} (a CIFAR batch holds only data)") from None


def _unpickle(blob: bytes, where: str) -> dict:
    try:
        d = _BatchUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as err:  # any unpickling failure is a corrupt (or hostile) file
        raise InputError(f"{where}: not a readable CIFAR pickle batch ({type(err).__name__}: {err})") from err
    if not isinstance(d, dict) or b"data" not in d:
        raise InputError(f"{where}: not a CIFAR batch (no b'data' entry)")
    return d


def _batch_arrays(d: dict, key: bytes, num_classes: int, where: str) -> tuple:
    """(pixels (n, 3072) uint8, labels (n,) int64) of one batch, checked: integer pixels in
    0..255, integer labels in [0, num_classes), one label per image."""
    data = np.asarray(d[b"data"]) if isinstance(d[b"data"], (np.ndarray, list)) else None
    if data is None or data.ndim != 2 or data.shape[1] != 3072 or data.dtype.kind not in "iub":
        raise InputError(f"{where}: expected b'data' as (n, 3072) integer pixels, got "
                         f"{type(d[b'data']).__name__} {getattr(data, 'shape', '')} {getattr(data, 'dtype', '')}")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise InputError(f"{where}: pixel values must be in 0..255, found {data.min()}..{data.max()}")
    labels = d.get(key)
    labels = np.asarray(labels) if isinstance(labels, (np.ndarray, list)) else None
    if labels is None or labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise InputError(f"{where}: expected {key!r} as {data.shape[0]} integer labels (one per image)")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise InputError(f"{where}: label {bad[0]} is outside 0..{num_classes - 1}")
    return data.astype(np.uint8), labels.astype(np.int64)


def load_cifar(path: str, split: str = "train", name: str = "cifar10") -> Dataset:
    """CIFAR-10/100 from the python-version batches in ``path`` (folder or .tar.gz archive),
    read as data (no code in a batch file is run); InputError naming the file if one is
    missing, truncated, corrupt or out of range."""
    argcheck.instance("path", path, (str, os.PathLike), "a folder or .tar.gz path")
    _check_split(split)
    argcheck.choice("name", name, tuple(CIFAR_STATS))
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        key, num_classes = b"labels", 10
    else:
        files, key, num_classes = [split], b"fine_labels", 100
    blobs = _read_members(path, files)
    data, labels = [], []
    for f, blob in zip(files, blobs):
        where = os.path.join(path, f)
        pixels, y = _batch_arrays(_unpickle(blob, where), key, num_classes, where)
        data.append(pixels)
        labels.append(y)
    pixels = torch.from_numpy(np.concatenate(data)).view(-1, 3, 32, 32).float() / 255.0
    mean, std = CIFAR_STATS[name]
    return _normalized(name, pixels, np.concatenate(labels), num_classes, mean, std)


def _read_members(path: str, files: list) -> list:
    """Raw bytes of the named batch files, from a folder (searched recursively) or a tar archive."""
    if os.path.isdir(path):
        found = {f: os.path.join(root, f) for root, _, names in os.walk(path) for f in names}
        missing = [f for f in files if f not in found]
        if missing:
            raise InputError(f"path: {path} has no {', '.join(missing)}")
        out = []
        for f in files:
            try:
                with open(found[f], "rb") as fh:
                    out.append(fh.read())
            except OSError as err:
                raise InputError(f"{found[f]}: cannot be read ({err.strerror})") from err
        return out
    if not os.path.exists(path):
        raise InputError(f"path: {path} does not exist")
    try:
        with tarfile.open(path) as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            missing = [f for f in files if f not in members]
            if missing:
                raise InputError(f"path: archive {path} has no {', '.join(missing)}")
            return [tar.extractfile(members[f]).read() for f in files]
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise InputError(f"{path}: not a folder nor a complete, readable tar archive "
                         f"({type(err).__name__}: {err})") from err


def load_image_folder(root: str, size=None) -> Dataset:
    """Images in class sub-folders of ``root`` (sorted class names are the labels), all in memory:
    :class:`metadd_fast.sources.ImageFolderSource`'s decode (RGB, resized to ``size``, int or
    (H, W), default the first image's size) and statistics (ImageNet's for wnid-named classes,
    else a sample of at most 1,000 images). For small folders; large ones stream through the
    source (:func:`metadd_fast.sources.open_source`)."""
    from .sources import ImageFolderSource

    argcheck.instance("root", root, (str, os.PathLike), "a folder path")
    size = argcheck.optional(argcheck.image_size, "size", size)
    with ImageFolderSource(root, size) as src:
        argcheck.allocation("size", sum(src.counts) * int(np.prod(src.shape)) * 4, torch.device("cpu"),
                            f"{sum(src.counts)} images of {'x'.join(map(str, src.shape))} in float32")
        return src.dataset()


def load(name: str, split: str = "train", *, path: str = None, size: int = None) -> Dataset:
    """A dataset by name: "digits" (embedded), "cifar10"/"cifar100" (``path`` to the
    batches) or "folder" (``path`` to class sub-folders, e.g. <imagenet>/train). ``size``: the
    image side (digits: 16 by default; folder: the first image's size by default; CIFAR: None
    or 32, its images are not resized)."""
    argcheck.choice("name", name, ("digits", *CIFAR_STATS, "folder"))
    _check_split(split)
    if name == "digits":
        argcheck.no_effect("path", path, None, "for digits (they are embedded)")
        return load_digits(split, 16 if size is None else size)
    if name in CIFAR_STATS:
        if path is None:
            raise InputError(f"path: {name} needs the folder or .tar.gz of its python-version batches")
        if size is not None and not (argcheck.integer("size", size) == 32):
            raise InputError(f"size: {name} images are 32x32 and are not resized; expected None or 32, got {size!r}")
        return load_cifar(path, split, name)
    if name == "folder":
        if path is None:
            raise InputError("path: the image-folder dataset needs its root folder")
        argcheck.instance("path", path, (str, os.PathLike), "a folder path")
        from .sources import folder_split

        return load_image_folder(folder_split(path, split), size)


def class_batches(ds: Dataset) -> list:
    """Indices of each class's images: [tensor of indices for class 0, ...]."""
    argcheck.instance("ds", ds, Dataset, "a Dataset")
    return [torch.nonzero(ds.labels == c).flatten() for c in range(ds.num_classes)]
