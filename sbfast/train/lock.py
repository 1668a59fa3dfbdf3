"""One writer per run folder: a lock file that names its holder.

A run (``train_ensemble``, a resume, ``run_comparison``) holds ``<folder>/run.lock`` while it
writes the folder; a second writer is refused with one line naming the holder. The file is
JSON ``{"pid", "host", "started", "proc_start"}``, written whole before it appears (it is
created under a temporary name and hard-linked into place, which fails when the lock exists),
so a reader never sees a half-written holder.

A lock whose holder is gone (a process killed with SIGKILL, a power cut) is *stale*: it names
this host and a pid that no longer runs (or that now runs another program: the pid's start time
differs from the one recorded). A stale lock is taken over, with a warning that says whose it
was. A lock from another host is never taken over (this host cannot tell whether that process
still runs): the message says to remove the file once that run is known to be gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any

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


__all__ = [
    "LOCK_FILE",
    "RunFolderLocked",
    "RunLock",
    "check_unlocked",
    "describe_holder",
    "is_stale",
    "locked_message",
    "read_holder",
]
