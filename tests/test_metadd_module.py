"""MetaDDLoss as a drop-in: the default's one pass where memory allows, nn.Module habits (frozen
submodules), and its checks on the whole input (odd but valid input included)."""
import math
import re

import pytest
import torch
from helpers import rel_err
from torch import nn

import metadd_fast as mf
from metadd_fast import metadd_budget
from metadd_fast.errors import InputError
from metadd_fast.models import get_model

SIZE = 24


def _nets(names=("ConvNetD1", "LeNet"), dtype=torch.float64, classes=10):
    torch.manual_seed(5)
    return [get_model(n, 3, classes, (SIZE, SIZE)).to(dtype) for n in names]


def _batch(B=5, dtype=torch.float64, classes=10):
    x = torch.randn(B, 3, SIZE, SIZE, dtype=dtype, requires_grad=True)
    return x, torch.randint(0, classes, (B,))


def _sizes_seen(net, fn):
    """Batch sizes of ``net``'s forward calls while ``fn()`` runs."""
    seen = []
    hook = net.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    try:
        fn()
    finally:
        hook.remove()
    return seen


# ---- the default: one pass when the whole graph fits, chunks only when it must -----------------

@pytest.mark.parametrize("alpha", [None, 0.4])
def test_default_runs_one_pass_when_memory_is_plentiful_and_splits_when_short(monkeypatch, alpha):
    nets = _nets(("ConvNetD1", "LeNet", "AlexNet"))
    x, y = _batch(7)
    (want,) = torch.autograd.grad(mf.MetaDDLoss(nets, alpha=alpha, memory="keep")(x, y), x)
    fn = mf.MetaDDLoss(nets, alpha=alpha)
    fn(x, y)  # the first call probes the networks on 2 images
    seen = _sizes_seen(nets[1], lambda: torch.autograd.grad(fn(x, y), x))
    assert seen == [7], "plenty of free memory: one forward of the whole batch, as memory='keep'"
    (got,) = torch.autograd.grad(fn(x, y), x)
    assert rel_err(got, want) <= 1e-12
    # free memory for two images' graphs (alpha: one image's, one network at a time): the default splits
    out_size = fn._prepare(x)
    sizes = fn._graph_bytes(x, y, out_size, "reference")
    per_image = metadd_budget.HEADROOM * (sum(sizes) if alpha is None else max(sizes))
    fixed = x.numel() * 8 + 2 * 3 * 7 * out_size[0] * out_size[1] * 8
    free = (fixed + (2.5 if alpha is None else 1.5) * per_image) / metadd_budget.FREE_SHARE
    monkeypatch.setattr(metadd_budget, "free_bytes", lambda device: free)
    short = mf.MetaDDLoss(nets, alpha=alpha)
    short(x, y)
    seen = _sizes_seen(nets[1], lambda: torch.autograd.grad(short(x, y), x))
    if alpha is None:
        assert seen == [2, 2, 2, 1], seen
    else:  # the no-grad pass one image at a time, then the re-run of the tail images
        assert seen[:7] == [1] * 7 and len(seen) > 7, seen
    (got,) = torch.autograd.grad(short(x, y), x)
    assert rel_err(got, want) <= 1e-12


def test_chunk_images_plans():
    cpu = torch.device("cpu")
    # the whole graph (fixed + HEADROOM * whole) fits the budget: one pass
    assert metadd_budget.chunk_images(10, 100, 1000, 50, 50, 2050 / 1e6, cpu) is None
    # it does not: as many images as fit, after the fixed bytes
    assert metadd_budget.chunk_images(10, 100, 1000, 50, 50, 2049 / 1e6, cpu) == 9
    assert metadd_budget.chunk_images(10, 100, 1000, 50, 50, 450 / 1e6, cpu) == 2
    with pytest.warns(UserWarning, match="memory_budget"):
        assert metadd_budget.chunk_images(10, 100, 1000, 50, 50, 100 / 1e6, cpu) == 1
    # no budget and no known free memory: one pass
    assert metadd_budget.chunk_images(10, 100, 1000, 50, 50, None, torch.device("meta")) is None


# ---- nn.Module habits -------------------------------------------------------------------------

class _Holder(nn.Module):
    """A user's module holding the loss next to a trained network."""

    def __init__(self, metadd):
        super().__init__()
        self.student = nn.Linear(3, 2)
        self.metadd = metadd


