"""Checkpoint files: an atomic, checksummed write and a strict, safe read.

A checkpoint file is a fixed header followed by a ``torch.save`` payload::

    magic      8 bytes   b"SBFASTCK"
    version    uint32    FORMAT_VERSION (little endian, as every field here)
    length     uint64    bytes of the payload
    sha256     32 bytes  of the payload
    payload    length bytes: torch.save of a dict of tensors and plain containers

The header lets a reader tell a truncated file (fewer bytes than ``length``), a corrupted one
(checksum mismatch: a flipped byte anywhere in the payload) and a foreign one (no magic) apart
before anything is unpickled, and the payload is read with ``torch.load(weights_only=True)``:
tensors and plain containers only, never arbitrary objects.

Writes are atomic: the bytes go to a temporary file in the same folder, are flushed and
fsync'ed, the file replaces the target with ``os.replace`` and the folder is fsync'ed. A machine
that dies mid-write leaves the old checkpoint or the new one, never a torn one. ``last.pt`` keeps
its predecessor as ``prev.pt``, so a checkpoint damaged later (a bad disk, a copy cut short)
still leaves one good state to resume from (:func:`load_latest`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import struct
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import torch

MAGIC = b"SBFASTCK"
FORMAT_VERSION = 1
PAYLOAD_FORMAT = "sbfast.train.checkpoint"  # the payload dict's "format" entry
HEADER = struct.Struct("<8sIQ32s")
CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
PREVIOUS = "prev.pt"
PHASE1 = "phase1.pt"
_TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, truncated, corrupted, foreign or from an
    unknown format version. The message names the file and what is wrong with it."""


def encode(payload: dict[str, Any]) -> memoryview:
    """The file's bytes for ``payload`` (header + torch.save of it), as one buffer: the payload
    is serialised after room left for the header, which is filled in place (no copy of a
    checkpoint that may be hundreds of MB)."""
    if not isinstance(payload, dict):
        raise TypeError(f"a checkpoint payload must be a dict, got {type(payload).__name__}")
    buf = io.BytesIO()
    buf.write(bytes(HEADER.size))
    torch.save(payload, buf)
    view = buf.getbuffer()
    body = view[HEADER.size :]
    view[: HEADER.size] = HEADER.pack(MAGIC, FORMAT_VERSION, len(body), hashlib.sha256(body).digest())
    return view


def decode(raw: bytes | memoryview, name: str = "<bytes>") -> dict[str, Any]:
    """Check ``raw`` (a whole checkpoint file) and return its payload dict (tensors on the CPU).

    Raises:
        CheckpointError naming ``name`` and what is wrong.
    """
    raw = memoryview(raw)
    if len(raw) == 0:
        raise CheckpointError(f"checkpoint {name}: empty (0 bytes)")
    if len(raw) < HEADER.size:
        if bytes(raw[: len(MAGIC)]) == MAGIC[: len(raw)]:
            raise CheckpointError(
                f"checkpoint {name}: truncated ({len(raw)} bytes, shorter than the {HEADER.size}-byte header)"
            )
        raise CheckpointError(f"checkpoint {name}: not an sbfast checkpoint ({len(raw)} bytes, no {MAGIC!r} header)")
    magic, version, length, digest = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise CheckpointError(
            f"checkpoint {name}: not an sbfast checkpoint (starts with {bytes(magic)!r}, expected {MAGIC!r})"
        )
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {name}: format version {version}; this sbfast reads version {FORMAT_VERSION}"
        )
    body = raw[HEADER.size :]
    if len(body) < length:
        raise CheckpointError(f"checkpoint {name}: truncated (payload has {len(body)} of {length} bytes)")
    if len(body) > length:
        raise CheckpointError(
            f"checkpoint {name}: corrupted ({len(body) - length} bytes after the {length}-byte payload)"
        )
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"checkpoint {name}: corrupted (sha256 of the payload does not match the header)")
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # torch's message is a page of advice; the line that names the refused object says what is wrong
        first = next(
            (ln for ln in lines if "Unsupported" in ln or "WeightsUnpickler" in ln),
            lines[0] if lines else type(e).__name__,
        )
        raise CheckpointError(
            f"checkpoint {name}: holds objects other than tensors and plain containers (weights_only load refused: {first})"
        ) from None
    except Exception as e:  # noqa: BLE001 - any failure to unpickle is a bad file, reported as one line
        raise CheckpointError(f"checkpoint {name}: payload cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != PAYLOAD_FORMAT:
        raise CheckpointError(
            f"checkpoint {name}: not an sbfast training checkpoint (payload format {_format_of(payload)!r})"
        )
    return payload


def _format_of(payload: object) -> object:
    return payload.get("format") if isinstance(payload, dict) else type(payload).__name__


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and check one checkpoint file; its payload dict with every tensor on the CPU.

    Raises:
        CheckpointError: missing, unreadable, truncated, corrupted, foreign or unknown version.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: missing") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({e.strerror or e})") from None
    return decode(raw, str(path))


