"""A kill -9 at every write point of the loop leaves a consistent project: a real process paints,
adds an image, trains and predicts and is killed (SIGKILL, no clean-up) at the N-th step of a
save, for every N; the next open and the next round find every stroke written before the kill."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import semsegloop
from semsegloop.data.atomic import is_temporary
from helpers_engine import square_image, square_strokes, tiny_models  # noqa: F401

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork (POSIX)")

LAB_A1 = square_strokes(64)
LAB_A2 = LAB_A1.copy()
LAB_A2[30:34, 2:60] = 2                              # a new stroke on image a
IMG_B = square_image(64, seed=5, lo=10, hi=40)[0]
LAB_B = square_strokes(64, lo=10, hi=40)

# One process imports the engine (and torch) once and forks a fresh child per kill point, so
# each run costs no import time; the child is an ordinary process killed by SIGKILL.
ZYGOTE = """
    import json, os, sys
    import numpy as np
    import semsegloop, torch  # noqa: F401
    import semsegloop.learn.round, semsegloop.learn.checkpoint, semsegloop.predict.sliding_window
    import safetensors.torch, monai.inferers  # noqa: F401
    from semsegloop.data import atomic
    from semsegloop.learn.networks import build_network, load_preset, plan_network

    # Warm torch up once here, on one thread (SEMSEGLOOP_THREADS=1: no OpenMP pool exists to
    # be lost in a fork), so each forked child trains without the first-use cost.
    torch.set_num_threads(1)
    net = build_network(plan_network(load_preset("tiny2d"), 1, 2))
    net(torch.zeros(1, 1, 48, 48)).sum().backward()
    del net

    def scenario(path, done):
        def mark(what):
            with open(done, "a") as f:
                f.write(what + "\\n"); f.flush(); os.fsync(f.fileno())
        d = np.load(os.path.join(os.path.dirname(path), "arrays.npz"))
        proj = semsegloop.Project.open(path)
        proj.set_labels("a", d["lab_a2"]); mark("labels a")
        proj.add_image(d["img_b"], name="b"); mark("image b")
        proj.set_labels("b", d["lab_b"]); mark("labels b")
        proj.train(steps=1, device="cpu", pseudo_labels=False); mark("round")
        proj.predict("a"); mark("prediction a")

    for line in sys.stdin:
        k, path, done, trace = line.rstrip("\\n").split("\\t")
        pid = atomic.fork_with_kill_point(lambda: scenario(path, done), k, trace)
        print(json.dumps(atomic.child_status(pid)), flush=True)
"""


@pytest.fixture(scope="module")
def zygote():
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(ZYGOTE)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "SEMSEGLOOP_THREADS": "1"})
    yield p
    p.stdin.close()
    p.wait(timeout=60)


def _run(zygote, k: int, path, done, trace) -> dict:
    zygote.stdin.write(f"{k}\t{path}\t{done}\t{trace}\n")
    zygote.stdin.flush()
    line = zygote.stdout.readline()
    assert line, "the zygote process died"
    return json.loads(line)


def _counts(lab: np.ndarray) -> dict[str, int]:
    return {str(k): int((lab == k).sum()) for k in (1, 2) if (lab == k).any()}


@pytest.mark.slow
def test_a_kill_at_any_write_point_loses_no_stroke(tmp_path, tiny_models, zygote):
    template = tmp_path / "template"
    proj = semsegloop.Project.create(template, ["square", "background"], preset="tiny2d")
    proj.add_image(square_image(64)[0], name="a")
    proj.set_labels("a", LAB_A1)
    proj.close()
    np.savez(tmp_path / "arrays.npz", lab_a2=LAB_A2, img_b=IMG_B, lab_b=LAB_B)

    # A run without a kill lists the write points of the whole scenario.
    shutil.copytree(template, tmp_path / "full")
    trace = tmp_path / "points.txt"
    assert _run(zygote, 0, tmp_path / "full", tmp_path / "full_done.txt", trace) == \
        {"signal": None, "code": 0}
    points = trace.read_text().splitlines()
    names = " ".join(points)
    for expected in ("renamed to a.nrrd", "renamed to project.json", "renamed to b.nrrd",
                     "round_001.tmp", "renamed to a_uncertainty.nrrd"):
        assert expected in names, f"no write point '{expected}' in {points}"
    assert len(points) >= 20

    for k in range(1, len(points) + 1):
        work = tmp_path / f"kill_{k:02d}"
        path, done_file = work / "p", work / "done.txt"
        shutil.copytree(template, path)
        shutil.copy(tmp_path / "arrays.npz", work / "arrays.npz")
        status = _run(zygote, k, path, done_file, work / "trace.txt")
        assert status["signal"] == signal.SIGKILL, (k, points[k - 1], status)
        done = set(done_file.read_text().split("\n")) if done_file.exists() else set()
        where = f"killed at point {points[k - 1]!r} after {sorted(done - {''})}"

        again = semsegloop.Project.open(path)           # takes over the dead process's lock
        left = [p for p in path.rglob("*") if is_temporary(p.name)]
        assert not left, f"{where}: temporaries left: {left}"
        lab_a = again.labels("a").reshape(LAB_A1.shape)
        assert any(np.array_equal(lab_a, v) for v in (LAB_A1, LAB_A2)), where
        if "labels a" in done:
            np.testing.assert_array_equal(lab_a, LAB_A2, err_msg=where)
        assert ("b" in again.image_ids) or ("image b" not in done), where
        if "b" in again.image_ids:
            np.testing.assert_array_equal(again.image("b").array[0, :, :, 0], IMG_B,
                                          err_msg=where)
            lab_b = again.labels("b").reshape(LAB_B.shape)
            assert lab_b.any() or "labels b" not in done, where
            assert not lab_b.any() or np.array_equal(lab_b, LAB_B), where
        if "round" in done:
            assert again.round == 1, where
        for r in again.rounds:                           # every recorded model loads
            again.load_model(r["round"], device="cpu")

        # The next round trains on every stroke on disk: the counts come from the files. (A
        # round is trained where a labels or image file has landed but project.json not yet,
        # the moment the issue found strokes ignored, and at the last point; elsewhere the
        # inputs a round reads are checked, to keep the test fast.)
        on_disk = {i: again.labels(i) for i in again.image_ids}
        painted = sorted(i for i, lab in on_disk.items() if lab.any())
        assert sorted(again.labeled_image_ids()) == painted, where
        assert all(again.image_info(i).get("labeled_pixels", {}) == _counts(on_disk[i])
                   for i in again.image_ids), where
        if not (points[k - 1].endswith("renamed to a.nrrd") and "round" not in done
                or points[k - 1].endswith("renamed to b.nrrd") or k == len(points)):
            again.close()
            shutil.rmtree(work)
            continue
        res = again.train(steps=1, device="cpu", pseudo_labels=False)
        entry = again.rounds[-1]
        assert entry["round"] == res.round and sorted(entry["images"]) == painted, where
        total = {str(c): sum(int((lab == c).sum()) for lab in on_disk.values()) for c in (1, 2)}
        assert entry["labeled_pixels"] == total, where
        again.close()
        shutil.rmtree(work)
