"""Saving what a run produces: DC-format synthetic sets, atomic checkpoints, PNG figures."""
from __future__ import annotations

import os
from typing import Sequence

import torch

__all__ = ["atomic_save", "save_synthetic", "load_synthetic", "save_image_grid", "save_cam_figure",
           "meta_regions", "save_meta_cam_figure"]


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file beside ``path``, then an atomic rename: a run killed at
    any moment leaves either the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_synthetic(path: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """DC's format, which DC-Bench loads: {"data": [(images, labels)]}."""
    atomic_save({"data": [(images.detach().cpu(), labels.detach().cpu())]}, path)


def load_synthetic(path: str) -> tuple:
    """(images, labels) from a DC-format file; ValueError if it is not one."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to read is a bad file
        raise ValueError(f"{path}: not a readable synthetic-set file ({type(err).__name__}: {err})") from err
    try:
        images, labels = obj["data"][0]
        assert isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor)
        assert images.dim() == 4 and labels.shape == (images.shape[0],)
    except (KeyError, IndexError, TypeError, ValueError, AssertionError) as err:
        raise ValueError(f"{path}: expected DC's format {{'data': [(images (N, C, H, W), labels (N,))]}}") from err
    return images, labels


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    fig.savefig(path, dpi=100)
    plt.close(fig)
