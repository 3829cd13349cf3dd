"""Distillers, data loaders, evaluation, saved results and the resumable run folder."""
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

import metadd_fast as mf
from metadd_fast import data
from metadd_fast.engine import EngineConfig, run_chunked
from metadd_fast.sources import TensorSource
from metadd_fast.distill import DC, DM, SRe2L
from metadd_fast.evaluate import evaluate_synthetic, format_table
from metadd_fast.models import ConvNet, get_model
from metadd_fast.results import load_synthetic, save_synthetic
from metadd_fast.training import train_model


@pytest.fixture(scope="module")
def tiny():
    """3 digit classes, 12 images each, 16x16."""
    full = data.load_digits("train", 16)
    keep = torch.cat([torch.nonzero(full.labels == c).flatten()[:12] for c in range(3)])
    return data.Dataset("tiny", full.images[keep], full.labels[keep], 3, full.mean, full.std)


def _fixed_loss(d, state):
    """The distiller's loss (every term) replayed from one saved random state: the same network,
    real batch and augmentation every time, so only the synthetic images differ."""
    now, net = d.gen.get_state(), getattr(d, "net", None)
    d.gen.set_state(state)
    d._ctx = (-1, None)
    if net is not None:
        d.net = None  # DC: a fresh network from the replayed state
    loss = float(sum(d.loss().values()).detach())
    d.gen.set_state(now)
    d._ctx = (-1, None)
    if net is not None:
        d.net = net
    return loss


@pytest.mark.parametrize("cls, kw", [
    (DM, dict(lr=5.0)),
    (DM, dict(lr=5.0, robust_alpha=0.5)),
    (DC, dict(lr=0.05, outer_loop=100, inner_steps=0)),  # one network throughout: its loss must fall
    (DC, dict(lr=0.05, outer_loop=100, inner_steps=0, robust_alpha=0.5)),
    (DC, dict(lr=0.05, outer_loop=100, inner_steps=0, robust_alpha=1.0, robust_weight=0.5)),
])
def test_distillers_reduce_their_loss(tiny, cls, kw):
    d = cls(tiny, 2, batch_real=8, seed=1, augment=None, **kw)
    state = d.gen.get_state()
    before = _fixed_loss(d, state)
    for _ in range(8):
        d.step()
    assert _fixed_loss(d, state) < before


def test_sre2l_reduces_its_loss(tiny):
    torch.manual_seed(0)
    teacher = train_model(ConvNet(1, 3, width=16, norm="batchnorm", im_size=(16, 16)), tiny.images, tiny.labels,
                          epochs=3)
    d = SRe2L(tiny, 2, teacher=teacher, seed=0, augment=None, lr=0.1)
    state = d.gen.get_state()
    before = _fixed_loss(d, state)
    for _ in range(10):
        d.step()
    assert _fixed_loss(d, state) < before
    with pytest.raises(ValueError, match="teacher: SRe2L needs a network with BatchNorm2d"):
        SRe2L(tiny, 2, teacher=get_model("ConvNet", 1, 3, (16, 16)))


def test_metadd_term_in_a_distiller(tiny):
    models = [get_model(n, 1, 3, (16, 16)) for n in ("ConvNetD1", "LeNet")]
    d = DM(tiny, 2, batch_real=8, metadd=mf.MetaDDLoss(models, alpha=0.5), metadd_weight=1.0, seed=0)
    terms = d.step()
    assert set(terms) == {"match", "metadd"} and terms["metadd"] > 0
    with pytest.raises(ValueError, match="metadd"):
        DM(tiny, 2, metadd_weight=1.0)
    with pytest.raises(ValueError, match="ipc"):
        DM(tiny, 100)


def test_synthetic_pt_round_trip_and_corrupt_files(tmp_path):
    images, labels = torch.randn(6, 1, 8, 8), torch.arange(3).repeat_interleave(2)
    path = str(tmp_path / "syn.pt")
    save_synthetic(path, images, labels)
    assert set(torch.load(path)) == {"data"}
    got = load_synthetic(path)
    assert torch.equal(got[0], images) and torch.equal(got[1], labels)
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable synthetic-set file"):
        load_synthetic(str(tmp_path / "bad.pt"))
    torch.save({"images": images}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="expected DC's format"):
        load_synthetic(str(tmp_path / "other.pt"))


