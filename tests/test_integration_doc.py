"""docs/integration.md: a minimal loop of each public code base's shape, with the two added lines."""
import math

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
