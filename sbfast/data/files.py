"""Byte-level reads of the data files sbfast understands, each failure one :class:`DataError`
naming the file and what is wrong with it.

Each reader checks what its format can check and hides nothing: a ``.npy`` file must be exactly
as long as its header says, a compressed archive is read to the end so that its checksum is
verified, a PNG's chunk checksums are all verified, a pickle may only rebuild NumPy arrays and
must be consumed to its last byte. A file that passes every check is returned as it is (a
corrupted byte that no checksum covers, such as a pixel of an uncompressed ``.npy`` or of a
JPEG, cannot be told from a real value).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import math
import os
import pickle
import struct
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from sbfast.data.checks import DataError

PathLike = str | os.PathLike


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # one line, whatever the library put in its message
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# Pickles (CIFAR python archives)
# --------------------------------------------------------------------------------------------

# The only callables a CIFAR pickle refers to: NumPy's array reconstruction (under its NumPy 1 and
# NumPy 2 module names) and the bytes codec protocol-2 pickles of Python 3 use. Anything else in
# a file is corruption or not a CIFAR file, and must not be called.
_PICKLE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


# The Python implementation of the unpickler, not the C one: its memo is a dict, where the C
# unpickler sizes an array by the largest memo index it meets, so one corrupted 4-byte LONG_BINPUT
# index would make it allocate and clear up to 32 GB. On CIFAR files the two are equally fast
# (the time goes into decoding the pixel string).
class _ArrayUnpickler(pickle._Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR pickle never does")
        return super().find_class(module, name)


def load_pickle(raw: bytes, where: str) -> Any:
    """Unpickle one CIFAR python pickle (Python 2's, so ``encoding="bytes"``), allowing only NumPy
    arrays, and require every byte to belong to it.

    Raises:
        DataError: naming ``where`` (the file, or ``archive:member``).
    """
    if not raw:
        raise DataError(where, "empty file")
    buf = io.BytesIO(raw)
    try:
        obj = _ArrayUnpickler(buf, encoding="bytes").load()
    except Exception as exc:  # unpickling corrupt bytes can raise almost any type
        raise DataError(where, f"not a readable CIFAR python pickle ({_why(exc)})") from exc
    if buf.tell() != len(raw):
        raise DataError(where, f"{len(raw) - buf.tell()} bytes after the end of the pickle")
    return obj


def read_bytes(path: PathLike) -> bytes:
    """The whole file; FileNotFoundError if missing, DataError for any other read failure."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"missing {str(path)!r}") from None
    except OSError as exc:
        raise DataError(path, f"cannot read ({_why(exc)})") from exc


# --------------------------------------------------------------------------------------------
# Tar archives, plain or gzip / bzip2 / xz compressed
# --------------------------------------------------------------------------------------------


def _decompressed(f: io.BufferedReader) -> Any:
    head = f.read(6)
    f.seek(0)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=f, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(f)
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(f)
    return f


_ARCHIVE_ERRORS = (OSError, EOFError, tarfile.TarError, zlib.error, lzma.LZMAError, ValueError, struct.error)


def iter_tar_members(
    path: PathLike, folder: str, names: Sequence[str], optional: Sequence[str] = ()
) -> Iterator[tuple[str, bytes, str]]:
    """Yield ``(name, bytes, where)`` for each ``<...>/<folder>/<name>`` file of a tar archive, in
    archive order, in one sequential pass (no seeking back through the compressed stream).
    ``names`` must all be present; ``optional`` ones are yielded when present.

    After the last member the rest of the archive is read to its end, so that the compressor's
    checksum and length are verified (tarfile stops at the end-of-archive blocks, before them):
    consume the whole iterator before trusting anything it yielded.

    Raises:
        DataError: naming the archive: not a tar archive, truncated, checksum mismatch, a wanted
            member missing or present twice.
    """
    wanted = set(names) | set(optional)
    seen: set[str] = set()
    try:
        with open(path, "rb") as f:
            stream = _decompressed(f)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    parts = PurePosixPath(member.name).parts
                    if not (member.isfile() and len(parts) >= 2 and parts[-2] == folder and parts[-1] in wanted):
                        continue
                    if parts[-1] in seen:
                        raise DataError(path, f"archive holds {folder}/{parts[-1]} twice")
                    seen.add(parts[-1])
                    member_file = tar.extractfile(member)
                    data = member_file.read() if member_file is not None else b""
                    if len(data) != member.size:
                        raise DataError(
                            path, f"{member.name} is {member.size} bytes, only {len(data)} read (truncated)"
                        )
                    yield parts[-1], data, f"{path}:{member.name}"
            while stream.read(1 << 20):
                pass
    except DataError:
        raise
    except FileNotFoundError:
        raise FileNotFoundError(f"missing {str(path)!r}") from None
    except _ARCHIVE_ERRORS as exc:
        problem = "empty file" if _is_empty(path) else f"not a readable tar archive ({_why(exc)})"
        raise DataError(path, problem) from exc
    missing = sorted(set(names) - seen)
    if missing:
        raise DataError(path, f"archive has no {folder}/{missing[0]}")


def _is_empty(path: PathLike) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# .npy arrays
# --------------------------------------------------------------------------------------------

_NPY_ERRORS = (OSError, EOFError, ValueError, TypeError, struct.error)


def read_npy(path: PathLike, *, mmap: bool = False) -> np.ndarray:
    """A ``.npy`` array, checked against its header before any data is read.

    The file must be exactly header + shape x itemsize bytes (truncated files and trailing bytes
    are both errors) and must not hold Python objects. ``mmap=True`` maps the file read-only
    instead of reading it.

    Raises:
        FileNotFoundError: missing. DataError: anything else, naming the file.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise DataError(path, "empty file")
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                # 3.0 differs from 2.0 only in allowing UTF-8 in the header (field names).
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise DataError(path, f"unsupported .npy format version {version}")
            offset = f.tell()
    except DataError:
        raise
    except FileNotFoundError:
        raise FileNotFoundError(f"missing {str(path)!r}") from None
    except Exception as exc:  # NumPy parses the header with tokenize and ast: corrupt text raises anything
        raise DataError(path, f"not a readable .npy file ({_why(exc)})") from exc
    if dtype.hasobject:
        raise DataError(path, f"holds Python objects ({dtype}); a data file must be a plain numeric array")
    count = math.prod(shape)
    need = offset + count * dtype.itemsize
    if size != need:
        what = "truncated" if size < need else "trailing bytes after the array"
        raise DataError(path, f"is {size} bytes but its header ({shape}, {dtype}) needs {need}: {what}")
    if count == 0:
        return np.empty(shape, dtype=dtype)
    order = "F" if fortran else "C"
    try:
        if mmap:
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
        with open(path, "rb") as f:
            f.seek(offset)
            flat = np.fromfile(f, dtype=dtype, count=count)
    except _NPY_ERRORS as exc:
        raise DataError(path, f"cannot read the array ({_why(exc)})") from exc
    if flat.size != count:
        raise DataError(path, f"read {flat.size} of {count} values (file changed while reading?)")
    return flat.reshape(shape, order=order)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png_chunks(path: PathLike, data: bytes) -> None:
    # PIL checks the CRCs of the chunks it reads, but stops reading once it has the pixels: a
    # file cut after its last image data, or with a corrupted IEND, would load. Walk every chunk.
    pos = len(_PNG_SIGNATURE)
    while True:
        if pos + 8 > len(data):
            raise DataError(path, f"PNG ends at byte {len(data)} before its IEND chunk (truncated)")
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise DataError(path, f"PNG chunk {ctype!r} at byte {pos} runs past the end of the file (truncated)")
        if zlib.crc32(data[pos + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            raise DataError(path, f"PNG chunk {ctype!r} at byte {pos} fails its CRC check (corrupted)")
        if ctype == b"IEND":
            return
        pos = end


def read_image(path: PathLike, mode: str) -> Any:
    """Decode one image file fully and convert it to PIL ``mode``; returns a loaded PIL image.

    PNG files have every chunk's CRC verified first. Formats without checksums (JPEG) decode as
    their bytes say. Truncation is an error for every format (as long as PIL's global
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False).

    Raises:
        FileNotFoundError: missing. DataError: naming the file, for anything PIL cannot decode.
    """
    from PIL import Image, UnidentifiedImageError

    data = read_bytes(path)
    if not data:
        raise DataError(path, "empty file")
    if data.startswith(_PNG_SIGNATURE):
        _check_png_chunks(path, data)
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert(mode)  # convert loads every pixel, so truncation shows here
    except UnidentifiedImageError as exc:
        raise DataError(path, "not an image format PIL recognises") from exc
    except Exception as exc:  # image plugins raise many types on corrupt data
        raise DataError(path, f"cannot decode the image ({_why(exc)})") from exc
