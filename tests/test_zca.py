"""ZCA whitening: whitened covariance = identity up to the regulariser, exact inverse, checks."""
import pytest
import torch

from metadd_fast import data
from metadd_fast.zca import ZCA


def _correlated(n=3000, shape=(2, 3, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    D = torch.Size(shape).numel()
    mix = torch.randn(D, D, generator=g, dtype=torch.float64) * torch.logspace(0, -2, D, dtype=torch.float64)
    x = torch.randn(n, D, generator=g, dtype=torch.float64) @ mix + 3.0
    return x.reshape(n, *shape)


def _cov(x):
    return torch.cov(x.reshape(x.shape[0], -1).T)


def test_whitened_covariance_is_identity_up_to_the_regulariser():
    x = _correlated()
    weak = ZCA.fit(x, strength=1e-9)
    torch.testing.assert_close(_cov(weak.whiten(x)), torch.eye(12, dtype=torch.float64), atol=1e-4, rtol=0)
    zca = ZCA.fit(x, strength=0.1)
    s = torch.linalg.eigvalsh(_cov(x))
    lam = 0.1 * s.sum() / 12
    got = torch.linalg.eigvalsh(_cov(zca.whiten(x)))
    torch.testing.assert_close(got, s / (s + lam), atol=1e-9, rtol=1e-7)
    assert float(got.max()) < 1 and abs(float(zca.whiten(x).mean())) < 1e-9
    w = _cov(zca.whiten(x))  # ZCA, not any whitening: the whitened data stays symmetric-aligned (W = W^T)
    torch.testing.assert_close(w, w.T)


def test_unwhiten_inverts_whiten_and_the_state_round_trips(tmp_path):
    x = _correlated(n=500, seed=1)
    zca = ZCA.fit(x.float())
    y = torch.randn(7, 2, 3, 2)
    torch.testing.assert_close(zca.unwhiten(zca.whiten(y)), y, atol=1e-5, rtol=1e-5)
    assert zca.whiten(y).dtype == torch.float32
    torch.save(zca.state_dict(), tmp_path / "zca.pt")
    back = ZCA.from_state_dict(torch.load(tmp_path / "zca.pt", weights_only=True))
    assert torch.equal(back.whiten(y), zca.whiten(y)) and back.strength == pytest.approx(0.1)
    ds = data.Dataset("r", y, torch.zeros(7, dtype=torch.int64), 1, (0.0,) * 2, (1.0,) * 2)
    assert torch.equal(zca.whiten_dataset(ds, chunk=3).images, zca.whiten(y))


def test_whiten_is_differentiable():
    zca = ZCA.fit(_correlated(n=200))
    y = torch.randn(2, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(zca.whiten, (y,))


def test_bad_input():
    with pytest.raises(ValueError, match="images: expected a 4-D \\(B, C, H, W\\) tensor, got shape \\(4, 12\\)"):
        ZCA.fit(torch.zeros(4, 12))
    with pytest.raises(TypeError, match="images: expected a floating tensor"):
        ZCA.fit(torch.zeros(4, 1, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="images: expected finite values"):
        ZCA.fit(torch.full((4, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="chunk: expected a positive int, got 0"):
        ZCA.fit(torch.randn(4, 1, 2, 2), chunk=0)
    with pytest.raises(ValueError, match="at least 2 images"):
        ZCA.fit(torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="strength"):
        ZCA.fit(torch.randn(4, 1, 2, 2), strength=0)
    with pytest.raises(ValueError, match="zero covariance"):
        ZCA.fit(torch.ones(4, 1, 2, 2))
    with pytest.raises(ValueError, match="refused"):
        ZCA.fit(torch.zeros(2, 3, 65, 64))
    with pytest.raises(ValueError, match="x: expected images of 12 values"):
        ZCA.fit(torch.randn(5, 2, 3, 2)).whiten(torch.randn(2, 1, 3, 3))
    state = ZCA.fit(torch.randn(5, 2, 3, 2)).state_dict()
    with pytest.raises(ValueError, match=r"state\['whiten'\]: expected a tensor of shape \(12, 12\)"):
        ZCA.from_state_dict({**state, "whiten": torch.zeros(12)})
    with pytest.raises(ValueError, match="state: expected a ZCA.state_dict"):
        ZCA.from_state_dict({})


def test_distill_run_with_zca_saves_unwhitened_images_and_the_transform(tmp_path):
    from metadd_fast.engine import EngineConfig, run_chunked
    from metadd_fast.results import load_synthetic
    from metadd_fast.sources import TensorSource

    cfg = EngineConfig(iterations=1, ipc=1, batch_real=8, checkpoint_every=1, arch="ConvNetD1", zca=True,
                       classes_per_chunk=None, lr=1e-9)  # the images barely move from their real initialization
    run_chunked(cfg, TensorSource(data.load_digits("train", 16)), str(tmp_path), progress=False)
    zca = ZCA.from_state_dict(torch.load(tmp_path / "zca.pt", weights_only=True))
    images, _ = load_synthetic(str(tmp_path / "synthetic.pt"))
    state = torch.load(tmp_path / "state.pt", weights_only=False)["distillers"][0]
    torch.testing.assert_close(zca.whiten(images), state["images"], atol=1e-4, rtol=1e-4)  # distilled in ZCA space
    train = data.load_digits("train", 16).images.flatten(1)
    # saved in the dataset's own space (direct distances: cdist's norm expansion is off by ~0.02 here)
    nearest = (images.flatten(1)[:, None] - train[None]).norm(dim=-1).min(1).values
    assert float(nearest.max()) < 1e-3


def test_fit_batches_is_fit_streamed():
    """The same accumulation over batches: equal to fit's with the same batches, close to one
    batch; a shift far from zero (pixels around 3) loses nothing."""
    x = _correlated(n=700, seed=2)
    a, b = ZCA.fit(x, chunk=100), ZCA.fit_batches(x.split(100))
    assert torch.equal(a.whiten_matrix, b.whiten_matrix) and torch.equal(a.mean, b.mean)
    one = ZCA.fit(x, chunk=700)
    torch.testing.assert_close(b.whiten_matrix, one.whiten_matrix, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(b.mean, x.reshape(700, -1).mean(0), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="batches: expected images of 12 values"):
        ZCA.fit_batches([x[:3], torch.randn(3, 2, 2, 2, dtype=torch.float64)])
    with pytest.raises(ValueError, match="batches: expected at least 2 images"):
        ZCA.fit_batches([x[:1]])
    with pytest.raises(TypeError, match="batches: expected an iterable"):
        ZCA.fit_batches(None)


def test_whitened_source_whitens_what_its_source_reads(monkeypatch):
    from metadd_fast.sources import RandomSource, TensorSource, WhitenedSource

    src = TensorSource(data.load_digits("test", 8))
    read = []
    batches = src.batches
    monkeypatch.setattr(src, "batches", lambda *a, **kw: read.append(a) or batches(*a, **kw))
    w = WhitenedSource(src, batch_size=64)
    assert read == [] and w.key == src.key + "+zca:0.1" and w.name == "digits+zca"  # fitted when first needed
    zca = w.zca
    assert read == [(64,)] and w.zca is zca  # one pass over the source's batches, once
    ds = src.dataset()
    torch.testing.assert_close(zca.whiten_matrix, ZCA.fit(ds.images).whiten_matrix, atol=1e-8, rtol=1e-6)
    idx = torch.tensor([5, 0, 300, 7])
    torch.testing.assert_close(w.rows(idx), zca.whiten(ds.images[idx]))
    torch.testing.assert_close(w.class_images(3), zca.whiten(src.class_images(3)))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(w.sample(2, 4, g1), zca.whiten(src.sample(2, 4, g2)))
    x, y = next(w.batches(10, classes=[4]))
    torch.testing.assert_close(x, zca.whiten(src.class_images(4)[:10]))
    assert torch.equal(y, torch.full((10,), 4)) and torch.equal(w.labels(), src.labels())
    assert w.counts == src.counts and w.shape == src.shape and (w.mean, w.std) == (src.mean, src.std)
    # images too large for the covariance: refused before any is read
    big = RandomSource(2, 3, (3, 65, 64))
    monkeypatch.setattr(big, "class_images", lambda c: pytest.fail("read"))
    with pytest.raises(ValueError, match=r"source: ZCA needs a 12480 x 12480 covariance \(3x65x64 images\)"):
        WhitenedSource(big)
