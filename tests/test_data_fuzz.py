"""sbfast.data readers on bad files: the named defects first, then a seeded fuzz pass.

Contract under test: a file that is empty, truncated, corrupted or holds the wrong contents gives
exactly one :class:`sbfast.data.DataError` (a ValueError) whose one-line message starts with that
file's path (``archive:member`` for a member of an archive); a file that is still valid loads,
and then exactly as its bytes say: nothing dropped, nothing coerced.

Fuzz pass: 10 target files (CIFAR-10 and CIFAR-100 folder pickles, data and meta; CIFAR-10 and
CIFAR-100 ``.tar.gz`` archives; CIFAR-10-C image and label ``.npy``; a PNG and a JPEG in an image
folder). Each gets the empty file, truncations at 6 cut points and single-byte flips (XOR with a
nonzero byte) at seeded random positions, plus targeted positions where the outcome is known in
advance. Which outcome is right is decided for every mutated file by an oracle written
independently of the readers (a strict unpickler allowing only what the test wrote and the
format's rules, ``gzip.decompress``, ``np.load`` plus the exact-length rule, PIL). Count: 10
targets x (1 empty + 6 cuts + ``FLIPS`` = 16 flips) = 230 mutated files in the main pass; the
targeted tests add one flip per byte of the PNG, 132 flips of the ``.npy`` and 12 of the archive.

Which mutations legitimately still load, and why:
* a flip in the pixel data of a ``.npy`` (no checksum: any byte is a pixel value);
* a flip in a ``.npy`` label that leaves it inside the class range;
* a flip in a pickle that changes a pixel or label to another valid value, or an unused field
  (``batch_label``), keeping the pickle well formed;
* a flip in a gzip header field no checksum covers (MTIME, XFL, OS, the stored file name);
* a flip in a JPEG's entropy-coded data (JPEG has no checksum; PIL decodes what is there).
Never: any flip or cut of a PNG (every chunk has a CRC, IEND included), any cut of anything.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from sbfast.data import DataError, load_cifar10, load_cifar100, load_cifar_c, load_image_folder

FLIPS = 16  # seeded random flip positions per target file (targeted positions come on top)


def _cuts(n: int) -> list[int]:
    """Truncation points of an n-byte file: inside the magic, in the header, halfway, near the end."""
    return [1, 7, n // 4, n // 2, n - 8, n - 1]


class Invalid(Exception):
    """The oracle's verdict: this file must be refused."""


# --------------------------------------------------------------------------------------------
# Writing the files, in the published formats
# --------------------------------------------------------------------------------------------


