"""The engine on class-indexed sources: a decoded image folder (uint8 chunks, normalized per
batch) gives the same run as its images handed over in memory, for every method, with zoo
networks trained on it and with --zca; zoo networks are trained a batch at a time (never the
whole folder decoded); SRe2L from a teacher file without robust DD opens no image; every flag
and weights file is checked before the first image is decoded, and a refused run writes
nothing into --out."""
import os

import pytest
import torch

from metadd_fast import engine, sources
from metadd_fast.cli import main
from metadd_fast.engine import EngineConfig, run_chunked
from metadd_fast.models import get_model
from metadd_fast.sources import ImageFolderSource, TensorSource
from metadd_fast.testing_data import make_imagenet_folder, wnid

CLASSES, SHAPE = 4, (3, 16, 16)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """4 ImageNet-style classes x 5 JPEGs of 40x30, decoded at 16x16."""
    root = tmp_path_factory.mktemp("imagenet")
    make_imagenet_folder(str(root), CLASSES, 5, size=(40, 30))
    return str(root / "train")


def _weights(folder, arch, num_classes=CLASSES):
    torch.manual_seed(0)
    path = os.path.join(str(folder), f"{arch}.pt")
    torch.save(get_model(arch, SHAPE[0], num_classes, SHAPE[1:]).state_dict(), path)
    return path


BASE = dict(ipc=2, iterations=2, classes_per_chunk=2, batch_real=4, arch="ConvNetD1")


def _configs(tmp):
    metadd = dict(metadd_weight=1.0, metadd_models=tuple(f"{a}={_weights(tmp, a)}" for a in ("ConvNetD1", "ConvNetD2")))
    teacher = f"ConvNetBN={_weights(tmp, 'ConvNetBN')}"
    return {
        "dm": dict(BASE),
        "dm+robust": dict(BASE, robust_alpha=0.5, cvar_chunks=2),
        "dc+metadd": dict(BASE, method="dc", **metadd),
        "dc+metadd+robust": dict(BASE, method="dc", robust_alpha=0.5, **metadd),
        "sre2l": dict(BASE, method="sre2l", teacher=teacher),
        "sre2l+metadd+robust": dict(BASE, method="sre2l", teacher=teacher, robust_alpha=0.5, **metadd),
        "dm+one-chunk": dict(BASE, classes_per_chunk=None, checkpoint_every=1),
        # networks without weights files: zoo networks trained on the source (a batch at a time)
        "sre2l+zoo-teacher": dict(BASE, method="sre2l", teacher="ConvNetBN", pretrain_epochs=2),
        "dm+metadd-zoo": dict(BASE, metadd_weight=1.0, metadd_models=("ConvNetD1", "ConvNetD2"), pretrain_epochs=2),
        # ZCA fitted on the source's batches, each chunk's classes whitened as read
        "dm+zca+metadd-zoo": dict(BASE, zca=True, metadd_weight=1.0, metadd_models=("ConvNetD1", "ConvNetD2"),
                                  pretrain_epochs=1),
        "dc+zca+robust": dict(BASE, method="dc", zca=True, robust_alpha=0.5),
    }


@pytest.mark.parametrize("name", ["dm", "dm+robust", "dc+metadd", "dc+metadd+robust", "sre2l",
                                  "sre2l+metadd+robust", "dm+one-chunk", "sre2l+zoo-teacher", "dm+metadd-zoo",
                                  "dm+zca+metadd-zoo", "dc+zca+robust"])
