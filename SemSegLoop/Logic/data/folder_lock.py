"""One writer per project folder: a lock file naming its holder (PID, host, since), created in
one atomic step, taken over only from a dead process on this host, released on close or exit."""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from pathlib import Path

from semsegloop.errors import ProjectError

log = logging.getLogger("semsegloop")

LOCK_FILE = "project.lock"
# A lock file still empty or torn after this long was left by a crash during its own creation.
_TORN_LOCK_AGE_S = 30.0

# Locks this process holds, by lock path, held weakly: a Project dropped without close() frees
# its FolderLock, whose finalizer removes the file, so it does not keep its folder locked.
_held: "weakref.WeakValueDictionary[str, FolderLock]" = weakref.WeakValueDictionary()
_held_guard = threading.Lock()


class FolderLock:
    """The lock of one folder held by this process; ``release()`` (idempotent) gives it back."""

    def __init__(self, path: Path, record: dict, key: str):
        self.path = path
        self.record = record
        self._key = key
        self._finalizer = weakref.finalize(self, _remove_if_ours, str(path), record["token"])

    @property
    def held(self) -> bool:
        return self._finalizer.alive

    def release(self) -> None:
        with _held_guard:
            if _held.get(self._key) is self:
                del _held[self._key]
        self._finalizer()


def describe(record: dict) -> str:
    return (f"process {record.get('pid')} on host '{record.get('host')}' "
            f"since {record.get('since')}")


def acquire(folder: str | os.PathLike, what: str = "project") -> FolderLock:
    """Take the write lock of ``folder`` or raise ProjectError naming the process that holds it.

    A lock left by a process of this host that no longer runs is taken over (logged). A lock of
    another host is never taken over: only a person can know that process is gone.
    """
    folder = Path(folder)
    lock_path = folder / LOCK_FILE
    key = str(lock_path.resolve())
    # One guard around the whole attempt: two threads of this process opening the same folder
    # must not both see "our PID, not registered" and take the lock over from each other.
    with _held_guard:
        for _attempt in range(20):
            mine = _held.get(key)
            if mine is not None and mine.held:
                raise ProjectError(
                    f"{what} '{folder}' is already open for writing in this process "
                    f"({describe(mine.record)}); close() that Project first or open this "
                    f"one with read_only=True")
            record = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now(),
                      "token": uuid.uuid4().hex}
            start = _process_start(os.getpid())
            if start is not None:
                record["pid_start"] = start
            try:
                _create_exclusive(lock_path, json.dumps(record))
            except FileExistsError:
                holder = read(lock_path)
                if not _is_stale(lock_path, holder):
                    raise ProjectError(_held_message(what, folder, lock_path, holder)) from None
                _take_over(lock_path, holder)
                continue
            except OSError as e:
                raise ProjectError(f"cannot write in {what} folder '{folder}' (creating "
                                   f"{LOCK_FILE}: {e.strerror or e}); open it with "
                                   f"read_only=True to predict or evaluate without "
                                   f"writing") from None
            lock = FolderLock(lock_path, record, key)
            _held[key] = lock
            _remove_old_leftovers(folder)
            return lock
    raise ProjectError(f"cannot take the lock of {what} '{folder}': {lock_path} keeps changing; "
                       f"another process is opening it")


def read(lock_path: Path) -> dict | None:
    """The holder record of a lock file, or None when it is missing, empty or torn."""
    try:
        rec = json.loads(lock_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def _held_message(what: str, folder: Path, lock_path: Path, holder: dict | None) -> str:
    if holder is None:
        return (f"{what} '{folder}' is being opened by another process right now ({lock_path} "
                f"is being written); try again in a moment")
    where = ("" if holder.get("host") == socket.gethostname() else
             f"; if that process is gone (another computer sharing this folder), delete "
             f"'{lock_path}'")
    return (f"{what} '{folder}' is open for writing by {describe(holder)}; only one program "
            f"may write a project at a time: close it there, or open this one with "
            f"read_only=True to predict or evaluate{where}")


def _is_stale(lock_path: Path, holder: dict | None) -> bool:
    if holder is None:  # torn by a crash during creation, or being written this instant
        try:
            return time.time() - lock_path.stat().st_mtime > _TORN_LOCK_AGE_S
        except FileNotFoundError:
            return True
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    if pid == os.getpid():
        # Our PID but not held for this folder (acquire checked under the guard): a Project of
        # this process dropped by a crash path, a copied folder, or a PID reused after a reboot.
        return True
    if not _pid_alive(pid):
        return True
    # PID reused by an unrelated process since the holder died.
    start = _process_start(pid)
    return start is not None and holder.get("pid_start") not in (None, start)


def _take_over(lock_path: Path, holder: dict | None) -> None:
    """Move the stale lock aside; if what moved was not the stale one (another process took
    over first), put it back. Only one process wins a rename of the same file."""
    aside = lock_path.with_name(f"{LOCK_FILE}.stale-{uuid.uuid4().hex[:12]}")
    try:
        os.rename(lock_path, aside)
    except FileNotFoundError:
        return
    moved = read(aside)
    if holder is not None and moved is not None and moved.get("token") != holder.get("token"):
        with contextlib.suppress(OSError):
            os.link(aside, lock_path)
        with contextlib.suppress(OSError):
            aside.unlink()
        return
    with contextlib.suppress(OSError):
        aside.unlink()
    log.warning("took over the lock of '%s' left by %s, which no longer holds it",
                lock_path.parent, describe(holder) if holder else "a crashed process")


def _create_exclusive(lock_path: Path, text: str) -> None:
    """Create ``lock_path`` holding ``text`` or raise FileExistsError: the content is written to
    a private file first and hard-linked into place, so a reader never sees it half written."""
    tmp = lock_path.with_name(f"{LOCK_FILE}.new-{uuid.uuid4().hex[:12]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, lock_path)
        except OSError as e:
            if e.errno == errno.EEXIST:
                raise FileExistsError(str(lock_path)) from None
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # Filesystems without hard links (FAT, some network shares): O_EXCL create.
            fd2 = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd2, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _remove_old_leftovers(folder: Path) -> None:
    # A crash within the microseconds between writing a new lock (or moving a stale one aside)
    # and linking/removing it leaves such a file; one older than a minute is nobody's.
    for p in folder.glob(f"{LOCK_FILE}.*-*"):
        with contextlib.suppress(OSError):
            if time.time() - p.stat().st_mtime > 60:
                p.unlink()


def _remove_if_ours(lock_path: str, token: str) -> None:
    p = Path(lock_path)
    rec = read(p)
    if rec is not None and rec.get("token") == token:
        with contextlib.suppress(OSError):
            p.unlink()


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return _pid_alive_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    except OSError:
        return True
    return True


def _pid_alive_windows(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.GetLastError() == 5  # access denied: it exists
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