def test_networks_are_frozen_submodules_out_of_optimizers_and_checkpoints():
    nets = _nets()
    fn = mf.MetaDDLoss(nets)
    assert list(fn.networks) == nets and "ConvNet" in repr(fn)
    assert list(fn.parameters()) == [] and list(fn.buffers()) == [] and fn.state_dict() == {}
    with pytest.raises(ValueError, match="empty parameter list"):
        torch.optim.SGD(fn.parameters(), lr=0.1)
    holder = _Holder(fn)
    assert [n for n, _ in holder.named_parameters()] == ["student.weight", "student.bias"]
    assert list(holder.state_dict()) == ["student.weight", "student.bias"]
    assert not any(m in nets for m in holder.modules())
    # train()/eval()/apply() of a module above leave the networks as they were
    nets[0].train(), nets[1].eval()
    holder.eval()
    holder.train()
    holder.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") and m is not holder.student
                 else None)
    assert [n.training for n in nets] == [True, False]
    before = [p.clone() for p in nets[0].parameters()]
    # a checkpoint without the networks loads without touching them (strict)
    holder.load_state_dict({k: v.clone() for k, v in holder.state_dict().items()})
    assert all(torch.equal(a, b) for a, b in zip(before, nets[0].parameters()))
    # asked for: saved and loaded with the networks
    saved = mf.MetaDDLoss(nets, save_networks=True).state_dict()
    assert "networks.0.features.0.weight" in saved and len(saved) == sum(len(n.state_dict()) for n in nets)
    other = _nets()
    with torch.no_grad():
        other[0].features[0].weight.add_(1.0)
    mf.MetaDDLoss(other, save_networks=True).load_state_dict(saved)
    assert torch.equal(other[0].features[0].weight, nets[0].features[0].weight)


def test_to_and_dtype_conversions_move_the_networks():
    nets = _nets(dtype=torch.float32)
    fn = mf.MetaDDLoss(nets)
    x, y = _batch(3, torch.float32)
    with pytest.raises(InputError, match=re.escape("images: torch.float64 on cpu, but models[0] (ConvNet) holds "
                                                   "torch.float32 on cpu")):
        fn(x.detach().double(), y)
    assert fn.double() is fn and all(p.dtype == torch.float64 for n in nets for p in n.parameters())
    x64 = x.detach().double().requires_grad_()
    (got,) = torch.autograd.grad(fn(x64, y), x64)
    (want,) = torch.autograd.grad(mf.MetaDDLoss(nets, memory="keep", backend="reference")(x64, y), x64)
    assert rel_err(got, want) <= 1e-12
    fn.to("meta")  # another device: a clear error naming both
    assert all(p.device.type == "meta" for n in nets for p in n.parameters())
    with pytest.raises(InputError, match=re.escape("images: torch.float64 on cpu, but models[0] (ConvNet) holds "
                                                   "torch.float64 on meta")):
        fn(x64, y)


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_torch_compile_of_the_loss(alpha):
    nets = _nets()
    fn = mf.MetaDDLoss(nets, alpha=alpha)
    x, y = _batch(4)
    (want,) = torch.autograd.grad(fn(x, y) * 1.5, x)
    compiled = torch.compile(fn, backend="aot_eager")
    out = compiled(x, y)
    (got,) = torch.autograd.grad(out * 1.5, x)
    assert rel_err(out, fn(x, y)) <= 1e-12 and rel_err(got, want) <= 1e-12


# ---- checks on the whole input; odd but valid input -------------------------------------------

@pytest.mark.parametrize("kw, exc, words", [
    (dict(eps=-1.0), InputError, "eps: expected a finite float >= 0, got -1.0"),
    (dict(eps=math.nan), InputError, "eps: expected a finite float >= 0, got nan"),
    (dict(relu=1), TypeError, "relu: expected a bool, got int"),
    (dict(save_networks="yes"), TypeError, "save_networks: expected a bool"),
    (dict(out_size=0), InputError, "out_size: expected an int or a pair (H, W) of ints in [1, 4096], got 0"),
    (dict(out_size=-3), InputError, "out_size: expected an int or a pair (H, W) of ints in [1, 4096], got -3"),
    (dict(out_size=(4, 0)), InputError, "out_size: expected an int or a pair (H, W) of ints"),
    (dict(groups=torch.zeros(5, dtype=torch.long)), InputError, "groups: has no effect without alpha"),
    (dict(num_groups=3), InputError, "num_groups: has no effect without alpha"),
    (dict(alpha=0.5, num_groups=0), InputError, "num_groups: expected a positive int, got 0"),
    (dict(alpha=0.5, groups=torch.zeros(5)), TypeError, "groups: expected an integer tensor"),
    (dict(chunk_size=2 ** 70), InputError, "chunk_size: expected a positive int"),
    (dict(memory_budget=math.inf), InputError, "memory_budget: expected a finite float > 0"),
    (dict(models=[3, 4]), TypeError, "models[0]: expected an nn.Module or a CAMTarget, got int"),
])
def test_bad_constructor_arguments_are_named(kw, exc, words):
    kw.setdefault("models", _nets())
    with pytest.raises(exc, match=re.escape(words)):
        mf.MetaDDLoss(**kw)


