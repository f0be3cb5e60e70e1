"""Data sources of cnds-train: digits, Fashion-MNIST (IDX), image folders; sampler and loader."""

from __future__ import annotations

import dataclasses
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf

from cnds_compiler import compile_spec
from cnds_compiler.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    EpochSampler,
    Skipped,
    digits_split,
    epoch_order,
    load_source,
    make_loader,
)
from cnds_compiler.errors import DataError
from cnds_compiler.ir import DataConfig, Shape
from cnds_compiler.train.synthetic import class_name, make_imagefolder

from .conftest import SPECS

HAVE_FMNIST = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()


@pytest.fixture(scope="module")
def digits_net():
    return compile_spec(SPECS / "digits_cnds8.cnds")


@pytest.fixture(scope="module")
def fmnist_net():
    return compile_spec(SPECS / "fmnist_cnds8.cnds")


@pytest.fixture(scope="module")
def raw_digits():
    from sklearn.datasets import load_digits

    b = load_digits()
    return torch.from_numpy(b.images.astype(np.float32) / 16.0), torch.from_numpy(b.target.astype(np.int64))


def with_input(net, c, h, w, *, classes=None, resize=None, mean=(), std=(), mirror=False):
    return dataclasses.replace(
        net, input=Shape((c, h, w)), num_classes=classes or net.num_classes,
        class_names=() if classes else net.class_names,
        data=DataConfig(resize=resize, mean=mean, std=std, mirror=mirror),
    )


MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    # 48x40 (H x W) so that a swapped height/width shows up.
    return make_imagefolder(tmp_path_factory.mktemp("tree"), classes=3, per_class=6, size=(48, 40),
                            corrupt=2, val_per_class=3)


@pytest.fixture(scope="module")
def rgb_net(digits_net):
    return with_input(digits_net, 3, 32, 24, classes=3, resize=(40, 36), mean=MEAN, std=STD, mirror=True)


def batches(loader):
    return [(x.clone(), y.clone(), int(k)) for x, y, k in loader]


# ---- digits -----------------------------------------------------------------------------------------


def test_digits_shapes_split_and_normalisation(digits_net, raw_digits):
    images, labels = raw_digits
    s = load_source("digits", digits_net)
    assert s.description == "digits (1,438 train / 359 val, 8x8 grey)"
    assert s.class_names == tuple("0123456789") and s.num_classes == 10
    assert len(s.train) == 1438 and len(s.val) == 359
    tr, va = set(s.train.indices), set(s.val.indices)
    assert not tr & va and len(tr | va) == 1797
    counts = torch.bincount(labels, minlength=10)
    val_counts = torch.bincount(labels[list(s.val.indices)], minlength=10)
    assert val_counts.tolist() == [int(round(0.2 * int(c))) for c in counts]  # stratified
    x, y, skipped = next(iter(make_loader(s.val, 64, shuffle=False)))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert isinstance(skipped, int) and skipped == 0
    idx = list(s.val.indices[:64])
    # spec: mean 0.5, std 0.5 on [0, 1] pixels
    torch.testing.assert_close(x * 0.5 + 0.5, images[idx].unsqueeze(1), atol=1e-6, rtol=0)
    assert torch.equal(y, labels[idx])


def test_digits_split_is_fixed(digits_net, raw_digits):
    a = load_source("digits", digits_net, seed=0)
    b = load_source("digits", digits_net, seed=7)
    assert a.val.indices == b.val.indices and a.train.indices == b.train.indices
    assert torch.equal(a.train[5][0], b.train[5][0])
    train, val = digits_split(raw_digits[1].tolist())
    assert tuple(val) == a.val.indices
    # pinned: the split must never change between versions
    assert sum(val) == 321156 and val[:8] == [14, 24, 31, 41, 45, 50, 54, 56]


def test_digits_resized_and_repeated_to_spec_input(digits_net, raw_digits):
    net = with_input(digits_net, 3, 16, 16, mean=(0.1,), std=(2.0,))
    s = load_source("digits", net, limit_train=40, limit_val=30)
    assert len(s.train) == 40 and len(s.val) == 30
    assert s.description == "digits (40 train / 30 val, 8x8 grey -> 3x16x16)"
    x, y, _ = next(iter(make_loader(s.val, 30, shuffle=False)))
    assert x.shape == (30, 3, 16, 16)
    raw = raw_digits[0][list(s.val.indices)].unsqueeze(1)
    want = (nnf.interpolate(raw, size=(16, 16), mode="bilinear", align_corners=False) - 0.1) / 2.0
    for ch in range(3):
        torch.testing.assert_close(x[:, ch : ch + 1], want, atol=1e-6, rtol=0)


