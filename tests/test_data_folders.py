"""Image-folder data sets: Tiny-ImageNet in both validation layouts, any train/ + val/ (or test/)
folder, Tiny-ImageNet-C corruption folders, in-memory and streamed storage, and every bad input.

Every data set here is written into tmp_path by the test itself (a few classes, a few images
each). Expected pixels come from the arrays the test wrote (PNG: lossless) or from decoding the
file with PIL directly (JPEG); labels from the class each file was written under.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sbfast.data import (
    TINY_IMAGENET_MEAN,
    TINY_IMAGENET_STD,
    ChannelStats,
    DataError,
    IndexedTensorDataset,
    StreamingDeviceData,
    StreamingImageDataset,
    check_corruption_folder,
    choose_storage,
    corrupted_test_sets,
    load_corruption_folder,
    load_image_splits,
    load_tiny_imagenet,
    make_corrupted_sets,
    memory_budget,
    normalize,
    spatial_scale_for,
)
from sbfast.data import image_splits as image_splits_mod
from sbfast.data.images import decode_images
from sbfast.data.layouts import find_split_dirs, scan_eval_split

CLASSES = ["n01443537", "n01629819", "n01641577"]  # sorted, as the label map is
TRAIN_COUNTS = {"n01443537": 3, "n01629819": 1, "n01641577": 2}
VAL_COUNTS = {"n01443537": 2, "n01629819": 2, "n01641577": 1}


def _image(seed: int, h: int = 64, w: int = 64, c: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, c), dtype=np.uint8)
    return arr[:, :, 0] if c == 1 else arr


def _save(path: Path, arr: np.ndarray, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt or ("JPEG" if path.suffix.upper() == ".JPEG" else "PNG"))


def _decoded(path: Path, mode: str = "RGB") -> torch.Tensor:
    """What the file holds, decoded by PIL directly: uint8 [C, H, W]."""
    with Image.open(path) as img:
        arr = np.asarray(img.convert(mode), dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def make_tiny(root: Path, *, val: str = "annotations", train: str = "official", fmt: str = "JPEG") -> dict:
    """A Tiny-ImageNet-format folder. train "official": train/<wnid>/images/<wnid>_<k>.JPEG plus
    <wnid>_boxes.txt; "flat": train/<wnid>/<wnid>_<k>.JPEG. val "annotations": val/images/val_<k>
    + val_annotations.txt (written in shuffled order); "folders": val/<wnid>/val_<k>. Returns
    {"train": [(path, label)], "val": [(path, label)]} in the order the reader must give."""
    ext = ".JPEG"
    out: dict[str, list] = {"train": [], "val": []}
    seed = 0
    for label, wnid in enumerate(CLASSES):
        cdir = root / "train" / wnid
        for k in range(TRAIN_COUNTS[wnid]):
            sub = cdir / "images" if train == "official" else cdir
            path = sub / f"{wnid}_{k}{ext}"
            _save(path, _image(seed := seed + 1), fmt)
            out["train"].append((path, label))
        if train == "official":
            (cdir / f"{wnid}_boxes.txt").write_text("".join(f"{wnid}_{k}{ext}\t0\t0\t63\t63\n" for k in range(3)))
    lines = []
    k = 0
    total = sum(VAL_COUNTS.values())
    for label, wnid in enumerate(CLASSES):
        for _ in range(VAL_COUNTS[wnid]):
            name = f"val_{total - 1 - k}{ext}"  # numbered against the class order: name order is not class order
            path = root / "val" / ("images" if val == "annotations" else wnid) / name
            _save(path, _image(1000 + k), fmt)
            out["val"].append((path, label))
            lines.append(f"{name}\t{wnid}\t1\t2\t60\t61\n")
            k += 1
    if val == "annotations":
        order = np.random.default_rng(7).permutation(len(lines))
        (root / "val" / "val_annotations.txt").write_text("".join(lines[i] for i in order))
    # Expected order: by class, then by file name (val_10 < val_2 as strings).
    out["val"].sort(key=lambda pl: (pl[1], pl[0].name))
    (root / "wnids.txt").write_text("\n".join(CLASSES) + "\n")
    return out


def _expect(items, mode="RGB") -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([_decoded(p, mode) for p, _ in items])
    y = torch.tensor([lab for _, lab in items], dtype=torch.int64)
    return x, y


# --------------------------------------------------------------------------------------------
# Tiny-ImageNet
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("val", ["annotations", "folders"])
@pytest.mark.parametrize("train", ["official", "flat"])
def test_tiny_imagenet_pixels_labels_and_order(tmp_path, val, train):
    files = make_tiny(tmp_path, val=val, train=train)
    s = load_image_splits("tiny_imagenet", tmp_path, storage="memory")
    for split, ds in (("train", s.train), ("val", s.test)):
        x, y = _expect(files[split])
        assert isinstance(ds, IndexedTensorDataset) and ds.x.dtype == torch.uint8
        assert torch.equal(ds.x, x), split
        assert torch.equal(ds.y, y), split
        assert ds.classes == CLASSES and ds.mean == TINY_IMAGENET_MEAN and ds.std == TINY_IMAGENET_STD
    assert s.classes == tuple(CLASSES) and s.num_classes == 3 and s.image_size == (64, 64)
    assert s.layouts == {"train": "class folders", "test": "annotations" if val == "annotations" else "class folders"}
    # A fetch is the release's ToTensor + Normalize: (x / 255 - mean) / std, float32.
    idx, xb, yb = s.test[[0, 4, 2]]
    mean = torch.tensor(TINY_IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(TINY_IMAGENET_STD).view(3, 1, 1)
    want = (s.test.x[[0, 4, 2]].double() / 255 - mean.double()) / std.double()
    torch.testing.assert_close(xb.double(), want, atol=1e-6, rtol=0)  # float32 rounding of the same formula
    assert idx.tolist() == [0, 4, 2] and yb.tolist() == s.test.y[[0, 4, 2]].tolist()
    info = s.run_info()
    assert info["dataset"] == "tiny_imagenet" and info["stats"] == "given" and info["storage"] == "memory"
    assert info["image_size"] == [64, 64] and info["mean"] == list(TINY_IMAGENET_MEAN)
    assert (info["train"], info["test"], info["num_classes"]) == (6, 5, 3)


def test_both_val_layouts_give_the_same_test_set(tmp_path):
    make_tiny(tmp_path / "a", val="annotations")
    make_tiny(tmp_path / "b", val="folders")
    a = load_image_splits("tiny_imagenet", tmp_path / "a")
    b = load_image_splits("tiny_imagenet", tmp_path / "b")
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.test.y, b.test.y)
    assert torch.equal(a.train.x, b.train.x)


def test_single_split_reader_reads_the_official_val(tmp_path):
    files = make_tiny(tmp_path, val="annotations")
    val = load_tiny_imagenet(tmp_path, "val")
    x, y = _expect(files["val"])
    assert torch.equal(val.x, x) and torch.equal(val.y, y) and val.classes == CLASSES


def test_grey_jpeg_becomes_three_equal_channels(tmp_path):
    make_tiny(tmp_path, val="folders")
    grey = tmp_path / "train" / CLASSES[1] / "images" / "grey.JPEG"
    _save(grey, _image(99, c=1))
    s = load_image_splits("tiny_imagenet", tmp_path)
    k = [i for i, p in enumerate(sorted((tmp_path / "train" / CLASSES[1]).rglob("*.JPEG"))) if p == grey][0]
    row = int((s.train.y < 1).sum()) + k
    g = _decoded(grey, "L")[0]
    assert s.train.y[row] == 1
    for ch in range(3):
        assert torch.equal(s.train.x[row, ch], g)


def test_train_subfolder_hint_and_eval_split_choice(tmp_path):
    make_tiny(tmp_path / "tiny-imagenet-200", val="folders")
    with pytest.raises(DataError, match=r"no train/ folder.*tiny-imagenet-200/ has one") as e:
        load_image_splits("tiny_imagenet", tmp_path)
    assert e.value.path == str(tmp_path)
    root = tmp_path / "tiny-imagenet-200"
    shutil.copytree(root / "val", root / "test")
    assert find_split_dirs(root)[1].name == "val" and find_split_dirs(root, "test")[1].name == "test"


# --------------------------------------------------------------------------------------------
# Any image folder
# --------------------------------------------------------------------------------------------


def make_folder(root: Path, *, eval_name: str = "val", h: int = 7, w: int = 5, c: int = 3) -> dict:
    """PNG class folders: train/<cls>/<k>.png, <eval_name>/<cls>/<k>.png; returns the arrays."""
    out: dict[str, list] = {"train": [], "test": []}
    seed = 0
    for split, counts in (("train", (2, 3)), (eval_name, (1, 2))):
        for label, cls in enumerate(["cat", "dog"]):
            for k in range(counts[label]):
                arr = _image(seed := seed + 1, h, w, c)
                _save(root / split / cls / f"{k}.png", arr)
                out["train" if split == "train" else "test"].append((arr, label))
    return out


def _stack(items) -> torch.Tensor:
    return torch.stack([torch.from_numpy(a if a.ndim == 3 else a[:, :, None]).permute(2, 0, 1) for a, _ in items])


def test_folder_computes_stats_from_train_pixels(tmp_path):
    arrays = make_folder(tmp_path, eval_name="test")  # no val/: test/ is the evaluation split
    s = load_image_splits("folder", tmp_path)
    assert torch.equal(s.train.x, _stack(arrays["train"])) and torch.equal(s.test.x, _stack(arrays["test"]))
    assert s.train.y.tolist() == [0, 0, 1, 1, 1] and s.test.y.tolist() == [0, 1, 1]
    px = np.stack([a for a, _ in arrays["train"]]).astype(np.float64) / 255  # [N, H, W, C]
    ref_mean, ref_std = px.mean(axis=(0, 1, 2)), px.std(axis=(0, 1, 2))
    np.testing.assert_allclose(s.mean, ref_mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.std, ref_std, rtol=0, atol=1e-12)
    assert s.train.mean == s.mean and s.test.std == s.std and s.image_size == (7, 5) and s.stats == "computed"
    info = s.run_info()
    assert info["stats"] == "computed" and info["test_dir"] == "test" and info["mean"] == list(s.mean)
    # Passing the saved values back reads the same data set, now with stats "given".
    again = load_image_splits("folder", tmp_path, image_size=info["image_size"], mean=info["mean"], std=info["std"])
    assert again.stats == "given" and again.mean == s.mean and torch.equal(again.train.x, s.train.x)


def test_folder_resizes_to_image_size_and_grey_mode(tmp_path):
    make_folder(tmp_path, h=9, w=6)
    _save(tmp_path / "train" / "cat" / "odd.png", _image(50, 4, 11))
    s = load_image_splits("folder", tmp_path, image_size=(5, 8), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    paths = sorted((tmp_path / "train" / "cat").glob("*.png")) + sorted((tmp_path / "train" / "dog").glob("*.png"))
    want = []
    for p in paths:
        with Image.open(p) as img:
            want.append(np.asarray(img.convert("RGB").resize((8, 5), Image.BILINEAR)))
    assert torch.equal(s.train.x, torch.from_numpy(np.stack(want)).permute(0, 3, 1, 2))
    assert s.image_size == (5, 8) and s.mean == (0.5, 0.5, 0.5)
    grey = load_image_splits("folder", tmp_path, image_size=4, mode="L")
    assert grey.train.x.shape == (6, 1, 4, 4) and len(grey.mean) == 1


def test_channel_stats_do_not_depend_on_the_batch_split():
    x = torch.randint(0, 256, (129, 3, 7, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    whole, parts = ChannelStats(), ChannelStats()
    whole.update(x)
    for chunk in x.split(7):
        parts.update(chunk)
    assert whole.result() == parts.result()
    ref = x.double().div(255).transpose(0, 1).reshape(3, -1)
    np.testing.assert_allclose(whole.result()[0], ref.mean(1).numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(whole.result()[1], ref.std(1, unbiased=False).numpy(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="same value in every pixel"):
        flat = ChannelStats()
        flat.update(torch.zeros(2, 3, 1, 1, dtype=torch.uint8))
        flat.result()


# --------------------------------------------------------------------------------------------
# Storage: in memory or streamed
# --------------------------------------------------------------------------------------------


def test_storage_threshold():
    assert choose_storage(100, "auto", 100) == "memory"
    assert choose_storage(101, "auto", 100) == "stream"
    assert choose_storage(10**12, "auto", None) == "memory"
    assert choose_storage(0, "stream", 10) == "stream" and choose_storage(10**12, "memory", 0) == "memory"
    with pytest.raises(ValueError, match="storage must be one of"):
        choose_storage(1, "disk")
    with pytest.raises(ValueError, match="budget"):
        choose_storage(1, "auto", -1)
    budget = memory_budget("cpu")
    assert budget is None or 0 < budget


def test_auto_storage_streams_above_the_budget(tmp_path):
    make_tiny(tmp_path, val="folders")
    nbytes = 11 * 3 * 64 * 64  # 6 train + 5 val images
    assert load_image_splits("tiny_imagenet", tmp_path, budget=nbytes).storage == "memory"
    assert load_image_splits("tiny_imagenet", tmp_path, budget=nbytes - 1).storage == "stream"


@pytest.mark.parametrize("dataset", ["tiny_imagenet", "folder"])
def test_streamed_data_gives_the_in_memory_values(tmp_path, dataset):
    make_tiny(tmp_path, val="annotations")
    mem = load_image_splits(dataset, tmp_path, storage="memory")
    st = load_image_splits(dataset, tmp_path, storage="stream", workers=2)
    assert st.storage == "stream" and isinstance(st.train, StreamingImageDataset)
    assert st.mean == mem.mean and st.std == mem.std  # computed stats too ("folder")
    for a, b in ((mem.train, st.train), (mem.test, st.test)):
        assert len(a) == len(b) and a.image_shape == b.image_shape and a.num_classes == b.num_classes
        assert torch.equal(a.y, b.y) and b.nbytes == a.x.numel()
        mask = torch.arange(len(a)) % 2 == 0
        for idx in ([0], [4, 1, 2], slice(1, None, 2), mask):
            for u, v in zip(a[idx], b[idx], strict=True):
                assert torch.equal(u, v)
        i, x1, y1 = b[-1]
        assert int(i) == len(b) - 1 and torch.equal(x1, a[-1][1]) and int(y1) == int(a.y[-1])
        assert torch.equal(b.pixels([2, 0]), a.pixels([2, 0]))
        assert torch.equal(b.materialize().x, a.x)
        sub_a, sub_b = a.subset([3, 0]), b.subset([3, 0])
        assert torch.equal(sub_a[:][1], sub_b[:][1]) and torch.equal(sub_a.y, sub_b.y)
    # On the device: the trainer's fetch (uint8 / 255, normalise), the same bits.
    dev = st.train.on_device("cpu")
    assert isinstance(dev, StreamingDeviceData) and dev.n == len(st.train)
    idx = torch.tensor([5, 0, 3])
    x, y = dev.fetch(idx)
    ref = normalize(mem.train.x[idx].to(torch.float32).div_(255.0), mem.mean, mem.std)
    assert torch.equal(x, ref) and torch.equal(y, mem.train.y[idx])
    assert torch.equal(torch.cat([xb for xb, _ in dev.slices(4)]), mem.train[:][1])


def test_streaming_fingerprint_survives_a_move_not_a_change(tmp_path):
    make_tiny(tmp_path / "a", val="folders")
    fa = load_image_splits("tiny_imagenet", tmp_path / "a", storage="stream").train.fingerprint()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert load_image_splits("tiny_imagenet", tmp_path / "b", storage="stream").train.fingerprint() == fa
    victim = next((tmp_path / "b" / "train").rglob("*.JPEG"))
    _save(victim, np.zeros((64, 64, 3), np.uint8))
    assert load_image_splits("tiny_imagenet", tmp_path / "b", storage="stream").train.fingerprint() != fa


def test_streamed_file_corrupted_after_loading_is_named_at_fetch(tmp_path):
    make_tiny(tmp_path, val="folders")
    st = load_image_splits("tiny_imagenet", tmp_path, storage="stream")
    victim = st.train.paths[2]
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(DataError) as e:
        st.train[[1, 2]]
    assert e.value.path == str(victim)


# --------------------------------------------------------------------------------------------
# Corrupted test sets
# --------------------------------------------------------------------------------------------


def make_corrupted_copy(root: Path, test_items, names=("fog", "snow"), severities=(1, 2, 3, 4, 5)) -> dict:
    """<root>/<name>/<s>/<wnid>/<file>.png: the test images darkened by s * 10 (plus 1 for snow)."""
    out: dict[tuple[str, int], list] = {}
    for name in names:
        for s in severities:
            items = []
            for path, label in test_items:
                arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
                dark = np.clip(arr - 10 * s - (name == "snow"), 0, 255).astype(np.uint8)
                dest = root / name / str(s) / CLASSES[label] / (path.stem + ".png")
                _save(dest, dark)
                items.append((dest, label))
            items.sort(key=lambda pl: (pl[1], pl[0].name))
            out[(name, s)] = items
    return out


@pytest.mark.parametrize("storage", ["memory", "stream"])
def test_corruption_folder_values_and_labels(tmp_path, storage):
    files = make_tiny(tmp_path / "tiny", val="annotations")
    want = make_corrupted_copy(tmp_path / "C", files["val"], severities=(1, 3))
    s = load_image_splits("tiny_imagenet", tmp_path / "tiny", storage=storage)
    sets = load_corruption_folder(tmp_path / "C", s.test, ["fog", "snow"], [1, 3])
    assert list(sets) == [("fog", 1), ("fog", 3), ("snow", 1), ("snow", 3)]
    for key, items in want.items():
        ds = sets[key]
        x, y = _expect(items)
        raw = ds.x if isinstance(ds, IndexedTensorDataset) else ds.materialize().x
        assert torch.equal(raw, x) and torch.equal(ds.y, y), key
        assert ds.mean == s.test.mean and ds.classes == list(CLASSES)
        assert isinstance(ds, StreamingImageDataset) == (storage == "stream")
    eager = corrupted_test_sets(s.test, ["fog"], [3], tmp_path / "C")
    assert isinstance(eager, dict) and torch.equal(eager[("fog", 3)][:][1], sets[("fog", 3)][:][1])


def test_generated_corruptions_scale_with_the_image_size(tmp_path):
    make_tiny(tmp_path, val="folders")
    s = load_image_splits("tiny_imagenet", tmp_path)
    assert spatial_scale_for(s.test.image_shape) == 2.0 and spatial_scale_for((3, 32, 48)) == 1.0
    got = corrupted_test_sets(s.test, ["gaussian_blur", "gaussian_noise"], [2])
    ref = make_corrupted_sets(s.test, ["gaussian_blur", "gaussian_noise"], [2], 0, spatial_scale=2.0)
    for k in ref:
        assert torch.equal(got[k].x, ref[k].x) and torch.equal(got[k].y, s.test.y)
    assert not torch.equal(got[("gaussian_blur", 2)].x, s.test.x)
    streamed = load_image_splits("tiny_imagenet", tmp_path, storage="stream")
    again = corrupted_test_sets(streamed.test, ["gaussian_blur"], [2])
    assert torch.equal(again[("gaussian_blur", 2)].x, ref[("gaussian_blur", 2)].x)


# --------------------------------------------------------------------------------------------
# Bad input: one line naming the path or value, before anything is decoded
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if load_image_splits decodes anything (the checks must come first)."""

    def refuse(*a, **k):
        raise AssertionError("decoded before every check had passed")

    monkeypatch.setattr(image_splits_mod, "decode_images", refuse)


