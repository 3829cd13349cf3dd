"""Class-indexed data sources (metadd_fast.sources): the interface on in-memory and random data,
and image folders (generated JPEG folders): index cache, parallel decode, bad data."""
import pytest
import torch

from metadd_fast import data
from metadd_fast.sources import RandomSource, TensorSource, open_source


def _interface_holds(src):
    """What every source promises: counts, shapes, sample = randperm draw, batches one class each,
    rows and labels = the dataset's."""
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
    idx = torch.randperm(len(src), generator=torch.Generator().manual_seed(1))[:7]
    assert torch.equal(src.rows(idx), ds.images[idx]) and torch.equal(src.labels(), ds.labels)
    assert src.rows(idx[:0]).shape == (0, *src.shape)
    for bad in (torch.tensor([len(src)]), torch.tensor([-1]), torch.tensor([0.5]), [0]):
        with pytest.raises((TypeError, ValueError), match="idx"):
            src.rows(bad)
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


# ---- image folders -----------------------------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402

import numpy as np  # noqa: E402

from metadd_fast.errors import InputError  # noqa: E402
from metadd_fast.sources import IMAGENET_STATS, ImageFolderSource, folder_split  # noqa: E402
from metadd_fast.testing_data import make_imagenet_folder, wnid  # noqa: E402

SMALL = (80, 60)  # generated images (width, height): a 16 px decode drafts them to 1/2 (40 x 30)


@pytest.fixture
def imagenet(tmp_path):
    """<tmp>/data/{train,val}/<wnid>/*.JPEG: 3 classes of 5, 4, 3 train images and 2 val images each."""
    root = tmp_path / "data"
    make_imagenet_folder(str(root), 3, [5, 4, 3], size=SMALL, seed=1)
    make_imagenet_folder(str(root), 3, 2, size=SMALL, seed=2, split="val")
    return root


def _reference(path, size, fit="resize"):
    """The decode as ImageFolderSource defines it, spelled out: draft, RGB, bilinear resize."""
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (size, size))
        im = im.convert("RGB")
        box = None
        if fit == "crop":
            side = min(im.size)
            box = ((im.width - side) / 2, (im.height - side) / 2, (im.width + side) / 2, (im.height + side) / 2)
        return torch.from_numpy(np.asarray(im.resize((size, size), Image.BILINEAR, box=box)).copy()).permute(2, 0, 1)


def test_folder_source_interface_and_reference_decode(imagenet, tmp_path):
    src = ImageFolderSource(str(imagenet / "train"), 16, index_dir=str(tmp_path / "run"), workers=3)
    assert src.classes == [wnid(c) for c in range(3)] and src.counts == [5, 4, 3] and src.shape == (3, 16, 16)
    assert (src.mean, src.std) == IMAGENET_STATS and src.stats_from == "imagenet" and src.name == "data"
    _interface_holds(src)
    for c in range(3):
        px = src.class_pixels(c)
        assert px.dtype == torch.uint8 and px.is_contiguous()
        ref = torch.stack([_reference(p, 16) for p in src.paths(c)])
        assert torch.equal(px, ref)
        m, s = torch.tensor(src.mean)[:, None, None], torch.tensor(src.std)[:, None, None]
        assert torch.allclose(src.class_images(c), (ref / 255.0 - m) / s)
    # draft really decodes at a reduced scale, and stays close to a full decode + resize
    from PIL import Image

    with Image.open(src.paths(0)[0]) as im:
        im.draft("RGB", (16, 16))
        assert im.size == (40, 30)
        full = np.asarray(Image.open(src.paths(0)[0]).convert("RGB").resize((16, 16), Image.BILINEAR), np.float32)
    assert np.abs(src.class_pixels(0)[0].permute(1, 2, 0).numpy() - full).mean() < 4
    one = ImageFolderSource(str(imagenet / "train"), 16, workers=1)
    assert all(torch.equal(one.class_pixels(c), src.class_pixels(c)) for c in range(3))
    crop = ImageFolderSource(str(imagenet / "train"), 16, fit="crop", workers=2)
    assert torch.equal(crop.class_pixels(2), torch.stack([_reference(p, 16, "crop") for p in crop.paths(2)]))
    assert crop.key != src.key
    rect = ImageFolderSource(str(imagenet / "train"), (12, 20))
    assert rect.shape == (3, 12, 20) and rect.class_pixels(1).shape == (4, 3, 12, 20)
    assert ImageFolderSource(str(imagenet / "train")).shape == (3, SMALL[1], SMALL[0])  # first image's size


