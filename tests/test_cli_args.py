"""Every command-line argument is checked before any work starts: a bad one ends in one line
naming the flag and what was expected, exit status 2, no traceback, nothing written to --out.
Internal errors keep their traceback."""
import os

import pytest
import torch

from cli_helpers import cli, one_line, run_main, write_cifar
from metadd_fast.cli import main

TINY = ["--iterations", "1", "--ipc", "1", "--batch-real", "8", "--arch", "ConvNetD1"]


@pytest.mark.parametrize("argv, flag, expected", [
    (["--checkpoint-every", "0"], "--checkpoint-every", "expected a positive int, got '0'"),
    (["--metadd-weight", "1", "--metadd-alpha", "-1"], "--metadd-alpha", "expected a float in (0, 1] or none"),
    (["--iterations", "-5"], "--iterations", "expected a positive int, got '-5'"),
    (["--iterations", "0"], "--iterations", "expected a positive int, got '0'"),
    (["--batch-real", "-4"], "--batch-real", "expected a positive int, got '-4'"),
    (["--lr", "nan"], "--lr", "expected a finite float > 0, got 'nan'"),
])
def test_the_issues_bad_distill_flags_through_the_cli(tmp_path, argv, flag, expected):
    out = tmp_path / "run"
    r = cli("distill", *argv, "--out", out)
    assert r.returncode == 2
    one_line(r.stderr, f"metadd-fast distill: argument {flag}: {expected}")
    assert not out.exists(), "nothing is written before the checks pass"


def test_out_naming_an_existing_file_through_the_cli(tmp_path):
    (tmp_path / "f").write_text("mine")
    r = cli("distill", *TINY, "--out", tmp_path / "f")
    assert r.returncode == 2
    one_line(r.stderr, "argument --out: expected a folder", "an existing file")
    assert (tmp_path / "f").read_text() == "mine"


def test_evaluate_seeds_0_through_the_cli(tmp_path):
    r = cli("evaluate", "--synthetic", tmp_path / "s.pt", "--seeds", "0")
    assert r.returncode == 2
    one_line(r.stderr, "metadd-fast evaluate: argument --seeds: expected a positive int, got '0'")


def _synthetic(path, images, labels):
    torch.save({"data": [(images, labels)]}, str(path))
    return str(path)


@pytest.mark.parametrize("images, labels, expected", [
    (torch.randn(10, 3, 16, 16), torch.arange(10), "holds 3x16x16 images, but --dataset digits gives 1x16x16"),
    (torch.randn(10, 1, 16, 16), torch.tensor([57] + [0] * 9), "has label 57, but --dataset digits has classes 0..9"),
])
def test_synthetic_set_that_does_not_fit_the_data_set_through_the_cli(tmp_path, images, labels, expected):
    r = cli("evaluate", "--synthetic", _synthetic(tmp_path / "s.pt", images, labels), "--archs", "ConvNetD1",
            "--seeds", "1", "--epochs", "1", "--json", tmp_path / "res.json")
    assert r.returncode == 2
    one_line(r.stderr, "argument --synthetic:", expected)
    assert not (tmp_path / "res.json").exists()


@pytest.fixture
def cifar_folder(tmp_path):
    write_cifar(tmp_path / "cifar")
    return str(tmp_path / "cifar")


