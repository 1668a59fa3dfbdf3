"""sbfast.data: container, embedded sets, readers (on files written here in the exact formats),
augmentation, loaders and corruptions."""

from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from sbfast.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CORRUPTIONS,
    DIGITS_SPLIT_SIZES,
    DataError,
    IndexedTensorDataset,
    RandomCropFlip,
    augment_batch,
    corrupt,
    corruption_seed,
    denormalize,
    list_cifar_c,
    load_cifar10,
    load_cifar100,
    load_cifar_c,
    load_digits_splits,
    load_image_folder,
    load_tiny_imagenet,
    make_corrupted_sets,
    make_loader,
    make_synthetic_images,
    normalize,
    train_transform_for,
)
from sbfast.data.corruptions.blur import defocus_kernel
from sbfast.data.corruptions.digital import elastic_transform
from sbfast.data.corruptions.filters import magick_motion_blur

# --------------------------------------------------------------------------------------------
# Container
# --------------------------------------------------------------------------------------------


def test_indexed_dataset_sample_and_batch():
    x = torch.arange(5 * 2 * 3 * 3, dtype=torch.float32).reshape(5, 2, 3, 3)
    y = torch.tensor([0, 1, 2, 1, 0])
    ds = IndexedTensorDataset(x, y)
    i, xi, yi = ds[3]
    assert i.dtype == torch.int64 and int(i) == 3 and i.dim() == 0
    assert xi.dtype == torch.float32 and xi.shape == (2, 3, 3) and torch.equal(xi, x[3])
    assert yi.dtype == torch.int64 and int(yi) == 1
    assert int(ds[-1][0]) == 4  # negative indices resolve to the stable positive index
    idx, xb, yb = ds[[4, 0, 2]]
    assert idx.tolist() == [4, 0, 2] and torch.equal(xb, x[[4, 0, 2]]) and yb.tolist() == [0, 0, 2]
    assert ds[1:3][0].tolist() == [1, 2]
    assert ds[torch.tensor([True, False, False, True, False])][0].tolist() == [0, 3]
    assert len(ds) == 5 and ds.num_classes == 3 and ds.image_shape == (2, 3, 3)
    with pytest.raises(IndexError):
        ds[5]


def test_indexed_dataset_uint8_storage_normalises_on_fetch():
    x = torch.randint(0, 256, (4, 3, 2, 2), dtype=torch.uint8)
    ds = IndexedTensorDataset(x, torch.zeros(4, dtype=torch.int64), mean=CIFAR10_MEAN, std=CIFAR10_STD)
    m = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    s = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    assert torch.allclose(ds[2][1], (x[2].float() / 255 - m) / s)
    assert torch.allclose(ds.pixels(), x.float() / 255)
    # Float storage records mean/std; pixels() undoes them.
    f = IndexedTensorDataset(
        normalize(x.float() / 255, CIFAR10_MEAN, CIFAR10_STD), ds.y, mean=CIFAR10_MEAN, std=CIFAR10_STD
    )
    assert torch.allclose(f.pixels(), x.float() / 255, atol=1e-6)


