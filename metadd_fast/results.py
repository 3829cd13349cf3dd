"""Saving what a run produces (DC-format synthetic sets, checkpoints, JSON, PNG figures), each write
atomic and cleaned up on failure, and reading a synthetic set back as data."""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
from typing import Callable, Sequence

import torch

from .errors import InputError, SaveError, first_line, load_failure

__all__ = ["load_checkpoint", "load_into", "atomic_write", "atomic_save", "atomic_write_json", "atomic_write_text", "load_json_object",
           "save_synthetic", "load_synthetic", "save_image_grid", "save_cam_figure", "meta_regions",
           "save_meta_cam_figure"]


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` writes the file to a temporary path beside ``path``, then an atomic
    rename: a run killed at any moment leaves either the old file or the new one, never half
    of one. On any failure the temporary file is removed; an OSError (disk full, permission)
    becomes a :class:`SaveError` that names ``path`` and says whether its last version is kept."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(err, OSError) and not isinstance(err, SaveError):
            kept = "its last version is kept" if os.path.exists(path) else "nothing was written"
            reason = os.strerror(err.errno) if err.errno else str(err)
            raise SaveError(err.errno, f"could not write {path}: {reason}; {kept}") from err
        raise


def atomic_save(obj, path: str) -> None:
    """torch.save of ``obj`` (tensors and plain containers, so that torch.load(weights_only=True)
    reads it back) through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_json_object(path: str, what: str, remedy: str) -> dict:
    """The JSON object in ``path`` (a run's description); InputError naming the file, ``what``
    it should hold and the ``remedy`` if it cannot be read or is not an object."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: corrupt {what} ({err}); {remedy}") from err
    if not isinstance(obj, dict):
        raise InputError(f"{path}: corrupt {what} (not a JSON object); {remedy}")
    return obj


def atomic_write_text(text: str, path: str) -> None:
    """``text`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text))


def atomic_write_json(obj, path: str) -> None:
    """``obj`` as indented JSON through :func:`atomic_write`."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    atomic_write(path, write)


def save_synthetic(path: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """DC's format, which DC-Bench loads: {"data": [(images, labels)]}."""
    atomic_save({"data": [(images.detach().cpu(), labels.detach().cpu())]}, path)