# ---- Fashion-MNIST --------------------------------------------------------------------------------


@pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_real_files(fmnist_net):
    s = load_source("fashion-mnist", fmnist_net)
    assert s.description == "fashion-mnist (60,000 train / 10,000 val, 28x28 grey)"
    assert s.class_names == FASHION_MNIST_CLASSES
    assert len(s.train) == 60000 and len(s.val) == 10000
    assert torch.bincount(s.val.labels).tolist() == [1000] * 10
    assert torch.bincount(s.train.labels).tolist() == [6000] * 10
    assert s.train.labels[0] == 9 and s.val.labels[0] == 9  # both files start with an ankle boot
    x, y, k = next(iter(make_loader(s.val, 256, shuffle=False)))
    assert x.shape == (256, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64 and k == 0
    pixels = (x * 0.353 + 0.286) * 255  # spec: mean 0.286, std 0.353
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
    assert (pixels - pixels.round()).abs().max() < 1e-3
    assert 0.2 < float(pixels.mean() / 255) < 0.4


@pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_mirror_augmentation(fmnist_net):
    flat = dataclasses.replace(fmnist_net, data=dataclasses.replace(fmnist_net.data, mirror=False))
    aug = load_source("fashion-mnist", fmnist_net, limit_train=64).train
    plain = load_source("fashion-mnist", flat, limit_train=64).train
    assert aug.indices == plain.indices

    def flips(epoch, seed=0):
        aug.set_epoch(epoch, seed)
        out = []
        for i in range(64):
            a, b = aug[i][0], plain[i][0]
            assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
            out.append(not torch.equal(a, b))
        return out

    e0 = flips(0)
    assert 10 < sum(e0) < 54
    assert flips(0) == e0 and flips(1) != e0 and flips(0, seed=1) != e0


def write_idx(path: Path, arr: np.ndarray, *, cut: int = 0, compress_cut: int = 0) -> None:
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = head + arr.astype(np.uint8).tobytes()
    if cut:
        data = data[:-cut]
    gz = gzip.compress(data)
    path.write_bytes(gz[:-compress_cut] if compress_cut else gz)


def fake_fmnist(root: Path, **bad) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", 12), ("t10k", 5)):
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)),
                  **(bad if stem == "train" else {}))
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def test_fashion_mnist_parses_idx_and_rejects_bad_files(tmp_path, fmnist_net):
    s = load_source(f"fashion-mnist:{fake_fmnist(tmp_path / 'ok')}", fmnist_net)
    assert len(s.train) == 12 and len(s.val) == 5 and s.train.labels.tolist() == [i % 10 for i in range(12)]
    assert s.val[0][0].shape == (1, 28, 28)
    for name, bad in (("short", {"cut": 100}), ("gzcut", {"compress_cut": 30})):
        root = fake_fmnist(tmp_path / name, **bad)
        with pytest.raises(DataError) as e:
            load_source(f"fashion-mnist:{root}", fmnist_net)
        assert e.value.path == str(root / "train-images-idx3-ubyte.gz")
        assert "truncated" in str(e.value)
    root = fake_fmnist(tmp_path / "magic")
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 20))
    with pytest.raises(DataError, match="bad header") as e:
        load_source(f"fashion-mnist:{root}", fmnist_net)
    assert e.value.path.endswith("t10k-labels-idx1-ubyte.gz")


def test_fashion_mnist_missing_dir_says_how_to_install(tmp_path, fmnist_net):
    where = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        load_source(f"fashion-mnist:{where}", fmnist_net)
    text = str(e.value)
    assert text.startswith(f"{where}: data error:")
    assert "apt-get install -y dataset-fashion-mnist" in text and "fashion-mnist:DIR" in text
    (where).mkdir()
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_source(f"fashion-mnist:{where}", fmnist_net)


# ---- image folders --------------------------------------------------------------------------------


