"""The metadd-fast command line: --help everywhere, info, and tiny distill/evaluate runs."""
import json
import os
import subprocess
import sys

import pytest
import torch

from metadd_fast.cli import main
from metadd_fast.data import load_digits


@pytest.mark.parametrize("argv", [[], ["distill"], ["evaluate"], ["bench"], ["demo"], ["info"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    assert "usage: metadd-fast" in capsys.readouterr().out


def test_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "metadd-fast")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "distill" in out and "evaluate" in out and "bench" in out


def test_info(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend_cpp"] == "available" and info["torch"]


def test_distill_then_evaluate(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["distill", "--iterations", "2", "--ipc", "1", "--batch-real", "8", "--arch", "ConvNetD1",
            "--checkpoint-every", "1", "--out", out]
    assert main(args) == 0
    assert {"run.json", "state.pt", "synthetic.pt", "synthetic.png"} <= set(os.listdir(out))
    assert main(args) == 0, "a finished run re-run with the same command is a no-op resume"
    assert main(args[:2] + ["3"] + args[3:]) == 2
    assert "holds a different run" in capsys.readouterr().err
    res = str(tmp_path / "res.json")
    assert main(["evaluate", "--synthetic", os.path.join(out, "synthetic.pt"), "--archs", "ConvNetD1",
                 "--seeds", "1", "--epochs", "1", "--json", res]) == 0
    assert "ConvNetD1" in capsys.readouterr().out and "ConvNetD1" in json.load(open(res))
    (tmp_path / "bad.pt").write_bytes(b"junk")
    assert main(["evaluate", "--synthetic", str(tmp_path / "bad.pt")]) == 2
    assert "not a readable synthetic-set file" in capsys.readouterr().err


def test_distill_with_metadd_and_robust_grouping(tmp_path):
    out = str(tmp_path / "m")
    assert main(["distill", "--iterations", "1", "--ipc", "2", "--batch-real", "8", "--arch", "ConvNetD1",
                 "--metadd-weight", "1", "--metadd-models", "ConvNetD1,LeNet", "--metadd-alpha", "0.5",
                 "--robust-alpha", "0.5", "--out", out]) == 0
    assert os.path.exists(os.path.join(out, "cams.png"))
    assert sorted(os.listdir(os.path.join(out, "models"))) == ["00_metadd_models_ConvNetD1.pt",
                                                               "01_metadd_models_LeNet.pt"]


def test_distill_robust_groups_all_round_trip(tmp_path, capsys):
    """--robust-groups reaches the run (run.json, groups.pt over every real image); the folder
    resumes only with the grouping it started with."""
    out = str(tmp_path / "all")
    args = ["distill", "--iterations", "1", "--ipc", "1", "--batch-real", "8", "--arch", "ConvNetD1",
            "--robust-alpha", "0.5", "--out", out]
    assert main(args + ["--robust-groups", "all"]) == 0
    with open(os.path.join(out, "run.json")) as f:
        assert json.load(f)["config"]["robust_groups"] == "all"
    sizes = torch.load(os.path.join(out, "groups.pt"))["group_sizes"]
    assert sizes.shape == (10,) and int(sizes.sum()) == len(load_digits("train", 16))
    assert main(args + ["--robust-groups", "all", "--resume"]) == 0
    capsys.readouterr()
    assert main(args) == 2  # the default, "class": another run
    err = capsys.readouterr().err
    assert "holds a different run (differs in robust_groups)" in err and len(err.splitlines()) == 1


def test_chunked_distill_resume_and_restart(tmp_path, capsys):
    out = str(tmp_path / "big")
    args = ["distill", "--classes-per-chunk", "4", "--ipc", "1", "--iterations", "1", "--batch-real", "8",
            "--arch", "ConvNetD1", "--out", out]
    assert main(args[:-2] + ["--resume", "--out", out]) == 2
    assert "holds no run to continue" in capsys.readouterr().err
    assert main(args) == 0
    assert len(os.listdir(os.path.join(out, "chunks"))) == 3  # 10 classes in chunks of 4
    assert main(args + ["--resume"]) == 0
    assert main(args[:6] + ["2"] + args[7:]) == 2  # another config in the same folder
    assert main(args[:6] + ["2"] + args[7:] + ["--restart"]) == 0


def test_chunked_robust_distill_and_its_bad_options(tmp_path, capsys):
    out = str(tmp_path / "robust")
    args = ["distill", "--classes-per-chunk", "3", "--ipc", "1", "--iterations", "1", "--batch-real", "8",
            "--arch", "ConvNetD1", "--robust-alpha", "0.5", "--cvar-chunks", "2", "--out", out]
    assert main(args) == 0
    with open(os.path.join(out, "run.json")) as f:
        config = json.load(f)["config"]
    assert config["robust_alpha"] == 0.5 and config["cvar_chunks"] == 2
    assert main(args + ["--pin-memory", "--restart"]) == 2
    assert "argument --pin-memory: pinned host memory serves a CUDA --device" in capsys.readouterr().err