def test_folder_sample_decodes_the_drawn_files_or_uses_the_kept_class(imagenet):
    src = ImageFolderSource(str(imagenet / "train"), 16, cache_bytes=10 ** 6)
    g = torch.Generator().manual_seed(5)
    fresh = src.sample(0, 3, g)
    assert not src._cache
    full = src.class_images(0)
    assert list(src._cache) == [0]
    assert torch.equal(fresh, full[torch.randperm(5, generator=torch.Generator().manual_seed(5))[:3]])
    assert torch.equal(src.sample(0, 3, torch.Generator().manual_seed(5)), fresh)
    small = ImageFolderSource(str(imagenet / "train"), 16, cache_bytes=2 * 3 * 16 * 16 * 5)  # 2 classes of 5
    for c in (0, 1, 2, 0):
        small.class_pixels(c)
    assert list(small._cache) == [2, 0]
    small.close()
    assert not small._cache and torch.equal(small.class_pixels(1), src.class_pixels(1))  # new threads after close
    pickle.loads(pickle.dumps(small)).class_pixels(0)


def _index_reason(root, run, **kw):
    src = ImageFolderSource(str(root), 8, index_dir=str(run), **kw)
    src.save_index()
    return src


def test_folder_index_is_cached_and_checked_against_the_folder(imagenet, tmp_path):
    train, run = imagenet / "train", tmp_path / "run"
    opened = ImageFolderSource(str(train), 8, index_dir=str(run))
    assert opened.reindexed == "no index" and not run.exists()  # opening writes nothing; save_index() does
    first = _index_reason(train, run)
    index = run / "index_train.json"
    assert first.reindexed == "no index" and index.exists() and os.listdir(run) == ["index_train.json"]
    table = json.loads(index.read_text())
    assert table["classes"] == first.classes and table["files"][0][0] == f"{wnid(0)}/{wnid(0)}_0.JPEG"
    stamp = index.stat().st_mtime_ns
    again = _index_reason(train, run)
    assert again.reindexed is None and again.key == first.key and index.stat().st_mtime_ns == stamp
    # a file added, removed, changed (size, or only mtime): re-indexed, and the key moves
    keys = {first.key}
    new = train / wnid(1) / "extra.jpeg"
    new.write_bytes((train / wnid(0) / f"{wnid(0)}_0.JPEG").read_bytes())
    src = _index_reason(train, run)
    assert src.reindexed == "1 files added, 0 removed, 0 changed" and src.counts == [5, 5, 3]
    keys.add(src.key)
    new.unlink()
    src = _index_reason(train, run)
    assert src.reindexed == "0 files added, 1 removed, 0 changed" and src.key == first.key
    target = train / wnid(2) / f"{wnid(2)}_1.JPEG"
    target.write_bytes(target.read_bytes() + b"\0")
    src = _index_reason(train, run)
    assert src.reindexed == "0 files added, 0 removed, 1 changed"
    keys.add(src.key)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    src = _index_reason(train, run)
    assert src.reindexed == "0 files added, 0 removed, 1 changed"
    keys.add(src.key)
    assert len(keys) == 4 and _index_reason(train, run).reindexed is None
    # a damaged index (half-written by something else) is rewritten, not trusted
    index.write_text(index.read_text()[:100])
    assert _index_reason(train, run).reindexed == "unreadable index"
    assert json.loads(index.read_text())["files"] == json.loads(json.dumps(src.files))
    # a class folder without images: named, and the index is left as it was
    before = index.read_bytes()
    (train / "n99999999").mkdir()
    (train / "n99999999" / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="n99999999: class folder without images"):
        _index_reason(train, run)
    assert index.read_bytes() == before and os.listdir(run) == ["index_train.json"]
    with pytest.raises(InputError, match="has no class sub-folders"):
        ImageFolderSource(str(train / wnid(0)), 8)


