"""Nothing a run folder or a data set holds can run code or end in a traceback: every file is
read as data, a failed write leaves no temporary file and keeps the last good version, and a
loader error names the file and what is wrong with it."""
import errno
import glob
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from cli_helpers import Payload, cli, one_line, payload_runs, run_main, write_cifar
from metadd_fast import data, results
from metadd_fast.cli import main
from metadd_fast.errors import InputError, SaveError

TINY = ["--iterations", "1", "--ipc", "1", "--batch-real", "8", "--arch", "ConvNetD1"]


# --- files read as data -------------------------------------------------------------------

@pytest.mark.parametrize("name, flags", [
    ("state.pt", []),
    ("models/00_metadd_models_ConvNetD1.pt", ["--metadd-weight", "1", "--metadd-models", "ConvNetD1,LeNet"]),
    ("models/00_teacher_ConvNetBN.pt", ["--method", "sre2l"]),
])
def test_crafted_run_folder_file_is_refused_without_running_it(tmp_path, name, flags):
    payload_runs(tmp_path)
    out, marker = tmp_path / "run", tmp_path / "marker"
    (out / "models").mkdir(parents=True)
    torch.save({"distiller": Payload(marker), "key": Payload(marker), "state_dicts": [Payload(marker)]},
               str(out / name))
    r = cli("distill", *TINY, *flags, "--out", out)
    assert r.returncode == 2
    one_line(r.stderr, f"{out / name}: refused:", "delete it to start over")
    assert not marker.exists(), "the crafted file ran code"


def test_crafted_cifar_batch_is_refused_without_running_it(tmp_path):
    payload_runs(tmp_path, protocol=2)
    marker = tmp_path / "marker"
    write_cifar(tmp_path / "cifar", {"data_batch_3": pickle.dumps({b"data": Payload(marker)}, protocol=2)})
    r = cli("distill", *TINY, "--dataset", "cifar10", "--data-path", tmp_path / "cifar", "--out", tmp_path / "run")
    assert r.returncode == 2
    one_line(r.stderr, f"{tmp_path / 'cifar' / 'data_batch_3'}: not a readable CIFAR pickle batch",
             "(UnpicklingError: refused global")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_cifar_batches_written_by_numpy_still_load(tmp_path):
    """The restricted unpickler reads numpy arrays and numpy scalars (labels) of any protocol."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
    for protocol in (2, 4, 5):
        write_cifar(tmp_path / f"c{protocol}", {"test_batch": pickle.dumps(
            {b"data": pixels, b"labels": list(np.arange(10))}, protocol=protocol)})
        test = data.load_cifar(str(tmp_path / f"c{protocol}"), "test")
        assert torch.equal(test.labels, torch.arange(10))
        back = test.denormalize(test.images) * 255
        assert torch.allclose(back.flatten(1), torch.tensor(pixels, dtype=torch.float32), atol=0.02)


def test_crafted_synthetic_set_is_refused(tmp_path, capsys):
    marker = tmp_path / "marker"
    torch.save({"data": [(Payload(marker), torch.arange(3))]}, str(tmp_path / "s.pt"))
    code, err = run_main(["evaluate", "--synthetic", str(tmp_path / "s.pt")], capsys)
    assert code == 2
    one_line(err, f"{tmp_path / 's.pt'}: not a readable synthetic-set file (refused: Unsupported global")
    assert not marker.exists()


def test_checkpoints_hold_only_data(tmp_path):
    """What a run writes reads back with weights_only=True (and is what a resume reads)."""
    out = tmp_path / "run"
    assert main(["distill", *TINY, "--checkpoint-every", "1", "--out", str(out)]) == 0
    state = torch.load(str(out / "state.pt"), weights_only=True)
    assert state["iteration"] == 1 and state["distillers"][0]["gen"].dtype == torch.uint8
    assert torch.load(str(out / "synthetic.pt"), weights_only=True)["data"][0][0].shape == (10, 1, 16, 16)
    assert main(["distill", *TINY, "--checkpoint-every", "1", "--out", str(out)]) == 0


def test_teacher_is_cached_as_a_state_dict(tmp_path):
    from metadd_fast.model_sources import load_model, parse_spec
    from metadd_fast.sources import TensorSource

    full = data.load_digits("train", 8)
    small = data.Dataset("small", full.images[:40], full.labels[:40] % 2, 2, full.mean, full.std)
    path = str(tmp_path / "teacher.pt")

    def teacher():
        return load_model(parse_spec("ConvNetBN", "--teacher"), "--teacher", channel=1, num_classes=2,
                          im_size=(8, 8), train=TensorSource(small), cache=path, epochs=1)

    first = teacher()
    assert all(isinstance(v, torch.Tensor) for v in torch.load(path, weights_only=True)["state_dict"].values())
    again = teacher()
    with torch.no_grad():
        assert torch.equal(first(small.images), again(small.images))


# --- failed writes ------------------------------------------------------------------------

DISK_FULL = """
import errno, sys, torch
from metadd_fast import cli
save, calls = torch.save, []
def full(obj, path, *a, **k):
    if 'state.pt' in str(path):
        calls.append(path)
        if len(calls) == 2:
            open(path, 'wb').write(b'half a checkpoint')
            raise OSError(errno.ENOSPC, 'No space left on device')
    return save(obj, path, *a, **k)