def _one_line(err: BaseException, *names: object) -> None:
    msg = str(err)
    assert "\n" not in msg, msg
    for n in names:
        assert str(n) in msg, (n, msg)


def test_root_without_train(tmp_path, no_decoding):
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="no train/ folder") as e:
        load_image_splits("folder", tmp_path)
    _one_line(e.value, tmp_path)
    with pytest.raises(FileNotFoundError, match="no data folder"):
        load_image_splits("folder", tmp_path / "nowhere")


def test_root_without_val_or_test(tmp_path, no_decoding):
    make_folder(tmp_path)
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(DataError, match=r"no val/ or test/ folder") as e:
        load_image_splits("folder", tmp_path)
    _one_line(e.value, tmp_path)


@pytest.mark.parametrize("case", ["empty", "loose files", "images without annotations"])
def test_val_in_neither_layout(tmp_path, no_decoding, case):
    make_tiny(tmp_path, val="annotations")
    val = tmp_path / "val"
    if case == "empty":
        shutil.rmtree(val)
        val.mkdir()
    elif case == "loose files":
        for p in (val / "images").iterdir():
            p.rename(val / p.name)
        (val / "images").rmdir()
        (val / "val_annotations.txt").unlink()
    else:
        (val / "val_annotations.txt").unlink()
    with pytest.raises(DataError, match="neither layout|no val_annotations.txt") as e:
        load_image_splits("tiny_imagenet", tmp_path)
    _one_line(e.value, val)