def load_synthetic(path: str) -> tuple:
    """(images (N, C, H, W) float32, labels (N,) int64) from a DC-format file, read as data
    (torch.load with weights_only=True); InputError naming the file if it is not one."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to read is a bad file
        refused, detail = load_failure(err)
        raise InputError(f"{path}: not a readable synthetic-set file ({'refused: ' if refused else ''}"
                         f"{detail})") from err
    expected = "expected DC's format {'data': [(images (N, C, H, W) float, labels (N,) int)]}"
    try:
        images, labels = obj["data"][0]
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise InputError(f"{path}: {expected}") from err
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise InputError(f"{path}: {expected}, got {type(images).__name__} and {type(labels).__name__}")
    if images.dim() != 4 or not images.is_floating_point() or images.shape[0] < 1:
        raise InputError(f"{path}: {expected}, got images of shape {tuple(images.shape)} and dtype {images.dtype}")
    if labels.shape != (images.shape[0],) or labels.is_floating_point() or labels.is_complex() or \
            labels.dtype == torch.bool:
        raise InputError(f"{path}: {expected}, got labels of shape {tuple(labels.shape)} and dtype {labels.dtype} "
                         f"for {images.shape[0]} images")
    if not torch.isfinite(images).all():
        raise InputError(f"{path}: the synthetic images hold NaN or Inf")
    if int(labels.min()) < 0:
        raise InputError(f"{path}: negative label {int(labels.min())}")
    return images.float(), labels.long()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(plt, fig, path: str) -> None:
    """Write ``fig`` as a PNG through :func:`atomic_write` and close it, whatever happens."""
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)

def save_image_grid(path: str, pixels: torch.Tensor, labels: torch.Tensor, title: str = "") -> None:
    """PNG grid of images in [0, 1] (N, C, H, W): one row per class."""
    plt = _plt()
    classes = labels.unique().tolist()
    per = max(int((labels == c).sum()) for c in classes)
    fig, axes = plt.subplots(len(classes), per, figsize=(per * 0.6 + 0.4, len(classes) * 0.6 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, c in enumerate(classes):
        for j, i in enumerate((labels == c).nonzero().flatten().tolist()):
            img = pixels[i].permute(1, 2, 0).cpu().numpy()
            axes[r, j].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save_figure(plt, fig, path)


def save_cam_figure(path: str, pixels: torch.Tensor, maps: torch.Tensor, arch_names: Sequence[str],
                    title: str = "") -> None:
    """PNG: one row per image, its picture then its normalized CAM under each architecture.
    pixels (B, C, H, W) in [0, 1]; maps (K, B, S_h, S_w)."""
    plt = _plt()
    K, B = maps.shape[:2]
    fig, axes = plt.subplots(B, K + 1, figsize=(1.3 * (K + 1), 1.3 * B + 0.4), squeeze=False)
    for b in range(B):
        img = pixels[b].permute(1, 2, 0).cpu().numpy()
        axes[b, 0].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
        for k in range(K):
            axes[b, k + 1].imshow(maps[k, b].detach().float().cpu().numpy(), cmap="jet", vmin=0, vmax=1)
    for ax in axes.flat:
        ax.axis("off")
    for k, name in enumerate(["image", *arch_names]):
        axes[0, k].set_title(name, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save_figure(plt, fig, path)


def meta_regions(maps: torch.Tensor) -> tuple:
    """(meta (B, S_h, S_w), heterogeneous (K, B, S_h, S_w)) of normalized CAMs (K, B, S_h, S_w):
    the meta region is where all K maps agree, their per-pixel minimum; what network k adds
    alone is its map minus that minimum."""
    meta = maps.min(dim=0).values
    return meta, maps - meta


def save_meta_cam_figure(path: str, stages: Sequence[tuple], arch_names: Sequence[str], title: str = "") -> None:
    """PNG like MetaDD's Figure 2. stages: (label, pixels (B, C, H, W) in [0, 1], maps (K, B, S_h, S_w));
    every stage has the same B. One row per image and stage: the picture, each network's
    normalized CAM, the meta region (per-pixel minimum over the networks) and each
    network's heterogeneous region (its map minus the meta region), all on one 0-1 scale."""
    plt = _plt()
    K, B = stages[0][2].shape[:2]
    cols = ["image", *arch_names, "meta (min)", *[f"{n} alone" for n in arch_names]]
    rows = [(label, pixels[b], maps[:, b]) for b in range(B) for label, pixels, maps in stages]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.15 * len(cols), 1.2 * len(rows) + 0.5), squeeze=False)
    for r, (label, pix, maps) in enumerate(rows):
        meta, alone = meta_regions(maps[:, None].detach().float().cpu())
        img = pix.permute(1, 2, 0).cpu().numpy()
        axes[r, 0].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
        panels = [*maps.detach().float().cpu(), meta[0], *alone[:, 0]]
        for c, panel in enumerate(panels, start=1):
            axes[r, c].imshow(panel.numpy(), cmap="jet", vmin=0, vmax=1)
        axes[r, 0].set_ylabel(label, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for c, name in enumerate(cols):
        axes[0, c].set_title(name, fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save_figure(plt, fig, path)


def load_checkpoint(path: str, what: str):
    """A run-folder file read as data (torch.load with weights_only=True: tensors and plain
    containers only, so a crafted file cannot run code); InputError naming the file otherwise."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any read failure: a corrupt file, or one that names code to run
        refused, detail = load_failure(err)
        if refused:
            raise InputError(f"{path}: refused: the {what} holds more than tensors and plain containers "
                             f"({detail}); delete it to start over") from err
        raise InputError(f"{path}: corrupt {what} ({detail}); delete it to start over") from err


def load_into(module: torch.nn.Module, state_dict, path: str, what: str) -> None:
    """``module.load_state_dict(state_dict)``; InputError naming ``path`` if it does not fit."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise InputError(f"{path}: the {what} does not fit this run ({first_line(err)}); "
                         f"delete it to start over") from err
