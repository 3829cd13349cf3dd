"""`python -m metadd_fast.demo`: the MetaDD loss on DC CIFAR-10 IPC-50 shaped features.

Four frozen-network feature maps (ConvNet, ResNet18, AlexNet and VGG11 shapes, B=500)
go through the fused CAM-variance op and through the plain PyTorch reference; the
demo prints the backends available here, the agreement of every backend with a
float64 reference, and forward+backward times.
"""
from __future__ import annotations

import time

import torch

import metadd_fast as mf
from metadd_fast import reference

ARCHS = [("ConvNet", 128, 4, 4, "flatten"), ("ResNet18", 512, 4, 4, "linear"), ("AlexNet", 192, 4, 4, "flatten"),
         ("VGG11", 512, 2, 2, "flatten")]


def _inputs(B=500, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (B,), generator=g)
    features = [torch.randn(B, C, H, W, generator=g).requires_grad_() for _, C, H, W, _ in ARCHS]
    weights = [torch.randn((classes, C) if kind == "linear" else (classes, C, H, W), generator=g) * 0.05
               for _, C, H, W, kind in ARCHS]
    return features, weights, labels


def _time(fn, reps=20):
    fn()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return sorted(t)[reps // 2] * 1e3


def main():
    features, weights, labels = _inputs()
    print(f"metadd_fast {mf.__version__}, torch {torch.__version__}; fused backends here: "
          f"{', '.join(b for b in ('cpp', 'triton') if mf.available(b)) or 'none'}")
    print("features: " + ", ".join(f"{n} {C}x{H}x{W} ({k} head)" for n, C, H, W, k in ARCHS) + ", B=500")
    f64 = [f.detach().double().requires_grad_() for f in features]
    ref = reference.cam_variance(f64, [w.double() for w in weights], labels, out_size=(4, 4))
    ref_grads = torch.autograd.grad(ref, f64)
    print(f"MetaDD loss (float64 reference): {ref.item():.6f}")
    backends = ["reference", "cpp"] if mf.available("cpp") else ["reference"]
    times = {}
    for backend in backends:
        loss = mf.cam_variance(features, weights, labels, out_size=(4, 4), backend=backend)
        grads = torch.autograd.grad(loss, features)
        err = max(float((g.double() - r).norm() / r.norm()) for g, r in zip(grads, ref_grads))
        step = lambda: torch.autograd.grad(mf.cam_variance(features, weights, labels, out_size=(4, 4),  # noqa: E731
                                                           backend=backend), features)
        times[backend] = _time(step)
        print(f"  {backend:9}  loss {loss.item():.6f}  loss error {abs(loss.item() - ref.item()) / ref.item():.1e}"
              f"  max gradient error {err:.1e}  forward+backward {times[backend]:.2f} ms")
    if "cpp" in times:
        print(f"fused C++ forward+backward: {times['reference'] / times['cpp']:.1f}x the eager reference")


if __name__ == "__main__":
    main()