def test_annotation_naming_a_class_absent_from_train(tmp_path, no_decoding):
    make_tiny(tmp_path, val="annotations")
    ann = tmp_path / "val" / "val_annotations.txt"
    lines = ann.read_text().splitlines()
    lines[2] = lines[2].replace(lines[2].split("\t")[1], "n99999999")
    ann.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 3: class 'n99999999'.*not a class folder of") as e:
        load_image_splits("tiny_imagenet", tmp_path)
    _one_line(e.value, ann, tmp_path / "train")


@pytest.mark.parametrize(
    "defect, match",
    [
        ("short line", r"line 1 .*expected"),
        ("listed twice", "listed twice"),
        ("file missing", "is not a file in"),
        ("unlabelled image", "is not listed in"),
    ],
)
def test_annotations_file_defects(tmp_path, no_decoding, defect, match):
    make_tiny(tmp_path, val="annotations")
    ann = tmp_path / "val" / "val_annotations.txt"
    lines = ann.read_text().splitlines()
    if defect == "short line":
        lines[0] = lines[0].split("\t")[0]
    elif defect == "listed twice":
        lines.append(lines[0])
    elif defect == "file missing":
        (tmp_path / "val" / "images" / lines[1].split("\t")[0]).unlink()
    else:
        _save(tmp_path / "val" / "images" / "extra.JPEG", _image(5))
    ann.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=match) as e:
        load_image_splits("tiny_imagenet", tmp_path)
    _one_line(e.value, "extra.JPEG" if defect == "unlabelled image" else ann)