def test_imagefolder_two_workers_skip_and_count(tree, rgb_net):
    s = load_source(f"imagefolder:{tree}", rgb_net)
    assert s.class_names == tuple(class_name(k) for k in range(3))
    assert len(s.train) == 20 and len(s.val) == 9  # 18 good + 2 corrupt
    assert s.description == f"imagefolder {tree} (20 train / 9 val, 3 classes, 32x24 RGB crops of 40x36)"
    loader = make_loader(s.train, 4, shuffle=True, workers=2, seed=3)
    got = batches(loader)
    assert all(x.shape == (len(y), 3, 32, 24) and x.dtype == torch.float32 for x, y, _ in got)
    assert sum(k for *_, k in got) == 2
    labels = torch.cat([y for _, y, _ in got])
    assert labels.dtype == torch.int64 and torch.bincount(labels).tolist() == [6, 6, 6]
    # augmentation and order depend on (seed, epoch) only, not on the worker count
    single = make_loader(s.train, 4, shuffle=True, workers=0, seed=3)
    for (a, la, ka), (b, lb, kb) in zip(got, batches(single), strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb) and ka == kb
    # the skipped value names what was dropped
    x, y, k = next(b for b in make_loader(s.train, 20, shuffle=False))
    assert k == 2 and len(y) == 18
    assert sorted(Path(p).name for p, _ in k.items) == ["corrupt_000.jpg", "corrupt_001.jpg"]


def test_imagefolder_strict_raises_data_error_in_main(tree, rgb_net):
    s = load_source(f"imagefolder:{tree}", rgb_net, strict=True)
    with pytest.raises(DataError) as e:
        for _ in make_loader(s.train, 4, shuffle=True, workers=2):
            pass
    err = e.value
    assert type(err) is DataError
    assert Path(err.path).name in {"corrupt_000.jpg", "corrupt_001.jpg"} and Path(err.path).is_file()
    assert "\n" not in str(err) and "Traceback" not in str(err) and "worker" not in str(err)
    assert str(err).startswith(f"{err.path}: data error: cannot read image")


def test_every_image_unreadable_stops(tmp_path, rgb_net):
    root = make_imagefolder(tmp_path, classes=3, per_class=0, corrupt=3, val_per_class=1)
    s = load_source(f"imagefolder:{root}", rgb_net)
    with pytest.raises(DataError, match="none of the 3 images"):
        list(make_loader(s.train, 2, shuffle=False))


def tv_eval(mean, std, mode="RGB"):
    from PIL import Image
    from torchvision import transforms as T

    pipe = T.Compose([T.Resize((40, 36)), T.CenterCrop((32, 24)), T.ToTensor(), T.Normalize(mean, std)])
    return lambda path: pipe(Image.open(path).convert(mode))


def test_eval_transform_equals_torchvision_pipeline(tree, rgb_net):
    s = load_source(f"imagefolder:{tree}", rgb_net)
    ref = tv_eval(MEAN, STD)
    x, y, _ = next(iter(make_loader(s.val, 9, shuffle=False)))
    assert x.shape == (9, 3, 32, 24)
    for i, (path, label) in enumerate(s.val.samples):
        assert (x[i] - ref(path)).abs().max() <= 1e-6 and y[i] == label
    grey = with_input(rgb_net, 1, 32, 24, classes=3, resize=(40, 36), mean=(0.45,), std=(0.2,))
    g = load_source(f"imagefolder:{tree}", grey).val
    img, _ = g[4]
    assert img.shape == (1, 32, 24)
    assert (img - tv_eval((0.45,), (0.2,), "L")(g.samples[4][0])).abs().max() <= 1e-6


def test_ten_crop_val(tree, rgb_net):
    from PIL import Image
    from torchvision import transforms as T

    s = load_source(f"imagefolder:{tree}", rgb_net, ten_crop=True)
    x, y, _ = next(iter(make_loader(s.val, 4, shuffle=False, workers=0)))
    assert x.shape == (4, 10, 3, 32, 24) and y.shape == (4,)
    norm = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    pipe = T.Compose([T.Resize((40, 36)), T.TenCrop((32, 24)), T.Lambda(lambda cs: torch.stack([norm(c) for c in cs]))])
    want = pipe(Image.open(s.val.samples[1][0]).convert("RGB"))
    assert (x[1] - want).abs().max() <= 1e-6
    centre = load_source(f"imagefolder:{tree}", rgb_net).val[1][0]
    assert (x[1, 4] - centre).abs().max() <= 1e-6 and torch.equal(x[1, 9], x[1, 4].flip(-1))
    # in-memory sources give the same layout
    d = load_source("digits", with_input(rgb_net, 1, 6, 6, classes=10, resize=(8, 8)), ten_crop=True,
                    limit_val=5)
    assert d.val[0][0].shape == (10, 1, 6, 6) and d.train[0][0].shape == (1, 6, 6)


