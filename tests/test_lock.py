"""The run folder's lock (sbfast.train.checkpoint): one writer at a time, the holder named in one line,
released on exit, taken over only when stale (a dead pid, or a reused one, on this host) with a
warning that says whose it was; never taken from another host."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings

import pytest

from sbfast.train import checkpoint as L


@pytest.fixture
def live_pid():
    """The pid of a live process of this host that is not this one."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has it (until the pid wraps, which takes far longer than a test)


def _write_holder(folder, **holder):
    (folder / L.LOCK_FILE).write_text(json.dumps(holder))


def test_the_lock_names_its_holder_and_is_released(tmp_path):
    with L.RunLock(tmp_path) as lk:
        holder = json.loads((tmp_path / L.LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
        assert lk.held
        with pytest.raises(L.RunFolderLocked, match=f"in use by this process \\(pid {os.getpid()}\\)"):
            L.RunLock(tmp_path).acquire()  # the same process twice: one run writes a folder at a time
        L.check_unlocked(tmp_path)  # this process's own lock passes the early check
    assert not (tmp_path / L.LOCK_FILE).exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary left either
    L.RunLock(tmp_path).acquire().release()  # free again


def test_a_live_holder_is_refused_in_one_line_naming_it(tmp_path, live_pid):
    _write_holder(tmp_path, pid=live_pid, host=socket.gethostname(), started="2026-01-01T00:00:00")
    for attempt in (lambda: L.RunLock(tmp_path).acquire(), lambda: L.check_unlocked(tmp_path)):
        with pytest.raises(L.RunFolderLocked) as e:
            attempt()
        msg = str(e.value)
        assert "\n" not in msg and f"pid {live_pid} on host {socket.gethostname()}" in msg
        assert str(tmp_path / L.LOCK_FILE) in msg  # what to remove if that process is gone
    assert json.loads((tmp_path / L.LOCK_FILE).read_text())["pid"] == live_pid  # left alone


def test_a_dead_holder_on_this_host_is_taken_over_and_said_so(tmp_path):
    dead = _dead_pid()
    _write_holder(tmp_path, pid=dead, host=socket.gethostname(), started="2026-01-01T00:00:00")
    L.check_unlocked(tmp_path)  # stale: the early check lets it pass
    with pytest.warns(RuntimeWarning, match=f"took over the lock of pid {dead} on host"):
        lk = L.RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / L.LOCK_FILE).read_text())["pid"] == os.getpid()
    lk.release()


def test_a_reused_pid_is_stale(tmp_path, live_pid):
    if L._proc_start(live_pid) is None:
        pytest.skip("no /proc: a reused pid cannot be told from its first process")
    _write_holder(tmp_path, pid=live_pid, host=socket.gethostname(), proc_start="1")  # another start time
    with pytest.warns(RuntimeWarning, match="took over"):
        L.RunLock(tmp_path).acquire().release()


def test_another_hosts_lock_is_never_taken_over(tmp_path):
    _write_holder(tmp_path, pid=_dead_pid(), host="another-host-" + socket.gethostname())
    with pytest.raises(L.RunFolderLocked, match="on host another-host-"):
        L.RunLock(tmp_path).acquire()


def test_an_unreadable_lock_file_is_an_unknown_holder_never_taken_over(tmp_path):
    (tmp_path / L.LOCK_FILE).write_text("")  # not JSON: nothing says its holder is gone
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(L.RunFolderLocked, match="an unknown process"):
            L.RunLock(tmp_path).acquire()
