"""Model zoo, CAM adapters and MetaDDLoss against the naive per-model autograd graph."""
import re
import warnings

import pytest
import torch
from helpers import rel_err
from torch import nn

import metadd_fast as mf
from metadd_fast import cam_target
from metadd_fast.metadd_budget import HEADROOM
from metadd_fast.models import MODELS, get_model

ZOO_KINDS = {"ConvNet": "flatten", "ConvNetD1": "flatten", "ConvNetD2": "flatten", "ConvNetD3": "flatten",
             "ConvNetD4": "flatten", "ConvNetBN": "flatten", "ConvNetW32": "flatten", "AlexNet": "flatten",
             "VGG11": "flatten", "ResNet18": "linear", "ResNet18_AP": "flatten", "LeNet": "gradcam",
             "ResNet18ImageNet": "linear", "MobileNetV2": "linear"}
IMAGENET_FORMS = ("ResNet18ImageNet", "MobileNetV2")  # stride 32: a 1x1 map at DC sizes, refused by name


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("channel, size", [(3, 32), (1, 28), (1, 32)])
def test_zoo_models_and_their_cam_layers(name, channel, size):
    if name == "ConvNetD4" and size == 28 and channel == 3:
        pytest.skip("28x28 RGB is not a DC input")
    model = get_model(name, channel, 7, (size, size)).double().eval()
    x = torch.randn(3, channel, size, size, dtype=torch.float64)
    logits = model(x)
    assert logits.shape == (3, 7)
    target = cam_target(model)
    if name in IMAGENET_FORMS:
        with pytest.raises(ValueError, match=f"{name} gives a 1x1 CAM map"):
            target.probe(x)
        return
    target.probe(x)
    assert target.kind == ZOO_KINDS[name]
    A, out = target.run(x)
    assert torch.equal(out, logits) and A.dim() == 4
    y = torch.tensor([0, 3, 6])
    bias = target.head.bias[y] if target.kind != "gradcam" else None
    if target.kind == "flatten":  # the CAM summed over pixels plus the bias is the logit
        cam = (target.head_weight(A)[y] * A).sum(1)
        assert torch.allclose(cam.sum((1, 2)) + bias, logits.gather(1, y[:, None])[:, 0])
    elif target.kind == "linear":  # ... its pixel mean, for a linear head after average pooling
        cam = torch.einsum("bc,bchw->bhw", target.head_weight(A)[y], A)
        assert torch.allclose(cam.mean((1, 2)) + bias, logits.gather(1, y[:, None])[:, 0])


def test_unknown_models_and_explicit_layers():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    with pytest.raises(ValueError, match="found no 4-D feature map with more than one pixel in Sequential"):
        cam_target(mlp).probe(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=re.escape("layer: Sequential has no submodule 'conv9'")):
        cam_target(mlp, layer="conv9")
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        cam_target("resnet")
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    target = cam_target(net, layer="1", head="4")  # torch-cam's habit: names
    target.probe(torch.randn(2, 3, 6, 6))
    assert target.layer is net[1] and target.kind == "linear"
    auto = cam_target(net)  # found by the probe: the ReLU's 4x4 map and the last linear layer
    auto.probe(torch.randn(2, 3, 6, 6))
    assert auto.layer is net[1] and auto.kind == "linear"


def test_torchvision_models_where_installed():
    tv = pytest.importorskip("torchvision.models")
    for ctor, kind in ((tv.resnet18, "linear"), (tv.vgg11, "gradcam"), (tv.mobilenet_v2, "linear")):
        model = ctor(weights=None, num_classes=5).eval()
        target = cam_target(model)
        target.probe(torch.randn(2, 3, 64, 64))
        assert target.kind == kind


def _smooth_head_net():
    """A Grad-CAM network whose head is smooth in A (GELU): its Grad-CAM weights depend on A."""
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=4, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 16), nn.GELU(),
                         nn.Linear(16, 10))