def test_a_folder_source_gives_the_run_of_its_images_in_memory(tmp_path, folder, monkeypatch, name):
    cfg = EngineConfig(**_configs(tmp_path)[name])
    src = ImageFolderSource(folder, 16, index_dir=str(tmp_path))
    in_memory = TensorSource(src.dataset())  # the same images, decoded once, float32 normalized
    stored = []
    real_chunk = engine._chunk_real

    def spy(source, classes, pin, reads=True):
        out = real_chunk(source, classes, pin, reads)
        stored.append((type(source).__name__, out.images.dtype, len(out)))
        return out

    monkeypatch.setattr(engine, "_chunk_real", spy)
    torch.set_num_threads(1)
    try:
        a = run_chunked(cfg, src, str(tmp_path / "folder"), progress=False)
        b = run_chunked(cfg, in_memory, str(tmp_path / "memory"), progress=False)
    finally:
        torch.set_num_threads(2)
    assert torch.isfinite(a["images"]).all() and a["images"].abs().sum() > 0
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    if cfg.robust_alpha is not None:
        assert torch.equal(a["group_sizes"], b["group_sizes"]) and int(a["group_sizes"].sum()) == 20
    if cfg.zca:
        assert torch.equal(torch.load(tmp_path / "folder" / "zca.pt")["whiten"],
                           torch.load(tmp_path / "memory" / "zca.pt")["whiten"])
    # The folder's chunks held uint8 pixels of their own classes only, the in-memory ones float32
    # (with ZCA both whitened float32 images of their own classes); SRe2L without robust DD held none.
    per_chunk = 5 * (cfg.classes_per_chunk or CLASSES) if cfg.method != "sre2l" or cfg.robust_alpha else 0
    if cfg.zca:
        assert set(stored) == {("WhitenedSource", torch.float32, per_chunk)}
    else:
        assert set(stored) == {("ImageFolderSource", torch.uint8, per_chunk),
                               ("TensorSource", torch.float32 if per_chunk else torch.uint8, per_chunk)}


def _corrupt_folder(root, classes=CLASSES, per_class=3):
    for c in range(classes):
        os.makedirs(os.path.join(root, "train", wnid(c)))
        for i in range(per_class):
            with open(os.path.join(root, "train", wnid(c), f"{i}.JPEG"), "wb") as f:
                f.write(b"\xff\xd8 not a jpeg")
    return root


def test_sre2l_from_a_teacher_file_opens_no_image_and_bad_flags_are_reported_first(tmp_path, monkeypatch, capsys):
    root = _corrupt_folder(str(tmp_path / "data"))
    opened = []

    def decode(path, *args, **kwargs):
        opened.append(path)
        raise AssertionError(f"{path} was decoded")

    monkeypatch.setattr(sources, "decode_image", decode)
    argv = ["distill", "--dataset", "folder", "--data-path", root, "--size", "16", "--method", "sre2l",
            "--ipc", "2", "--iterations", "2", "--arch", "ConvNetD1", "--classes-per-chunk", "2"]
    teacher = _weights(tmp_path, "ConvNetBN")
    assert main(argv + ["--teacher", f"ConvNetBN={teacher}", "--out", str(tmp_path / "run")]) == 0
    images = torch.load(tmp_path / "run" / "synthetic.pt", weights_only=True)["data"][0][0]
    assert images.shape == (8, *SHAPE) and torch.isfinite(images).all()
    # A teacher for other classes, a missing file, a bad --ipc: one line, exit 2, nothing decoded.
    capsys.readouterr()
    for extra, words in [(["--teacher", f"ConvNetBN={_weights(tmp_path / 'run', 'ConvNetBN', 10)}"],
                          "--teacher: " + str(tmp_path / "run" / "ConvNetBN.pt") + " does not fit"),
                         (["--teacher", "ConvNetBN=/no/such.pt"], "/no/such.pt"),
                         (["--teacher", f"ConvNetBN={teacher}", "--ipc", "4"], "--ipc: at most 3")]:
        try:
            code = main(argv + extra + ["--out", str(tmp_path / "bad")])
        except SystemExit as exit_:  # argparse's own refusal
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2 and words in err and "Traceback" not in err, (extra, err)
    assert opened == [] and not os.path.exists(tmp_path / "bad")  # refused: nothing written, not even the index
    assert "index_train.json" in os.listdir(tmp_path / "run")  # a run that starts writes it
    # With robust DD the real images are read: one line naming the corrupt file.
    monkeypatch.undo()
    code = main(argv + ["--teacher", f"ConvNetBN={teacher}", "--robust-alpha", "0.5", "--out",
                        str(tmp_path / "robust")])
    err = capsys.readouterr().err
    assert code == 2 and ".JPEG" in err and "Traceback" not in err, err


