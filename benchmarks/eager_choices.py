"""Plain-PyTorch formulations of each op, timed side by side (forward + backward, round-robin),
to pick the benchmarks' eager provider: the fastest one a researcher would write.

    PYTHONPATH=$PWD python benchmarks/eager_choices.py [--device cpu|cuda]

Each group prints its candidates' median times; the chosen ones (marked *) are those of
workloads_cam.py, workloads_cvar.py and workloads_nearest.py.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure  # noqa: E402
import workloads_cam  # noqa: E402
import workloads_cvar  # noqa: E402
import workloads_nearest  # noqa: E402
from metadd_fast import reference  # noqa: E402


def _full(fn, leaves):
    return measure.Call(lambda: torch.autograd.grad(fn(), leaves))


def cam_head_candidates(device):
    """Raw CAM of one flatten head (ConvNet 128x4x4) and one linear head (ResNet18 512x4x4), DC IPC 50."""
    features, weights, labels, _ = workloads_cam.make_inputs("dc_cifar10_ipc50", device)
    f_flat, w_flat, f_lin, w_lin = features[0], weights[0], features[1], weights[1]
    B, C, H, W = f_lin.shape
    return {
        "flatten einsum": _full(lambda: torch.einsum("bchw,bchw->bhw", w_flat[labels], f_flat).sum(), [f_flat]),
        "flatten mul-sum *": _full(lambda: (w_flat[labels] * f_flat).sum(1).sum(), [f_flat]),
        "linear einsum": _full(lambda: torch.einsum("bc,bchw->bhw", w_lin[labels], f_lin).sum(), [f_lin]),
        "linear bmm": _full(lambda: torch.bmm(w_lin[labels][:, None], f_lin.flatten(2)).view(B, H, W).sum(), [f_lin]),
        "linear mul-sum *": _full(lambda: (w_lin[labels][:, :, None, None] * f_lin).sum(1).sum(), [f_lin]),
    }


def cam_candidates(device):
    """The whole CAM variance at DC IPC 50: the test oracle's formulation vs the eager provider."""
    features, weights, labels, out = workloads_cam.make_inputs("dc_cifar10_ipc50", device)
    return {
        "reference.cam_variance (einsum, always resize)": _full(
            lambda: reference.cam_variance(features, weights, labels, out_size=out), features),
        "workloads_cam eager *": _full(lambda: workloads_cam.OPS["cam_variance"][0](features, weights, labels, out),
                                       features),
    }


def cvar_candidates(device):
    values, groups, num_groups = workloads_cvar.make_inputs("imagenet_ipc50_groups", device)
    return {
        "reference.cvar (full sort)": _full(lambda: reference.cvar(values, 0.1, groups, num_groups), [values]),
        "eager_cvar (topk) *": _full(lambda: workloads_cvar.eager_cvar(values, 0.1, groups, num_groups), [values]),
    }


def nearest_candidates(device):
    x, c = workloads_nearest.make_inputs("cifar10_50k_by_500_d128", device)

    def cdist():
        index = torch.cat([torch.cdist(x[s:s + 4096], c).argmin(1) for s in range(0, x.shape[0], 4096)])
        return index, ((x - c[index]) ** 2).sum(1)

    return {"cdist + argmin": measure.Call(cdist),
            "||c||^2 - 2 x c^T argmin *": measure.Call(lambda: workloads_nearest.eager_nearest_centroid(x, c))}


GROUPS = {"CAM heads (DC IPC 50)": cam_head_candidates, "CAM variance (DC IPC 50)": cam_candidates,
          "CVaR (1.28M values, 50k groups)": cvar_candidates, "nearest centroid (50k x 500 x 128)": nearest_candidates}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for title, make in GROUPS.items():
        calls = make(args.device)
        times = measure.time_cuda(calls) if args.device == "cuda" else measure.time_cpu(calls, reps=15)
        print(title)
        for name, (p50, _, _) in times.items():
            print(f"  {name:50s} {p50 * 1e3:9.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