def test_evaluation_table_shape(tiny):
    res = evaluate_synthetic(tiny.images[::4], tiny.labels[::4], tiny, ["ConvNetD1", "LeNet"], seeds=2, epochs=2,
                             augment=None, progress=False)
    assert set(res) == {"ConvNetD1", "LeNet"}
    for r in res.values():
        assert len(r["acc"]) == 2 and len(r["worst_group"]) == 2
        assert 0 <= r["worst_group_mean"] <= r["mean"] <= 1
    table = format_table({"base": res, "+MetaDD": res}).splitlines()
    assert len(table) == 4 and table[0].count("|") == 2 + 4


def test_digits_loader():
    train, test = data.load_digits("train", 16), data.load_digits("test", 32)
    assert train.images.shape[1:] == (1, 16, 16) and test.images.shape[1:] == (1, 32, 32)
    assert len(train) + len(test) == 1797 and abs(len(test) / 1797 - 0.3) < 0.02
    assert torch.equal(torch.bincount(test.labels), torch.bincount(data.load_digits("test", 16).labels))
    assert abs(float(train.images.mean())) < 1e-4
    with pytest.raises(ValueError, match="split"):
        data.load_digits("val")


def _cifar_batch(n, rng, fine=False):
    key = b"fine_labels" if fine else b"labels"
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: list(rng.integers(0, 10, n))}


def test_cifar_loader_from_folder_and_archive(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {f"data_batch_{i}": _cifar_batch(4, rng) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(3, rng)
    for name, b in batches.items():
        (folder / name).write_bytes(pickle.dumps(b))
    train = data.load_cifar(str(tmp_path), "train")
    assert train.images.shape == (20, 3, 32, 32) and train.num_classes == 10
    pixel = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32)[:, 0, 0] / 255.0
    assert torch.allclose(train.denormalize(train.images[:1])[0, :, 0, 0], torch.tensor(pixel, dtype=torch.float32),
                          atol=1e-5)
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    assert torch.equal(data.load_cifar(str(archive), "test").images, data.load_cifar(str(tmp_path), "test").images)
    (folder / "test_batch").write_bytes(b"\x80garbage")
    with pytest.raises(ValueError, match="test_batch: not a readable CIFAR pickle batch"):
        data.load_cifar(str(tmp_path), "test")
    with pytest.raises(ValueError, match="has no"):
        data.load_cifar(str(tmp_path / "cifar-10-batches-py" / ".."), "train", name="cifar100")


def test_image_folder_loader(tmp_path):
    from PIL import Image

    for c, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / "train" / c / "images").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (12, 10), color).save(tmp_path / "train" / c / "images" / f"{i}.png")
    ds = data.load("folder", "train", path=str(tmp_path), size=8)
    assert ds.images.shape == (4, 3, 8, 8) and ds.labels.tolist() == [0, 0, 1, 1] and ds.num_classes == 2
    (tmp_path / "train" / "dog" / "images" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png: not a readable image"):
        data.load("folder", "train", path=str(tmp_path))


def _tiny_cfg(**kw):
    base = dict(iterations=4, ipc=1, batch_real=8, checkpoint_every=1, arch="ConvNetD1", classes_per_chunk=None)
    base.update(kw)
    return EngineConfig(**base)


def _run(cfg, out):
    """The one runner (one chunk of every class) on the digits, as ``metadd-fast distill`` runs it."""
    return run_chunked(cfg, TensorSource(data.load_digits("train", 16)), out, progress=False)


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    full = _run(_tiny_cfg(), str(tmp_path / "a"))
    real_step = DM.step

    def dying_step(self):
        if self.iteration == 2:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(DM, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        _run(_tiny_cfg(), str(tmp_path / "b"))
    monkeypatch.setattr(DM, "step", real_step)
    assert not os.path.exists(tmp_path / "b" / "synthetic.pt")
    resumed = _run(_tiny_cfg(), str(tmp_path / "b"))
    assert torch.equal(resumed["images"], full["images"])
    assert os.path.exists(tmp_path / "b" / "synthetic.png")


def test_mismatched_or_corrupt_run_folder_is_refused(tmp_path):
    _run(_tiny_cfg(iterations=1), str(tmp_path))
    with pytest.raises(ValueError, match="holds a different run \\(differs in ipc\\)"):
        _run(_tiny_cfg(iterations=1, ipc=2), str(tmp_path))
    (tmp_path / "state.pt").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        _run(_tiny_cfg(iterations=1), str(tmp_path))