def test_indexed_dataset_transform_subset_and_errors():
    x = torch.randn(6, 1, 4, 4)
    ds = IndexedTensorDataset(x, torch.arange(6) % 2, transform=lambda t: t * 2)
    assert torch.equal(ds[1][1], x[1] * 2)
    assert torch.equal(ds[[0, 1]][1], x[:2] * 2)  # batch fetch: the transform sees [B, C, H, W]
    sub = ds.subset([5, 1])
    assert sub[0][0].item() == 0 and torch.equal(sub[0][1], x[5] * 2)
    assert ds.with_transform(None)[1][1].equal(x[1])
    with pytest.raises(ValueError, match="N, C, H, W"):
        IndexedTensorDataset(torch.randn(3, 4, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="y must be"):
        IndexedTensorDataset(torch.randn(3, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer labels"):
        IndexedTensorDataset(torch.randn(3, 1, 4, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="both mean and std"):
        IndexedTensorDataset(torch.randn(3, 1, 4, 4), torch.zeros(3, dtype=torch.int64), mean=(0.5,))
    with pytest.raises(ValueError, match="one per channel"):
        IndexedTensorDataset(torch.randn(3, 1, 4, 4), torch.zeros(3, dtype=torch.int64), mean=(0, 0), std=(1, 1))


def test_normalize_denormalize_round_trip():
    x = torch.rand(2, 3, 4, 4)
    y = normalize(x, CIFAR100_MEAN, CIFAR100_STD)
    assert torch.allclose(y[:, 1], (x[:, 1] - CIFAR100_MEAN[1]) / CIFAR100_STD[1])
    assert torch.allclose(denormalize(y, CIFAR100_MEAN, CIFAR100_STD), x, atol=1e-6)
    with pytest.raises(ValueError, match="one per channel"):
        normalize(x, (0.5, 0.5), (1.0, 1.0))


# --------------------------------------------------------------------------------------------
# Embedded sets
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_digits_splits()


def test_digits_splits_sizes_partition_and_normalisation(digits):
    from sklearn.datasets import load_digits

    assert {k: len(v) for k, v in digits.items()} == DIGITS_SPLIT_SIZES == {"train": 1257, "val": 180, "test": 360}
    for ds in digits.values():
        assert ds.x.dtype == torch.float32 and ds.image_shape == (1, 8, 8) and ds.y.dtype == torch.int64
        # Stratified: every class present in roughly its overall share (about 10%).
        counts = torch.bincount(ds.y, minlength=10).double() / len(ds)
        assert counts.min() > 0.07 and counts.max() < 0.13
    tr = digits["train"].x
    assert abs(float(tr.mean())) < 1e-5 and abs(float(tr.std(unbiased=False)) - 1) < 1e-4
    # The three splits together are exactly the 1,797 images (as a multiset of rows).
    raw = torch.from_numpy(load_digits().images.reshape(-1, 64)).float() / 16
    got = torch.cat([ds.pixels().reshape(-1, 64) for ds in digits.values()])
    key = lambda t: sorted(map(tuple, (t * 16).round().int().tolist()))  # noqa: E731
    assert key(got) == key(raw)


def test_digits_split_seeded():
    a, b = load_digits_splits(seed=0), load_digits_splits(seed=1)
    assert torch.equal(a["test"].x, load_digits_splits(seed=0)["test"].x)
    assert not torch.equal(a["test"].x, b["test"].x)
    with pytest.raises(ValueError, match="val_fraction"):
        load_digits_splits(val_fraction=0.0)
    with pytest.raises(ValueError, match="< 1"):
        load_digits_splits(val_fraction=0.5, test_fraction=0.5)


def test_synthetic_images_deterministic_and_learnable():
    a = make_synthetic_images(200, 4, (3, 8, 8), seed=3)
    b = make_synthetic_images(200, 4, (3, 8, 8), seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, make_synthetic_images(200, 4, (3, 8, 8), seed=4).x)
    assert a.x.shape == (200, 3, 8, 8) and torch.bincount(a.y).tolist() == [50] * 4
    # Nearest class mean (fitted on the first half) classifies the second half well: learnable.
    protos = torch.stack([a.x[:100][a.y[:100] == k].mean(0) for k in range(4)]).flatten(1)
    pred = torch.cdist(a.x[100:].flatten(1), protos).argmin(1)
    assert (pred == a.y[100:]).float().mean() > 0.9


# --------------------------------------------------------------------------------------------
# Readers (files in the exact published formats)
# --------------------------------------------------------------------------------------------


def _pickle(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _cifar_rows(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _write_cifar10(root, rng, per_batch=3, n_test=4):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rows, labels = [], []
    for i in range(1, 6):
        r, lab = _cifar_rows(rng, per_batch), rng.integers(0, 10, per_batch).tolist()
        _pickle(d / f"data_batch_{i}", {b"batch_label": b"batch", b"data": r, b"labels": lab, b"filenames": []})
        rows.append(r)
        labels += lab
    tr, tl = _cifar_rows(rng, n_test), rng.integers(0, 10, n_test).tolist()
    _pickle(d / "test_batch", {b"batch_label": b"test", b"data": tr, b"labels": tl})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _pickle(d / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return d, np.concatenate(rows), labels, tr, tl


def _tar(folder, out):
    with tarfile.open(out, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return out


def test_cifar10_folder_parent_and_targz(tmp_path):
    rng = np.random.default_rng(0)
    d, rows, labels, trows, tlabels = _write_cifar10(tmp_path / "data", rng)
    ds = load_cifar10(tmp_path / "data", train=True)
    assert len(ds) == 15 and ds.x.dtype == torch.uint8 and ds.x.shape == (15, 3, 32, 32)
    assert ds.y.tolist() == labels and ds.classes[0] == "airplane" and ds.classes[9] == "truck"
    # Row layout: 1024 red values, then green, then blue, each row-major.
    r = rows[7]
    assert ds.x[7, 0, 0, 1] == r[1] and ds.x[7, 1, 0, 0] == r[1024] and ds.x[7, 2, 31, 31] == r[3071]
    m = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    s = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    i, x7, y7 = ds[7]
    assert int(i) == 7 and int(y7) == labels[7]
    assert torch.allclose(x7, (torch.from_numpy(r.reshape(3, 32, 32)).float() / 255 - m) / s)
    assert torch.equal(load_cifar10(d, train=True).x, ds.x)  # the folder itself
    test = load_cifar10(d, train=False)
    assert test.y.tolist() == tlabels and torch.equal(test.x.reshape(4, -1), torch.from_numpy(trows))
    tgz = _tar(d, tmp_path / "cifar-10-python.tar.gz")
    assert torch.equal(load_cifar10(tgz, train=True).x, ds.x)  # the archive file
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "cifar-10-python.tar.gz").write_bytes(tgz.read_bytes())
    assert torch.equal(load_cifar10(tmp_path / "only", train=False).x, test.x)  # folder holding the archive
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_cifar10(tmp_path / "nothing_here")


def test_cifar100_fine_coarse_and_targz(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rows = _cifar_rows(rng, 5)
    fine, coarse = [0, 99, 42, 7, 7], [0, 19, 3, 1, 1]
    _pickle(d / "train", {b"filenames": [], b"data": rows, b"fine_labels": fine, b"coarse_labels": coarse})
    _pickle(d / "test", {b"data": rows[:2], b"fine_labels": fine[:2], b"coarse_labels": coarse[:2]})
    _pickle(
        d / "meta",
        {
            b"fine_label_names": [f"f{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"c{i}".encode() for i in range(20)],
        },
    )
    ds = load_cifar100(tmp_path)
    assert ds.y.tolist() == fine and ds.num_classes == 100 and ds.classes[99] == "f99" and ds.mean == CIFAR100_MEAN
    assert load_cifar100(tmp_path, label="coarse").y.tolist() == coarse
    assert len(load_cifar100(tmp_path, train=False)) == 2
    assert torch.equal(load_cifar100(_tar(d, tmp_path / "c100.tar.gz")).x, ds.x)
    with pytest.raises(ValueError, match="fine"):
        load_cifar100(tmp_path, label="medium")


def test_cifar_c_blocks_lazy_and_errors(tmp_path):
    n = 6  # images per severity block (10,000 in the published sets)
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, size=(5 * n, 32, 32, 3), dtype=np.uint8)
    labels = np.tile(rng.integers(0, 10, n), 5).astype(np.uint8)
    np.save(tmp_path / "gaussian_noise.npy", arr)
    np.save(tmp_path / "fog.npy", arr[::-1].copy())
    np.save(tmp_path / "labels.npy", labels)
    assert list_cifar_c(tmp_path) == ["fog", "gaussian_noise"]
    sets = load_cifar_c(tmp_path)
    assert len(sets) == 10 and list(sets)[0] == ("fog", 1)
    ds = sets[("gaussian_noise", 3)]
    assert len(ds) == n and ds.x.shape == (n, 3, 32, 32)
    assert torch.equal(ds.x, torch.from_numpy(arr[2 * n : 3 * n]).permute(0, 3, 1, 2))
    assert ds.y.tolist() == labels[:n].tolist()
    assert torch.allclose(ds.pixels(), torch.from_numpy(arr[2 * n : 3 * n]).permute(0, 3, 1, 2).float() / 255)
    eager = load_cifar_c(tmp_path, ["gaussian_noise"], [3], lazy=False)
    assert isinstance(eager, dict) and torch.equal(eager[("gaussian_noise", 3)].x, ds.x)
    with pytest.raises(FileNotFoundError, match="snow"):
        load_cifar_c(tmp_path, ["snow"])
    with pytest.raises(ValueError, match="severities"):
        load_cifar_c(tmp_path, severities=[0])
    with pytest.raises(KeyError):
        sets[("fog", 6)]


def _cifar_c_folder(root, labels, counts=None):
    """fog.npy (and snow.npy, ...) of tiny 4x4 images, ``counts[name]`` images each, and labels.npy."""
    for name, count in (counts or {"fog": 10}).items():
        np.save(root / f"{name}.npy", np.zeros((count, 4, 4, 3), dtype=np.uint8))
    np.save(root / "labels.npy", labels)
    return root / "labels.npy"


@pytest.mark.parametrize(
    "labels, problem",
    [
        (np.tile([3.0, 9.0], 5), r"1-D integer array \[5 \* n\], got a float64 array of shape \(10,\)"),
        (np.tile([3.7, 9.2], 5).astype(np.float32), "float32"),  # once truncated to 3 and 9
        (np.tile([True, False], 5), "bool"),
        (np.tile([3, 9], 5).reshape(5, 2), r"shape \(5, 2\)"),
        (np.tile([3, 10], 5), r"labels must be in \[0, 10\) \(10 classes\), got values in \[3, 10\]"),
        (np.tile([-1, 9], 5), r"got values in \[-1, 9\]"),
        (np.tile([3, 9], 2), "4 labels, not 5 equal non-empty severity blocks"),
        (np.zeros(0, dtype=np.int64), "0 labels"),
    ],
)
def test_cifar_c_labels_must_be_integers_in_the_class_range(tmp_path, labels, problem):
    path = _cifar_c_folder(tmp_path, labels)
    with pytest.raises(DataError, match=problem) as err:
        load_cifar_c(tmp_path)
    assert err.value.path == str(path) and str(err.value).startswith(str(path) + ": ")


def test_cifar_c_class_range_follows_num_classes_or_cifar100_stats(tmp_path):
    _cifar_c_folder(tmp_path, np.tile([0, 99], 5).astype(np.uint8))
    with pytest.raises(DataError, match=r"\[0, 10\).*for CIFAR-100-C pass num_classes=100"):
        load_cifar_c(tmp_path)  # CIFAR-10-C's statistics: 10 classes
    assert load_cifar_c(tmp_path, mean=CIFAR100_MEAN, std=CIFAR100_STD)[("fog", 2)].y.tolist() == [0, 99]
    assert load_cifar_c(tmp_path, num_classes=100)[("fog", 5)].y.tolist() == [0, 99]
    with pytest.raises(DataError, match=r"\[0, 50\)"):
        load_cifar_c(tmp_path, num_classes=50)
    with pytest.raises(ValueError, match="num_classes"):
        load_cifar_c(tmp_path, num_classes=0)


def test_cifar_c_label_count_mismatch_names_the_file_that_disagrees(tmp_path):
    # 15 labels (3 per block) against two image files of 10 images each: the labels are off.
    labels = _cifar_c_folder(tmp_path, np.arange(15) % 10, {"fog": 10, "snow": 10})
    with pytest.raises(
        DataError, match=r"15 labels, but the image files \(fog.npy, snow.npy\) hold 10 images each"
    ) as e:
        load_cifar_c(tmp_path)
    assert e.value.path == str(labels)
    # Labels right, one image file short: that file is named (at the call, not at a later lookup).
    _cifar_c_folder(tmp_path, np.arange(10) % 10, {"fog": 10, "snow": 15})
    with pytest.raises(DataError, match=r"15 images, but .*labels.npy has 10 labels") as e:
        load_cifar_c(tmp_path)
    assert e.value.path == str(tmp_path / "snow.npy")
    assert len(load_cifar_c(tmp_path, ["fog"])[("fog", 1)]) == 2  # the good file alone still loads
    np.save(tmp_path / "snow.npy", np.zeros((10, 4, 4, 3), dtype=np.int16))
    with pytest.raises(DataError, match=r"expected uint8 .* got a int16 array") as e:
        load_cifar_c(tmp_path, ["snow"])
    assert e.value.path == str(tmp_path / "snow.npy")


def _png(path, arr):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_image_folder_png_nested_sorted(tmp_path):
    rng = np.random.default_rng(3)
    imgs = {}
    for cls, files in {"n02": ["b.png", "a.PNG"], "n01": ["images/z.png"], "n03": []}.items():
        (tmp_path / "train" / cls).mkdir(parents=True)
        for f in files:
            imgs[(cls, f)] = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
            _png(tmp_path / "train" / cls / f, imgs[(cls, f)])
    (tmp_path / "train" / "n01" / "notes.txt").write_text("not an image")
    ds = load_image_folder(tmp_path / "train")
    assert ds.classes == ["n01", "n02", "n03"] and ds.y.tolist() == [0, 1, 1]
    assert ds.x.shape == (3, 3, 6, 5) and ds.mean is None
    # Order: by class, then sorted path ("a.PNG" < "b.png").
    assert torch.equal(ds.x[1], torch.from_numpy(imgs[("n02", "a.PNG")]).permute(2, 0, 1))
    assert torch.equal(ds.x[0], torch.from_numpy(imgs[("n01", "images/z.png")]).permute(2, 0, 1))
    assert torch.allclose(ds[2][1], ds.x[2].float() / 255)
    assert load_image_folder(tmp_path / "train", size=4).x.shape == (3, 3, 4, 4)
    assert load_image_folder(tmp_path / "train", mode="L").x.shape == (3, 1, 6, 5)
    # Tiny-ImageNet wrapper: the val label map comes from train's folders.
    _png(tmp_path / "val" / "n02" / "v.png", imgs[("n02", "b.png")])
    val = load_tiny_imagenet(tmp_path, "val")
    assert val.classes == ["n01", "n02", "n03"] and val.y.tolist() == [1] and len(val.mean) == 3
    _png(tmp_path / "train" / "n03" / "big.png", rng.integers(0, 256, size=(7, 7, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="size="):
        load_image_folder(tmp_path / "train")
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "missing")


# --------------------------------------------------------------------------------------------
# Augmentation and loaders
# --------------------------------------------------------------------------------------------


def test_augment_batch_is_a_seeded_crop_and_flip():
    x = torch.randn(16, 2, 6, 6)
    a = augment_batch(x, torch.Generator().manual_seed(5), pad=2)
    b = augment_batch(x, torch.Generator().manual_seed(5), pad=2)
    assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.equal(a, augment_batch(x, torch.Generator().manual_seed(6), pad=2))
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(16):  # every output is some window of the zero-padded input, maybe flipped
        wins = [xp[i, :, r : r + 6, c : c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(a[i], w) or torch.equal(a[i], w.flip(-1)) for w in wins)
    assert torch.equal(augment_batch(x, None, pad=0, flip=False), x)
    flipped = augment_batch(x, torch.Generator().manual_seed(0), pad=0)
    n_flip = sum(torch.equal(flipped[i], x[i].flip(-1)) for i in range(16))
    assert 0 < n_flip < 16
    assert augment_batch(x[0], torch.Generator(), pad=1).shape == x[0].shape
    # fill: the padded border takes the given per-channel value.
    ones = augment_batch(torch.zeros(64, 2, 3, 3), torch.Generator().manual_seed(1), pad=3, flip=False, fill=(1.0, 2.0))
    assert set(ones[:, 0].unique().tolist()) == {0.0, 1.0} and set(ones[:, 1].unique().tolist()) == {0.0, 2.0}
    with pytest.raises(ValueError, match="pad"):
        augment_batch(x, None, pad=-1)


def test_random_crop_flip_pads_with_normalised_black():
    ds = IndexedTensorDataset(
        torch.full((8, 3, 4, 4), 200, dtype=torch.uint8),
        torch.zeros(8, dtype=torch.int64),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    )
    t = train_transform_for(ds, seed=0)
    out = ds.with_transform(t)[list(range(8))][1]
    # In pixel space every value is either the image's 200/255 or the black (0) border, as the
    # release's RandomCrop(padding=4) on the raw image gives; some border shows with pad 4 on 4x4.
    px = denormalize(out, CIFAR10_MEAN, CIFAR10_STD)
    is_img = torch.isclose(px, torch.tensor(200 / 255), atol=1e-5)
    is_black = torch.isclose(px, torch.tensor(0.0), atol=1e-5)
    assert bool((is_img | is_black).all()) and bool(is_black.any())
    assert isinstance(pickle.loads(pickle.dumps(RandomCropFlip(seed=3))), RandomCropFlip)


def test_make_loader_batches_epochs_and_seeds():
    ds = make_synthetic_images(10, 2, (1, 4, 4))
    batches = list(make_loader(ds, 4, shuffle=False))
    assert [b[0].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    idx, x, y = batches[1]
    assert idx.dtype == torch.int64 and x.dtype == torch.float32 and x.shape == (4, 1, 4, 4) and y.dtype == torch.int64
    assert torch.equal(x, ds.x[4:8]) and torch.equal(y, ds.y[4:8])
    assert [len(b[0]) for b in make_loader(ds, 4, shuffle=False, drop_last=True)] == [4, 4]
    loader = make_loader(ds, 3, shuffle=True, seed=7)
    e1 = torch.cat([b[0] for b in loader])
    e2 = torch.cat([b[0] for b in loader])
    assert sorted(e1.tolist()) == list(range(10)) and not torch.equal(e1, e2)  # a new order each epoch
    again = make_loader(ds, 3, shuffle=True, seed=7)
    assert torch.equal(torch.cat([b[0] for b in again]), e1)  # same seed, same epochs
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, 0, shuffle=False)


def _tiny_rgb():
    return make_synthetic_images(2, 2, (3, 4, 4))


# Every public place a seed enters the data package, as a function of that seed.
SEED_ENTRIES = {
    "make_loader": lambda s: make_loader(_tiny_rgb(), 1, shuffle=True, seed=s),
    "RandomCropFlip": lambda s: RandomCropFlip(seed=s),
    "train_transform_for": lambda s: train_transform_for(_tiny_rgb(), seed=s),
    "make_synthetic_images": lambda s: make_synthetic_images(2, 2, (1, 2, 2), seed=s),
    "corrupt": lambda s: corrupt(_tiny_rgb().x.clamp(0, 1), "gaussian_noise", 1, seed=s),
    "corruption_seed": lambda s: corruption_seed(s, "fog", 1),
    "make_corrupted_sets": lambda s: make_corrupted_sets(_tiny_rgb(), ["contrast"], [1], seed=s),
    "make_corrupted_sets(lazy)": lambda s: make_corrupted_sets(_tiny_rgb(), ["contrast"], [1], seed=s, lazy=True),
}


@pytest.mark.parametrize("entry", sorted(SEED_ENTRIES))
def test_seeds_are_checked_where_they_enter(entry):
    make = SEED_ENTRIES[entry]
    for ok in (0, 2**63 - 1, np.int64(5), np.uint64(2**63 - 1)):  # the bounds, and NumPy ints
        make(ok)
    # 2**70 used to surface from torch as "Overflow when unpacking long long"; -1 and 2**63
    # were taken (wrapped) by torch; corruption_seed reduced 2**70 silently.
    for bad in (2**63, 2**70, -1):
        with pytest.raises(ValueError, match=rf"^seed must be in \[0, 2\*\*63\), got {bad}$"):
            make(bad)
    for bad in (1.0, 2.5, True, "3", torch.tensor(3), None):  # 2.5 used to become seed 2
        with pytest.raises(TypeError, match=r"^seed must be an int in \[0, 2\*\*63\), got "):
            make(bad)


def test_digits_seed_is_checked_against_sklearns_32_bit_range():
    assert len(load_digits_splits(seed=2**32 - 1)["test"]) == DIGITS_SPLIT_SIZES["test"]
    with pytest.raises(ValueError, match=r"^seed must be in \[0, 2\*\*32\), got 4294967296$"):
        load_digits_splits(seed=2**32)
    with pytest.raises(TypeError, match="seed must be an int"):
        load_digits_splits(seed=0.5)


def test_random_crop_flip_checks_pad():
    with pytest.raises(ValueError, match="pad must be an int >= 0"):
        RandomCropFlip(pad=-1)


def test_make_loader_generic_dataset():
    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return i, torch.full((1, 2, 2), float(i)), i % 2

    b = list(make_loader(Plain(), 2, shuffle=False))
    assert b[0][0].tolist() == [0, 1] and b[0][1].shape == (2, 1, 2, 2) and b[2][2].tolist() == [0]


# --------------------------------------------------------------------------------------------
# Corruptions
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rgb():
    # Smooth-ish colour images with structure, so blurs and zooms have something to change.
    g = torch.Generator().manual_seed(0)
    low = torch.rand(6, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_corruption_shape_range_determinism(name, rgb, digits):
    grey = digits["test"].pixels(slice(0, 8))  # [8, 1, 8, 8] in [0, 1]
    for x in (rgb[:3], grey):
        for sev in (1, 5):
            out = corrupt(x, name, sev, seed=1)
            assert out.shape == x.shape and out.dtype == x.dtype
            assert float(out.min()) >= 0 and float(out.max()) <= 1
            assert torch.equal(out, corrupt(x, name, sev, seed=1))
    assert corrupt(rgb[0], name, 3, seed=0).shape == rgb[0].shape  # a single CHW image
    # Severity 5 changes a 32x32 colour image more than severity 1 does.
    d1 = (corrupt(rgb, name, 1, seed=0) - rgb).abs().mean()
    d5 = (corrupt(rgb, name, 5, seed=0) - rgb).abs().mean()
    assert d5 > 0 and (d5 >= d1 or name in ("glass_blur", "saturate", "elastic_transform"))


def test_corruption_errors(rgb):
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(rgb, "rain", 1)
    with pytest.raises(ValueError, match="not implemented"):
        corrupt(rgb, "frost", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(rgb, "fog", 6)
    with pytest.raises(TypeError, match="floating"):
        corrupt((rgb * 255).to(torch.uint8), "fog", 1)
    with pytest.raises(ValueError, match="C in"):
        corrupt(torch.rand(1, 2, 8, 8), "fog", 1)
    normalised = (rgb - 0.5) / 0.25  # never denormalised: values far outside [0, 1]
    with pytest.raises(
        ValueError, match=r"x must hold pixel values in \[0, 1\] \(denormalise first\), got values in \[-1\.9"
    ):
        corrupt(normalised, "shot_noise", 1)
    with pytest.raises(ValueError, match=r"got values in \[nan"):
        corrupt(torch.full((1, 3, 4, 4), float("nan")), "fog", 1)


@pytest.mark.parametrize("name", ["shot_noise", "gaussian_noise", "contrast"])
def test_corruption_takes_pixels_that_rounding_moved_just_outside_0_1(rgb, name):
    # a normalise/denormalise round trip can leave -1e-7 or 1 + 1e-7; shot noise's Poisson rate must not go negative
    strayed = rgb.clone()
    strayed[..., 0, 0] = -1e-7
    strayed[..., 1, 1] = 1 + 1e-7
    out = corrupt(strayed, name, 3, seed=4)
    assert torch.equal(out, corrupt(strayed.clamp(0, 1), name, 3, seed=4))
    assert out.min() >= 0 and out.max() <= 1


def test_noise_corruptions_statistics():
    x = torch.full((4, 3, 32, 32), 0.5)
    # gaussian_noise severity 5: sigma 0.10
    assert abs(float((corrupt(x, "gaussian_noise", 5) - x).std()) - 0.10) < 0.005
    # shot_noise severity 3: Poisson(0.5 * 100) / 100 has std sqrt(50) / 100
    assert abs(float(corrupt(x, "shot_noise", 3).std()) - 50**0.5 / 100) < 0.005
    # impulse_noise severity 5: 7% of values flipped to 0 or 1, half each
    out = corrupt(x, "impulse_noise", 5)
    assert abs(float((out == 1).float().mean()) - 0.035) < 0.01 and abs(float((out == 0).float().mean()) - 0.035) < 0.01
    assert not torch.equal(corrupt(x, "gaussian_noise", 1, seed=0), corrupt(x, "gaussian_noise", 1, seed=1))


def test_gaussian_blur_matches_scipy(rgb):
    ndimage = pytest.importorskip("scipy.ndimage")
    for sev, sigma in ((1, 0.4), (5, 1.0)):
        want = ndimage.gaussian_filter(rgb.double().numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0)
        assert np.allclose(corrupt(rgb.double(), "gaussian_blur", sev).numpy(), want, atol=1e-10)


def test_zoom_blur_matches_scipy_clipped_zoom(rgb):
    ndimage = pytest.importorskip("scipy.ndimage")
    img = rgb[0].permute(1, 2, 0).double().numpy()  # HWC, as the generator sees it
    out = np.zeros_like(img)
    factors = np.arange(1, 1.16, 0.01)  # severity 3
    for z in factors:
        ch = int(np.ceil(32 / z))
        top = (32 - ch) // 2
        zoomed = ndimage.zoom(img[top : top + ch, top : top + ch], (z, z, 1), order=1)
        trim = (zoomed.shape[0] - 32) // 2
        out += zoomed[trim : trim + 32, trim : trim + 32]
    want = np.clip((img + out) / (len(factors) + 1), 0, 1)
    got = corrupt(rgb[:1].double(), "zoom_blur", 3)[0].permute(1, 2, 0).numpy()
    assert np.allclose(got, want, atol=1e-6)


def test_brightness_saturate_contrast_match_hsv_formulas(rgb):
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    x = rgb[:2].double()
    x[0, :, 0, 0] = 0.0  # a black pixel and a grey one: the HSV corner cases
    x[0, :, 0, 1] = 0.3
    img = x.permute(0, 2, 3, 1).numpy()
    hsv = rgb_to_hsv(img)
    hsv[..., 2] = np.clip(hsv[..., 2] + 0.3, 0, 1)  # brightness severity 5
    assert np.allclose(
        corrupt(x, "brightness", 5).permute(0, 2, 3, 1).numpy(), np.clip(hsv_to_rgb(hsv), 0, 1), atol=1e-9
    )
    hsv = rgb_to_hsv(img)
    hsv[..., 1] = np.clip(hsv[..., 1] * 2.5 + 0.2, 0, 1)  # saturate severity 5
    assert np.allclose(corrupt(x, "saturate", 5).permute(0, 2, 3, 1).numpy(), np.clip(hsv_to_rgb(hsv), 0, 1), atol=1e-9)
    means = x.mean(dim=(2, 3), keepdim=True)  # contrast severity 2: factor 0.5 about the channel means
    assert torch.allclose(corrupt(x, "contrast", 2), ((x - means) * 0.5 + means).clamp(0, 1))


def test_jpeg_and_pixelate_match_pil(rgb):
    from PIL import Image

    u8 = (rgb[0].permute(1, 2, 0) * 255 + 1e-3).floor().to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, "JPEG", quality=40)  # severity 5
    want = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float64) / 255
    assert np.allclose(corrupt(rgb[:1].double(), "jpeg_compression", 5)[0].permute(1, 2, 0).numpy(), want)
    small = Image.fromarray(u8).resize((20, 20), Image.BOX).resize((32, 32), Image.BOX)  # 0.65 * 32 = 20
    want = np.asarray(small, dtype=np.float64) / 255
    assert np.allclose(corrupt(rgb[:1].double(), "pixelate", 5)[0].permute(1, 2, 0).numpy(), want)


def test_defocus_kernel():
    k = defocus_kernel(0.3, 0.4)  # disk of radius 0.3 = one pixel, then a 3x3 Gaussian (sigma 0.4)
    g = torch.exp(-torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) / (2 * 0.4**2))
    g = g / g.sum()
    assert k.shape == (3, 3) and torch.allclose(k, torch.outer(g, g))
    k = defocus_kernel(1.5, 0.1)  # 3x3 disk (corners at distance sqrt 2 < 1.5), blurred to 5x5
    assert (
        k.shape == (5, 5)
        and abs(float(k.sum()) - 1) < 1e-12
        and torch.allclose(k, k.T)
        and torch.allclose(k, k.flip(0))
    )


def test_motion_blur_with_tiny_sigma_is_identity(rgb):
    out = magick_motion_blur(rgb.double(), 3, 1e-3, torch.zeros(rgb.shape[0]))  # all weight on tap 0
    assert torch.allclose(out, rgb.double())
    # Radius 0.5 -> 2 * ceil(0.5) + 1 = 3 taps; a huge sigma weighs them equally, and angle 0
    # points them to the right: the mean of each pixel and its next two (edge replicated).
    out = magick_motion_blur(rgb.double(), 0.5, 1e6, torch.zeros(rgb.shape[0]))
    x = rgb.double()
    r1 = torch.cat([x[..., 1:], x[..., -1:]], dim=-1)
    r2 = torch.cat([x[..., 2:], x[..., -1:], x[..., -1:]], dim=-1)
    assert torch.allclose(out, (x + r1 + r2) / 3, atol=1e-9)
    # Angle 90 points them down the rows instead.
    out = magick_motion_blur(x, 0.5, 1e6, torch.full((rgb.shape[0],), 90.0))
    d1 = torch.cat([x[..., 1:, :], x[..., -1:, :]], dim=-2)
    d2 = torch.cat([x[..., 2:, :], x[..., -1:, :], x[..., -1:, :]], dim=-2)
    assert torch.allclose(out, (x + d1 + d2) / 3, atol=1e-9)


def test_make_corrupted_sets_float_and_uint8(digits):
    test = digits["test"].subset(range(20))
    sets = make_corrupted_sets(test, ["contrast", "gaussian_noise"], [1, 5], seed=3)
    assert list(sets) == [("contrast", 1), ("contrast", 5), ("gaussian_noise", 1), ("gaussian_noise", 5)]
    c5 = sets[("contrast", 5)]
    assert torch.equal(c5.y, test.y) and c5.mean == test.mean and c5.transform is None
    px = test.pixels()
    means = px.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(c5.pixels(), ((px - means) * 0.15 + means).clamp(0, 1), atol=1e-5)
    # Same seed, same sets, whatever else is built alongside; lazy gives the same tensors.
    alone = make_corrupted_sets(test, ["gaussian_noise"], [5], seed=3)
    assert torch.equal(alone[("gaussian_noise", 5)].x, sets[("gaussian_noise", 5)].x)
    lazy = make_corrupted_sets(test, ["gaussian_noise"], [5], seed=3, lazy=True)
    assert torch.equal(lazy[("gaussian_noise", 5)].x, alone[("gaussian_noise", 5)].x)
    assert not torch.equal(
        make_corrupted_sets(test, ["gaussian_noise"], [5], seed=4)[("gaussian_noise", 5)].x,
        alone[("gaussian_noise", 5)].x,
    )
    # uint8 storage stays uint8, truncated like CIFAR-10-C's np.uint8.
    u8 = IndexedTensorDataset(
        torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8), torch.arange(5), mean=CIFAR10_MEAN, std=CIFAR10_STD
    )
    b = make_corrupted_sets(u8, ["brightness"], [2])[("brightness", 2)]
    assert b.x.dtype == torch.uint8 and b.mean == CIFAR10_MEAN
    want = (corrupt(u8.pixels(), "brightness", 2) * 255 + 1e-3).floor().to(torch.uint8)
    assert torch.equal(b.x, want)
    with pytest.raises(ValueError, match="severity"):
        make_corrupted_sets(test, ["fog"], [0])
    with pytest.raises(TypeError):
        make_corrupted_sets(list(test), ["fog"], [1])


def test_defocus_filter_matches_scipy_correlate(rgb):
    ndimage = pytest.importorskip("scipy.ndimage")
    k = defocus_kernel(1.5, 0.1)  # severity 5
    want = ndimage.correlate(rgb.double().numpy(), k.numpy()[None, None], mode="mirror")  # OpenCV's reflect-101
    assert np.allclose(corrupt(rgb.double(), "defocus_blur", 5).numpy(), np.clip(want, 0, 1), atol=1e-10)


def test_elastic_without_jitter_or_displacement_is_identity(rgb):
    out = elastic_transform(rgb.double(), (0, 0, 0), torch.Generator().manual_seed(0), 1.0)
    assert torch.allclose(out, rgb.double(), atol=1e-9)
