"""Large-IPC runs: class chunks, a memory-mapped synthetic set, class sharding across ranks,
cross-rank robust-DD CVaR, and per-chunk checkpoints that survive ``kill -9``.

The synthetic set (classes * ipc, C, H, W) float32 lives in ``<out>/synthetic.f32``, a
memory-mapped file, so host and device memory depend on the chunk, not on the IPC:
only the chunk being optimized is on the device (``device=``), its real images stay
on the host (pinned with ``pin_memory=True``, so batches copy asynchronously).
Classes are optimized ``classes_per_chunk`` at a time.

With ``robust_alpha`` (robust DD), a step's loss is the CVaR over the groups (real
images grouped by their nearest synthetic image) of ``cvar_chunks`` chunks optimized
together: one "round". In a ``torch.distributed`` run (gloo on CPU, NCCL on GPU;
``torchrun`` sets the environment) the chunks of a round are split over the ranks and
the CVaR goes through the ``process_group=`` path of :func:`metadd_fast.cvar`, so every
rank's tail is the tail of the whole round. Without robust_alpha, chunks are
independent and rank r takes chunks r, r + world, ... Either way the result depends
only on the configuration and the seed, not on the number of ranks.

Each finished chunk is marked by an atomically written ``chunks/chunk_XXXXX.pt``; after
a barrier rank 0 writes the merged ``synthetic.pt``. A killed run restarted with the
same command skips finished rounds and redoes at most the one that was running. A
checkpoint from another run, or a corrupt one, is refused with a clear message.
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

from .ops.cvar import check_alpha, cvar
from .data import Dataset
from .distill import DISTILLERS
from .results import atomic_save, save_synthetic

__all__ = ["EngineConfig", "SyntheticStore", "RandomImageSource", "DatasetSource", "run_chunked"]


@dataclasses.dataclass
class EngineConfig:
    """A chunked run. ``robust_alpha``: robust-DD CVaR tail over the groups of a round of
    ``cvar_chunks`` chunks (None: plain DM). ``device`` and ``pin_memory`` say where the
    run executes and are not part of the run's identity (a run may resume elsewhere)."""

    method: str = "dm"
    ipc: int = 10
    iterations: int = 20
    classes_per_chunk: int = 10
    batch_real: int = 64
    arch: str = "ConvNet"
    lr: Optional[float] = None
    seed: int = 0
    robust_alpha: Optional[float] = None
    cvar_chunks: int = 1
    device: Optional[str] = None
    pin_memory: bool = False

    def digest(self, source_key: str) -> str:
        config = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("device", "pin_memory")}
        blob = json.dumps({"config": config, "source": source_key}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def check(self, world: int) -> None:
        if self.method != "dm":
            raise ValueError(f"method: the chunked engine runs 'dm' (per-class separable), got {self.method!r}")
        for name in ("ipc", "iterations", "classes_per_chunk", "batch_real", "cvar_chunks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.robust_alpha is not None:
            check_alpha(self.robust_alpha)
            if self.cvar_chunks % world:
                raise ValueError(f"cvar_chunks: the {self.cvar_chunks} chunks of a round cannot be split evenly "
                                 f"over {world} ranks; use a multiple of the world size")
        if self.pin_memory and torch.device(self.device or "cpu").type != "cuda":
            raise ValueError(f"pin_memory: pinned host memory serves a CUDA device, got device={self.device!r}")


class SyntheticStore:
    """The synthetic images in a float32 memory-mapped file; each write maps and unmaps it,
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

    def view(self) -> torch.Tensor:
        """The whole set as a tensor backed by the file (copy-on-write, nothing is copied): pages
        are read on access and can be evicted, so a set larger than RAM can still be saved."""
        return torch.from_numpy(np.memmap(self.path, dtype=np.float32, mode="c", shape=self.shape))


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


def _chunk_dataset(source: Callable, classes: list, pin: bool) -> Dataset:
    images = [source(c) for c in classes]
    labels = torch.cat([torch.full((len(x),), i, dtype=torch.int64) for i, x in enumerate(images)])
    channel = images[0].shape[1]
    images = torch.cat(images)
    return Dataset("chunk", images.pin_memory() if pin else images, labels, len(classes), (0.0,) * channel,
                   (1.0,) * channel)


def _distiller(cfg: EngineConfig, source, classes: list):
    real = _chunk_dataset(source, classes, cfg.pin_memory)
    return DISTILLERS[cfg.method](real, cfg.ipc, lr=cfg.lr, batch_real=cfg.batch_real, arch=cfg.arch,
                                  seed=cfg.seed * 1_000_003 + classes[0], device=cfg.device)


def _robust_step(distillers: list, offsets: list, num_groups: int, alpha: float, device, group) -> None:
    """One update of this rank's chunks of a round: the loss is the CVaR over the groups of all
    the round's chunks (those of every rank of ``group``). Group ids are offset per chunk so
    that they are unique in the round. A rank without a chunk in the round still takes part."""
    for d in distillers:
        d.optimizer.zero_grad(set_to_none=True)
    parts = [d.group_losses() for d in distillers]
    if parts:
        values = torch.cat([v for v, _ in parts])
        groups = torch.cat([g + offset for (_, g), offset in zip(parts, offsets)])
    else:
        values, groups = torch.zeros(0, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    loss = cvar(values, alpha, groups, num_groups, process_group=group)
    if parts:
        loss.backward()
    for d in distillers:
        d.optimizer.step()
        d.iteration += 1


def _run_round(cfg: EngineConfig, source, store: SyntheticStore, chunks: list, positions: list, group) -> None:
    """Optimize the chunks at ``positions`` of a round (lists of classes) and write them to the store."""
    distillers = [_distiller(cfg, source, chunks[p]) for p in positions]
    sizes = [len(c) * cfg.ipc for c in chunks]
    offsets = [sum(sizes[:p]) for p in positions]
    for _ in range(cfg.iterations):
        if cfg.robust_alpha is None:
            for d in distillers:
                d.step()
        else:
            _robust_step(distillers, offsets, sum(sizes), cfg.robust_alpha, cfg.device, group)
    for p, d in zip(positions, distillers):
        store.write(chunks[p][0] * cfg.ipc, d.images)


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
    default group); rank 0 returns {"images" (backed by ``synthetic.f32``), "labels", "seconds"},
    other ranks None."""
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    world = dist.get_world_size(group) if distributed else 1
    cfg.check(world)
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
    span = cfg.cvar_chunks if cfg.robust_alpha is not None else 1
    rounds = [list(range(s, min(len(chunks), s + span))) for s in range(0, len(chunks), span)]
    if span == 1:  # independent chunks: rank r takes chunks r, r + world, ...
        mine = [(r, [0]) for r in rounds[rank::world]]
    else:  # coupled chunks: every rank takes part in every round, with every world-th chunk of it
        mine = [(r, list(range(rank, len(r), world))) for r in rounds]
    cvar_group = (group if group is not None else dist.group.WORLD) if distributed and span > 1 else None
    marker = lambda i: os.path.join(out, "chunks", f"chunk_{i:05d}.pt")  # noqa: E731
    start = time.perf_counter()
    for r, positions in tqdm(mine, desc=f"rank {rank} rounds" if span > 1 else f"rank {rank} chunks",
                             disable=not progress):
        if all([os.path.exists(marker(i)) and _read_marker(marker(i), digest) for i in r]):
            continue  # every rank sees the same markers, so all skip a round or none does
        _run_round(cfg, source, store, [chunks[i] for i in r], positions, cvar_group)
        for p in positions:
            atomic_save({"digest": digest, "classes": chunks[r[p]]}, marker(r[p]))
    if distributed:
        dist.barrier(group)
    if rank != 0:
        return None
    missing = [i for i in range(len(chunks)) if not os.path.exists(marker(i))]
    if missing:
        raise RuntimeError(f"chunks {missing} are not finished")
    images = store.view()
    labels = torch.arange(n).repeat_interleave(cfg.ipc)
    save_synthetic(os.path.join(out, "synthetic.pt"), images, labels)
    return {"images": images, "labels": labels, "seconds": time.perf_counter() - start}