DISTILL_CASES = [  # every other flag of distill: (argv, the flag named, what the line says)
    (["--ipc", "0"], "--ipc", "expected a positive int"),
    (["--ipc", "200"], "--ipc", "at most 120 (the fewest real images of a class in digits: class 8), got 200"),
    (["--size", "4"], "--size", "expected an int in [8, 1024], got '4'"),
    (["--size", "16.5"], "--size", "expected an int in [8, 1024]"),
    (["--seed", "-1"], "--seed", "expected an int in [0, 4294967296)"),
    (["--seed", str(2 ** 32)], "--seed", "expected an int in [0, 4294967296)"),
    (["--lr", "0"], "--lr", "expected a finite float > 0"),
    (["--lr", "inf"], "--lr", "expected a finite float > 0"),
    (["--metadd-weight", "-1"], "--metadd-weight", "expected a finite float >= 0"),
    (["--metadd-weight", "inf"], "--metadd-weight", "expected a finite float >= 0"),
    (["--metadd-weight", "1", "--metadd-models", "ConvNet"], "--metadd-models", "expected at least 2 networks"),
    (["--metadd-weight", "1", "--metadd-models", "ConvNet,Foo"], "--metadd-models", "unknown zoo network 'Foo'"),
    (["--metadd-weight", "1", "--metadd-models", f"ConvNet={__file__},LeNet"], "--metadd-models",
     f"{__file__}: not a weights file torch.load(weights_only=True) reads"),
    (["--metadd-weight", "1", "--metadd-models", "LeNet,LeNet"], "--metadd-models", "expected distinct names"),
    (["--metadd-models", "ConvNet,LeNet"], "--metadd-models", "has no effect without --metadd-weight > 0"),
    (["--metadd-alpha", "0.5"], "--metadd-alpha", "has no effect without --metadd-weight > 0"),
    (["--metadd-precision", "bf16"], "--metadd-precision", "has no effect without --metadd-weight > 0"),
    (["--metadd-weight", "1", "--metadd-precision", "tf32"], "--metadd-precision", "invalid choice: 'tf32'"),
    (["--metadd-weight", "1", "--metadd-alpha", "nan"], "--metadd-alpha", "expected a float in (0, 1] or none"),
    (["--robust-alpha", "0"], "--robust-alpha", "expected a float in (0, 1] or none, got '0'"),
    (["--robust-alpha", "1.5"], "--robust-alpha", "expected a float in (0, 1] or none, got '1.5'"),
    (["--arch", "Foo"], "--arch", "expected one of ConvNet"),
    (["--method", "foo"], "--method", "invalid choice: 'foo'"),
    (["--dataset", "imagenet"], "--dataset", "invalid choice: 'imagenet'"),
    (["--dataset", "cifar10"], "--data-path", "--dataset cifar10 needs the path of its local copy"),
    (["--data-path", "x"], "--data-path", "digits is embedded and takes no --data-path"),
    (["--dataset", "cifar10", "--data-path", "/nonexistent/cifar"], "--data-path", "does not exist"),
    (["--dataset", "folder", "--data-path", __file__], "--data-path", "expects a folder of class sub-folders"),
    (["--dataset", "cifar10", "--data-path", "CIFAR", "--size", "16"], "--size", "cifar10 images are 32x32"),
    (["--restart", "--resume"], "--resume", "give one of them"),
    (["--resume"], "--resume", "holds no run to continue"),
    (["--cvar-chunks", "2"], "--cvar-chunks", "applies to the large-IPC engine only"),
    (["--device", "tpu:x"], "--device", "expected a device such as cpu or cuda:0"),
    (["--pin-memory"], "--pin-memory", "serves a CUDA --device"),
    (["--classes-per-chunk", "0"], "--classes-per-chunk", "expected a positive int"),
    (["--teacher", "ConvNetBN"], "--teacher", "only --method sre2l uses a teacher, got --method dm"),
    (["--method", "sre2l", "--teacher", f"ConvNetBN={__file__}"], "--teacher", "not a weights file"),
    (["--classes-per-chunk", "3", "--method", "dc", "--teacher", "ConvNetBN"], "--teacher",
     "only --method sre2l uses a teacher, got --method dc"),
    (["--zca", "--size", "128"], "--zca", "ZCA needs a 16384 x 16384 covariance (1x128x128 images)"),
    (["--dataset", "folder", "--data-path", os.path.dirname(__file__), "--size", "65", "--zca"], "--zca",
     "(3x65x65 images); images of more than 12288 values (64x64x3) are refused"),  # refused before it is opened
    (["--robust-weight", "2"], "--robust-weight", "has no effect without --robust-alpha"),
    (["--robust-groups", "all"], "--robust-groups", "has no effect without --robust-alpha"),
    (["--robust-alpha", "0.5", "--robust-groups", "any"], "--robust-groups", "invalid choice: 'any'"),
    (["--robust-alpha", "0.5", "--robust-groups", "all", "--classes-per-chunk", "3"], "--robust-groups",
     "groups over every class need one chunk: drop --classes-per-chunk (got 3 for 10 classes)"),
    (["--classes-per-chunk", "3", "--cvar-chunks", "2"], "--cvar-chunks", "add --robust-alpha"),
    (["--classes-per-chunk", "3", "--device", "tpu:x"], "--device", "expected a device such as cpu or cuda:0"),
    (["--classes-per-chunk", "3", "--pin-memory"], "--pin-memory", "serves a CUDA --device"),
]


