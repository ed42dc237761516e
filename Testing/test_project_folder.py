"""The project folder under concurrent and interrupted use: one writer (a lock naming its holder,
taken over from dead processes, also across real processes), read-only opening, clean-up of
interrupted writes, file modes that follow the umask, painted images counted from the files."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import semsegloop
from semsegloop import ProjectError
from semsegloop.data import folder_lock
from helpers_engine import make_square_project, square_image, square_strokes, tiny_models  # noqa: F401


def _child(code: str, *args) -> subprocess.Popen:
    """A real second Python process running ``code`` (it prints READY when it holds what it
    should hold, then waits for stdin to close)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


HOLD_PROJECT = """
    import sys, semsegloop
    proj = semsegloop.Project.open(sys.argv[1])
    print("READY", flush=True)
    sys.stdin.read()
"""


def _wait_ready(p: subprocess.Popen) -> None:
    line = p.stdout.readline()
    assert line.strip() == "READY", (line, p.stderr.read() if p.poll() is not None else "")


@pytest.fixture
def small_project(tmp_path):
    proj = semsegloop.Project.create(tmp_path / "p", ["cell", "background"], dims=2)
    img, _ = square_image(32)
    image_id = proj.add_image(img, name="tile")
    proj.set_labels(image_id, square_strokes(32))
    proj.close()
    return tmp_path / "p", image_id


def test_a_second_writer_process_is_refused_naming_the_holder_and_gets_in_after_it_exits(small_project):
    path, _ = small_project
    holder = _child(HOLD_PROJECT, path)
    try:
        _wait_ready(holder)
        with pytest.raises(ProjectError) as info:
            semsegloop.Project.open(path)
        msg = str(info.value)
        assert f"process {holder.pid}" in msg and socket.gethostname() in msg and "since 20" in msg
        assert "read_only=True" in msg
        # A third process is refused too (the lock is on disk, not in this process).
        third = subprocess.run([sys.executable, "-m", "semsegloop", "train", str(path), "--steps",
                                "1"], capture_output=True, text=True, timeout=120)
        assert third.returncode == 2 and f"process {holder.pid}" in third.stderr
        assert third.stderr.count("\n") == 1, third.stderr
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert holder.returncode == 0
    assert not (path / folder_lock.LOCK_FILE).exists(), "a normal exit releases the lock"
    with semsegloop.Project.open(path) as proj:
        assert proj.labeled_image_ids() == ["tile"]