def test_val_class_folder_absent_from_train(tmp_path, no_decoding):
    make_folder(tmp_path)
    _save(tmp_path / "val" / "emu" / "0.png", _image(3, 7, 5))
    with pytest.raises(DataError, match=r"\['emu'\] missing from") as e:
        load_image_splits("folder", tmp_path)
    _one_line(e.value, tmp_path / "val", tmp_path / "train")


@pytest.mark.parametrize("where", ["train", "val"])
def test_non_image_file_is_named(tmp_path, no_decoding, where):
    make_tiny(tmp_path, val="folders")
    bad = tmp_path / where / CLASSES[0] / ("images" if where == "train" else "") / "notes.JPEG"
    bad.write_text("these are not pixels")
    with pytest.raises(DataError, match="not an image") as e:
        load_image_splits("tiny_imagenet", tmp_path)
    assert e.value.path == str(bad)
    _one_line(e.value, bad)
    bad.write_bytes(b"")
    with pytest.raises(DataError, match="not an image") as e:
        load_image_splits("tiny_imagenet", tmp_path)
    assert e.value.path == str(bad)


def test_unreadable_file_is_named(tmp_path, monkeypatch, no_decoding):
    # As root (the CI container) chmod cannot make a file unreadable, so the read fails here.
    make_tiny(tmp_path, val="folders")
    victim = sorted((tmp_path / "val").rglob("*.JPEG"))[1]
    real_open = Image.open

    def open_(fp, *a, **k):
        if Path(fp) == victim:
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *a, **k)

    monkeypatch.setattr(Image, "open", open_)
    with pytest.raises(DataError, match="cannot read the image header.*PermissionError") as e:
        load_image_splits("tiny_imagenet", tmp_path)
    assert e.value.path == str(victim)