@pytest.mark.parametrize("argv, flag, expected", DISTILL_CASES)
def test_every_distill_flag_is_checked(tmp_path, capsys, cifar_folder, argv, flag, expected):
    out = tmp_path / "run"
    base = {"--iterations": "1", "--batch-real": "8", "--arch": "ConvNetD1", "--ipc": "1"}
    given = dict(zip(argv[::2], argv[1::2]))
    extra = [x for k, v in base.items() if k not in given for x in (k, v)]
    argv = [cifar_folder if a == "CIFAR" else a for a in argv]
    code, err = run_main(["distill", *argv, *extra, "--out", str(out)], capsys)
    assert code == 2
    one_line(err, f"argument {flag}:", expected)
    assert not out.exists()


def test_arch_that_cannot_take_the_images(tmp_path, capsys):
    code, err = run_main(["distill", "--arch", "VGG11", "--size", "8", "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    one_line(err, "argument --arch: VGG11 cannot take 1x8x8 images")


@pytest.mark.parametrize("argv, flag, expected", [
    (["--epochs", "0"], "--epochs", "expected a positive int"),
    (["--archs", "ConvNet,Foo"], "--archs", "got 'Foo'"),
    (["--archs", ""], "--archs", "got ''"),
    (["--synthetic", "/nonexistent/s.pt"], "--synthetic", "is not a file"),
    (["--json", "/nonexistent/dir/r.json"], "--json", "does not exist"),
    (["--json", "."], "--json", "a folder"),
])
def test_every_evaluate_flag_is_checked(tmp_path, capsys, argv, flag, expected):
    syn = _synthetic(tmp_path / "s.pt", torch.randn(10, 1, 16, 16), torch.arange(10))
    code, err = run_main(["evaluate", *([] if "--synthetic" in argv else ["--synthetic", syn]), *argv], capsys)
    assert code == 2
    one_line(err, f"argument {flag}:", expected)


@pytest.mark.parametrize("argv, flag", [(["--iterations", "0"], "--iterations"), (["--seeds", "-1"], "--seeds"),
                                        (["--eval-epochs", "x"], "--eval-epochs"),
                                        (["--eval-seeds", "0"], "--eval-seeds"),
                                        (["--metadd-fraction", "nan"], "--metadd-fraction"),
                                        (["--robust-alpha", "2"], "--robust-alpha"), (["--out", __file__], "--out")])
def test_demo_flags_are_checked(capsys, argv, flag):
    code, err = run_main(["demo", *argv], capsys)
    assert code == 2
    one_line(err, f"argument {flag}:")


def test_internal_errors_keep_their_traceback(tmp_path, monkeypatch):
    from metadd_fast import engine

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(engine, "run_chunked", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["distill", *TINY, "--out", str(tmp_path / "run")])


def test_internal_errors_keep_their_traceback_through_the_cli(tmp_path):
    script = ("import sys; from metadd_fast import engine, cli\n"
              "def broken(*a, **k): raise RuntimeError('an internal bug')\n"
              "engine.run_chunked = broken\nsys.exit(cli.main(sys.argv[1:]))")
    r = cli("distill", *TINY, "--out", tmp_path / "run", script=script)
    assert r.returncode == 1 and "Traceback" in r.stderr and "RuntimeError: an internal bug" in r.stderr