def test_train_augmentation_random_crop_and_mirror(tree, rgb_net):
    s = load_source(f"imagefolder:{tree}", rgb_net)
    full = dataclasses.replace(rgb_net, input=Shape((3, 40, 36)))  # the whole resized image
    whole = load_source(f"imagefolder:{tree}", full).val
    i = 0  # a val image seen through the train dataset's transform
    s.train.samples[0] = whole.samples[i]
    big = whole[i][0]
    placements = set()
    for epoch in range(12):
        s.train.set_epoch(epoch, seed=1)
        crop = s.train[0][0]
        assert crop.shape == (3, 32, 24)
        found = [(t, left, f) for t in range(9) for left in range(13) for f in (False, True)
                 if (crop - (big[:, t : t + 32, left : left + 24].flip(-1) if f else
                             big[:, t : t + 32, left : left + 24])).abs().max() <= 1e-6]
        assert found, "a training sample is a crop (maybe mirrored) of the resized image"
        placements.add(found[0])
        s.train.set_epoch(epoch, seed=1)
        assert torch.equal(s.train[0][0], crop)
    assert len(placements) >= 6 and {f for *_, f in placements} == {False, True}


def test_imagefolder_layout_errors(tmp_path, rgb_net):
    with pytest.raises(DataError, match="no such directory") as e:
        load_source(f"imagefolder:{tmp_path / 'none'}", rgb_net)
    assert e.value.path == str(tmp_path / "none")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="image folder is a file, not a folder") as e:
        load_source(f"imagefolder:{tmp_path / 'afile'}", rgb_net)
    assert e.value.path == str(tmp_path / "afile")
    root = make_imagefolder(tmp_path / "a", classes=3, per_class=1, size=(8, 8))
    (root / "val" / "class_xyz").mkdir()
    with pytest.raises(DataError, match="val class 'class_xyz' is not a train class") as e:
        load_source(f"imagefolder:{root}", rgb_net)
    assert e.value.path == str(root / "val" / "class_xyz")
    (root / "val" / "class_xyz").rmdir()
    (root / "val").rename(root / "valid")
    with pytest.raises(DataError, match="missing val/") as e:
        load_source(f"imagefolder:{root}", rgb_net)
    assert e.value.path == str(root / "val")
    empty = tmp_path / "b"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    with pytest.raises(DataError, match="no class folders") as e:
        load_source(f"imagefolder:{empty}", rgb_net)
    assert e.value.path == str(empty / "train")
    with pytest.raises(DataError, match="smaller than the input"):
        load_source(f"imagefolder:{root}", dataclasses.replace(rgb_net, data=DataConfig(resize=(16, 16))))


def test_class_count_mismatch(tree, rgb_net, digits_net):
    with pytest.raises(DataError, match="declares 4 classes but .* has 3"):
        load_source(f"imagefolder:{tree}", dataclasses.replace(rgb_net, num_classes=4))
    with pytest.raises(DataError, match="declares 3 classes but digits has 10"):
        load_source("digits", with_input(digits_net, 1, 8, 8, classes=3))


def test_unknown_source_hint(digits_net):
    with pytest.raises(DataError) as e:
        load_source("digit", digits_net)
    assert e.value.hint == "did you mean 'digits'?"
    assert "unknown data source 'digit'" in str(e.value)
    assert "fashion-mnist:DIR" in str(e.value) and "imagefolder:DIR" in str(e.value)
    assert "hint: did you mean 'digits'?" in e.value.render()
    with pytest.raises(DataError, match="needs a directory"):
        load_source("imagefolder", digits_net)


# ---- held-out validation split (--val-split) ----------------------------------------------------------