@pytest.mark.parametrize("memory", ["keep", "stream"])
def test_gradcam_weights_taken_as_constants_only_for_piecewise_linear_heads(memory):
    """LeNet's ReLU MLP head: the weights' derivative is zero almost everywhere, so no second-order
    graph is kept, and the image gradient equals the one that keeps it; a GELU head keeps it."""
    torch.manual_seed(3)
    lenet = get_model("LeNet", 3, 10, (32, 32)).double()
    smooth = _smooth_head_net().double()
    convnet = get_model("ConvNetD1", 3, 10, (32, 32)).double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 10, (4,))
    for net, varies in ((lenet, False), (smooth, True)):
        loss = mf.MetaDDLoss([net, convnet], memory=memory, **({"chunk_size": 3} if memory == "stream" else {}))
        (got,) = torch.autograd.grad(loss(x, y) * 1.7, x)
        assert loss.targets[0].kind == "gradcam" and loss.targets[0].weights_vary is varies
        loss.targets[0].weights_vary = True  # the full second-order graph through the head
        (want,) = torch.autograd.grad(loss(x, y) * 1.7, x)
        assert rel_err(got, want) <= 1e-12
    probe, target = torch.randn(2, 3, 32, 32), cam_target(_smooth_head_net())
    rng = torch.random.get_rng_state()
    target.probe(probe)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the probe draws from its own generator


def _zoo(names, dtype=torch.float64, channel=3, size=24):
    torch.manual_seed(7)
    return [get_model(n, channel, 10, (size, size)).to(dtype) for n in names]


@pytest.mark.parametrize("names, size", [(("ConvNet", "ResNet18"), 16), (("ConvNet", "AlexNet", "VGG11", "LeNet"), 32)])
@pytest.mark.parametrize("mode", ["cam", "gradcam"])
@pytest.mark.parametrize("memory", ["keep", "stream"])
@pytest.mark.parametrize("alpha", [None, 0.4])
def test_loss_gradient_equals_naive_graph(fused_backend, names, size, mode, memory, alpha):
    models = _zoo(names, size=size)
    x = torch.randn(5, 3, size, size, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 10, (5,))
    naive = mf.MetaDDLoss(models, mode=mode, alpha=alpha, memory="keep", backend="reference")
    fused = mf.MetaDDLoss(models, mode=mode, alpha=alpha, memory=memory, backend=fused_backend,
                          **({"chunk_size": 3} if memory == "stream" else {}))
    ref = naive(x, y)
    (want,) = torch.autograd.grad(ref * 1.3, x)
    out = fused(x, y)
    (got,) = torch.autograd.grad(out * 1.3, x)
    assert rel_err(out, ref) <= 1e-10 and rel_err(got, want) <= 1e-10


@pytest.mark.parametrize("alpha", [None, 0.4])
@pytest.mark.parametrize("chunking", [dict(), dict(chunk_size=1), dict(chunk_size=4), dict(memory_budget=1e-6)])
def test_stream_chunks_equal_keep(alpha, chunking):
    models = _zoo(("ConvNet", "LeNet", "ResNet18"))  # LeNet: Grad-CAM weights
    x = torch.randn(7, 3, 24, 24, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 10, (7,))
    ref = mf.MetaDDLoss(models, alpha=alpha, memory="keep")(x, y)
    (want,) = torch.autograd.grad(ref * -0.7, x)
    fn = mf.MetaDDLoss(models, alpha=alpha, **chunking)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(x, y)
    assert [str(w.message).split(":")[0] for w in caught] == (["memory_budget"] if chunking.get("memory_budget") else [])
    (got,) = torch.autograd.grad(out * -0.7, x)
    assert rel_err(out, ref) <= 1e-12 and rel_err(got, want) <= 1e-12
    with torch.no_grad():  # the value alone
        assert rel_err(fn(x, y), ref) <= 1e-12


@pytest.mark.parametrize("alpha", [None, 1.0])
def test_budget_sets_the_chunk(alpha):
    models = _zoo(("ConvNet", "AlexNet", "LeNet"))
    x = torch.randn(7, 3, 24, 24, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 10, (7,))
    probe = mf.MetaDDLoss(models)
    sizes = probe._graph_bytes(x, y, probe._prepare(x), "reference")
    assert len(sizes) == 3 and min(sizes) > 0
    # two and a half images' graphs of the models that run on one chunk: chunks of 2 images
    together = alpha is None
    fixed = x.numel() * 8 + (0 if together else 2 * 3 * 7 * 16 * 8)
    per_image = HEADROOM * (sum(sizes) if together else max(sizes))
    fn = mf.MetaDDLoss(models, alpha=alpha, memory_budget=(fixed + 2.5 * per_image) / 1e6)
    seen = []
    hook = models[1].register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    try:
        fn(x, y).backward()
    finally:
        hook.remove()
    assert seen[-4:] == [2, 2, 2, 1]


