"""docs/integration.md: every Python snippet of the page runs, and a minimal loop of each public
code base's shape, with the two added lines."""
import math
import os
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import metadd_fast as mf
from metadd_fast.models import get_model

C, IPC, SIZE = 3, 2, 16


@pytest.fixture
def setup():
    torch.manual_seed(0)
    models = [get_model(n, 1, C, (SIZE, SIZE)) for n in ("ConvNetD1", "LeNet")]
    metadd = mf.MetaDDLoss(models)  # the first added line, before the loop
    image_syn = torch.randn(C * IPC, 1, SIZE, SIZE, requires_grad=True)
    label_syn = torch.arange(C).repeat_interleave(IPC)
    real = torch.randn(C, 8, 1, SIZE, SIZE)
    return metadd, image_syn, label_syn, real, torch.optim.SGD([image_syn], lr=0.1)


def _update_moves(loss, optimizer, images) -> bool:
    """One optimizer step on ``loss``; whether it changed ``images``."""
    before = images.detach().clone()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return not torch.equal(before, images.detach())


def test_dc_dsa_loop(setup):
    metadd, image_syn, label_syn, real, optimizer_img = setup
    net = get_model("ConvNetD1", 1, C, (SIZE, SIZE))
    params = list(net.parameters())
    loss = torch.tensor(0.0)
    for c in range(C):
        gw_real = torch.autograd.grad(F.cross_entropy(net(real[c]), torch.full((8,), c)), params)
        syn = image_syn[c * IPC:(c + 1) * IPC]
        gw_syn = torch.autograd.grad(F.cross_entropy(net(syn), label_syn[c * IPC:(c + 1) * IPC]), params,
                                     create_graph=True)
        loss = loss + sum(((a - b.detach()) ** 2).sum() for a, b in zip(gw_syn, gw_real))
    loss += 0.5 * metadd(image_syn, label_syn)  # the second added line
    assert _update_moves(loss, optimizer_img, image_syn)


def test_dm_loop_with_robust_grouping(setup):
    metadd, image_syn, label_syn, real, optimizer_img = setup
    net = get_model("ConvNetD1", 1, C, (SIZE, SIZE))
    loss, values, group_ids = torch.tensor(0.0), [], []
    for c in range(C):
        output_real = net.embed(real[c]).detach()
        output_syn = net.embed(image_syn[c * IPC:(c + 1) * IPC])
        loss += torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)
        groups = mf.nearest_centroid(output_real.detach(), output_syn.detach())[0]
        values.append(((output_real - output_syn[groups]) ** 2).sum(1))
        group_ids.append(groups + c * IPC)
    robust = 1.0 * C * mf.cvar(torch.cat(values), 0.5, torch.cat(group_ids), C * IPC)
    # the robust term moves the images of the worst groups one by one, not a class's mean alone
    (g,) = torch.autograd.grad(robust, image_syn, retain_graph=True)
    moved = g.flatten(1).abs().sum(1).gt(0).nonzero().flatten()
    nonempty = torch.cat(group_ids).unique()
    assert set(moved.tolist()) <= set(nonempty.tolist()) and 1 <= len(moved) <= math.ceil(0.5 * len(nonempty))
    loss += robust
    loss += 0.5 * metadd(image_syn, label_syn)
    assert _update_moves(loss, optimizer_img, image_syn)


def test_mtt_loop(setup):
    metadd, image_syn, label_syn, real, optimizer_img = setup
    student = get_model("ConvNetD1", 1, C, (SIZE, SIZE))
    start = torch.cat([p.detach().flatten() for p in student.parameters()])
    target = start + 0.01 * torch.randn_like(start)
    params = [p.detach().clone().requires_grad_() for p in student.parameters()]
    syn_lr = torch.tensor(0.01, requires_grad=True)
    names = [n for n, _ in student.named_parameters()]
    for _ in range(2):  # unrolled student steps on the synthetic data
        out = torch.func.functional_call(student, dict(zip(names, params)), (image_syn,))
        grads = torch.autograd.grad(F.cross_entropy(out, label_syn), params, create_graph=True)
        params = [p - syn_lr * g for p, g in zip(params, grads)]
    flat = torch.cat([p.flatten() for p in params])
    grand_loss = ((flat - target) ** 2).sum() / ((start - target) ** 2).sum()
    grand_loss = grand_loss + 0.5 * metadd(image_syn, label_syn)
    assert _update_moves(grand_loss, optimizer_img, image_syn) and syn_lr.grad is not None