def _pickle(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def _cifar10_files(rng) -> dict[str, bytes]:
    files = {}
    for i in range(1, 6):
        d = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        files[f"data_batch_{i}"] = _pickle(
            {b"batch_label": b"b", b"data": d, b"labels": rng.integers(0, 10, 2).tolist()}
        )
    d = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    files["test_batch"] = _pickle({b"batch_label": b"testing batch", b"data": d, b"labels": [3, 0, 9]})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    files["batches.meta"] = _pickle({b"label_names": names, b"num_vis": 3072})
    return files


def _cifar100_files(rng) -> dict[str, bytes]:
    files = {}
    for name, n in (("train", 2), ("test", 3)):
        d = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine, coarse = rng.integers(0, 100, n).tolist(), rng.integers(0, 20, n).tolist()
        files[name] = _pickle({b"filenames": [], b"data": d, b"fine_labels": fine, b"coarse_labels": coarse})
    files["meta"] = _pickle(
        {
            b"fine_label_names": [f"class{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"super{i}".encode() for i in range(20)],
        }
    )
    return files


def _write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
    return folder


def _write_targz(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tf:  # stores the file name in the gzip header, as gzip(1) does
        tf.add(folder, arcname=folder.name)
    return out


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _image(arr, fmt) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("fuzz")
    c10 = _write_folder(root / "c10" / "cifar-10-batches-py", _cifar10_files(rng))
    c100 = _write_folder(root / "c100" / "cifar-100-python", _cifar100_files(rng))
    (root / "tgz").mkdir()
    c10_tgz = _write_targz(c10, root / "tgz" / "cifar-10-python.tar.gz")
    c100_tgz = _write_targz(c100, root / "tgz" / "cifar-100-python.tar.gz")
    cc = root / "cifar10c"
    cc.mkdir()
    (cc / "fog.npy").write_bytes(_npy(rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)))
    (cc / "labels.npy").write_bytes(_npy(np.tile(np.array([4, 9], dtype=np.int64), 5)))
    img = root / "images"
    pixels = {c: rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for c in "abc"}
    for c, fmt, ext in (("a", "PNG", "png"), ("b", "JPEG", "jpg"), ("c", "PNG", "png")):
        (img / c).mkdir(parents=True)
        (img / c / f"x.{ext}").write_bytes(_image(pixels[c], fmt))
    return {"c10": c10, "c100": c100, "c10_tgz": c10_tgz, "c100_tgz": c100_tgz, "cifar_c": cc, "images": img}


@contextmanager
def _replaced(path: Path, raw: bytes):
    original = path.read_bytes()
    path.write_bytes(raw)
    try:
        yield
    finally:
        path.write_bytes(original)


def _assert_names(err: BaseException, path: Path, case: str) -> None:
    assert isinstance(err, DataError), f"{case}: {type(err).__name__}: {err} (expected a DataError naming {path})"
    msg = str(err)
    assert msg.startswith(f"{path}:") and err.path.startswith(str(path)), f"{case}: message does not name {path}: {msg}"
    assert "\n" not in msg and len(err.problem) > 0, f"{case}: not one line: {msg!r}"


# --------------------------------------------------------------------------------------------
# The named defects
# --------------------------------------------------------------------------------------------


def test_truncated_targz_names_the_archive(data):
    raw = data["c10_tgz"].read_bytes()
    bad = data["c10_tgz"].parent / "cut.tar.gz"
    bad.write_bytes(raw[: len(raw) // 2])  # used to raise a bare EOFError
    with pytest.raises(DataError, match="not a readable tar archive.*EOFError") as err:
        load_cifar10(bad)
    _assert_names(err.value, bad, "cut archive")


def test_corrupted_targz_is_caught_by_its_checksum(data):
    raw = bytearray(data["c10_tgz"].read_bytes())
    raw[-6] ^= 0x01  # inside the gzip trailer's CRC-32: only reading to the end notices
    bad = data["c10_tgz"].parent / "crc.tar.gz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="CRC check failed") as err:
        load_cifar10(bad, train=False)
    _assert_names(err.value, bad, "bad CRC")


def test_truncated_cifar_c_npy_names_the_file_at_the_call(data):
    fog = data["cifar_c"] / "fog.npy"
    raw = fog.read_bytes()
    # Used to pass the call (lazy) and fail a lookup with "mmap length is greater than file size".
    with _replaced(fog, raw[:-100]):
        with pytest.raises(DataError, match=r"bytes but its header .* needs \d+: truncated") as err:
            load_cifar_c(data["cifar_c"])
    _assert_names(err.value, fog, "cut npy")
    with _replaced(fog, raw + b"\0" * 3):  # used to be read as if the 3 bytes were not there
        with pytest.raises(DataError, match="trailing bytes after the array"):
            load_cifar_c(data["cifar_c"])
    labels = data["cifar_c"] / "labels.npy"
    with _replaced(labels, labels.read_bytes()[:-1]):
        with pytest.raises(DataError, match="truncated") as err:
            load_cifar_c(data["cifar_c"])
    _assert_names(err.value, labels, "cut labels")


def test_truncated_png_names_the_file(data):
    png = data["images"] / "a" / "x.png"
    raw = png.read_bytes()
    with _replaced(png, raw[: len(raw) // 2]):  # used to raise "image file is truncated" with no path
        with pytest.raises(DataError, match="truncated") as err:
            load_image_folder(data["images"])
    _assert_names(err.value, png, "cut png")
    # Cut inside the IEND chunk: PIL alone has every pixel by then and used to load it.
    with _replaced(png, raw[:-4]):
        with pytest.raises(DataError, match="IEND"):
            load_image_folder(data["images"])


def test_truncated_batches_meta_is_an_error_not_missing_names(data):
    meta = data["c10"] / "batches.meta"
    assert load_cifar10(data["c10"], train=False).classes[9] == "truck"
    with _replaced(meta, meta.read_bytes()[:-10]):  # used to give classes=None silently
        with pytest.raises(DataError, match="not a readable CIFAR python pickle") as err:
            load_cifar10(data["c10"], train=False)
    _assert_names(err.value, meta, "cut meta")


def _folder_with(tmp_path, **over) -> Path:
    files = _cifar10_files(np.random.default_rng(1))
    files.update(over)
    return _write_folder(tmp_path / "cifar-10-batches-py", files)


@pytest.mark.parametrize(
    "name, obj, problem",
    [
        # Labels were np.asarray(..., int64): 1.5 became 1, True became 1, "7" became 7.
        ("test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1.5, 2]}, "found 1.5 \\(float\\)"),
        ("test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [True, 2]}, "found True"),
        ("test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": ["7", 2]}, "found '7'"),
        ("test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]}, r"\[0, 10\).*\[1, 10\]"),
        ("test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2, 3]}, "3 'labels' for 2 images"),
        # Data was np.asarray(..., uint8): 300 became 44, 0.9 became 0.
        ("test_batch", {b"data": np.full((2, 3072), 300, np.int64), b"labels": [1, 2]}, "uint8 array.*int64"),
        ("test_batch", {b"data": np.zeros((2, 3072), np.float32), b"labels": [1, 2]}, "float32"),
        ("test_batch", {b"data": np.zeros((2, 3071), np.uint8), b"labels": [1, 2]}, r"\(2, 3071\)"),
        ("test_batch", {b"labels": [1, 2]}, "missing key 'data'"),
        ("test_batch", [1, 2], "expected a dict"),
        # Class names: a wrong count was taken as the class count; non-strings were str()-ed.
        ("batches.meta", {b"label_names": [b"a"] * 9}, "list of 10 class names, got 9 names"),
        ("batches.meta", {b"label_names": [b"a"] * 9 + [5]}, "must hold strings, found 5"),
        ("batches.meta", {b"label_names": [b"a"] * 9 + [b"\xff"]}, "not UTF-8"),
    ],
)
def test_cifar_pickle_contents_are_checked_and_name_the_file(tmp_path, name, obj, problem):
    folder = _folder_with(tmp_path, **{name: _pickle(obj)})
    with pytest.raises(DataError, match=problem) as err:
        load_cifar10(folder, train=False)
    _assert_names(err.value, folder / name, problem)


class _CallsGetcwd:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_pickle_may_only_rebuild_arrays(tmp_path):
    # A pickle can call any importable function; a CIFAR file has no reason to call one.
    bad = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"batch_label": _CallsGetcwd()}
    folder = _folder_with(tmp_path, test_batch=_pickle(bad))
    with pytest.raises(DataError, match=r"refers to posix.getcwd|refers to nt.getcwd") as err:
        load_cifar10(folder, train=False)
    _assert_names(err.value, folder / "test_batch", "foreign callable")


def test_cifar_pickle_with_trailing_bytes_is_refused(tmp_path):
    files = _cifar10_files(np.random.default_rng(1))
    folder = _folder_with(tmp_path, test_batch=files["test_batch"] + b"\0\0")
    with pytest.raises(DataError, match="2 bytes after the end of the pickle"):
        load_cifar10(folder, train=False)


def test_pickle_memo_index_allocates_nothing(tmp_path):
    # A corrupted 4-byte memo index still makes a well-formed pickle, but CPython's C unpickler
    # sizes its memo array by it: index 2**31 - 1 would ask for 32 GB. The reader's memo is a dict.
    import tracemalloc

    raw = _cifar10_files(np.random.default_rng(1))["test_batch"]
    at = raw.index(b"q\x00")  # the first BINPUT (1-byte index 0) of a protocol-2 pickle
    raw = raw[:at] + b"r" + (2**31 - 1).to_bytes(4, "little") + raw[at + 2 :]
    folder = _folder_with(tmp_path, test_batch=raw)
    tracemalloc.start()
    try:
        ds = load_cifar10(folder, train=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ds.y.tolist() == [3, 0, 9] and peak < 50 * 2**20


def test_image_of_another_size_and_non_image_name_the_file(data, tmp_path):
    other = tmp_path / "img"
    (other / "a").mkdir(parents=True)
    (other / "a" / "x.png").write_bytes(_image(np.zeros((6, 5, 3), np.uint8), "PNG"))
    (other / "a" / "y.png").write_bytes(_image(np.zeros((7, 5, 3), np.uint8), "PNG"))
    with pytest.raises(DataError, match="differs") as err:
        load_image_folder(other)
    _assert_names(err.value, other / "a" / "y.png", "size")
    (other / "a" / "y.png").write_bytes(b"GIF89a not really")
    with pytest.raises(DataError, match="cannot decode|not an image") as err:
        load_image_folder(other)
    _assert_names(err.value, other / "a" / "y.png", "not an image")


# --------------------------------------------------------------------------------------------
# Oracles: what a mutated file must give, decided without the readers
# --------------------------------------------------------------------------------------------

_ORACLE_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _OracleUnpickler(pickle._Unpickler):  # the Python one: a dict memo, see test_pickle_memo_index
    def find_class(self, module, name):
        if (module, name) not in _ORACLE_GLOBALS:
            raise Invalid(f"global {module}.{name}")
        return super().find_class(module, name)


def _oracle_unpickle(raw: bytes):
    buf = io.BytesIO(raw)
    try:
        obj = _OracleUnpickler(buf, encoding="bytes").load()
    except Exception as exc:
        raise Invalid(repr(exc)) from exc
    if buf.tell() != len(raw) or not isinstance(obj, dict):
        raise Invalid("trailing bytes or not a dict")
    return obj


def _get(d: dict, key: str):
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise Invalid(f"no {key}")


def _oracle_batch(raw: bytes, label_key: str, k: int):
    d = _oracle_unpickle(raw)
    data, labels = _get(d, "data"), _get(d, label_key)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise Invalid("data")
    if isinstance(labels, np.ndarray):
        ok = labels.ndim == 1 and labels.dtype.kind in "iu"
    else:
        ok = isinstance(labels, (list, tuple)) and all(type(v) is int for v in labels)
    if not ok or len(labels) != data.shape[0] or any(not 0 <= int(v) < k for v in labels):
        raise Invalid("labels")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), [int(v) for v in labels]


def _oracle_meta(raw: bytes, key: str, k: int):
    names = _get(_oracle_unpickle(raw), key)
    if not isinstance(names, (list, tuple)) or len(names) != k:
        raise Invalid("names")
    out = []
    for c in names:
        if isinstance(c, bytes):
            try:
                c = c.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise Invalid("utf-8") from exc
        if not isinstance(c, str):
            raise Invalid("name type")
        out.append(c)
    return out


def _oracle_npy(raw: bytes) -> np.ndarray:
    buf = io.BytesIO(raw)
    try:
        arr = np.load(buf, allow_pickle=False)
    except Exception as exc:
        raise Invalid(repr(exc)) from exc
    if not isinstance(arr, np.ndarray) or buf.tell() != len(raw):  # np.load ignores trailing bytes
        raise Invalid("not exactly one array")
    return arr


# --------------------------------------------------------------------------------------------
# Targets: (file to mutate, load it, what the oracle expects from the mutated bytes)
# --------------------------------------------------------------------------------------------


def _result(ds):
    return ds.x, ds.y.tolist(), ds.classes


def _expect_cifar(folder: Path, files: tuple[str, str], label_key: str, names_key: str, k: int, mutated: dict):
    """(x, y, classes) the data file and meta file of ``folder`` must give, ``mutated`` replacing some."""
    raws = {n: mutated[n] if n in mutated else (folder / n).read_bytes() for n in files}
    x, y = _oracle_batch(raws[files[0]], label_key, k)
    return x, y, _oracle_meta(raws[files[1]], names_key, k)


_C10 = ("c10", ("test_batch", "batches.meta"), "labels", "label_names", 10, lambda r: load_cifar10(r, train=False))
_C100 = ("c100", ("test", "meta"), "fine_labels", "fine_label_names", 100, lambda r: load_cifar100(r, train=False))


def _cifar_target(spec, file):
    key, files, label_key, names_key, k, loader = spec
    return {
        "path": lambda d: d[key] / file,
        "load": lambda d: _result(loader(d[key])),
        "expect": lambda d, raw: _expect_cifar(d[key], files, label_key, names_key, k, {file: raw}),
    }


def _targz_target(spec, archive_key):
    key, files, label_key, names_key, k, loader = spec

    def expect(data, mutated):
        # gzip.decompress checks the CRC-32 and length; an archive that decompresses to the very
        # same tar must load as the folder it was made from.
        try:
            same = gzip.decompress(mutated) == gzip.decompress(data[archive_key].read_bytes())
        except Exception as exc:
            raise Invalid(repr(exc)) from exc
        if not same:
            raise Invalid("another archive")
        return _expect_cifar(data[key], files, label_key, names_key, k, {})

    return {"path": lambda d: d[archive_key], "load": lambda d: _result(loader(d[archive_key])), "expect": expect}


def _cifar_c_target(file):
    def expect(data, mutated):
        root = data["cifar_c"]
        raws = {n: mutated if n == file else (root / n).read_bytes() for n in ("fog.npy", "labels.npy")}
        images, labels = _oracle_npy(raws["fog.npy"]), _oracle_npy(raws["labels.npy"])
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3) or 0 in images.shape[1:3]:
            raise Invalid("images")
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.size == 0 or labels.size % 5:
            raise Invalid("labels")
        if labels.min() < 0 or labels.max() >= 10 or labels.size != images.shape[0]:
            raise Invalid("label values")
        n = labels.size // 5
        blocks = [
            (torch.from_numpy(images[i * n : (i + 1) * n].copy()), labels[i * n : (i + 1) * n].tolist())
            for i in range(5)
        ]
        return {("fog", i + 1): (x.permute(0, 3, 1, 2), y) for i, (x, y) in enumerate(blocks)}

    def load(data):
        return {k: (v.x, v.y.tolist()) for k, v in load_cifar_c(data["cifar_c"], lazy=False).items()}

    return {"path": lambda d: d["cifar_c"] / file, "load": load, "expect": expect}


_IMAGE_FILES = {"a": "x.png", "b": "x.jpg", "c": "x.png"}  # one image per class, sorted by class


def _image_target(cls):
    def expect(data, mutated):
        from PIL import Image

        original = (data["images"] / cls / _IMAGE_FILES[cls]).read_bytes()
        if original.startswith(b"\x89PNG") and mutated != original:
            # Every PNG chunk, IEND included, carries a CRC-32, which catches any change of one
            # byte; a cut leaves a chunk incomplete. (PIL alone would load a PNG cut after its
            # last image data, so it cannot be the oracle here.)
            raise Invalid("changed PNG")
        arrays = []
        for c, f in _IMAGE_FILES.items():
            raw = mutated if c == cls else (data["images"] / c / f).read_bytes()
            try:
                with Image.open(io.BytesIO(raw)) as img:
                    arrays.append(np.asarray(img.convert("RGB")))
            except Exception as exc:
                raise Invalid(repr(exc)) from exc
        if len({a.shape for a in arrays}) != 1:
            raise Invalid("sizes differ")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2), [0, 1, 2], ["a", "b", "c"]

    return {
        "path": lambda d: d["images"] / cls / _IMAGE_FILES[cls],
        "load": lambda d: _result(load_image_folder(d["images"])),
        "expect": expect,
    }


TARGETS = {
    "cifar10/test_batch": _cifar_target(_C10, "test_batch"),
    "cifar10/batches.meta": _cifar_target(_C10, "batches.meta"),
    "cifar100/test": _cifar_target(_C100, "test"),
    "cifar100/meta": _cifar_target(_C100, "meta"),
    "cifar10.tar.gz": _targz_target(_C10, "c10_tgz"),
    "cifar100.tar.gz": _targz_target(_C100, "c100_tgz"),
    "cifar10c/fog.npy": _cifar_c_target("fog.npy"),
    "cifar10c/labels.npy": _cifar_c_target("labels.npy"),
    "images/png": _image_target("a"),
    "images/jpeg": _image_target("b"),
}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (
            isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    return a == b


def _mutations(raw: bytes, seed: int):
    """(label, mutated bytes): the empty file, the cuts, and FLIPS seeded single-byte flips."""
    yield "empty", b""
    for at in _cuts(len(raw)):
        yield f"cut at {at} of {len(raw)}", raw[:at]
    rng = np.random.default_rng(seed)
    for pos in sorted(rng.choice(len(raw), size=min(FLIPS, len(raw)), replace=False).tolist()):
        yield from _flip(raw, pos, int(rng.integers(1, 256)))


def _flip(raw: bytes, pos: int, mask: int):
    out = bytearray(raw)
    out[pos] ^= mask
    yield f"flip byte {pos} ^ {mask:#04x}", bytes(out)


def _check(data, target, label: str, mutated: bytes) -> str:
    """Run one mutated file through its reader and the oracle; 'error' or 'valid'."""
    path = target["path"](data)
    case = f"{path.name} {label}"
    try:
        want = target["expect"](data, mutated)
    except Invalid:
        want = Invalid
    with _replaced(path, mutated):
        try:
            got = target["load"](data)
        except Exception as exc:
            assert want is Invalid, f"{case}: the file is still valid but the reader raised {type(exc).__name__}: {exc}"
            _assert_names(exc, path, case)
            return "error"
    assert want is not Invalid, f"{case}: the file is invalid but the reader returned a data set"
    assert _equal(got, want), f"{case}: loaded, but not as the file's bytes say"
    return "valid"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_truncated_flipped_and_empty_files(data, name):
    target = TARGETS[name]
    raw = target["path"](data).read_bytes()
    count = 0
    for label, mutated in _mutations(raw, seed=sorted(TARGETS).index(name)):
        outcome = _check(data, target, label, mutated)
        assert outcome == "error" or label.startswith("flip"), f"{name} {label} loaded"
        count += 1
    assert count == 1 + len(_cuts(len(raw))) + FLIPS
    assert _equal(target["load"](data), target["expect"](data, raw))  # the intact file, after all that


def test_fuzz_png_every_flip_is_an_error(data):
    # Every PNG chunk carries a CRC-32, which detects any single-byte change: signature, lengths,
    # types, data and CRCs alike, IEND included.
    target = TARGETS["images/png"]
    raw = target["path"](data).read_bytes()
    for pos in range(len(raw)):
        for label, mutated in _flip(raw, pos, 0x10):
            assert _check(data, target, label, mutated) == "error"


def test_fuzz_npy_pixel_flips_load_and_header_flips_follow_the_oracle(data):
    target = TARGETS["cifar10c/fog.npy"]
    raw = target["path"](data).read_bytes()
    offset = 128  # np.save pads the version 1.0 header to a multiple of 64 bytes
    assert raw[offset - 1 : offset] == b"\n" and len(raw) == offset + 10 * 8 * 8 * 3
    # In the pixel data every byte is some uint8 pixel: the flipped value must come out as it is.
    for pos in (offset, offset + 1, len(raw) // 2, len(raw) - 1):
        for label, mutated in _flip(raw, pos, 0xFF):
            assert _check(data, target, label, mutated) == "valid"
    # Magic, version and header length: always refused; the rest of the header: as the oracle says.
    for pos in range(10):
        for label, mutated in _flip(raw, pos, 0x01):
            assert _check(data, target, label, mutated) == "error"
    for pos in range(10, offset):
        for label, mutated in _flip(raw, pos, 0x01):
            _check(data, target, label, mutated)


def test_fuzz_gzip_header_fields_without_checksum_still_load(data):
    target = TARGETS["cifar10.tar.gz"]
    raw = target["path"](data).read_bytes()
    assert raw[3] & 0x08  # FNAME set: the header stores the file name, as gzip(1) and tarfile write it
    for pos in (4, 5, 6, 7, 8, 9, 10):  # MTIME (4 bytes), XFL, OS, first byte of the name
        for label, mutated in _flip(raw, pos, 0x01):
            assert _check(data, target, label, mutated) == "valid"
    for pos in (0, 1, 2, len(raw) - 8, len(raw) - 1):  # magic, method; CRC-32 and length in the trailer
        for label, mutated in _flip(raw, pos, 0x01):
            assert _check(data, target, label, mutated) == "error"