def test_truncated_image_is_named_when_decoded(tmp_path):
    make_tiny(tmp_path, val="folders")
    victim = sorted((tmp_path / "train").rglob("*.JPEG"))[3]
    victim.write_bytes(victim.read_bytes()[:2000])  # the header still reads: found by decoding
    with pytest.raises(DataError, match="cannot decode") as e:
        load_image_splits("tiny_imagenet", tmp_path, storage="memory")
    assert e.value.path == str(victim)
    _one_line(e.value, victim)


def test_mixed_sizes(tmp_path, no_decoding):
    make_tiny(tmp_path, val="folders")
    odd = tmp_path / "val" / CLASSES[2] / "small.JPEG"
    _save(odd, _image(4, 32, 32))
    with pytest.raises(DataError, match=r"size 32x32 .*differs from 64x64.*Tiny-ImageNet images are 64x64") as e:
        load_image_splits("tiny_imagenet", tmp_path)
    assert e.value.path == str(odd)
    with pytest.raises(DataError, match="pass image_size") as e:
        load_image_splits("folder", tmp_path)
    assert e.value.path == str(odd)


def test_mixed_sizes_resized_when_image_size_is_given(tmp_path):
    make_tiny(tmp_path, val="folders")
    _save(tmp_path / "val" / CLASSES[2] / "small.JPEG", _image(4, 32, 32))
    s = load_image_splits("folder", tmp_path, image_size=64)
    assert s.test.x.shape == (6, 3, 64, 64) and s.stats == "computed"


