"""docs/integration.md: a minimal loop of each public code base's shape, with the two added lines."""
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
    loss = torch.tensor(0.0)
    for c in range(C):
        output_real = net.embed(real[c]).detach()
        output_syn = net.embed(image_syn[c * IPC:(c + 1) * IPC])
        groups = mf.nearest_centroid(output_real.detach(), output_syn.detach())[0]
        loss = loss + mf.cvar(((output_real - output_syn.mean(0)) ** 2).sum(1), 0.5, groups, IPC)
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


def test_sre2l_loop_with_soft_labels(setup):
    metadd, image_syn, label_syn, real, _ = setup
    inputs = image_syn
    targets = F.one_hot(label_syn, C).float()
    teacher = get_model("ConvNetD1", 1, C, (SIZE, SIZE)).eval()
    optimizer = torch.optim.Adam([inputs], lr=0.05)
    loss = F.cross_entropy(teacher(inputs), targets)
    loss = loss + 0.5 * metadd(inputs, targets.argmax(1))
    assert _update_moves(loss, optimizer, inputs)
