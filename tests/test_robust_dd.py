"""Robust DD in the distillers: the effect on a toy where the answer is known, the step split
(loss_terms / group_losses / finish_step) that the chunked engine uses, and resuming."""
import pytest
import torch
from torch import nn

import metadd_fast as mf
from metadd_fast import data
from metadd_fast.distill import DC, DM, SRe2L, coverage_losses
from metadd_fast.models import ConvNet

MINORITY = torch.tensor([6.0, 0.0])


def _mixture(seed: int):
    """One class of 2-D points stored as (N, 2, 1, 1) images: 90 around the origin (majority),
    10 around (6, 0) (minority), std 0.3. Returns the dataset and the majority points."""
    g = torch.Generator().manual_seed(seed)
    majority = 0.3 * torch.randn(90, 2, generator=g)
    minority = MINORITY + 0.3 * torch.randn(10, 2, generator=g)
    x = torch.cat([majority, minority])[:, :, None, None]
    return data.Dataset("toy", x, torch.zeros(100, dtype=torch.int64), 1, (0.0, 0.0), (1.0, 1.0)), majority


def _distance_to_minority(d, majority, steps: int) -> float:
    """Start both synthetic points on majority points, run ``steps`` steps; the distance of the
    nearest synthetic point to the minority's centre."""
    with torch.no_grad():
        d.images.copy_(majority[:2, :, None, None])
    for _ in range(steps):
        d.step()
    return float((d.images.detach().flatten(1) - MINORITY).norm(dim=1).min())


