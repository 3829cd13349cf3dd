"""The demo (the study at small settings, metadd_fast/demo.py): the known-minority split, the
MetaDD weight calibration, the CAM regions and a tiny end-to-end run (its files)."""
import json
import os

import pytest
import torch

from metadd_fast.cli import main
from metadd_fast.data import load_digits, with_inverted_minority
from metadd_fast.demo import run_demo
from metadd_fast.study import _limited, build, calibrate_metadd_weight, demo_config
from metadd_fast.distill import DM
from metadd_fast.evaluate import evaluate_synthetic
from metadd_fast.metadd_loss import MetaDDLoss
from metadd_fast.results import meta_regions


@pytest.fixture(scope="module")
def digits16():
    return _limited(load_digits("train", 16), 12)


@pytest.mark.parametrize("share", [0.1, 0.5, 1.0])
def test_inverted_minority_has_the_share_per_class_and_inverted_pixels(digits16, share):
    before = digits16.images.clone()
    ds, minority = with_inverted_minority(digits16, share, seed=3)
    assert torch.equal(digits16.images, before)  # the input is not modified
    for c in range(10):
        in_class = digits16.labels == c
        assert int(minority[in_class].sum()) == round(share * int(in_class.sum()))
    pix, new = digits16.denormalize(digits16.images), ds.denormalize(ds.images)
    torch.testing.assert_close(new[minority], 1 - pix[minority], atol=1e-5, rtol=0)
    assert torch.equal(ds.images[~minority], digits16.images[~minority])
    assert torch.equal(ds.labels, digits16.labels) and (ds.mean, ds.std) == (digits16.mean, digits16.std)
    other = with_inverted_minority(digits16, share, seed=4)[1]
    assert share == 1.0 or not torch.equal(other, minority)


def test_inverted_minority_rejects_a_bad_share(digits16):
    with pytest.raises(ValueError, match="share"):
        with_inverted_minority(digits16, 1.5)


def test_calibration_gives_the_stated_fraction_of_the_method_gradient(digits16):
    nets = [build(n, digits16) for n in ("ConvNetD1-W32", "ConvNetD2-W32")]
    metadd = MetaDDLoss(nets)

    def make():
        return DM(digits16, 2, batch_real=6, arch="ConvNetW32", seed=5)

    cal = calibrate_metadd_weight(make, metadd, 0.25, probes=1)
    # Independently: the method's gradient in its first step, and the weighted MetaDD gradient.
    method = make()
    x0 = method.images.detach().clone()
    method.step()
    g_method = method.images.grad.norm()
    x = x0.clone().requires_grad_()
    (cal["weight"] * metadd(x, method.labels)).backward()
    assert float(x.grad.norm() / g_method) == pytest.approx(0.25, rel=1e-4)
    assert cal["method_grad_norm"] == pytest.approx(float(g_method), rel=1e-5)
    # More probes: the mean over several random networks, still from the initial images.
    cal3 = calibrate_metadd_weight(make, metadd, 0.25, probes=3)
    assert cal3["metadd_grad_norm"] == pytest.approx(cal["metadd_grad_norm"], rel=1e-5)
    assert cal3["method_grad_norm"] != pytest.approx(cal["method_grad_norm"], rel=1e-6)


def test_meta_regions_are_the_minimum_and_what_each_map_adds():
    maps = torch.tensor([[[[0.2, 1.0], [0.0, 0.5]]], [[[0.6, 0.3], [0.0, 0.5]]]])  # (K=2, B=1, 2, 2)
    meta, alone = meta_regions(maps)
    assert torch.equal(meta, torch.tensor([[[0.2, 0.3], [0.0, 0.5]]]))
    torch.testing.assert_close(alone, torch.tensor([[[[0.0, 0.7], [0.0, 0.0]]], [[[0.4, 0.0], [0.0, 0.0]]]]))


def test_minority_accuracy_splits_the_overall_accuracy(digits16):
    test, minority = with_inverted_minority(digits16, 0.5, seed=1)
    r = evaluate_synthetic(test.images[:20], test.labels[:20], test, ["LeNet"], seeds=1, epochs=1,
                           batch_size=10, augment=None, minority=minority, progress=False)["LeNet"]
    n = int(minority.sum())
    mixed = (n * r["minority"][0] + (len(test) - n) * r["majority"][0]) / len(test)
    assert mixed == pytest.approx(r["acc"][0], abs=1e-6)
    with pytest.raises(ValueError, match="minority"):
        evaluate_synthetic(test.images[:2], test.labels[:2], test, ["LeNet"], minority=minority[:5])


TINY = dict(limit_per_class=12, ipc=2, iterations=1, batch_real=6, metadd_nets=("ConvNetD1-W32", "ConvNetD2-W32"),
            heldout_cam_nets=("ConvNetMP-W32", "LeNet"), pretrain_target=0.05, pretrain_max_epochs=2,
            pretrain_lr=0.05, calibration_probes=1, eval_archs=("LeNet",), eval_epochs=1, seeds=2)


def test_tiny_demo_runs_end_to_end_and_writes_its_files(tmp_path):
    cfg = demo_config(**TINY)
    assert cfg.variants == ("initial", "k-center", "base", "+MetaDD", "+Robust DD") and cfg.eval_augment is None
    report = run_demo(str(tmp_path), cfg, progress=False, figure_images=2)
    for name in ("results.md", "results.json", "results.png", "demo_cam_regions.png", "synthetic_initial.png",
                 "synthetic_kcenter.png", "synthetic_base.png", "synthetic_metadd.png", "synthetic_robust_dd.png",
                 os.path.join("cells", "robust_dd_seed1.pt"), os.path.join("cells", "robust_dd_seed1.json")):
        assert os.path.getsize(tmp_path / name) > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"].keys() == {"initial", "k-center", "base", "+MetaDD", "+Robust DD"}
    assert saved["per_seed"] == report["per_seed"]
    assert "| +Robust DD − k-center | minority (inverted) acc | 2 |" in (tmp_path / "results.md").read_text()


def test_cli_demo_names_a_bad_flag(capsys):
    assert main(["demo", "--variants", "base,+nothing"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metadd-fast demo: --variants") and len(err.strip().splitlines()) == 1
