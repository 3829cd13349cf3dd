"""Class-indexed data sources (metadd_fast.sources): the interface on in-memory and random data,
and image folders (generated JPEG folders): index cache, parallel decode, bad data."""
import pytest
import torch

from metadd_fast import data
from metadd_fast.sources import RandomSource, TensorSource, open_source


def _interface_holds(src):
    """What every source promises: counts, shapes, sample = randperm draw, batches one class each."""
    assert len(src.counts) == src.num_classes and len(src) == sum(src.counts)
    full = [src.class_images(c) for c in range(src.num_classes)]
    for c, x in enumerate(full):
        assert x.dtype == torch.float32 and tuple(x.shape) == (src.count(c), *src.shape)
        assert torch.equal(src(c), x)
        g1, g2 = torch.Generator().manual_seed(c), torch.Generator().manual_seed(c)
        n = max(1, src.count(c) // 2)
        assert torch.equal(src.sample(c, n, g1), x[torch.randperm(src.count(c), generator=g2)[:n]])
        assert src.sample(c, 10 ** 6).shape[0] == src.count(c)
    seen = {c: [] for c in range(src.num_classes)}
    for x, y in src.batches(3):
        assert x.shape[0] <= 3 and x.shape[0] == y.shape[0] and len(set(y.tolist())) == 1
        seen[int(y[0])].append(x)
    for c in range(src.num_classes):
        assert torch.equal(torch.cat(seen[c]), full[c])
    some = [int(y[0]) for _, y in src.batches(100, classes=[1, 0])]
    assert some == [1, 0]
    ds = src.dataset()
    assert ds.num_classes == src.num_classes and len(ds) == len(src) and tuple(ds.mean) == tuple(src.mean)
    with pytest.raises(ValueError, match="class"):
        src.class_images(src.num_classes)
    with pytest.raises(ValueError, match="batch_size"):
        next(src.batches(0))


def test_tensor_source_is_the_dataset_by_class():
    ds = data.load_digits("test", 8)
    src = TensorSource(ds)
    _interface_holds(src)
    assert src.dataset() is ds and src.shape == (1, 8, 8) and src.num_outputs == 10
    assert torch.equal(src.class_images(3), ds.images[ds.labels == 3])
    assert src.key == f"dataset:digits:{len(ds)}:(1, 8, 8)"
    # unsorted labels: rows of the class, in dataset order
    perm = torch.randperm(len(ds))
    shuffled = data.Dataset("s", ds.images[perm], ds.labels[perm], 10, ds.mean, ds.std)
    assert torch.equal(TensorSource(shuffled).class_images(4), shuffled.images[shuffled.labels == 4])
    _interface_holds(TensorSource(shuffled))


def test_random_source_matches_the_engines():
    src = RandomSource(3, 5, (3, 4, 4), seed=2)
    _interface_holds(src)

    def old(c):  # the removed engine.RandomImageSource's images
        g = torch.Generator().manual_seed(2 * 1_000_003 + c)
        return torch.randn(5, 3, 4, 4, generator=g) + torch.randn(1, 3, 4, 4, generator=g)

    assert src.key == "random:3:5:(3, 4, 4):2" and all(torch.equal(src(c), old(c)) for c in range(3))
    with pytest.raises(ValueError, match="per_class"):
        RandomSource(3, 0, (3, 4, 4))


def test_open_source_in_memory():
    src = open_source("digits", "train", size=16)
    assert isinstance(src, TensorSource) and src.shape == (1, 16, 16) and src.num_classes == 10
