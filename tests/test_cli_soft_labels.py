"""`metadd-fast evaluate --soft-labels/--temperature/--recipe`: a run, and every refusal as one
line naming the flag, exit 2, before any training."""
import json

import pytest
import torch

from cli_helpers import cli, one_line
from metadd_fast.data import load_digits
from metadd_fast.models import get_model
from metadd_fast.results import save_synthetic


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("soft")
    train = load_digits("train", 16)
    save_synthetic(str(d / "s.pt"), train.images[:10], train.labels[:10])
    save_synthetic(str(d / "s32.pt"), torch.zeros(2, 1, 32, 32), torch.tensor([0, 1]))
    torch.save(get_model("ConvNet", 1, 10, (16, 16)).state_dict(), d / "t.pt")
    torch.save(get_model("ConvNet", 1, 7, (16, 16)).state_dict(), d / "t7.pt")
    torch.save(get_model("ConvNet", 1, 10, (32, 32)).state_dict(), d / "t32.pt")
    return d


def evaluate(d, *argv):
    return cli("evaluate", "--synthetic", d / "s.pt", "--archs", "LeNet", "--seeds", "1", "--epochs", "1", *argv)


@pytest.mark.parametrize("argv, fragments", [
    (["--soft-labels", "ConvNet=t7.pt"], ["argument --soft-labels:", "10 classes"]),
    (["--soft-labels", "ConvNet=t32.pt"], ["argument --soft-labels:", "(16, 16) images"]),
    (["--soft-labels", "ConvNet=t.pt", "--temperature", "0"], ["argument --temperature:", "> 0"]),
    (["--soft-labels", "ConvNet=t.pt", "--temperature", "-2"], ["argument --temperature:", "> 0"]),
    (["--soft-labels", "ConvNet=t.pt", "--temperature", "inf"], ["argument --temperature:", "finite"]),
    (["--soft-labels", "ConvNet=t.pt", "--temperature", "nan"], ["argument --temperature:", "finite"]),
    (["--temperature", "4"], ["argument --temperature:", "without --soft-labels"]),
    (["--recipe", "sre2l-cifar"], ["argument --recipe:", "sre2l-imagenet", "sre2l-cifar"]),
    (["--soft-labels", "ConvNet=missing.pt"], ["argument --soft-labels:", "no such file"]),
    (["--cutmix", "-1"], ["argument --cutmix:", ">= 0"]),
])
def test_refusals_name_the_flag(files, argv, fragments, monkeypatch):
    monkeypatch.chdir(files)
    r = evaluate(files, *argv)
    assert r.returncode == 2, r.stderr
    one_line(r.stderr, *fragments)
    assert "| LeNet" not in r.stdout  # nothing was trained


def test_synthetic_set_of_another_size_than_the_teacher_and_test_set(files, monkeypatch):
    monkeypatch.chdir(files)
    r = cli("evaluate", "--synthetic", files / "s32.pt", "--archs", "LeNet", "--soft-labels", "ConvNet=t.pt")
    assert r.returncode == 2
    one_line(r.stderr, "argument --synthetic:", "1x32x32", "1x16x16")


def test_soft_label_run_with_a_recipe_writes_results(files, monkeypatch):
    monkeypatch.chdir(files)
    r = evaluate(files, "--soft-labels", "ConvNet=t.pt", "--recipe", "sre2l-tiny", "--temperature", "4",
                 "--batch-size", "5", "--cutmix", "1", "--json", files / "r.json")
    assert r.returncode == 0, r.stderr
    res = json.loads((files / "r.json").read_text())["LeNet"]
    assert len(res["acc"]) == 1 and 0 <= res["acc"][0] <= 1