def test_zoo_networks_train_on_a_folder_a_batch_at_a_time(tmp_path, folder, monkeypatch):
    """train_model on an ImageFolderSource decodes each batch's files (never more, never the
    whole folder through dataset()), with the weights of the same images in memory; the engine's
    zoo networks without weights files train the same way."""
    from metadd_fast.training import train_model

    src = ImageFolderSource(folder, 16)
    in_memory = TensorSource(src.dataset())
    decoded = []
    real_decode = ImageFolderSource._decode

    def spy(self, rels):
        decoded.append(len(rels))
        return real_decode(self, rels)

    def no_dataset(self):
        raise AssertionError("dataset() called: the whole folder decoded at once")

    monkeypatch.setattr(ImageFolderSource, "_decode", spy)
    monkeypatch.setattr(ImageFolderSource, "dataset", no_dataset)
    nets = []
    for source in (src, in_memory):
        torch.manual_seed(0)
        nets.append(train_model(get_model("ConvNetD1", 3, CLASSES, (16, 16)), source, source.labels(), epochs=2,
                                batch_size=6, seed=1))
    assert decoded == [6, 6, 6, 2] * 2  # 20 images, 2 epochs, batches of 6: only each batch's files
    assert all(torch.equal(a, b) for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()))
    decoded.clear()
    cfg = EngineConfig(**dict(BASE, method="sre2l", teacher="ConvNetBN", metadd_weight=1.0,
                              metadd_models=("ConvNetD1", "ConvNetD2"), pretrain_epochs=2))
    run_chunked(cfg, src, str(tmp_path / "run"), progress=False)
    assert decoded == [20] * 2 * 3  # each network: every image once an epoch, one batch (of at most 256) a step
    assert sorted(os.listdir(tmp_path / "run" / "models")) == ["00_teacher_ConvNetBN.pt",
                                                                 "01_metadd_models_ConvNetD1.pt",
                                                                 "02_metadd_models_ConvNetD2.pt"]


def test_a_refused_run_writes_nothing_into_out(tmp_path, folder, capsys):
    """A bad --ipc on a folder: one line, exit 2, and --out is not created (nor the index written
    into an existing one); a run that starts writes the index there."""
    argv = ["distill", "--dataset", "folder", "--data-path", folder, "--size", "16", "--iterations", "1",
            "--arch", "ConvNetD1", "--batch-real", "4"]
    for out in (tmp_path / "new", tmp_path / "existing"):
        if out.name == "existing":
            out.mkdir()
        assert main(argv + ["--ipc", "6", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "argument --ipc: at most 5" in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() if out.name == "new" else os.listdir(out) == []
    assert main(argv + ["--ipc", "1", "--out", str(tmp_path / "existing")]) == 0
    assert "index_train.json" in os.listdir(tmp_path / "existing")


def test_cli_warns_once_when_zoo_networks_train_on_a_folder(tmp_path, folder, capsys):
    argv = ["distill", "--dataset", "folder", "--data-path", folder, "--size", "16", "--iterations", "1",
            "--arch", "ConvNetD1", "--batch-real", "4", "--ipc", "1", "--method", "sre2l"]
    assert main(argv + ["--out", str(tmp_path / "zoo")]) == 0  # the default teacher: ConvNetBN, no weights file
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warned) == 1 and "ConvNetBN: no weights file" in warned[0] and "ARCH=PATH" in warned[0], warned
    assert main(argv + ["--teacher", f"ConvNetBN={_weights(tmp_path, 'ConvNetBN')}", "--out",
                        str(tmp_path / "file")]) == 0
    assert "warning" not in capsys.readouterr().err