def test_sre2l_loop_with_hard_targets(setup):
    metadd, image_syn, label_syn, real, _ = setup
    inputs, targets = image_syn, label_syn  # recover_*.py: targets are class ids (a LongTensor)
    with pytest.raises(IndexError):
        targets.argmax(1)  # the old advice fails on these labels
    teacher = get_model("ConvNetD1", 1, C, (SIZE, SIZE)).eval()
    optimizer = torch.optim.Adam([inputs], lr=0.05)
    loss_ce = F.cross_entropy(teacher(inputs), targets)
    loss = loss_ce + 0.01 * sum(p.abs().sum() for p in teacher.parameters()).detach()  # loss_ce + loss_aux
    loss = loss + 0.5 * metadd(inputs, targets)
    assert _update_moves(loss, optimizer, inputs)


DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "integration.md")


def _snippets() -> list:
    with open(DOC) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def _namespace() -> dict:
    """The names the snippets use, at tiny sizes: the code bases' tensors, 4 MetaDD networks
    (the zoo's ConvNet, ResNet18, VGG11, AlexNet at 32x32) and the loop's state (class c = 0)."""
    torch.manual_seed(0)
    classes, ipc, size = 3, 2, 32
    nets = [get_model(n, 3, classes, (size, size)) for n in ("ConvNet", "ResNet18", "VGG11", "AlexNet")]
    image_syn = torch.randn(classes * ipc, 3, size, size, requires_grad=True)
    label_syn = torch.arange(classes).repeat_interleave(ipc)
    embed_net = get_model("ConvNetD1", 3, classes, (size, size)).embed
    real = torch.randn(8, 3, size, size)
    output_real, output_syn = embed_net(real), embed_net(image_syn[:ipc])

    def method_loss(x):  # DM's loss of one class with a fresh network
        net = get_model("ConvNetD1", 3, classes, (size, size))
        return ((net.embed(real).mean(0) - net.embed(x).mean(0)) ** 2).sum()

    return dict(torch=torch, mf=mf, convnet=nets[0], resnet18=nets[1], vgg11=nets[2], alexnet=nets[3],
                metadd=mf.MetaDDLoss(nets), image_syn=image_syn, label_syn=label_syn, inputs=image_syn,
                targets=label_syn, lam=0.5, loss=torch.tensor(0.0), grand_loss=torch.tensor(0.0),
                method_loss=method_loss, output_real=output_real, output_syn=output_syn, c=0, values=[],
                group_ids=[], args=SimpleNamespace(ipc=ipc), num_classes=classes, alpha=0.5, robust_weight=1.0,
                embed_net=embed_net, real_loader=[real[:5], real[5:]], per_sample_losses=torch.rand(8),
                num_groups=classes * ipc)


def test_every_snippet_of_the_guide_runs():
    snippets = _snippets()
    assert len(snippets) >= 8, "the guide's Python snippets"
    for code in snippets:
        ns = _namespace()
        exec(compile(code, DOC, "exec"), ns)  # noqa: S102 (our own documentation)
        for name in ("loss", "grand_loss"):  # a loss the snippet made differentiable reaches the images
            if ns[name].requires_grad:
                (g,) = torch.autograd.grad(ns[name], ns["image_syn"], allow_unused=True)
                assert g is not None and g.abs().sum() > 0, code
        if "lam = " in code:
            assert 0 < ns["lam"] < math.inf, code