def _write(path, im, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)


def test_folder_bad_images_are_named_and_odd_modes_converted(tmp_path):
    from PIL import Image

    root = tmp_path / "odd"
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    _write(root / "gray" / "a.jpg", Image.fromarray(gray, "L"), quality=95)
    _write(root / "cmyk" / "a.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95)
    deep = np.full((16, 16), 65535, dtype=np.uint16)
    deep[:, 8:] = 32896  # 128 * 257
    _write(root / "deep" / "a.png", Image.fromarray(deep))
    pal = Image.new("RGB", (16, 16), (10, 200, 30)).convert("P", palette=Image.ADAPTIVE)
    _write(root / "pal" / "a.png", pal)
    _write(root / "rgba" / "a.png", Image.new("RGBA", (16, 16), (50, 60, 70, 0)))
    _write(root / "rgba" / ".hidden.png", Image.new("RGBA", (16, 16)))  # skipped: starts with "."
    assert Image.open(root / "deep" / "a.png").mode.startswith("I;16")
    src = ImageFolderSource(str(root), 16)
    assert src.classes == ["cmyk", "deep", "gray", "pal", "rgba"] and src.counts == [1] * 5
    assert src.stats_from == "sample"
    px = {name: src.class_pixels(c)[0] for c, name in enumerate(src.classes)}
    assert all(p.shape == (3, 16, 16) for p in px.values())
    assert torch.equal(px["gray"][0], px["gray"][1]) and torch.equal(px["gray"][0], px["gray"][2])
    assert (px["gray"][0, :, -1].float().mean() - 240).abs() < 8
    r, g, b = px["cmyk"].float().mean(dim=(1, 2))
    assert r > 220 and g < 35 and b < 35  # no cyan, full magenta and yellow: red
    assert px["deep"][:, :, :7].eq(255).all() and px["deep"][:, :, 9:].eq(128).all()
    assert px["pal"][:, 4, 4].tolist() == [10, 200, 30] and px["rgba"][:, 4, 4].tolist() == [50, 60, 70]
    # statistics of the (whole, under 1,000 images) sample: the pixels' mean and std
    allpx = torch.cat([src.class_pixels(c) for c in range(5)]).double() / 255
    assert np.allclose(src.mean, allpx.mean(dim=(0, 2, 3)).tolist())
    assert np.allclose(src.std, allpx.std(dim=(0, 2, 3)).tolist())
    given = ImageFolderSource(str(root), 16, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert given.stats_from == "given" and given.mean == (0.5,) * 3
    assert torch.allclose(given.class_images(0), (given.class_pixels(0) / 255.0 - 0.5) / 0.25)
    # corrupt and truncated files: the file is named, when its class is decoded
    good = (root / "gray" / "a.jpg").read_bytes()
    (root / "gray" / "cut.jpg").write_bytes(good[: len(good) // 2])
    (root / "pal" / "junk.png").write_bytes(b"\x89PNG not really")
    lazy = ImageFolderSource(str(root), 16)  # opening decodes nothing: the flags are checked first
    assert lazy.key.endswith(":sample")
    with pytest.raises(InputError, match=r"gray/cut.jpg: not a readable image \(OSError: "):
        lazy.mean  # the statistics' sample decodes it, when first read
    src = ImageFolderSource(str(root), 16, mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(InputError, match=r"gray/cut.jpg: not a readable image \(OSError: "):
        src.class_pixels(2)
    with pytest.raises(InputError, match=r"pal/junk.png: not a readable image"):
        src.sample(3, 2)
    with pytest.raises(InputError, match=r"cut.jpg: not a readable image"):
        list(src.batches(4))
    assert torch.equal(src.class_pixels(0)[0], px["cmyk"])  # the other classes still decode


def test_sampled_statistics_are_read_lazily(tmp_path, monkeypatch):
    """A folder of other names than wnids: opening it decodes nothing (distill checks every flag
    first); its statistics are sampled when first read, the same as a full pass under 1,000 images."""
    import metadd_fast.sources as sources

    make_imagenet_folder(str(tmp_path), 3, 4, size=(40, 30), names=["cat", "dog", "owl"])
    decoded = []
    real = sources.decode_image
    monkeypatch.setattr(sources, "decode_image", lambda *a, **k: decoded.append(a[0]) or real(*a, **k))
    src = ImageFolderSource(str(tmp_path / "train"), 16)
    assert decoded == [] and src.stats_from == "sample" and src.key.endswith(":sample")
    mean, std = src.mean, src.std
    assert len(decoded) == 12
    allpx = torch.cat([src.class_pixels(c) for c in range(3)]).double() / 255
    assert np.allclose(mean, allpx.mean(dim=(0, 2, 3)).tolist()) and np.allclose(std, allpx.std(dim=(0, 2, 3)).tolist())
    assert (src.mean, len(decoded)) == (mean, 24)  # read once; class_pixels decoded the 12 again


def test_val_folders_take_the_train_classes(imagenet, tmp_path):
    from metadd_fast.sources import open_source

    train = open_source("folder", "train", path=str(imagenet), size=8, index_dir=str(tmp_path / "run"))
    val = open_source("folder", "test", path=str(imagenet), index_dir=str(tmp_path / "run"), like=train)
    assert val.root.endswith("val") and val.classes == train.classes and val.counts == [2, 2, 2]
    assert val.shape == train.shape and (val.mean, val.std) == (train.mean, train.std)
    train.save_index()
    val.save_index()
    assert sorted(os.listdir(tmp_path / "run")) == ["index_test.json", "index_train.json"]
    (imagenet / "val" / wnid(1)).rename(imagenet / "val" / "n77777777")
    with pytest.raises(InputError, match=rf"do not match .*missing: {wnid(1)}; not among them: n77777777"):
        open_source("folder", "val", path=str(imagenet), like=train)
    # Tiny-ImageNet: train/<wnid>/images/*.JPEG and val/images/ + val_annotations.txt
    tiny = tmp_path / "tiny"
    names = make_imagenet_folder(str(tiny), 2, 3, size=(24, 24), seed=3)
    for n in names:
        (tiny / "train" / n / "images").mkdir()
        for f in os.listdir(tiny / "train" / n):
            if f.endswith(".JPEG"):
                os.rename(tiny / "train" / n / f, tiny / "train" / n / "images" / f)
        (tiny / "train" / n / f"{n}_boxes.txt").write_text("ignored\n")
    (tiny / "val" / "images").mkdir(parents=True)
    lines = []
    for i, n in enumerate([names[1], names[0], names[1]]):
        os.link(tiny / "train" / n / "images" / f"{n}_{i}.JPEG", tiny / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{n}\t0\t0\t10\t10")
    (tiny / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    tr = open_source("folder", "train", path=str(tiny), size=8)
    assert tr.counts == [3, 3] and tr.files[0][0] == f"{names[0]}/images/{names[0]}_0.JPEG"
    va = open_source("folder", "val", path=str(tiny), like=tr, index_dir=str(tmp_path / "tinyrun"))
    assert va.classes == names and va.files == [["images/val_1.JPEG"], ["images/val_0.JPEG", "images/val_2.JPEG"]]
    assert torch.equal(va.class_pixels(0)[0], tr.class_pixels(0)[1])
    with open(tiny / "val" / "val_annotations.txt", "a") as f:
        f.write("val_9.JPEG\tn01440764\n")
    with pytest.raises(InputError, match="val_9.JPEG: cannot be read"):
        open_source("folder", "val", path=str(tiny), like=tr)


def test_folder_split_and_the_in_memory_loader(imagenet, tmp_path):
    assert folder_split(str(imagenet), "train") == str(imagenet / "train")
    assert folder_split(str(imagenet), "test") == str(imagenet / "val")
    assert folder_split(str(imagenet / "train"), "test") == str(imagenet / "train")  # class folders themselves
    (tmp_path / "only" / "train").mkdir(parents=True)
    with pytest.raises(InputError, match="has no val/ or test/ folder"):
        folder_split(str(tmp_path / "only"), "test")
    ds = data.load("folder", "train", path=str(imagenet), size=8)
    src = ImageFolderSource(str(imagenet / "train"), 8)
    assert ds.labels.tolist() == [0] * 5 + [1] * 4 + [2] * 3 and ds.mean == IMAGENET_STATS[0]
    assert torch.equal(ds.images, torch.cat([src.class_images(c) for c in range(3)]))


def test_cli_names_a_truncated_image_in_one_line(imagenet, tmp_path, capsys):
    from cli_helpers import one_line, run_main

    victim = imagenet / "train" / wnid(1) / f"{wnid(1)}_2.JPEG"
    blob = victim.read_bytes()
    victim.write_bytes(blob[: len(blob) // 2])
    code, err = run_main(["distill", "--dataset", "folder", "--data-path", str(imagenet), "--size", "8",
                          "--iterations", "1", "--ipc", "1", "--arch", "ConvNetD1", "--out", str(tmp_path / "o")],
                         capsys)
    assert code == 2
    one_line(err, f"{victim}: not a readable image (OSError: image file is truncated")


def test_decode_benchmark_writes_its_rows(tmp_path):
    import csv
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import data_scale

    out = tmp_path / "decode.csv"
    argv = ["--classes", "2", "--per-class", "3", "--image", "40x30", "--sizes", "16", "--reps", "1",
            "--decode-out", str(out)]
    assert data_scale.main(argv) == 0 and data_scale.main(argv) == 0
    rows = list(csv.DictReader(open(out)))
    assert [r["method"] for r in rows] == ["plain", "draft_1_thread", "parallel"] * 2
    assert all(r["images"] == "6" and r["size"] == "16" and float(r["images_per_s_p50"]) > 0 for r in rows)


def test_class_indices_are_checked():
    src = RandomSource(3, 2, (1, 2, 2))
    assert torch.equal(src(np.int64(2)), src(2)) and torch.equal(src(torch.tensor(1)), src(1))
    for bad in (True, 1.0, "1", -1, 3, torch.tensor([1])):
        with pytest.raises(ValueError, match=r"class: expected an int in \[0, 3\)"):
            src.class_images(bad)


def test_folder_arguments_are_checked_before_anything_is_written(imagenet, tmp_path):
    train, run = str(imagenet / "train"), tmp_path / "run"
    for kw, match in (({"size": 0}, "size"), ({"size": (8,)}, "size"), ({"fit": "pad"}, "fit"),
                      ({"workers": 0}, "workers"), ({"cache_bytes": -1}, "cache_bytes"),
                      ({"split": "../x"}, "split"), ({"mean": (0.5,) * 3}, "mean, std"),
                      ({"mean": (0.5,) * 3, "std": (0.0,) * 3}, "mean, std")):
        with pytest.raises(ValueError, match=match):
            ImageFolderSource(train, **{"size": 8, **kw}, index_dir=str(run))
    assert not run.exists()
    with pytest.raises(InputError, match="is not a folder"):
        ImageFolderSource(str(tmp_path / "nothing"), 8)