def test_bad_call_arguments_are_named():
    x, y = _batch(4)
    fn = mf.MetaDDLoss(_nets())
    with pytest.raises(InputError, match=re.escape("groups: a CVaR over groups needs the loss's alpha")):
        fn(x, y, torch.zeros(4, dtype=torch.long))
    with pytest.raises(InputError, match=re.escape("images: expected 3 channels (the input of models[0] (ConvNet)), "
                                                   "got 1")):
        fn(x[:, :1], y)
    with pytest.raises(InputError, match=re.escape("images: models[0] (ConvNet) cannot run on images of shape "
                                                   "(C, H, W) = (3, 4, 4)")):
        fn(x[:, :, :4, :4], y)
    with pytest.raises(ValueError, match=re.escape("labels: expected a tensor on cpu (like images), got meta")):
        fn(x, y.to("meta"))
    with pytest.raises(InputError, match=re.escape("models: expected networks that score the same classes, got 10 "
                                                   "for models[0] (ConvNet), 3 for models[1] (LeNet)")):
        mf.MetaDDLoss([_nets()[0], _nets(classes=3)[1]])(x, y % 3)


@pytest.mark.parametrize("kw", [dict(), dict(chunk_size=1), dict(memory="keep"), dict(mode="gradcam", chunk_size=2)])
def test_label_range_reports_all_labels(kw):
    """CIFAR-100 targets through 10-class networks: the true min and max, whatever the chunks and
    head kinds (Grad-CAM heads included: no raw IndexError)."""
    x, _ = _batch(4)
    with pytest.raises(ValueError, match=re.escape("labels: expected values in [0, 10), got values in [3, 99]")):
        mf.MetaDDLoss(_nets(), **kw)(x, torch.tensor([3, 50, 99, 7]))


class _TrainModeNet(nn.Module):
    """BatchNorm2d, BatchNorm1d and Dropout: a network a user may leave in train mode."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AvgPool2d(4))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(6 * 36, 12), nn.BatchNorm1d(12), nn.ReLU(),
                                        nn.Dropout(0.5), nn.Linear(12, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("kw", [dict(), dict(memory="keep"), dict(alpha=0.5, chunk_size=1)])
def test_train_mode_networks_work_and_are_left_as_they_were(B, kw):
    torch.manual_seed(1)
    nets = [_TrainModeNet().double(), get_model("ConvNetBN", 3, 10, (SIZE, SIZE)).double()]
    for n in nets:  # running statistics away from their defaults
        with torch.no_grad():
            n(torch.randn(4, 3, SIZE, SIZE, dtype=torch.float64))
    nets[0].classifier[2].eval()  # mixed modes inside one network
    modes = [[m.training for m in n.modules()] for n in nets]
    state = [{k: v.clone() for k, v in n.state_dict().items()} for n in nets]
    x, y = _batch(B)
    (got,) = torch.autograd.grad(mf.MetaDDLoss(nets, **kw)(x, y), x)
    assert torch.isfinite(got).all()
    assert [[m.training for m in n.modules()] for n in nets] == modes
    assert all(torch.equal(v, s[k]) for n, s in zip(nets, state) for k, v in n.state_dict().items())
    for n in nets:  # the loss is the eval-mode networks' (deterministic: Dropout off)
        n.eval()
    (want,) = torch.autograd.grad(mf.MetaDDLoss(nets, memory="keep", backend="reference", alpha=kw.get("alpha"))(x, y), x)
    assert rel_err(got, want) <= 1e-12


@pytest.mark.parametrize("kw", [dict(), dict(chunk_size=2), dict(memory="keep")])
def test_nan_pixel_gives_nan_loss_confined_to_its_image(kw):
    """As the op contract: NaN propagates as in PyTorch. The loss is NaN; the mean's gradient is
    NaN on that image alone, and the others' equal the gradient without it."""
    nets = _nets()
    x, y = _batch(4)
    bad = x.detach().clone()
    bad[0, 1, 2, 3] = math.nan
    bad.requires_grad_()
    loss = mf.MetaDDLoss(nets, **kw)(bad, y)
    loss.backward()
    assert math.isnan(loss.item())
    assert bad.grad.flatten(1).isnan().any(1).tolist() == [True, False, False, False]
    rest = x[1:].detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(mf.MetaDDLoss(nets, **kw)(rest, y[1:]) * 3 / 4, rest)
    assert rel_err(bad.grad[1:], want) <= 1e-12


@pytest.mark.parametrize("kw", [dict(), dict(memory="keep"), dict(alpha=0.5), dict(alpha=0.5, chunk_size=1)])
def test_one_image(kw):
    nets = _nets()
    x, y = _batch(1)
    (got,) = torch.autograd.grad(mf.MetaDDLoss(nets, **kw)(x, y), x)
    (want,) = torch.autograd.grad(mf.MetaDDLoss(nets, memory="keep", backend="reference")(x, y), x)
    assert rel_err(got, want) <= 1e-12
