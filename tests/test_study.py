"""The study runner (metadd_fast/study.py, shared by `demo` and `study`): its statistics against
hand computations, the k-center coreset, the validation split that stops pre-training, the
pairing of variants by seed, resuming after an interruption, and the command line."""
import json
import math
import os

import pytest
import torch

import metadd_fast.study as study
from metadd_fast.cli import main
from metadd_fast.errors import InputError
from metadd_fast.stats import paired, summary
from metadd_fast.study import StudyConfig, kcenter, run_study

TINY = dict(limit_per_class=12, ipc=1, iterations=1, batch_real=6, metadd_nets=("ConvNetD1-W32", "ConvNetD2-W32"),
            heldout_cam_nets=("ConvNetMP-W32", "LeNet"), pretrain_target=0.05, pretrain_max_epochs=2,
            pretrain_lr=0.05, calibration_probes=1, eval_archs=("LeNet",), eval_epochs=1, eval_augment=None, seeds=2,
            variants=("initial", "k-center", "base", "+MetaDD"))


def test_summary_and_paired_statistics_match_hand_computations():
    s = summary([1.0, 2.0, 4.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(7 / 3)
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert s["sd"] == pytest.approx(sd)
    assert s["ci95"] == pytest.approx(4.302653 * sd / math.sqrt(3), rel=1e-5)  # t_{0.975, 2}
    a, b = [3.0, 5.0, 4.5, 6.0], [1.0, 2.0, 3.5, 3.0]
    p = paired(a, b)
    d = [2.0, 3.0, 1.0, 3.0]
    t = (sum(d) / 4) / (summary(d)["sd"] / 2)
    assert p["mean"] == pytest.approx(2.25) and p["wins"] == 4
    # two-sided p of t with 3 degrees of freedom, from Student's closed-form CDF for 3 d.o.f.
    u = t / math.sqrt(3)
    assert p["t_p"] == pytest.approx(1 - 2 * (u / (1 + u * u) + math.atan(u)) / math.pi, rel=1e-9)
    assert t == pytest.approx(4.7001, rel=1e-4)
    assert p["wilcoxon_p"] == pytest.approx(0.125)  # all 4 positive: 2 / 2^4, exact
    assert math.isnan(paired([1.0, 2.0], [0.0, 1.0])["t_p"])  # equal differences: no t
    assert math.isnan(paired([1.0], [1.0])["wilcoxon_p"])
    with pytest.raises(ValueError, match="a, b"):
        paired([1.0], [1.0, 2.0])


def test_kcenter_picks_the_farthest_point_each_time():
    x = torch.tensor([[0.0], [1.0], [10.0], [3.0], [6.0]])
    assert kcenter(x, 3, first=0).tolist() == [0, 2, 4]  # 10 is farthest from 0; then 6 (4 from 10; 3 is 3 from 0)
    assert kcenter(x, 1, first=3).tolist() == [3]
    with pytest.raises(ValueError, match="k"):
        kcenter(x, 6)


def test_validation_split_is_carved_from_train_and_stops_pretraining():
    cfg = StudyConfig(**TINY)
    train, val, test, minority, clusters = study.load_task(cfg)
    assert len(val) == 10 and len(train) == 110 and minority.dtype == torch.bool
    assert len(minority) == len(clusters) == len(test)
    assert not any(torch.equal(v, t) for v in val.images for t in train.images[:40])  # disjoint
    nets, report = study.pretrain(("LeNet",), cfg, train, val, 7, progress=False)
    from metadd_fast.training import accuracy

    assert report["LeNet"]["val_acc"] == pytest.approx(accuracy(nets[0], val.images, val.labels))
    with pytest.raises(ValueError, match="ConvNetD4BN-W32 gives 2x2"):
        study.pretrain(("ConvNetD4BN-W32",), cfg, train, val, 7, progress=False)
    strict = StudyConfig(**{**TINY, "pretrain_target": 1.0, "pretrain_max_epochs": 1})
    with pytest.raises(RuntimeError, match="LeNet reached .* validation accuracy"):
        study.pretrain(("LeNet",), strict, train, val, 7, progress=False)


def test_variants_of_a_seed_start_from_the_same_images(monkeypatch):
    cfg = StudyConfig(**{**TINY, "ipc": 2})
    train = study.load_task(cfg)[0]
    init, labels, _ = study.make_set(cfg, "initial", 1, train, None)
    started = []
    real_dm = study._dm

    def spy(*a, **kw):
        d = real_dm(*a, **kw)
        started.append(d.images.detach().clone())
        return d

    monkeypatch.setattr(study, "_dm", spy)
    base, _, _ = study.make_set(cfg, "base", 1, train, None)
    kc, kc_labels, _ = study.make_set(cfg, "k-center", 1, train, None)
    assert started and all(torch.equal(s, init) for s in started)
    assert not torch.equal(base, init)  # one iteration moved the images
    assert torch.equal(kc[::2], init[::2]) and torch.equal(kc_labels, labels)  # k-center starts from the seed's first
    rnd, _, _ = study.make_set(cfg, "random real", 1, train, None)
    assert not torch.equal(rnd, init)


@pytest.mark.parametrize("kw, match", [
    (dict(eval_archs=("LeNet", "ConvNetD1-W32")), "held out"),
    (dict(heldout_cam_nets=("ConvNetMP-W32", "ConvNetD1-W32")), "heldout_cam_nets"),
    (dict(metadd_nets=("ConvNetD1-W32",)), "at least 2"),
    (dict(variants=("base", "+CVaR")), "variants"),
    (dict(variants=("base", "base")), "variants"),
    (dict(eval_augment="foo"), "eval_augment"),
    (dict(robust_groups="global"), "robust_groups"),
    (dict(eval_archs=("NoNet",)), "eval_archs: 'NoNet'"),
    (dict(iterations=0), "iterations"),
])
def test_study_config_refuses_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        StudyConfig(**kw)


def test_tiny_study_resumes_after_an_interruption_with_the_same_results(tmp_path, monkeypatch):
    cfg = StudyConfig(**TINY)
    whole = run_study(str(tmp_path / "whole"), cfg, progress=False)
    calls, real_cell = [], study.run_cell

    def dies_after_three(*a, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt  # a run stopped in its fourth cell
        calls.append(a[1:3])
        return real_cell(*a, **kw)

    monkeypatch.setattr(study, "run_cell", dies_after_three)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_study(str(out), cfg, progress=False)
    assert len(os.listdir(out / "cells")) == 6  # three cells: .json and .pt each
    calls.clear()
    monkeypatch.setattr(study, "run_cell", lambda *a, **kw: (calls.append(a[1:3]), real_cell(*a, **kw))[1])
    resumed = run_study(str(out), cfg, progress=False)
    assert len(calls) == 5  # only the unfinished cells of 4 variants x 2 seeds
    assert resumed["per_seed"] == whole["per_seed"]
    for name in ("results.md", "results.json", "results.png", "networks.pt", "config.json"):
        assert os.path.getsize(out / name) > 0
    saved = json.loads((out / "results.json").read_text())
    assert {(c["variant"], c["reference"]) for c in saved["comparisons"]} == {
        ("+MetaDD", "base"), ("base", "initial"), ("k-center", "initial")}
    assert saved["per_seed"]["base"]["metadd_weight"] == [0.0, 0.0]
    assert all(w > 0 for w in saved["per_seed"]["+MetaDD"]["metadd_weight"])
    text = (out / "results.md").read_text()
    assert "| +MetaDD − base | held-out acc | 2 |" in text and "paired t p" in text and "majority acc" in text
    with pytest.raises(InputError, match="differs in seeds"):
        run_study(str(out), StudyConfig(**{**TINY, "seeds": 3}), progress=False)


def test_cli_study_runs_at_a_tiny_size_and_names_bad_flags(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["study", "--out", str(out), "--seeds", "1", "--variants", "initial", "--eval-epochs", "1",
                 "--limit-per-class", "12", "--pretrain-target", "0.05", "--pretrain-max-epochs", "2",
                 "--eval-archs", "LeNet", "--eval-augment", "none", "--ipc", "1"]) == 0
    capsys.readouterr()  # the run's progress bars
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["eval_augment"] is None and saved["summary"]["initial"]["acc"]["n"] == 1
    for argv, flag in ((["--variants", "base,+x"], "--variants"), (["--eval-augment", "foo"], "--eval-augment"),
                       (["--eval-archs", "ConvNetD1-W32"], "--eval-archs")):
        assert main(["study", "--out", str(tmp_path / "bad"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"metadd-fast study: {flag}") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
