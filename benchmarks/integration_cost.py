"""What the MetaDD term costs inside each public code base's loop (docs/integration.md).

One image update of each code base's shape, written with the same operations as its
training script, timed without and with ``loss + lam * metadd(image_syn, label_syn)``
(4 frozen networks: ConvNet, ResNet18, VGG11, AlexNet, memory="stream"):

- DC  (VICO-UoE/DatasetCondensation main.py): CIFAR-10, IPC 1, ConvNet, 256 real images per
  class, per-class gradient matching, one optimizer_img step (the inner network update is
  not timed);
- DM  (main_DM.py): CIFAR-10, IPC 10, 256 real images per class, a fresh ConvNet embedding;
- MTT (mtt-distillation distill.py): CIFAR-10, IPC 1, 50 unrolled student steps (syn_steps),
  parameter-matching grand_loss;
- SRe2L (recover_cifar.py): CIFAR-100, a batch of 20 inputs, ResNet-18 (BatchNorm) teacher,
  CE + r_bn * BN-statistics loss, Adam.

Prints, per code base: the median step time (20th-80th percentile) without and with the term,
their ratio, and the peak RSS above the pre-step RSS of each. CPU timings; run on a quiet
machine:

    PYTHONPATH=$PWD python benchmarks/integration_cost.py            # the shapes above
    PYTHONPATH=$PWD python benchmarks/integration_cost.py --quick    # 1/8 of the real batches
    PYTHONPATH=$PWD python benchmarks/integration_cost.py --weights 0.5   # starting weights
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import Call, peak_extra_rss, time_cpu  # noqa: E402

import metadd_fast as mf  # noqa: E402
from metadd_fast.models import ConvNet, ResNet18, get_model  # noqa: E402

METADD_NETS = ("ConvNet", "ResNet18", "VGG11", "AlexNet")
LAM = 0.5


def _metadd(num_classes: int) -> mf.MetaDDLoss:
    return mf.MetaDDLoss([get_model(n, 3, num_classes, (32, 32)).eval() for n in METADD_NETS])


def _cos_distance(gw_syn, gw_real):
    """DC's match_loss ('ours'): per output unit 1 - cos, biases skipped."""
    return sum((1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-6)).sum()
               for a, b in zip(gw_syn, gw_real) if a.dim() > 1)


def _synthetic(classes: int, ipc: int, lr: float):
    """(image_syn, label_syn, optimizer_img) as DC, DM and MTT set them up (CIFAR-10 shapes)."""
    image_syn = torch.randn(classes * ipc, 3, 32, 32, requires_grad=True)
    label_syn = torch.arange(classes).repeat_interleave(ipc)
    return image_syn, label_syn, torch.optim.SGD([image_syn], lr=lr, momentum=0.5)


def dc_loop(batch_real: int):
    classes, ipc = 10, 1
    real = torch.randn(classes, batch_real, 3, 32, 32)
    image_syn, label_syn, optimizer_img = _synthetic(classes, ipc, 0.1)
    net = ConvNet(3, classes)
    params = list(net.parameters())

    def base():
        loss = 0.0
        for c in range(classes):
            gw_real = torch.autograd.grad(F.cross_entropy(net(real[c]), torch.full((batch_real,), c)), params)
            syn = image_syn[c * ipc:(c + 1) * ipc]
            gw_syn = torch.autograd.grad(F.cross_entropy(net(syn), label_syn[c * ipc:(c + 1) * ipc]), params,
                                         create_graph=True)
            loss = loss + _cos_distance(gw_syn, [g.detach() for g in gw_real])
        return loss

    return image_syn, label_syn, optimizer_img, base, classes


def dm_loop(batch_real: int):
    classes, ipc = 10, 10
    real = torch.randn(classes, batch_real, 3, 32, 32)
    image_syn, label_syn, optimizer_img = _synthetic(classes, ipc, 1.0)

    def base():
        net = ConvNet(3, classes).requires_grad_(False)  # a fresh network every iteration
        loss = 0.0
        for c in range(classes):
            output_real = net.embed(real[c]).detach()
            output_syn = net.embed(image_syn[c * ipc:(c + 1) * ipc])
            loss = loss + torch.sum((output_real.mean(0) - output_syn.mean(0)) ** 2)
        return loss

    return image_syn, label_syn, optimizer_img, base, classes