# ------------------------------------------------------------------------------------ writing


def _write_bytes(f: BinaryIO, data: bytes | memoryview) -> None:
    """Write ``data`` to the open temporary file (a seam: tests stop a writer half-way here)."""
    f.write(data)


def _rotate(current: Path, previous: Path) -> None:
    """Keep the checkpoint about to be replaced as ``previous`` (a seam, as ``_write_bytes``)."""
    os.replace(current, previous)


def _fsync_dir(folder: Path) -> None:
    # a rename is durable only once the folder's entry is on disk; some file systems cannot open
    # a folder for fsync (then the rename is as durable as that file system makes it)
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | memoryview, *, keep_previous: str | Path | None = None) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, flush, fsync,
    ``os.replace``, fsync of the folder). With ``keep_previous``, an existing ``path`` is first
    renamed to it: between the two renames ``path`` is absent and ``keep_previous`` holds the old
    state, so every instant leaves one complete checkpoint. An exception (or a signal raising
    one) during the write removes the temporary file and leaves ``path`` as it was."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{_TMP_PREFIX}{path.name}-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            _write_bytes(f, data)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            _rotate(path, Path(keep_previous))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(folder)


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete temporary files that a killed writer left in ``folder`` (never a finished file)."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(f"{_TMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                p.unlink()


def save_checkpoint(run_dir: str | Path, payload: dict[str, Any] | bytes | memoryview, name: str = LAST) -> Path:
    """Write ``payload`` (a dict, or the bytes of :func:`encode`) as ``run_dir/checkpoints/name``;
    ``last.pt`` keeps its predecessor as ``prev.pt``. Returns the path written."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    data = encode(payload) if isinstance(payload, dict) else payload
    path = folder / name
    write_atomic(path, data, keep_previous=folder / PREVIOUS if name == LAST else None)
    return path


def checkpoint_paths(run_dir: str | Path) -> list[Path]:
    """The checkpoints a resume may use, newest first: ``last.pt``, ``prev.pt``."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    return [folder / LAST, folder / PREVIOUS]


def has_checkpoint(run_dir: str | Path) -> bool:
    return any(p.is_file() for p in checkpoint_paths(run_dir))


def load_latest(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """The newest good checkpoint of a run: ``last.pt``, else ``prev.pt`` (with a warning that
    names what is wrong with ``last.pt``). Returns (path, payload).

    Raises:
        CheckpointError listing what is wrong with each candidate when none is usable.
    """
    problems = []
    for path in checkpoint_paths(run_dir):
        try:
            payload = load_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            warnings.warn(f"{problems[0]}; using the previous checkpoint {path} instead", RuntimeWarning, stacklevel=2)
        return path, payload
    raise CheckpointError(f"no usable checkpoint in {Path(run_dir) / CHECKPOINT_DIR}: " + "; ".join(problems))


def phase1_path(source: str | Path) -> Path:
    """``source`` itself when it is a file, else ``source/checkpoints/phase1.pt``."""
    source = Path(source)
    return source if source.is_file() else source / CHECKPOINT_DIR / PHASE1