def test_val_split_holds_out_a_fixed_seeded_part_of_train(digits_net, raw_digits):
    plain = load_source("digits", digits_net)
    a = load_source("digits", digits_net, val_split=0.25, split_seed=3, seed=0)
    b = load_source("digits", digits_net, val_split=0.25, split_seed=3, seed=7)  # another training seed
    tr, va = set(a.train.indices), set(a.val.indices)
    assert len(va) == round(0.25 * 1438) and len(tr) == 1438 - len(va)
    assert not tr & va and tr | va == set(plain.train.indices)  # carved from train, disjoint, nothing lost
    assert not va & set(plain.val.indices)  # the source's own val (test) set is not used
    assert a.val.indices == b.val.indices and a.train.indices == b.train.indices  # the split ignores --seed
    other = load_source("digits", digits_net, val_split=0.25, split_seed=4)
    assert other.val.indices != a.val.indices  # ... and follows --split-seed
    labels = raw_digits[1]
    x, y = a.val[0]
    assert int(y) == int(labels[a.val.indices[0]])
    torch.testing.assert_close(x * 0.5 + 0.5, raw_digits[0][a.val.indices[0]].unsqueeze(0), atol=1e-6, rtol=0)
    assert a.description == "digits (1,078 train / 360 val, 8x8 grey, val = 0.25 of train held out (split seed 3))"
    limited = load_source("digits", digits_net, val_split=0.25, split_seed=3, limit_train=100, limit_val=50)
    assert len(limited.train) == 100 and len(limited.val) == 50  # limits apply after the split
    assert set(limited.train.indices) <= tr and set(limited.val.indices) <= va


@pytest.mark.parametrize("fraction, message", [(0.0, "between 0 and 1"), (1.0, "between 0 and 1"),
                                                (1e-5, "leaves no validation sample"),
                                                (0.99999, "leaves no training sample")])
def test_val_split_bad_fractions_are_data_errors(digits_net, fraction, message):
    with pytest.raises(DataError, match=message):
        load_source("digits", digits_net, val_split=fraction)


@pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist is not installed")
def test_val_split_on_fashion_mnist_takes_from_the_60000(fmnist_net):
    from cnds_compiler.data import read_idx

    s = load_source("fashion-mnist", fmnist_net, val_split=0.05, limit_train=1000)
    assert len(s.val) == 3000 and len(s.train) == 1000
    assert not set(s.train.indices) & set(s.val.indices) and max(s.val.indices) < 60000
    labels = read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz", 1)  # the *train* file's labels
    assert [int(s.val[k][1]) for k in range(20)] == [int(labels[i]) for i in s.val.indices[:20]]


def test_val_split_on_an_image_folder_needs_no_val_folder(tmp_path, rgb_net):
    root = make_imagefolder(tmp_path, classes=3, per_class=5, size=(16, 16), val_per_class=1)
    import shutil

    shutil.rmtree(root / "val")
    with pytest.raises(DataError, match="missing val/ folder"):
        load_source(f"imagefolder:{root}", rgb_net)
    s = load_source(f"imagefolder:{root}", rgb_net, val_split=0.2, split_seed=1)
    tr = {f for f, _ in s.train.samples}
    va = {f for f, _ in s.val.samples}
    assert len(va) == 3 and len(tr) == 12 and not tr & va and all("/train/" in f for f in va)
    assert not s.val.augments and s.train.augments
    again = load_source(f"imagefolder:{root}", rgb_net, val_split=0.2, split_seed=1, seed=5)
    assert [f for f, _ in again.val.samples] == [f for f, _ in s.val.samples]
    assert s.description.endswith("val = 0.2 of train held out (split seed 1))")


# ---- sampler and loader ---------------------------------------------------------------------------