def mtt_loop(syn_steps: int):
    classes, ipc = 10, 1
    image_syn, label_syn, optimizer_img = _synthetic(classes, ipc, 1000.0)
    syn_lr = torch.tensor(0.01, requires_grad=True)
    student = ConvNet(3, classes)
    names = [n for n, _ in student.named_parameters()]
    start = torch.cat([p.detach().flatten() for p in student.parameters()])
    target = start + 0.01 * torch.randn_like(start)

    def base():
        params = [p.detach().clone().requires_grad_() for p in student.parameters()]
        for _ in range(syn_steps):
            out = torch.func.functional_call(student, dict(zip(names, params)), (image_syn,))
            grads = torch.autograd.grad(F.cross_entropy(out, label_syn), params, create_graph=True)
            params = [p - syn_lr * g for p, g in zip(params, grads)]
        flat = torch.cat([p.flatten() for p in params])
        return ((flat - target) ** 2).sum() / ((start - target) ** 2).sum()

    return image_syn, label_syn, optimizer_img, base, classes


def sre2l_loop(batch: int):
    classes = 100
    teacher = ResNet18(3, classes, norm="batchnorm").eval().requires_grad_(False)
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
    bns = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    inputs = torch.randn(batch, 3, 32, 32, requires_grad=True)
    targets = torch.arange(batch) % classes  # class indices, as recover_cifar.py's targets
    optimizer = torch.optim.Adam([inputs], lr=0.25, betas=(0.5, 0.9), eps=1e-8)

    def base():
        r_feature = []
        hooks = [m.register_forward_hook(lambda m, i, o: r_feature.append(
            torch.norm(i[0].mean((0, 2, 3)) - m.running_mean, 2)
            + torch.norm(i[0].var((0, 2, 3), unbiased=False) - m.running_var, 2))) for m in bns]
        try:
            outputs = teacher(inputs)
        finally:
            for h in hooks:
                h.remove()
        return F.cross_entropy(outputs, targets) + 0.01 * torch.stack(r_feature).sum()

    return inputs, targets, optimizer, base, classes


LOOPS = {"DC (IPC 1)": (dc_loop, 256), "DM (IPC 10)": (dm_loop, 256), "MTT (IPC 1)": (mtt_loop, 50),
         "SRe2L (batch 20)": (sre2l_loop, 20)}


def _calls(builder, size: int) -> dict:
    images, labels, optimizer, base, classes = builder(size)
    metadd = _metadd(classes)

    def step(with_term: bool):
        def run():
            loss = base()
            if with_term:
                loss = loss + LAM * metadd(images, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return Call(run)

    return {"base": step(False), "+MetaDD": step(True)}


def starting_weights(size_of, fraction: float, probes: int) -> None:
    """Print each code base's starting MetaDD weight (:meth:`MetaDDLoss.starting_weight`): the
    weight whose gradient on the initial synthetic images is ``fraction`` of the method's, the
    method's gradient norm the mean over ``probes`` evaluations (DM draws a network each)."""
    print(f"{'code base':18s} {'method |grad|':>14s} {'MetaDD |grad|':>14s} {'weight':>10s}  (fraction {fraction})")
    for name, (builder, size) in LOOPS.items():
        images, labels, _, base, classes = builder(size_of(size))
        grads = [torch.autograd.grad(base(), images)[0] for _ in range(probes)]
        w = _metadd(classes).starting_weight(images, labels, grads, fraction)
        print(f"{name:18s} {w['method_grad_norm']:14.4g} {w['metadd_grad_norm']:14.4g} {w['weight']:10.3g}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1/8 of the real batches / unrolled steps")
    p.add_argument("--reps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--only", default=None, help="comma-separated code bases (DC, DM, MTT, SRe2L)")
    p.add_argument("--weights", type=float, default=None, metavar="FRACTION",
                   help="print each code base's starting MetaDD weight for this fraction of its gradient instead")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.weights is not None:
        starting_weights(lambda size: max(1, size // 8) if args.quick else size, args.weights, probes=3)
        return 0
    only = None if args.only is None else {s.strip().lower() for s in args.only.split(",")}
    print(f"threads: {torch.get_num_threads()}; MetaDD nets: {', '.join(METADD_NETS)}; quick: {args.quick}")
    print(f"{'code base':18s} {'base s/step':>22s} {'+MetaDD s/step':>22s} {'ratio':>6s} "
          f"{'base MiB':>9s} {'+MetaDD MiB':>11s}")
    for name, (builder, size) in LOOPS.items():
        if only is not None and name.split()[0].lower() not in only:
            continue
        size = max(1, size // 8) if args.quick else size
        calls = _calls(builder, size)
        t = time_cpu(calls, warmup=1, reps=args.reps, budget_s=0)
        mem = {k: peak_extra_rss(c, calls=1) / 2 ** 20 for k, c in calls.items()}
        fmt = lambda v: f"{v[0]:.3f} ({v[1]:.3f}-{v[2]:.3f})"  # noqa: E731
        print(f"{name:18s} {fmt(t['base']):>22s} {fmt(t['+MetaDD']):>22s} {t['+MetaDD'][0] / t['base'][0]:6.2f} "
              f"{mem['base']:9.0f} {mem['+MetaDD']:11.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
