"""Atomic file writes: a write either lands whole or leaves the previous file untouched,
so a crash or a full disk never destroys what the person painted or trained."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import Iterator

_TEMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"
# "<stem>.tmp<8 chars><suffixes>": this module's (and, before it, mkstemp's) temporary names.
_TEMP_NAME = re.compile(r"\.tmp[a-z0-9_]{8}(\.|$)")


# Test hook: with SEMSEGLOOP_TEST_KILL_AT=N set, the process kills itself (SIGKILL, no clean-up)
# at the N-th write point it passes, so a test can crash a real process between any two steps of
# a save; SEMSEGLOOP_TEST_WRITE_TRACE=FILE appends each point's name to FILE (to count them).
KILL_AT_ENV = "SEMSEGLOOP_TEST_KILL_AT"
TRACE_ENV = "SEMSEGLOOP_TEST_WRITE_TRACE"
_points_passed = 0


def write_point(what: str) -> None:
    """Mark a moment between two steps of a write (a crash there must leave a consistent
    project); a no-op unless the test hook above is set."""
    global _points_passed
    kill_at, trace = os.environ.get(KILL_AT_ENV), os.environ.get(TRACE_ENV)
    if not kill_at and not trace:
        return
    _points_passed += 1
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(f"{_points_passed}\t{what}\n")
    if kill_at and _points_passed == int(kill_at):
        import signal
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def fork_with_kill_point(run, kill_at: str, trace: str) -> int:
    """Test hook: fork a child that runs ``run()`` with the hook above armed at the
    ``kill_at``-th write point ("" or "0": none) and tracing to ``trace``; returns the child's
    pid in the parent (the child exits 0, or 1 after printing an exception; see
    child_status). POSIX only: the kill tests fork a warm zygote so torch is imported once."""
    global _points_passed
    pid = os.fork()
    if pid == 0:
        import sys

        os.environ[KILL_AT_ENV] = kill_at if kill_at != "0" else ""
        os.environ[TRACE_ENV] = trace
        _points_passed = 0
        code = 0
        try:
            run()
        except BaseException as e:
            print(repr(e), file=sys.stderr, flush=True)
            code = 1
        os._exit(code)
    return pid


def child_status(pid: int) -> dict:
    """Wait for a child of fork_with_kill_point: {"signal": its killing signal or None,
    "code": its exit code or None}."""
    _, status = os.waitpid(pid, 0)
    return {"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}


def make_temp(directory: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """Create a new empty file ``<prefix><8 chars><suffix>`` in ``directory``; (fd, path).

    Unlike ``tempfile.mkstemp`` (always 0600) the mode follows the umask like any file the user
    creates, so a project shared on a lab server stays readable by the group.
    """
    for _ in range(100):
        name = prefix + "".join(secrets.choice(_TEMP_CHARS) for _ in range(8)) + suffix
        path = Path(directory) / name
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                           0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {prefix}*{suffix} in {directory}")


def is_temporary(name: str) -> bool:
    """True for a name an interrupted atomic write of this module can leave behind."""
    return bool(_TEMP_NAME.search(name))


def remove_temporaries(directory: Path) -> list[Path]:
    """Delete what interrupted atomic writes left in ``directory`` (not recursive); returns them.

    Only safe while no one else writes there, i.e. while holding the project's lock.
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for e in entries:
        if is_temporary(e.name) and e.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(e.path)
                removed.append(Path(e.path))
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    The temporary name keeps the final suffix (``x.tmp123.nrrd``) because writers such as
    SimpleITK choose the format from the extension. On any exception the temporary file is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp(path.parent, path.stem + ".tmp", "".join(path.suffixes) or ".tmp")
    os.close(fd)
    try:
        yield tmp
        _fsync_file(tmp)
        write_point(f"written {tmp.name}")
        os.replace(tmp, path)
        write_point(f"renamed to {path.name}")
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        with open(path, "rb+") as f:
            os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes the rename durable on POSIX; Windows cannot open directories.
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
