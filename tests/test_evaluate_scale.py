"""Evaluation at scale: the test split read in batches from a class source, and worst-group
clusters computed in bounded memory, equal to the in-memory definition on small data sets."""
import torch

from metadd_fast.data import Dataset, load_digits
from metadd_fast import evaluate as ev
from metadd_fast.evaluate import cluster_view, evaluate_synthetic
from metadd_fast.kmeans import kmeans
from metadd_fast.ops.nearest_centroid import nearest_centroid
from metadd_fast.sources import TensorSource


class StreamSource(TensorSource):
    """A class source (metadd_fast.sources) that records the largest batch it handed out."""

    def __init__(self, ds: Dataset):
        super().__init__(ds)
        order = torch.argsort(ds.labels, stable=True)
        self.images, self.labels = ds.images[order], ds.labels[order]  # the order batches() gives
        self.largest = 0

    def batches(self, batch_size, classes=None):
        for x, y in super().batches(batch_size, classes):
            self.largest = max(self.largest, len(y))
            yield x, y


def test_clusters_equal_kmeans_on_the_pixels_where_both_run():
    for size in (16, 32):
        test = load_digits("test", size)
        torch.testing.assert_close(ev.test_clusters(test, batch_size=100),
                                   kmeans(test.images.flatten(1), 10, seed=0)[1], rtol=0, atol=0)


def test_clusters_beyond_fit_max_are_nearest_centres_of_a_sample_and_streamed():
    test = load_digits("test", 16)
    src = StreamSource(test)
    ids = ev.test_clusters(src, k=5, fit_max=200, batch_size=64)
    assert src.largest <= 64 and ids.shape == (len(test),)
    keep = torch.zeros(len(test), dtype=torch.bool)
    keep[torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:200]] = True
    centres = kmeans(src.images[keep].flatten(1), 5, seed=0)[0]
    assert torch.equal(ids, nearest_centroid(src.images.flatten(1), centres)[0])
    assert len(ids.unique()) == 5


def test_cluster_view_pools_large_images_only():
    x = torch.randn(3, 3, 64, 64)
    assert torch.equal(cluster_view(x[:, :, :32, :32]), x[:, :, :32, :32].flatten(1))
    torch.testing.assert_close(cluster_view(x), x.reshape(3, 3, 32, 2, 32, 2).mean((3, 5)).flatten(1))
    assert cluster_view(x, 16).shape == (3, 3 * 16 * 16)
    assert cluster_view(torch.randn(2, 1, 8, 100)).shape == (2, 8 * 32)


def test_evaluation_from_a_stream_equals_evaluation_in_memory():
    test = load_digits("test", 16)
    src = StreamSource(test)
    sorted_ds = Dataset("digits", src.images, src.labels, 10, test.mean, test.std)
    x, y = test.images[::40], test.labels[::40]
    kw = dict(seeds=1, epochs=2, batch_size=16, progress=False, augment=None, test_batch_size=50)
    streamed = evaluate_synthetic(x, y, src, ["LeNet"], **kw)["LeNet"]
    in_memory = evaluate_synthetic(x, y, sorted_ds, ["LeNet"], **kw)["LeNet"]
    assert src.largest <= 50
    assert streamed["acc"] == in_memory["acc"] and streamed["worst_group"] == in_memory["worst_group"]
    assert 0 <= streamed["worst_group"][0] <= streamed["acc"][0] <= 1
