"""The benchmark harness measures what it says: every mode gives the op's own gradient, the
backward mode times the backward alone, and a setup stays out of the timings and the peak."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import measure  # noqa: E402
import workloads_cam  # noqa: E402
import workloads_cvar  # noqa: E402
from providers import MODES, timed_call  # noqa: E402


@pytest.fixture
def tiny(monkeypatch):
    """Small workloads of the CAM and CVaR ops."""
    monkeypatch.setitem(workloads_cvar.WORKLOADS, "tiny", (997, 13))
    monkeypatch.setitem(workloads_cam.WORKLOADS, "tiny", (3, [(5, 3, 3, "flatten"), (6, 2, 2, "linear")], (3, 3), 4))
    return [(workloads_cvar, "cvar"), (workloads_cam, "cam_variance"), (workloads_cam, "metacam_cvar")]


@pytest.mark.parametrize("provider", ["eager", "fused"])
def test_modes_give_the_ops_gradient(tiny, provider):
    for mod, op in tiny:
        inputs = mod.make_inputs("tiny")
        leaves = mod.leaves(inputs)
        leaves = [leaves] if isinstance(leaves, torch.Tensor) else leaves
        expected = torch.autograd.grad(mod.run(op, provider, inputs), leaves)
        forward = timed_call(mod, op, provider, "forward", inputs).run()
        assert forward.grad_fn is None
        torch.testing.assert_close(forward, mod.run(op, provider, inputs).detach())
        for mode in ("backward", "full"):
            call = timed_call(mod, op, provider, mode, inputs)
            for _ in range(2):  # each backward call has a graph of its own
                call.prepare()
                for got, want in zip(call.run(), expected, strict=True):
                    torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert {m: mod.min_bytes(inputs, m) > 0 for m in MODES} == dict.fromkeys(MODES, True)


def test_unknown_mode_is_refused(tiny):
    mod, op = tiny[0]
    with pytest.raises(ValueError, match="mode"):
        timed_call(mod, op, "eager", "sideways", mod.make_inputs("tiny"))


def test_setup_runs_before_every_timed_call_and_outside_it():
    events = []
    calls = {"a": measure.Call(lambda: events.append("run"), setup=lambda: events.append("setup"))}
    measure.time_cpu(calls, warmup=2, reps=5)
    assert len(events) == 2 * (2 + 5)
    assert events == ["setup", "run"] * (2 + 5)


def test_peak_memory_leaves_the_setup_out():
    held = {}

    def setup():  # 200 MB kept alive across the run, as a backward graph is
        held["graph"] = torch.ones(50 * 2**20)

    def run():  # 40 MB that live only during the run
        return float(torch.ones(10 * 2**20).sum())

    extra = measure.peak_extra_rss(measure.Call(run, setup=setup), calls=2)
    assert 20e6 < extra < 100e6, extra


def test_quick_csv_gets_its_own_plots(tmp_path):
    """run.py plots the CSV it wrote; a CSV other than results.csv (bench --quick's quick.csv)
    gets PNGs named after it, so the plots of record are never replaced."""
    import csv

    from plot import plot
    from run import FIELDS

    path = tmp_path / "quick.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for p, t in (("eager", "2.0"), ("fused", "1.0")):
            for metric in ("time", "peak_extra_memory"):
                w.writerow(dict(op="cvar", provider=p, mode="full", workload="w", metric=metric, unit="ms", p50=t,
                                p20="", p80="", device="AMD EPYC (2 threads, avx512_bf16)", torch="x", triton="x",
                                commit="abc"))
    (png,) = plot(str(path))
    assert os.path.basename(png) == "quick_cvar_AMD_EPYC_2_threads_avx512_bf16.png"
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