def _identity(x):
    return x.flatten(1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_robust_dm_sends_a_point_to_the_minority_and_dm_does_not(seed):
    ds, majority = _mixture(seed)
    kw = dict(lr=0.1, batch_real=100, augment=None, embedding=_identity, seed=seed)
    plain = _distance_to_minority(DM(ds, 2, **kw), majority, 150)
    robust = _distance_to_minority(DM(ds, 2, robust_alpha=0.5, **kw), majority, 150)
    strong = _distance_to_minority(DM(ds, 2, robust_alpha=0.5, robust_weight=4.0, **kw), majority, 150)
    # DM matches the mean only: both points stay by the majority (the class mean is at x = 0.6)
    assert plain > 5.0
    # the robust term pulls one point onto the minority; DM's mean term pulls back (docs/methods.md)
    assert robust < 1.6 and strong < 0.75


class _BNTeacher(nn.Module):
    """SRe2L teacher for the toy: BatchNorm statistics of the real points, identity embedding,
    one class (so the cross-entropy is constant and only the BN and robust terms act)."""

    def __init__(self, x):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm2d(2, momentum=None), nn.Linear(2, 1)
        with torch.no_grad():
            self.bn(x)  # running statistics = the real data's
        self.eval()

    def embed(self, x):
        return x.flatten(1)

    def forward(self, x):
        return self.fc(self.bn(x).flatten(1))


@pytest.mark.parametrize("seed", [0, 1])
def test_robust_sre2l_sends_a_point_to_the_minority_and_sre2l_does_not(seed):
    ds, majority = _mixture(seed)
    kw = dict(teacher=_BNTeacher(ds.images), lr=0.05, batch_real=100, augment=None, seed=seed)
    plain = _distance_to_minority(SRe2L(ds, 2, **kw), majority, 200)
    robust = _distance_to_minority(SRe2L(ds, 2, robust_alpha=0.5, **kw), majority, 200)
    assert plain > 3.0  # BN matching spreads the two points to the class mean +- std (x = -1.2, 2.4)
    assert robust < 0.4


def test_coverage_losses_against_float64_and_their_gradient_moves_one_image():
    torch.manual_seed(0)
    e_real = torch.randn(13, 5, dtype=torch.float64)
    e_syn = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    values, groups = coverage_losses(e_real, e_syn)
    d = torch.cdist(e_real, e_syn.detach()) ** 2
    assert torch.equal(groups, d.argmin(1))
    torch.testing.assert_close(values, d.min(1).values)
    cvar_loss = mf.cvar(values, 0.3, groups, 3)  # the worst group only
    worst = int(torch.stack([values[groups == j].mean() if (groups == j).any() else values.new_tensor(-1.0)
                             for j in range(3)]).argmax())
    (grad,) = torch.autograd.grad(cvar_loss, e_syn)
    moved = grad.abs().sum(1) > 0
    assert moved.tolist() == [j == worst for j in range(3)]


@pytest.fixture(scope="module")
def tiny():
    full = data.load_digits("train", 16)
    keep = torch.cat([torch.nonzero(full.labels == c).flatten()[:10] for c in range(3)])
    return data.Dataset("tiny", full.images[keep], full.labels[keep], 3, full.mean, full.std)


def _teacher(tiny):
    torch.manual_seed(0)
    return ConvNet(1, 3, width=8, depth=2, norm="batchnorm", im_size=(16, 16)).eval()


def _make(cls, tiny, **kw):
    extra = dict(teacher=_teacher(tiny)) if cls is SRe2L else dict(outer_loop=2) if cls is DC else {}
    base = dict(batch_real=6, seed=3, robust_alpha=0.5, arch="ConvNetD1")
    base.update(kw)
    return cls(tiny, 2, **extra, **base)


@pytest.mark.parametrize("cls", [DM, DC, SRe2L])
def test_step_equals_its_composed_parts(tiny, cls):
    a, b = _make(cls, tiny), _make(cls, tiny)
    for _ in range(3):  # DC: crosses a network re-initialization (outer_loop=2)
        got = a.step()
        b.optimizer.zero_grad(set_to_none=True)
        terms = b.loss_terms()
        values, groups = b.group_losses()
        assert groups.dtype == torch.int64 and values.shape == groups.shape
        assert 0 <= int(groups.min()) and int(groups.max()) < b.num_groups == 6
        robust = b.robust_scale * mf.cvar(values, b.robust_alpha, groups, b.num_groups)
        (sum(terms.values()) + robust).backward()
        b.finish_step()
        assert set(got) == {"match", "robust"}
        assert got["match"] == float(terms["match"].detach()) and got["robust"] == float(robust.detach())
        assert torch.equal(a.images, b.images)


@pytest.mark.parametrize("cls", [DM, DC, SRe2L])
def test_state_dict_resumes_exactly_through_weights_only_load(tiny, tmp_path, cls):
    a = _make(cls, tiny)
    a.step()
    torch.save(a.state_dict(), tmp_path / "state.pt")
    a.step()
    a.step()
    b = _make(cls, tiny, seed=99)
    b.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    b.step()
    b.step()
    assert torch.equal(a.images, b.images) and a.iteration == b.iteration == 3


def test_robust_dc_at_ipc_1_and_alpha_1_is_dc(tiny):
    d = DC(tiny, 1, batch_real=6, seed=0, robust_alpha=1.0, robust_weight=0.5, augment=None)
    terms = d.loss()
    torch.testing.assert_close(terms["robust"], 0.5 * terms["match"])


def test_robust_options_are_checked(tiny):
    with pytest.raises(ValueError, match="robust_weight"):
        DM(tiny, 1, robust_alpha=0.5, robust_weight=0.0)
    with pytest.raises(TypeError, match="embedding"):
        DM(tiny, 1, robust_alpha=0.5, embedding="identity")
    teacher = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(ValueError, match="embedding: robust SRe2L"):
        SRe2L(tiny, 1, teacher=teacher, robust_alpha=0.5)


def _two_classes():
    """Two classes of 2-D points as (N, 2, 1, 1) images: class 0 around (0, 0) with 5 strays at
    (9, 0) (beside class 1), class 1 around (10, 0)."""
    g = torch.Generator().manual_seed(0)
    c0 = torch.cat([0.3 * torch.randn(15, 2, generator=g), torch.tensor([9.0, 0.0]) + 0.1 * torch.randn(5, 2, generator=g)])
    c1 = torch.tensor([10.0, 0.0]) + 0.3 * torch.randn(20, 2, generator=g)
    x = torch.cat([c0, c1])[:, :, None, None]
    y = torch.arange(2).repeat_interleave(20)
    return data.Dataset("toy2", x, y, 2, (0.0, 0.0), (1.0, 1.0))


@pytest.mark.parametrize("groups", ["class", "all"])
@pytest.mark.parametrize("method", ["dm", "dc"])
def test_robust_groups_class_or_all_assign_the_nearest_synthetic_image_of_the_class_or_of_any(groups, method):
    ds = _two_classes()
    if method == "dm":
        d = DM(ds, 2, batch_real=20, augment=None, embedding=_identity, robust_alpha=0.5, robust_groups=groups)
    else:
        d = DC(ds, 2, batch_real=20, augment=None, embedding=_identity, robust_alpha=0.5, robust_groups=groups)
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
        d._fresh_net = lambda: net  # a network for 2-D points (the zoo's need images)
    syn = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [11.0, 0.0]])
    with torch.no_grad():
        d.images.copy_(syn[:, :, None, None])
    values, ids = d.group_losses()
    if method == "dc":  # one value per non-empty group: check which groups exist
        assert ids.tolist() == sorted(set(ids.tolist()))
    # every real image of the batch (all 40, in class order), its expected group
    real = ds.images.flatten(1)
    if groups == "class":
        want = torch.cat([torch.cdist(real[:20], syn[:2]).argmin(1), torch.cdist(real[20:], syn[2:]).argmin(1) + 2])
    else:
        want = torch.cdist(real, syn).argmin(1)
    # the strays of class 0 (near (9, 0)) join class 1's image 2 only when grouping over all classes
    assert (want[15:20] == (2 if groups == "all" else 1)).all()
    if method == "dm":
        order = torch.cat([d.by_class[0], d.by_class[1]])  # the batch is a permutation of each class
        batch = torch.cat([d._context()["classes"][c][1] for c in range(2)])
        exp = torch.cdist(batch, syn).argmin(1) if groups == "all" else \
            torch.cat([torch.cdist(batch[:20], syn[:2]).argmin(1), torch.cdist(batch[20:], syn[2:]).argmin(1) + 2])
        assert torch.equal(ids, exp)
        torch.testing.assert_close(values, ((batch - syn[ids]) ** 2).sum(1))
        assert sorted(ids.tolist()) == sorted(want[order].tolist())
    else:
        assert set(ids.tolist()) == set(want.tolist())
    d.robust_loss().backward()
    assert d.images.grad is not None and torch.isfinite(d.images.grad).all()


def test_robust_groups_is_checked():
    with pytest.raises(ValueError, match="robust_groups"):
        DM(_two_classes(), 1, robust_groups="global")