@pytest.mark.parametrize("defect", ["extra class", "missing class", "size", "no corruption", "no severity"])
def test_corruption_folder_that_does_not_match_the_test_set(tmp_path, defect):
    files = make_tiny(tmp_path / "tiny", val="folders")
    make_corrupted_copy(tmp_path / "C", files["val"], names=("fog",), severities=(1, 2))
    s = load_image_splits("tiny_imagenet", tmp_path / "tiny")
    sev = tmp_path / "C" / "fog" / "2"
    names, sevs, match, where = ["fog"], [1, 2], None, sev
    if defect == "extra class":
        _save(sev / "n09999999" / "x.png", _image(1))
        match = r"classes \['n09999999'\] not in the test set"
    elif defect == "missing class":
        shutil.rmtree(sev / CLASSES[1])
        match = rf"no folders for the test set's classes \['{CLASSES[1]}'\]"
    elif defect == "size":
        where = sev / CLASSES[0] / "wrong.png"
        _save(where, _image(2, 32, 64))
        match = r"size 32x64 .*differs from 64x64.*test set"
    elif defect == "no corruption":
        names, match, where = ["fog", "snow"], r"no snow/ folder", tmp_path / "C"
    else:
        sevs, match, where = [1, 5], r"no severity folder 5/", tmp_path / "C" / "fog"
    with pytest.raises(DataError, match=match) as e:
        check_corruption_folder(tmp_path / "C", s.test, names, sevs)
    assert e.value.path == str(where)
    _one_line(e.value, where)
    with pytest.raises(DataError, match=match):  # the loader checks everything before building a set
        load_corruption_folder(tmp_path / "C", s.test, names, sevs, lazy=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image_size": 32}, "tiny_imagenet images are 64x64"),
        ({"mode": "L"}, "tiny_imagenet is RGB"),
        ({"mean": (0.5, 0.5, 0.5)}, "give both mean and std"),
        ({"mean": (0.5, 0.5), "std": (0.2, 0.2)}, "mean must be 3 numbers"),
        ({"mean": (0.5,) * 3, "std": (0.2, 0.0, 0.2)}, "std must be > 0"),
        ({"storage": "disk"}, "storage must be one of"),
        ({"eval_split": "train"}, "eval_split must be"),
    ],
)
def test_bad_arguments(tmp_path, no_decoding, kwargs, match):
    make_tiny(tmp_path, val="folders")
    with pytest.raises(ValueError, match=match):
        load_image_splits("tiny_imagenet", tmp_path, **kwargs)