def test_cvar_over_groups_and_default_groups():
    models = _zoo(("ConvNet", "ResNet18"))
    x = torch.randn(6, 3, 24, 24, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 10, (6,))
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    naive = mf.MetaDDLoss(models, alpha=0.5, groups=groups, num_groups=3, memory="keep", backend="reference")
    fused = mf.MetaDDLoss(models, alpha=0.5, num_groups=3)
    (want,) = torch.autograd.grad(naive(x, y), x)
    (got,) = torch.autograd.grad(fused(x, y, groups), x)
    assert rel_err(got, want) <= 1e-10


def test_stream_backward_reruns_only_tail_images():
    models = _zoo(("ConvNet", "AlexNet"))
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0])) for m in models]
    x = torch.randn(20, 3, 24, 24, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 10, (20,))
    loss = mf.MetaDDLoss(models, alpha=0.1, chunk_size=20)(x, y)  # streamed (the default runs one pass here)
    seen.clear()
    loss.backward()
    for h in hooks:
        h.remove()
    assert seen == [2, 2], "each model re-runs only the alpha * B = 2 tail images"
    assert int((x.grad.flatten(1).abs().sum(1) > 0).sum()) == 2


def test_models_stay_frozen_and_keep_their_state():
    models = _zoo(("ConvNet", "ResNet18", "LeNet"))
    models[0].train()
    models[1].eval()
    models[2].classifier.requires_grad_(False)
    flags = [[p.requires_grad for p in m.parameters()] for m in models]
    x = torch.randn(4, 3, 24, 24, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 10, (4,))
    for kw in (dict(memory="keep"), dict(), dict(alpha=0.5, chunk_size=3)):
        mf.MetaDDLoss(models, **kw)(x, y).backward()
        with torch.no_grad():
            mf.MetaDDLoss(models, **kw)(x, y)
    assert [m.training for m in models] == [True, False, True]
    assert [[p.requires_grad for p in m.parameters()] for m in models] == flags
    assert all(p.grad is None for m in models for p in m.parameters())
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bf16_autocast_on_cpu():
    # bf16 feature maps move the min/max pixels of the CAMs, so the gradient is not the
    # float32 one; stream and keep must still agree with each other, and the loss stay close.
    models = _zoo(("ConvNet", "ResNet18"), dtype=torch.float32)
    x = torch.randn(4, 3, 24, 24, requires_grad=True)
    y = torch.randint(0, 10, (4,))
    loss32 = mf.MetaDDLoss(models)(x, y)
    out = {}
    for memory in ("keep", "stream"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = mf.MetaDDLoss(models, memory=memory)(x, y)
        out[memory] = (loss, torch.autograd.grad(loss, x)[0])
        assert loss.dtype == torch.float32 and abs(loss.item() - loss32.item()) <= 0.05 * loss32.item()
    assert rel_err(out["stream"][0], out["keep"][0]) <= 1e-6
    assert rel_err(out["stream"][1], out["keep"][1]) <= 1e-2


@pytest.mark.parametrize("kw, exc, words", [
    (dict(models="convnet"), TypeError, "models: expected a list"),
    (dict(models=[nn.Conv2d(3, 3, 1)]), ValueError, "models: expected K >= 2"),
    (dict(mode="grad"), ValueError, "mode"),
    (dict(memory="disk"), ValueError, "memory"),
    (dict(alpha=0.0), ValueError, "alpha"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(memory_budget=0), ValueError, "memory_budget: expected a finite float > 0"),
    (dict(memory_budget=True), TypeError, "memory_budget: expected a finite float > 0"),
    (dict(memory_budget=100, memory="keep"), ValueError, "memory_budget: has no effect with memory='keep'"),
    (dict(memory_budget=100, chunk_size=4), ValueError, "memory_budget: has no effect with chunk_size"),
    (dict(chunk_size=4, memory="keep"), ValueError, "chunk_size: has no effect with memory='keep'"),
    (dict(norm="l1"), ValueError, "norm"),
])
def test_bad_constructor_arguments(kw, exc, words):
    kw.setdefault("models", _zoo(("ConvNet", "ResNet18")))
    with pytest.raises(exc, match=re.escape(words)):
        mf.MetaDDLoss(**kw)


def test_bad_call_arguments():
    fn = mf.MetaDDLoss(_zoo(("ConvNet", "ResNet18"), dtype=torch.float32))
    x = torch.randn(2, 3, 24, 24)
    with pytest.raises(ValueError, match="images: expected a 4-D"):
        fn(x[0], torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="labels: expected an integer tensor"):
        fn(x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=re.escape("labels: expected shape (2,)")):
        fn(x, torch.tensor([1, 2, 3]))
