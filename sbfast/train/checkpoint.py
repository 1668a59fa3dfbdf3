"""What keeps a run folder whole through crashes and rivals: checkpoint files (an atomic,
checksummed write and a strict, safe read) and the folder's lock (one writer at a time).

**Checkpoint files.**

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

**The lock: one writer per run folder, a lock file that names its holder.** A run
(``train_ensemble``, a resume, ``run_comparison``) holds ``<folder>/run.lock`` while it writes the
folder; a second writer is refused with one line naming the holder. The file is JSON ``{"pid",
"host", "started", "proc_start"}``, written whole before it appears (it is created under a
temporary name and hard-linked into place, which fails when the lock exists), so a reader never
sees a half-written holder.

A lock whose holder is gone (a process killed with SIGKILL, a power cut) is *stale*: it names
this host and a pid that no longer runs (or that now runs another program: the pid's start time
differs from the one recorded). A stale lock is taken over, with a warning that says whose it
was. A lock from another host is never taken over (this host cannot tell whether that process
still runs): the message says to remove the file once that run is known to be gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import socket
import struct
import threading
import time
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


LOCK_FILE = "run.lock"

# lock files this process holds (a thread of it may not take one twice), with the holder's pid:
# a process forked while holding one (a torchrun-like rank) does not hold it
_HELD: dict[str, int] = {}
_HELD_GUARD = threading.Lock()


class RunFolderLocked(ValueError):
    """The run folder is being written by another process (or another run of this one). The
    message is one line naming the folder, the holder's pid and host, and what to do."""


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux's /proc/<pid>/stat,
    field 22), which tells a reused pid from the original; None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    except OSError:
        return False
    return True


def read_holder(path: str | Path) -> dict[str, Any] | None:
    """The holder recorded in a lock file, or None when there is none (no file, or unreadable:
    an empty or foreign file is reported as an unknown holder)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    """``pid 1234 on host h (since 2026-01-01T12:00:00)`` for a lock file's holder."""
    if not holder.get("pid"):
        return "an unknown process (the lock file names no pid)"
    since = f" (since {holder['started']})" if holder.get("started") else ""
    return f"pid {holder['pid']} on host {holder.get('host', '?')}{since}"


def is_stale(holder: dict[str, Any]) -> bool:
    """Whether the holder is certainly gone: this host, and its pid no longer runs (or runs
    another process than the one that took the lock). A holder this process does not hold is
    gone too (its own pid, but not in this process's table: a leftover of an earlier holder
    with the same pid)."""
    pid, host = holder.get("pid"), holder.get("host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return False
    if pid == os.getpid():
        return True  # held() was checked first: this process does not hold it
    if not _alive(pid):
        return True
    recorded, now = holder.get("proc_start"), _proc_start(pid)
    return recorded is not None and now is not None and recorded != now


def locked_message(folder: Path, holder: dict[str, Any], what: str = "run folder") -> str:
    """The one line that refuses a second writer of ``folder``."""
    return (
        f"{what} {folder} is in use by {describe_holder(holder)}: another sbfast is writing it; wait for it to end "
        f"(or, if that process is gone, remove {folder / LOCK_FILE})"
    )


def check_unlocked(folder: str | Path, what: str = "run folder") -> None:
    """Refuse ``folder`` early when another live process holds its lock (a stale lock passes:
    the run that takes the lock takes it over; so does this process's own, checked again under
    it). Raises RunFolderLocked naming the holder."""
    folder = Path(folder)
    path = folder / LOCK_FILE
    holder = read_holder(path)
    if holder is None:
        return
    with _HELD_GUARD:
        mine = _HELD.get(str(path.resolve())) == os.getpid()
    if not mine and not is_stale(holder):
        raise RunFolderLocked(locked_message(folder, holder, what))


class RunLock:
    """The lock of one folder, held from :meth:`acquire` to :meth:`release` (a context manager
    too). ``what`` names the folder in messages ("run folder", "comparison folder")."""

    def __init__(self, folder: str | Path, what: str = "run folder") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.what = what
        self.held = False

    def _key(self) -> str:
        return str(self.path.resolve())

    def _write_new(self) -> bool:
        """Create the lock file with this process as holder; False if one exists."""
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "proc_start": _proc_start(os.getpid()),
        }
        tmp = self.folder / f".{LOCK_FILE}-{os.getpid()}-{threading.get_ident()}"
        tmp.write_text(json.dumps(holder) + "\n")
        try:
            try:
                os.link(tmp, self.path)  # atomic, and the file appears complete
                return True
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: exclusive create, then write
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(holder) + "\n")
                return True
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def acquire(self) -> RunLock:
        """Take the lock, taking over a stale one (with a RuntimeWarning naming its holder).

        Raises:
            RunFolderLocked naming the holder when another live process (or this process) holds it.
        """
        key = self._key()
        with _HELD_GUARD:
            if _HELD.get(key) == os.getpid():
                raise RunFolderLocked(
                    f"{self.what} {self.folder} is in use by this process (pid {os.getpid()}): "
                    "one run writes a folder at a time"
                )
            for _ in range(10):
                if self._write_new():
                    _HELD[key] = os.getpid()
                    self.held = True
                    return self
                holder = read_holder(self.path)
                if holder is None:
                    continue  # released between the two looks: try again
                if not is_stale(holder):
                    raise RunFolderLocked(locked_message(self.folder, holder, self.what))
                # take over: remove the stale file only if it is still the one just read
                if read_holder(self.path) == holder:
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    warnings.warn(
                        f"{self.what} {self.folder}: took over the lock of {describe_holder(holder)}, which is no "
                        "longer running",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            raise RunFolderLocked(f"{self.what} {self.folder}: could not take {self.path} (it keeps changing)")

    def release(self) -> None:
        """Give the lock back (remove the file if it is still this process's)."""
        if not self.held:
            return
        self.held = False
        with _HELD_GUARD:
            _HELD.pop(self._key(), None)
            holder = read_holder(self.path)
            if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