def test_bad_argument_values_for_folder(tmp_path):
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_image_splits("imagenet", tmp_path)
    with pytest.raises(ValueError, match="image_size must be"):
        load_image_splits("folder", tmp_path, image_size=(0, 4))
    with pytest.raises(ValueError, match="mode must be"):
        load_image_splits("folder", tmp_path, mode="CMYK")
    with pytest.raises(ValueError, match="severities"):
        corrupted_test_sets(IndexedTensorDataset(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), [0]), ["fog"], [6])


def test_eval_split_scan_reference_in_message(tmp_path):
    (tmp_path / "val" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="no val_annotations.txt"):
        scan_eval_split(tmp_path / "val", ["a"])


@pytest.mark.parametrize("n", [1, 7, 129])
def test_threaded_decoding_matches_one_thread(tmp_path, n):
    arrays = [_image(k, 3, 4) for k in range(n)]
    paths = []
    for k, a in enumerate(arrays):
        paths.append(tmp_path / f"{k:03d}.png")
        _save(paths[-1], a)
    want = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    assert torch.equal(decode_images(paths), want)
    assert torch.equal(decode_images(paths, workers=3), want)
    assert decode_images([], expect=(3, 4)).shape == (0, 3, 3, 4)
    if n > 1:
        _save(paths[n // 2 + 1 if n > 2 else 1], _image(0, 4, 4))
        with pytest.raises(DataError, match="differs from 3x4") as e:
            decode_images(paths, workers=3)
        assert e.value.path == str(paths[n // 2 + 1 if n > 2 else 1])
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="workers must be"):
            decode_images(paths, workers=bad)