def test_the_lock_of_a_killed_process_is_taken_over_with_a_log_line(small_project, caplog):
    path, image_id = small_project
    holder = _child(HOLD_PROJECT, path)
    _wait_ready(holder)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    rec = json.loads((path / folder_lock.LOCK_FILE).read_text())
    assert rec["pid"] == holder.pid and rec["host"] == socket.gethostname()
    with caplog.at_level(logging.WARNING, logger="semsegloop"):
        proj = semsegloop.Project.open(path)
    assert any("took over the lock" in r.getMessage() and str(holder.pid) in r.getMessage()
               for r in caplog.records)
    assert json.loads((path / folder_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    proj.set_labels(image_id, square_strokes(32))   # it writes
    proj.close()
    assert not (path / folder_lock.LOCK_FILE).exists()


def test_a_lock_of_another_host_is_never_taken_over(small_project):
    path, _ = small_project
    (path / folder_lock.LOCK_FILE).write_text(json.dumps(
        {"pid": 4242, "host": "lab-server-7", "since": "2026-11-30T08:00:00+00:00", "token": "x"}))
    with pytest.raises(ProjectError, match="process 4242 on host 'lab-server-7' since "
                                           "2026-11-30T08:00:00") as info:
        semsegloop.Project.open(path)
    assert "delete" in str(info.value) and folder_lock.LOCK_FILE in str(info.value)
    assert json.loads((path / folder_lock.LOCK_FILE).read_text())["host"] == "lab-server-7"


def test_read_only_opening_works_beside_a_writer_and_writes_nothing(tmp_path, tiny_models):

    writer, image_id, _ = make_square_project(tmp_path / "p")
    writer.train(steps=2, device="cpu")

    def snapshot():
        return {str(p.relative_to(tmp_path)): (p.stat().st_mtime_ns, p.stat().st_size)
                for p in (tmp_path / "p").rglob("*")}
    before = snapshot()
    reader = semsegloop.Project.open(tmp_path / "p", read_only=True)
    assert reader.read_only and not writer.read_only
    labels = reader.predict(image_id)            # predicting works; nothing is saved
    assert labels.shape == (64, 64) and reader.evaluate({image_id: labels})["images"]
    assert snapshot() == before
    for call in (lambda: reader.set_labels(image_id, square_strokes(64)),
                 lambda: reader.add_image(np.zeros((8, 8), np.float32)),
                 lambda: reader.train(steps=1, device="cpu"),
                 lambda: reader.predict(image_id, save=True),
                 lambda: reader.set_classes(reader.classes)):
        with pytest.raises(ProjectError, match="read-only"):
            call()
    assert snapshot() == before
    writer.close()


def test_one_writer_per_folder_in_a_process_too_and_close_or_with_gives_it_back(small_project):
    path, image_id = small_project
    first = semsegloop.Project.open(path)
    with pytest.raises(ProjectError, match="already open for writing in this process"):
        semsegloop.Project.open(path)
    first.close()
    with pytest.raises(ProjectError, match="read-only"):
        first.set_labels(image_id, square_strokes(32))
    with semsegloop.Project.open(path) as second:
        second.set_labels(image_id, square_strokes(32))
        assert (path / folder_lock.LOCK_FILE).exists()
    assert not (path / folder_lock.LOCK_FILE).exists()
    # A writer dropped without close() does not keep the folder locked.
    semsegloop.Project.open(path).labels(image_id)
    semsegloop.Project.open(path).close()


def test_create_takes_the_lock(tmp_path):
    proj = semsegloop.Project.create(tmp_path / "new", ["a", "b"])
    holder = json.loads((tmp_path / "new" / folder_lock.LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(ProjectError, match="already open for writing"):
        semsegloop.Project.open(tmp_path / "new")
    proj.close()


def test_two_processes_racing_for_a_stale_lock_end_with_exactly_one_writer(small_project):
    path, _ = small_project
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (path / folder_lock.LOCK_FILE).write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "since": "2026-12-01T00:00:00+00:00",
         "token": "dead"}))
    racer = """
        import sys, time, semsegloop
        time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
        try:
            proj = semsegloop.Project.open(sys.argv[1])
            print("WRITER", flush=True)
        except semsegloop.ProjectError as e:
            print("REFUSED", flush=True)
        sys.stdin.read()
    """
    start = time.time() + 3.0
    kids = [_child(racer, path, start) for _ in range(4)]
    outs = [k.stdout.readline().strip() for k in kids]
    for k in kids:
        k.stdin.close()
        k.wait(timeout=60)
    assert sorted(outs) == ["REFUSED"] * 3 + ["WRITER"], outs


def test_interrupted_writes_leave_nothing_after_the_next_open(small_project):
    path, image_id = small_project
    # What a kill during atomic writes leaves: temporaries beside project.json, a labels file,
    # a checkpoint and a prediction.
    (path / "checkpoints").mkdir()
    (path / "predictions" / "round_001").mkdir(parents=True)
    left = [path / "project.tmpa1b2c3d4.json", path / "labels" / "tile.tmpzz9_x0yq.nrrd",
            path / "checkpoints" / "round_002.tmpk3k3k3k3.safetensors",
            path / "predictions" / "round_001" / "tile.tmp00000000.nrrd"]
    for p in left:
        p.write_bytes(b"\0" * 1000)
    keep = path / "labels" / "notes.tmp.txt"      # not a name an atomic write makes
    keep.write_text("mine")
    old_lock_parts = [path / "project.lock.new-0123456789ab", path / "project.lock.stale-ab12"]
    for p in old_lock_parts:                       # a crash inside taking the lock, long ago
        p.write_text("{}")
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    left += old_lock_parts
    semsegloop.Project.open(path, read_only=True).close()
    assert all(p.exists() for p in left), "read-only opening removes nothing"
    semsegloop.Project.open(path).close()
    assert not any(p.exists() for p in left)
    assert keep.exists()


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_follow_the_umask(tmp_path, tiny_models, umask):

    old = os.umask(umask)
    try:
        proj, image_id, _ = make_square_project(tmp_path / "p")
        proj.train(steps=1, device="cpu")
        proj.predict(image_id)
        proj.close()
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "p").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"project.json", "square.nrrd", "round_001.safetensors",
                                        "round_001.json", "train_log.jsonl"}
    modes = {p.name: p.stat().st_mode & 0o777 for p in files}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_labels_on_disk_count_even_when_project_json_was_not_saved_after_them(small_project,
                                                                              monkeypatch):
    path, image_id = small_project
    proj = semsegloop.Project.open(path)
    img, _ = square_image(32, seed=1)
    second = proj.add_image(img, name="second")
    strokes = square_strokes(32)
    # The labels file lands, then the process dies before project.json is written.
    monkeypatch.setattr(proj, "save", lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        proj.set_labels(second, strokes)
    monkeypatch.undo()
    proj.close()
    stored = json.loads((path / "project.json").read_text())
    assert not [im for im in stored["images"] if im["id"] == second][0].get("labeled_pixels")

    for read_only in (True, False):
        again = semsegloop.Project.open(path, read_only=read_only)
        assert sorted(again.labeled_image_ids()) == sorted([image_id, second])
        assert again.image_info(second)["labeled_pixels"] == {
            str(k): int((strokes == k).sum()) for k in (1, 2)}
        again.close()
    # The writer stored the counts, so the next open need not read the file again.
    stored = json.loads((path / "project.json").read_text())
    assert [im for im in stored["images"] if im["id"] == second][0]["labeled_pixels"]
