"""Export of a synthetic set: SRe2L's PNG folder (round trip to 8 bits) and DD-Ranking's tensors,
from the API and the command line, and the command line's refusals."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import cli, one_line
from metadd_fast.data import load_digits
from metadd_fast.export import export_imagefolder, export_tensors, png_path, to_uint8
from metadd_fast.results import save_synthetic


def read_folder(out, mean, std):
    """The PNG folder read back with PIL: (images normalized float32, labels), in file order."""
    images, labels = [], []
    for folder in sorted(os.listdir(out)):
        for name in sorted(os.listdir(os.path.join(out, folder))):
            with Image.open(os.path.join(out, folder, name)) as im:
                a = np.asarray(im, dtype=np.float32) / 255
            a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
            images.append((torch.from_numpy(a) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
            labels.append(int(folder[3:]))
    return torch.stack(images), torch.tensor(labels)


@pytest.mark.parametrize("channels", [1, 3])
def test_png_round_trip_equals_the_set_to_8_bits(tmp_path, channels):
    mean, std = (0.5, 0.4, 0.3)[:channels], (0.25, 0.2, 0.3)[:channels]
    labels = torch.tensor([2, 0, 2, 1, 0, 2])
    pixels = torch.rand(6, channels, 9, 7)
    images = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    images[0, 0, 0, 0] = 100.0  # out of range: clamped to 255
    paths = export_imagefolder(images, labels, str(tmp_path / "out"), mean, std)
    assert paths[2] == png_path(str(tmp_path / "out"), 2, 1) == str(tmp_path / "out" / "new002" / "class002_id001.png")
    assert sorted(os.listdir(tmp_path / "out")) == ["new000", "new001", "new002"]
    assert sorted(os.listdir(tmp_path / "out" / "new002")) == [f"class002_id00{i}.png" for i in range(3)]
    back, back_labels = read_folder(str(tmp_path / "out"), mean, std)
    order = torch.argsort(labels, stable=True)
    assert torch.equal(back_labels, labels[order])
    bound = torch.tensor(std)[:, None, None].reciprocal() * (0.5 / 255) + 1e-6
    clipped = images[order].clamp(max=((1 - torch.tensor(mean)) / torch.tensor(std))[:, None, None])
    assert ((back - clipped).abs() <= bound).all()
    assert torch.equal(to_uint8(back, mean, std), to_uint8(images[order], mean, std))  # exact at 8 bits


def test_tensors_file_reads_back_with_weights_only(tmp_path):
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 1, 3])
    export_tensors(images, labels, str(tmp_path / "t.pt"))
    obj = torch.load(tmp_path / "t.pt", weights_only=True)
    assert set(obj) == {"images", "labels"} and torch.equal(obj["images"], images)
    assert torch.equal(obj["labels"], labels) and obj["labels"].dtype == torch.int64


def test_cli_export_and_its_refusals(tmp_path):
    train = load_digits("train", 16)
    save_synthetic(str(tmp_path / "s.pt"), train.images[:20:2], train.labels[:20:2])
    r = cli("export", "--synthetic", tmp_path / "s.pt", "--format", "imagefolder", "--out", tmp_path / "dir")
    assert r.returncode == 0, r.stderr
    back, _ = read_folder(str(tmp_path / "dir"), train.mean, train.std)
    assert len(back) == 10 and back.shape[1:] == (1, 16, 16)
    r = cli("export", "--synthetic", tmp_path / "s.pt", "--format", "tensors", "--out", tmp_path / "t.pt")
    assert r.returncode == 0 and torch.load(tmp_path / "t.pt", weights_only=True)["images"].shape == (10, 1, 16, 16)
    r = cli("export", "--synthetic", tmp_path / "s.pt", "--format", "imagefolder", "--out", tmp_path / "d2",
            "--size", "32")
    assert r.returncode == 2
    one_line(r.stderr, "argument --synthetic:", "1x16x16", "1x32x32")
    assert not (tmp_path / "d2").exists()
    r = cli("export", "--synthetic", tmp_path / "missing.pt", "--format", "tensors", "--out", tmp_path / "x.pt")
    assert r.returncode == 2
    one_line(r.stderr, "argument --synthetic:")


def test_round_trip_through_the_folder_source(tmp_path):
    """Read back with metadd_fast.sources.ImageFolderSource (RGB, the same statistics): every
    class's images equal the exported ones to half a grey level."""
    from metadd_fast.sources import ImageFolderSource

    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    labels = torch.tensor([1, 0, 1, 2, 2, 2])
    images = (torch.rand(6, 3, 8, 8) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    export_imagefolder(images, labels, str(tmp_path / "syn"), mean, std)
    src = ImageFolderSource(str(tmp_path / "syn"), mean=mean, std=std)
    assert src.classes == ["new000", "new001", "new002"] and src.counts == [1, 2, 3]
    bound = (0.5 / 255) / torch.tensor(std)[:, None, None] + 1e-6
    for c in range(3):
        back = src.class_images(c)
        assert ((back - images[labels == c]).abs() <= bound).all()
        assert torch.equal(to_uint8(back, mean, std), to_uint8(images[labels == c], mean, std))


def test_cli_evaluate_streams_a_folder_test_split(tmp_path):
    """An exported set is a data set too: evaluate on train/ and val/ folders (read by class)."""
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    labels = torch.arange(4).repeat_interleave(3)
    images = (torch.rand(12, 3, 16, 16) - 0.5) / 0.25
    for split in ("train", "val"):
        export_imagefolder(images, labels, str(tmp_path / "data" / split), mean, std)
    save_synthetic(str(tmp_path / "s.pt"), images[::3], labels[::3])
    r = cli("evaluate", "--synthetic", tmp_path / "s.pt", "--dataset", "folder", "--data-path", tmp_path / "data",
            "--archs", "LeNet", "--seeds", "1", "--epochs", "1", "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert "| LeNet" in r.stdout