def test_epoch_order_determinism_and_replicas():
    a = epoch_order(100, seed=3, epoch=2)
    assert sorted(a) == list(range(100)) and a != list(range(100))
    assert a == epoch_order(100, seed=3, epoch=2)
    assert a != epoch_order(100, seed=3, epoch=3) and a != epoch_order(100, seed=4, epoch=2)
    assert epoch_order(10, 3, 2, shuffle=False) == list(range(10))
    parts = [epoch_order(11, 5, 1, num_replicas=2, rank=r) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 6
    joined = parts[0] + parts[1]
    assert set(joined) == set(range(11)) and len(joined) == 12  # one index repeated as padding
    unpadded = [epoch_order(11, 5, 1, num_replicas=2, rank=r, pad=False) for r in (0, 1)]
    assert sorted(unpadded[0] + unpadded[1]) == list(range(11))
    sampler = EpochSampler(11, seed=5, num_replicas=2, rank=1)
    sampler.set_epoch(1, start=2)
    assert list(sampler) == parts[1][2:] and len(sampler) == 4


class Indexed(torch.utils.data.Dataset):
    def __len__(self):
        return 23

    def __getitem__(self, i):
        return torch.tensor([float(i)]), i % 3


def test_loader_epochs_resume_and_replicas(digits_net):
    net = with_input(digits_net, 1, 6, 6, resize=(8, 8), mirror=True)  # random crops and flips
    train = load_source("digits", net, limit_train=300).train
    loader = make_loader(train, 64, shuffle=True, seed=11)
    e0, e1 = batches(loader), batches(loader)  # no set_epoch: epochs 0, then 1
    assert [len(y) for _, y, _ in e0] == [64, 64, 64, 64, 44]
    again = make_loader(train, 64, shuffle=True, seed=11)
    assert len(again) == 5
    again.set_epoch(1, skip_batches=2)
    assert len(again) == 3
    resumed = batches(again)
    assert len(resumed) == 3 and len(again) == 5
    for (a, la, _), (b, lb, _) in zip(e1[2:], resumed, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(e0[0][1], e1[0][1])
    assert len(batches(again)) == 5  # the next epoch is complete again
    other = make_loader(train, 64, shuffle=True, seed=12)
    assert not torch.equal(batches(other)[0][0], e0[0][0])
    seen = []
    for rank in (0, 1):
        shard = make_loader(Indexed(), 5, shuffle=True, seed=2, num_replicas=2, rank=rank)
        shard.set_epoch(4)
        assert len(shard) == 3
        seen += [int(v) for x, _, _ in shard for v in x.flatten()]
    assert len(seen) == 24 and set(seen) == set(range(23))


def test_synthetic_tree_is_reproducible(tmp_path):
    a = make_imagefolder(tmp_path / "a", classes=2, per_class=2, size=(16, 12), corrupt=1, seed=4)
    b = make_imagefolder(tmp_path / "b", classes=2, per_class=2, size=(16, 12), corrupt=1, seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert len(files) == 2 * 2 + 2 * 1 + 1
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    from PIL import Image

    with Image.open(a / "train" / class_name(1) / "00000.jpg") as im:
        assert im.size == (12, 16) and im.mode == "RGB"


def test_skipped_survives_pickling():
    k = pickle.loads(pickle.dumps(Skipped([("a.jpg", "OSError: broken")])))
    assert isinstance(k, Skipped) and k == 1 and k.items == (("a.jpg", "OSError: broken"),)
    assert Skipped() == 0


def test_imagefolder_maps_classes_by_the_spec_names_not_folder_order(tmp_path, rgb_net):
    root = make_imagefolder(tmp_path / "t", classes=3, per_class=2, size=(48, 40), val_per_class=1)
    names = (class_name(2), class_name(0), class_name(1))  # not in sorted order
    named = dataclasses.replace(rgb_net, class_names=names)
    s = load_source(f"imagefolder:{root}", named)
    assert s.class_names == names
    by_label = {}
    for path, label in s.train.samples:
        by_label.setdefault(label, set()).add(Path(path).parent.name)
    assert by_label == {0: {class_name(2)}, 1: {class_name(0)}, 2: {class_name(1)}}  # label k = the spec's k-th
    wrong = dataclasses.replace(rgb_net, class_names=(class_name(0), class_name(1), "class_009"))
    with pytest.raises(DataError) as e:
        load_source(f"imagefolder:{root}", wrong)
    assert "no folder for the spec's classes ['class_009']" in e.value.message
    assert "folders the spec does not name ['class_002']" in e.value.message and e.value.path.endswith("train")


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path, rgb_net):
    from PIL import Image

    root = make_imagefolder(tmp_path / "t", classes=3, per_class=1, size=(48, 40), val_per_class=1)
    ramp = (np.linspace(0, 65535, 48 * 40).reshape(48, 40)).astype(np.uint16)  # dark to bright
    wide = root / "val" / class_name(0) / "wide.png"
    Image.fromarray(ramp).save(wide)
    narrow = root / "val" / class_name(1) / "narrow.png"
    Image.fromarray((ramp // 257).astype(np.uint8)).save(narrow)  # the same picture in 8 bits
    s = load_source(f"imagefolder:{root}", rgb_net)
    got = {Path(p).name: s.val[i][0] for i, (p, _) in enumerate(s.val.samples) if Path(p).name.endswith(".png")}
    assert torch.allclose(got["wide.png"], got["narrow.png"], atol=1.01 / 255 / min(STD))  # within 1/255
    assert got["wide.png"].std() > 0.1  # not a clipped white field
