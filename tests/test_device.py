"""The GPU proof's test cases (benchmarks/gpu_proof.py): every op against its float64 reference on
the device's tensors, opcheck, torch.compile, MetaDDLoss with torchvision networks at 224x224 (and
zoo networks) in every precision, and the engine on one device.

The device is METADD_DEVICE (gpu_proof.py sets it: cuda, or cpu for --dry-run, which also sets
METADD_PROOF_TINY=1 for tiny shapes); without it the cases run on CUDA where there is one and are
skipped otherwise (the dry run of tests/test_gpu_proof.py runs them on the CPU).
"""
import os

import pytest
import torch
from helpers import rel_err
from test_oplib import _opcheck_cases

import metadd_fast as mf
from metadd_fast import reference
from metadd_fast.engine import EngineConfig, run_chunked
from metadd_fast.sources import RandomSource
from metadd_fast.models import get_model

DEVICE = os.environ.get("METADD_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no CUDA device (set METADD_DEVICE to run elsewhere)")
TINY = os.environ.get("METADD_PROOF_TINY") == "1"
PRECISIONS = ["fp32", "bf16"] + (["fp16"] if DEVICE == "cuda" else [])  # fp16 on a CPU: emulated, slow
TORCHVISION = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121")


def _to(obj):
    """``obj`` with every tensor on DEVICE (leaves keep requires_grad)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(DEVICE).requires_grad_(obj.requires_grad)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o) for o in obj)
    return obj


def _cam_case(B, dtype=torch.float32):
    feats = [torch.randn(B, C, H, H, dtype=dtype, requires_grad=True) for C, H in ((16, 4), (24, 2), (8, 7))]
    weights = [torch.randn(10, C, dtype=dtype) for C, _ in ((16, 4), (24, 2), (8, 7))]
    return feats, weights, torch.randint(0, 10, (B,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cam_variance_and_cvar_against_float64(dtype):
    feats, weights, labels = _cam_case(6 if TINY else 512, dtype)
    dev = _to((feats, weights, labels))
    v = mf.cam_variance(*dev, reduction="none")
    loss = mf.cvar(v, 0.3)
    grads = torch.autograd.grad(loss, dev[0])
    f64 = [f.detach().double().requires_grad_() for f in feats]
    v64 = reference.cam_variance(f64, [w.double() for w in weights], labels, reduction="none")
    loss64 = reference.cvar(v64, 0.3)
    want = torch.autograd.grad(loss64, f64)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert rel_err(v.cpu(), v64) <= tol and rel_err(loss.cpu(), loss64) <= tol
    assert all(rel_err(g.cpu(), w) <= 10 * tol for g, w in zip(grads, want))


def test_nearest_centroid_against_float64():
    N, M, D = (64, 9, 8) if TINY else (100_000, 2_000, 128)
    x, c = torch.randn(N, D), torch.randn(M, D)
    idx, dist = mf.nearest_centroid(x.to(DEVICE), c.to(DEVICE))
    idx64, dist64 = reference.nearest_centroid(x.double(), c.double())
    assert (idx.cpu() == idx64).float().mean() >= 0.999 and rel_err(dist.cpu(), dist64) <= 1e-4


@pytest.mark.parametrize("index", range(len(_opcheck_cases())))
def test_opcheck_on_device(index):
    name, args = _opcheck_cases()[index]
    torch.library.opcheck(getattr(torch.ops.metadd_fast, name).default, _to(args))


def test_torch_compile_on_device():
    feats, weights, labels = _to(_cam_case(6 if TINY else 256))
    fn = lambda f, w, y: mf.cvar(mf.cam_variance(f, w, y, reduction="none"), 0.3)  # noqa: E731
    want = fn(feats, weights, labels)
    got = torch.compile(fn, fullgraph=True)(feats, weights, labels)
    assert rel_err(got.cpu(), want.cpu()) <= 1e-5


def _term(models, x, y, precision, memory="stream"):
    xi = x.clone().requires_grad_()
    loss = mf.MetaDDLoss(models, precision=precision, memory=memory)(xi, y)
    (g,) = torch.autograd.grad(loss, xi)
    assert torch.isfinite(loss) and torch.isfinite(g).all() and g.dtype == x.dtype
    return loss.detach(), g


def _precisions(models, x, y):
    """Every precision against fp32: prints cosine and relative value change (the proof's log)."""
    loss32, g32 = _term(models, x, y, "fp32", memory="keep")
    loss_s, g_s = _term(models, x, y, "fp32")
    assert rel_err(loss_s.cpu(), loss32.cpu()) <= 1e-4 and rel_err(g_s.cpu(), g32.cpu()) <= 1e-3
    for p in PRECISIONS[1:]:
        loss, g = _term(models, x, y, p)
        cos = float(torch.nn.functional.cosine_similarity(g.flatten().double(), g32.flatten().double(), 0))
        print(f"precision {p} vs fp32: gradient cosine {cos:.4f}, value {float(loss):.6g} vs {float(loss32):.6g}")
        assert cos > 0 and abs(float(loss) - float(loss32)) <= 0.1 * abs(float(loss32))


def test_metadd_loss_zoo_every_precision():
    size, B = (16, 4) if TINY else (32, 128)
    models = [get_model(n, 3, 10, (size, size)).to(DEVICE).eval() for n in ("ConvNetD1", "ConvNetD2", "ConvNet")]
    x, y = torch.randn(B, 3, size, size, device=DEVICE), torch.randint(0, 10, (B,), device=DEVICE)
    _precisions(models, x, y)


@pytest.mark.parametrize("name", TORCHVISION)
def test_metadd_loss_torchvision_224(name):
    tv = pytest.importorskip("torchvision.models", reason="torchvision does not import here")
    size, B = (64, 2) if TINY else (224, 16)
    torch.manual_seed(0)
    models = [tv.get_model(n, weights=None, num_classes=1000).to(DEVICE).eval() for n in (name, "resnet18")]
    if name == "resnet18":
        models[1] = tv.get_model("mobilenet_v2", weights=None, num_classes=1000).to(DEVICE).eval()
    x, y = torch.randn(B, 3, size, size, device=DEVICE), torch.randint(0, 1000, (B,), device=DEVICE)
    _precisions(models, x, y)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_engine_on_one_device(tmp_path, precision):
    cfg = EngineConfig(ipc=2, iterations=2, classes_per_chunk=2, batch_real=6, arch="ConvNetD1", device=DEVICE,
                       metadd_weight=1.0, metadd_models=("ConvNetD1", "ConvNetD2"), metadd_precision=precision,
                       pretrain_epochs=1)
    run = run_chunked(cfg, RandomSource(4, 6, (3, 8, 8), seed=3), str(tmp_path), progress=False)
    assert run is not None and torch.isfinite(run["images"]).all() and run["images"].shape == (8, 3, 8, 8)
