"""Robust-DD grouping: embed real images with a network and give each its group id.

Groups feed :func:`metadd_fast.cvar` (``groups=``, ``num_groups=``): either the
nearest synthetic image in embedding space (robust DD's default) or k-means
clusters of the real embeddings.

``embed`` accepts anything that maps a batch of images to (B, ...) features: a
model, ``model.features`` or a lambda. It runs under ``torch.no_grad`` in eval
mode (the model's mode is restored) and in chunks, so memory depends on the
chunk, not on N.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import argcheck
from .errors import InputError, first_line
from .kmeans import kmeans
from .ops.backends import BACKENDS
from .ops.nearest_centroid import nearest_centroid

__all__ = ["embed", "nearest_groups", "class_nearest_groups", "kmeans_groups"]

Images = Union[Tensor, Iterable]


def _check_images(name: str, images: Images) -> None:
    """A non-empty floating tensor (N, ...), or an iterable (of batches, checked as they come)."""
    if isinstance(images, Tensor):
        argcheck.tensor(name, images)
        if images.dim() < 2:
            raise InputError(f"{name}: expected a batch of images (N, ...), got shape {tuple(images.shape)}")
    elif isinstance(images, (str, bytes)) or not hasattr(images, "__iter__"):
        raise argcheck.type_error(name, "a tensor (N, ...) or an iterable of batches", images)


def _batches(images: Images, batch_size: int, name: str) -> Iterator[Tensor]:
    """Batches of a tensor (N, ...) or of an iterable of tensors / (images, labels, ...) tuples."""
    if isinstance(images, Tensor):
        yield from images.split(batch_size)
        return
    for i, batch in enumerate(images):
        batch = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        argcheck.tensor(f"{name} (batch {i})", batch)
        yield batch


class _eval_mode:
    """Eval mode for an nn.Module inside the block, its previous mode restored after."""

    def __init__(self, net):
        self.net = net if isinstance(net, nn.Module) else None

    def __enter__(self):
        self.was_training = self.net.training if self.net is not None else False
        if self.net is not None:
            self.net.eval()

    def __exit__(self, *exc):
        if self.net is not None:
            self.net.train(self.was_training)


def _check_args(net: Callable, batch_size: int, device) -> None:
    argcheck.function("net", net, "a callable (a model or a feature function)")
    argcheck.positive_int("batch_size", batch_size)
    argcheck.device("device", device)


def _embedded(net: Callable, images: Images, batch_size: int, device, name: str = "images") -> Iterator[Tensor]:
    """Embeddings of the batches of ``images``; a batch the network cannot take (wrong dtype,
    channels or size) is an InputError naming ``name``."""
    _check_args(net, batch_size, device)
    _check_images(name, images)
    with torch.no_grad(), _eval_mode(net):
        for batch in _batches(images, batch_size, name):
            if device is not None:
                batch = batch.to(device, non_blocking=True)
            try:
                out = net(batch)
            except (RuntimeError, ValueError, TypeError, IndexError) as err:
                if isinstance(err, torch.OutOfMemoryError):
                    raise
                raise InputError(f"{name}: the network cannot take a batch of shape {tuple(batch.shape)} and dtype "
                                 f"{batch.dtype} ({type(err).__name__}: {first_line(err)})") from err
            yield out.flatten(1).float()


def embed(net: Callable, images: Images, *, batch_size: int = 256, device=None, name: str = "images") -> Tensor:
    """Embeddings (N, D) float32 of all images, computed batch by batch without gradients.
    ``name``: the argument errors name (a batch the network cannot take, no image)."""
    out = list(_embedded(net, images, batch_size, device, name))
    if not out:
        raise InputError(f"{name}: expected at least one image, got none")
    return torch.cat(out)


def nearest_groups(net: Callable, real: Images, synthetic: Tensor, *, batch_size: int = 256, device=None,
                   backend: Optional[str] = None) -> Tensor:
    """Group id (N,) int64 of every real image: the index of its nearest synthetic image
    in the embedding space of ``net``. The real images are embedded and assigned one
    chunk at a time: memory is O(batch + M) embeddings for any N."""
    _check_args(net, batch_size, device)
    argcheck.tensor("synthetic", synthetic)
    _check_images("real", real)
    argcheck.optional(argcheck.choice, "backend", backend, BACKENDS)
    centroids = embed(net, synthetic, batch_size=batch_size, device=device, name="synthetic")
    ids = [nearest_centroid(e.to(centroids.device), centroids, backend=backend)[0]
           for e in _embedded(net, real, batch_size, device, "real")]
    if not ids:
        raise InputError("real: expected at least one image, got none")
    return torch.cat(ids)


def class_nearest_groups(net: Callable, real_of_class: Callable, classes: Sequence[int], synthetic: Tensor,
                         ipc: int, *, batch_size: int = 256, device=None, backend: Optional[str] = None) -> Tensor:
    """Robust DD's groups over every real image of ``classes``: each image joins its nearest
    synthetic image of its own class. ``real_of_class(c)`` gives class c's real images
    (n_c, C, H, W); ``synthetic`` (len(classes) * ipc, C, H, W) holds ``ipc`` images per
    class in the order of ``classes``. Returns (sum n_c,) int64 ids in [0, len(classes) * ipc),
    class by class. One class's images and one batch of embeddings are alive at a time:
    memory does not depend on the number of classes or on the real set's size beyond a class."""
    argcheck.positive_int("ipc", ipc)
    argcheck.function("real_of_class", real_of_class, "a callable class -> its real images")
    if isinstance(classes, (str, bytes, Tensor)) or not isinstance(classes, Sequence):
        raise argcheck.type_error("classes", "a sequence of class ids", classes)
    if not classes:
        raise InputError("classes: expected at least one class, got none")
    for i, c in enumerate(classes):
        argcheck.nonnegative_int(f"classes[{i}]", c)
    argcheck.tensor("synthetic", synthetic)
    if synthetic.shape[0] != len(classes) * ipc:
        raise InputError(f"synthetic: expected {len(classes)} classes x {ipc} images, got {synthetic.shape[0]}")
    ids = [nearest_groups(net, real_of_class(c), synthetic[i * ipc:(i + 1) * ipc], batch_size=batch_size,
                          device=device, backend=backend) + i * ipc for i, c in enumerate(classes)]
    return torch.cat(ids)


def kmeans_groups(net: Callable, real: Images, k: int, *, batch_size: int = 256, device=None,
                  **kmeans_options) -> tuple[Tensor, Tensor]:
    """(group ids (N,), centroids (k, D)): k-means clusters of the real embeddings.
    k-means needs several passes, so the N x D embeddings are kept (not the images)."""
    argcheck.positive_int("k", k)
    centroids, index = kmeans(embed(net, real, batch_size=batch_size, device=device), k, **kmeans_options)
    return index, centroids
