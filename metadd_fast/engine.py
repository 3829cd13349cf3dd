"""Large-IPC runs: class chunks, a memory-mapped synthetic set, class sharding across ranks,
and per-chunk checkpoints that survive ``kill -9``.

The synthetic set (classes * ipc, C, H, W) float32 lives in ``<out>/synthetic.f32``, a
memory-mapped file, so host and device memory depend on the chunk, not on the IPC.
Classes are optimized ``classes_per_chunk`` at a time. The result of a chunk
depends only on its classes and the run's seed, not on which rank runs it or in
what order, so a class-sharded run gives the same synthetic set as a single process.

In a ``torch.distributed`` run (gloo on CPU, NCCL on GPU; ``torchrun`` sets the
environment), rank r takes chunks r, r + world, ...; after a barrier, rank 0 writes the
merged ``synthetic.pt``. Each finished chunk is marked by an atomically written
``chunks/chunk_XXXXX.pt``. A killed run restarted with the same command skips
finished chunks and redoes at most the one that was running. A checkpoint from
another run, or a corrupt one, is refused with a clear message.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .data import Dataset
from .distill import DISTILLERS
from .results import atomic_save, save_synthetic

__all__ = ["EngineConfig", "SyntheticStore", "RandomImageSource", "DatasetSource", "run_chunked"]


@dataclasses.dataclass
class EngineConfig:
    method: str = "dm"
    ipc: int = 10
    iterations: int = 20
    classes_per_chunk: int = 10
    batch_real: int = 64
    arch: str = "ConvNet"
    lr: Optional[float] = None
    seed: int = 0

    def digest(self, source_key: str) -> str:
        blob = json.dumps({"config": dataclasses.asdict(self), "source": source_key}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class SyntheticStore:
    """The synthetic images in a float32 memory-mapped file; each access maps and unmaps it,
    so only the chunk in use is resident."""

    def __init__(self, path: str, num_images: int, image_shape: tuple):
        self.path, self.shape = path, (num_images, *image_shape)
        if not os.path.exists(path) or os.path.getsize(path) != int(np.prod(self.shape)) * 4:
            np.memmap(path, dtype=np.float32, mode="w+", shape=self.shape).flush()

    def write(self, start: int, images: torch.Tensor) -> None:
        mm = np.memmap(self.path, dtype=np.float32, mode="r+", shape=self.shape)
        mm[start:start + images.shape[0]] = images.detach().cpu().numpy()
        mm.flush()
        del mm

    def read(self, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        mm = np.memmap(self.path, dtype=np.float32, mode="r", shape=self.shape)
        out = torch.from_numpy(np.array(mm[start:stop]))
        del mm
        return out


class RandomImageSource:
    """Real images made on demand, class by class (ImageNet-shaped scale tests without ImageNet):
    ``per_class`` images of ``shape`` whose mean depends on the class."""

    def __init__(self, num_classes: int, per_class: int, shape: tuple, seed: int = 0):
        self.num_classes, self.per_class, self.shape, self.seed = num_classes, per_class, tuple(shape), seed
        self.key = f"random:{num_classes}:{per_class}:{self.shape}:{seed}"

    def __call__(self, c: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + c)
        return torch.randn(self.per_class, *self.shape, generator=g) + torch.randn(1, *self.shape, generator=g)


class DatasetSource:
    """Real images of one class from an in-memory :class:`Dataset`."""

    def __init__(self, ds: Dataset):
        self.ds, self.num_classes, self.shape = ds, ds.num_classes, tuple(ds.images.shape[1:])
        self.key = f"dataset:{ds.name}:{len(ds)}:{self.shape}"

    def __call__(self, c: int) -> torch.Tensor:
        return self.ds.images[self.ds.labels == c]


def _chunk_dataset(source: Callable, classes: list) -> Dataset:
    images = [source(c) for c in classes]
    labels = torch.cat([torch.full((len(x),), i, dtype=torch.int64) for i, x in enumerate(images)])
    channel = images[0].shape[1]
    return Dataset("chunk", torch.cat(images), labels, len(classes), (0.0,) * channel, (1.0,) * channel)


def _read_marker(path: str, digest: str) -> bool:
    try:
        marker = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any read failure is a corrupt marker
        raise ValueError(f"{path}: corrupt chunk checkpoint ({type(err).__name__}); delete it to redo the chunk") \
            from err
    if not isinstance(marker, dict) or marker.get("digest") != digest:
        raise ValueError(f"{path}: checkpoint of another run (config or data differ); use another --out")
    return True


def run_chunked(cfg: EngineConfig, source, out: str, *, group=None, progress: bool = True) -> Optional[dict]:
    """Distill ``source`` (a callable class -> real images, with ``num_classes``, ``shape`` and
    ``key``) in class chunks into ``out``. In a distributed run pass ``group`` (or rely on the
    default group); rank 0 returns {"images", "labels", "seconds"}, other ranks None."""
    if cfg.method != "dm":
        raise ValueError(f"method: the chunked engine runs 'dm' (per-class separable), got {cfg.method!r}")
    if cfg.classes_per_chunk < 1:
        raise ValueError(f"classes_per_chunk: expected a positive int, got {cfg.classes_per_chunk}")
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    world = dist.get_world_size(group) if distributed else 1
    digest = cfg.digest(source.key)
    os.makedirs(os.path.join(out, "chunks"), exist_ok=True)
    run_file = os.path.join(out, "run.json")
    if rank == 0:
        if os.path.exists(run_file):
            with open(run_file) as f:
                have = json.load(f).get("digest")
            if have != digest:
                raise ValueError(f"out: {out} holds a different run; use another --out")
        else:
            with open(run_file + ".tmp", "w") as f:
                json.dump({"digest": digest, "config": dataclasses.asdict(cfg), "source": source.key}, f)
            os.replace(run_file + ".tmp", run_file)
    if distributed:
        dist.barrier(group)
    n = source.num_classes
    store = SyntheticStore(os.path.join(out, "synthetic.f32"), n * cfg.ipc, source.shape)
    chunks = [list(range(s, min(n, s + cfg.classes_per_chunk))) for s in range(0, n, cfg.classes_per_chunk)]
    mine = list(range(rank, len(chunks), world))
    start = time.perf_counter()
    for i in tqdm(mine, desc=f"rank {rank} chunks", disable=not progress):
        marker = os.path.join(out, "chunks", f"chunk_{i:05d}.pt")
        if os.path.exists(marker) and _read_marker(marker, digest):
            continue
        classes = chunks[i]
        real = _chunk_dataset(source, classes)
        distiller = DISTILLERS[cfg.method](real, cfg.ipc, lr=cfg.lr, batch_real=cfg.batch_real, arch=cfg.arch,
                                           seed=cfg.seed * 1_000_003 + classes[0])
        for _ in range(cfg.iterations):
            distiller.step()
        store.write(classes[0] * cfg.ipc, distiller.images)
        atomic_save({"digest": digest, "classes": classes}, marker)
    if distributed:
        dist.barrier(group)
    if rank != 0:
        return None
    missing = [i for i in range(len(chunks)) if not os.path.exists(os.path.join(out, "chunks", f"chunk_{i:05d}.pt"))]
    if missing:
        raise RuntimeError(f"chunks {missing} are not finished")
    images = store.read()
    labels = torch.arange(n).repeat_interleave(cfg.ipc)
    save_synthetic(os.path.join(out, "synthetic.pt"), images, labels)
    return {"images": images, "labels": labels, "seconds": time.perf_counter() - start}