torch.save = full
sys.exit(cli.main(sys.argv[1:]))
"""


def test_disk_full_keeps_the_last_checkpoint_and_says_so_in_one_line(tmp_path):
    out = tmp_path / "run"
    r = cli("distill", "--iterations", "3", "--ipc", "1", "--batch-real", "8", "--arch", "ConvNetD1",
            "--checkpoint-every", "1", "--out", out, script=DISK_FULL)
    assert r.returncode == 1
    one_line(r.stderr, f"could not write {out / 'state.pt'}: No space left on device; its last version is kept")
    assert torch.load(str(out / "state.pt"), weights_only=True)["iteration"] == 1
    assert not glob.glob(str(out / "*.tmp*"))


@pytest.mark.parametrize("where", ["torch.save", "os.replace"])
@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "No space left on device"),
                                          (errno.EACCES, "Permission denied")])
def test_failed_write_removes_its_temporary_file(tmp_path, monkeypatch, where, code, reason):
    path = str(tmp_path / "state.pt")
    results.atomic_save({"iteration": 1}, path)
    real_save = torch.save

    def failing(*args, **kwargs):
        if where == "torch.save":
            real_save({"iteration": 2}, args[1])  # the temporary file exists when the failure hits
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(torch if where == "torch.save" else os, where.split(".")[1], failing)
    with pytest.raises(SaveError, match=f"could not write {path}: {reason}; its last version is kept"):
        results.atomic_save({"iteration": 2}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["state.pt"]
    assert torch.load(path, weights_only=True) == {"iteration": 1}


def test_interrupted_write_removes_its_temporary_file(tmp_path, monkeypatch):
    def interrupted(obj, path):
        open(path, "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        results.atomic_save({}, str(tmp_path / "x.pt"))
    assert os.listdir(tmp_path) == []


def test_permission_denied_through_the_cli(tmp_path, monkeypatch, capsys):
    """EACCES as a read-only folder gives it (simulated: root ignores permissions)."""
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(torch, "save", denied)
    code, err = run_main(["distill", *TINY, "--out", str(tmp_path / "run")], capsys)
    assert code == 1
    one_line(err, f"could not write {tmp_path / 'run' / 'state.pt'}: Permission denied; nothing was written")
    assert sorted(os.listdir(tmp_path / "run")) == ["chunks", "run.json", "synthetic.f32"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    results.atomic_save({"a": 1}, str(ro / "x.pt"))
    ro.chmod(0o500)
    try:
        with pytest.raises(SaveError, match="Permission denied; its last version is kept"):
            results.atomic_save({"a": 2}, str(ro / "x.pt"))
        code, err = run_main(["distill", *TINY, "--out", str(ro / "run")], capsys)
        assert code == 2
        one_line(err, "argument --out: cannot write in", "(permission denied)")
    finally:
        ro.chmod(0o700)
    assert os.listdir(ro) == ["x.pt"]


# --- loader errors name the file and what is wrong ------------------------------------------

def test_truncated_archive(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    blob = archive.read_bytes()
    archive.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError, match=f"{archive}: not a folder nor a complete, readable tar archive"):
        data.load_cifar(str(archive), "train")


def test_pixels_out_of_range(tmp_path):
    bad = np.full((10, 3072), 300, dtype=np.int64)
    write_cifar(tmp_path / "c", {"test_batch": {b"data": bad, b"labels": list(range(10))}})
    with pytest.raises(InputError, match=r"test_batch: pixel values must be in 0\.\.255, found 300\.\.300"):
        data.load_cifar(str(tmp_path / "c"), "test")
    write_cifar(tmp_path / "d", {"test_batch": {b"data": [[1.5] * 3072] * 10, b"labels": list(range(10))}})
    with pytest.raises(InputError, match=r"test_batch: expected b'data' as \(n, 3072\) integer pixels"):
        data.load_cifar(str(tmp_path / "d"), "test")


def test_cifar_label_out_of_range_through_the_cli(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
    write_cifar(tmp_path / "c", {"data_batch_2": {b"data": pixels, b"labels": [42] + [i % 10 for i in range(19)]}})
    r = cli("distill", *TINY, "--dataset", "cifar10", "--data-path", tmp_path / "c", "--out", tmp_path / "run")
    assert r.returncode == 2
    one_line(r.stderr, f"{tmp_path / 'c' / 'data_batch_2'}: label 42 is outside 0..9")
    write_cifar(tmp_path / "e", {"test_batch": {b"data": pixels, b"labels": [1, 2]}})
    with pytest.raises(InputError, match="test_batch: expected b'labels' as 20 integer labels"):
        data.load_cifar(str(tmp_path / "e"), "test")


def test_corrupt_run_json(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text('{"digest": ')
    code, err = run_main(["distill", *TINY, "--classes-per-chunk", "5", "--out", str(out)], capsys)
    assert code == 2
    one_line(err, f"{out / 'run.json'}: corrupt run description")


def _state(images):
    """A checkpoint of round 0 of this run (its digest from run.json) holding ``images``."""
    def make(out):
        assert main(["distill", *TINY, "--out", str(out)]) == 0  # writes run.json
        digest = json.loads((out / "run.json").read_text())["digest"]
        for f in ("state.pt", "synthetic.pt", "chunks/chunk_00000.pt"):
            (out / f).unlink()
        return {"digest": digest, "round": 0, "positions": [0], "iteration": 1, "distillers": [{"images": images}]}
    return make


@pytest.mark.parametrize("name, content, expected", [
    ("run.json", b"{not json", "run.json: corrupt run description"),
    ("run.json", b"[1, 2]", "run.json: corrupt run description (not a JSON object)"),
    ("state.pt", b"junk", "state.pt: corrupt checkpoint ("),
    ("state.pt", {"distiller": {"images": torch.zeros(3, 1, 16, 16)}}, "state.pt: checkpoint does not match"),
    ("state.pt", _state(torch.zeros(3, 1, 16, 16)), "state.pt: checkpoint does not match this run (expected"),
    ("state.pt", _state(torch.zeros(10, 1, 16, 16)), "state.pt: the checkpoint does not fit"),
    ("state.pt", [1, 2], "state.pt: checkpoint does not match this run"),
])
def test_corrupt_run_folder_files(tmp_path, capsys, name, content, expected):
    out = tmp_path / "run"
    out.mkdir()
    if callable(content):
        content = content(out)
        capsys.readouterr()
    if isinstance(content, bytes):
        (out / name).write_bytes(content)
    else:
        torch.save(content, str(out / name))
    code, err = run_main(["distill", *TINY, "--out", str(out)], capsys)
    assert code == 2
    one_line(err, f"{out / name}", expected[len(name):])


@pytest.mark.parametrize("obj, expected", [
    ({"images": torch.zeros(2, 1, 16, 16)}, "expected DC's format"),
    ({"data": [(torch.zeros(2, 16, 16), torch.zeros(2, dtype=torch.long))]}, "got images of shape (2, 16, 16)"),
    ({"data": [(torch.zeros(2, 1, 16, 16), torch.zeros(2))]}, "got labels of shape (2,) and dtype torch.float32"),
    ({"data": [(torch.full((2, 1, 16, 16), float("nan")), torch.zeros(2, dtype=torch.long))]}, "NaN or Inf"),
    ({"data": [(torch.zeros(2, 1, 16, 16), torch.tensor([0, -3]))]}, "negative label -3"),
])
def test_synthetic_set_not_in_dcs_format(tmp_path, capsys, obj, expected):
    torch.save(obj, str(tmp_path / "s.pt"))
    code, err = run_main(["evaluate", "--synthetic", str(tmp_path / "s.pt")], capsys)
    assert code == 2
    one_line(err, f"{tmp_path / 's.pt'}: ", expected)


def test_results_json_is_written_atomically(tmp_path):
    results.atomic_write_json({"a": [1.5]}, str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": [1.5]} and os.listdir(tmp_path) == ["r.json"]
