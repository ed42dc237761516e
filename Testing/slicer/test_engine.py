"""The panel's engine session with the real service (subprocess transport, tiny UNet): which
Python runs it, the bootstrap that loads the module's own engine, one followed job at a time, a
job over only once its final event is read, follow-ups, Stop, and a closed scene."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers_engine import make_square_project, square_strokes, tiny_models  # noqa: F401
from semsegloop.errors import LabelError, TrainingError
from semsegloop.service.client import ServiceError
from semsegloop.slicer import engine

LOGIC = Path(__file__).resolve().parents[2] / "SemSegLoop" / "Logic"


def _exe(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return str(path)


def test_the_engine_runs_in_pythonslicer_found_the_way_slicer_sets_it_up(tmp_path):
    inside = _exe(tmp_path / "Slicer" / "bin" / "PythonSlicer")
    # Inside Slicer sys.executable is PythonSlicer already.
    assert engine.engine_python(inside, None, "posix", lambda n: None) == inside
    # Else PATH, else slicerHome/bin (on macOS slicerHome is Slicer.app/Contents).
    assert engine.engine_python("/x/Slicer", None, "posix", lambda n: "/path/PythonSlicer") == "/path/PythonSlicer"
    mac = _exe(tmp_path / "Slicer.app" / "Contents" / "bin" / "PythonSlicer")
    assert engine.engine_python("/x/Slicer", str(tmp_path / "Slicer.app" / "Contents"), "posix",
                                lambda n: None) == mac
    win = _exe(tmp_path / "win" / "bin" / "PythonSlicer.exe")
    assert engine.engine_python("C:/x/SlicerApp-real.exe", str(tmp_path / "win"), "nt", lambda n: None) == win
    # Outside Slicer a plain interpreter serves (tests, pip installs).
    assert engine.engine_python(sys.executable, None, "posix", lambda n: None) == sys.executable
    with pytest.raises(ServiceError, match="PythonSlicer was not found"):
        engine.engine_python(str(tmp_path / "Slicer"), str(tmp_path / "nowhere"), "posix", lambda n: None)


@pytest.fixture
def painted(tmp_path, tiny_models):
    proj, image_id, _ = make_square_project(tmp_path / "proj")
    proj.close()
    return proj.path, image_id


@pytest.fixture
def sessions():
    made = []

    def make(**kw):
        s = engine.EngineSession(python=sys.executable, engine_dir=LOGIC, device="cpu", **kw)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def test_a_job_is_over_only_once_its_final_event_is_read_and_its_follow_up_may_start_the_next(painted, sessions):
    path, image_id = painted
    s = sessions()
    client = s.open(path)
    assert client.argv[1] == "-c" and client.argv[3] == str(LOGIC)   # the module's own engine
    progress, seen = [], []
    s.listeners.append(lambda job, outcome: seen.append((job.op, job.state, s.busy_job())))

    def after_training(job):
        assert s.busy_job() is None        # over before the follow-up runs
        s.run("predict", lambda c: c.predict([image_id]),
              on_finished=lambda j: engine.read_predictions(client, j))
        return engine.train_result(job)

    s.run("train", lambda c: c.train(labels={image_id: square_strokes()[None]}, steps=3, device="cpu"),
          on_finished=after_training, on_progress=progress.append)
    assert s.busy_job() == "train"
    with pytest.raises(TrainingError, match="already running a train job"):
        s.run("export", lambda c: c.request("export", out_dir=str(path / "out")))
    first = s.followed
    client.wait(first.job, timeout=120)
    assert first.over and first.outcome.steps == 3 and first.outcome.round == 1
    assert s.busy_job() == "predict"       # started by the follow-up
    assert [p.step for p in progress if p.phase == "train"] == [1, 2, 3]
    assert all(math.isfinite(p.loss) for p in progress if p.phase == "train")
    predicted = s.wait(timeout=120)
    labels, uncertainty = predicted[image_id]
    assert labels.shape == (1, 64, 64) and uncertainty is None
    # Listeners hear of a job after its follow-up (here: the prediction it started).
    assert seen == [("train", "done", "predict"), ("predict", "done", None)]
    assert client.starts == 1


def test_a_bad_request_raises_the_engines_own_error_and_quick_edits_answer(painted, sessions):
    path, image_id = painted
    s = sessions()
    s.open(path)
    s.run("train", lambda c: c.train(labels={image_id: np.zeros((1, 64, 64), np.uint8)}, steps=1))
    with pytest.raises(LabelError, match="no labels painted"):
        s.wait(timeout=120)
    assert s.busy_job() is None
    result = s.quick("set_classes", classes=[{"name": "blob", "color": [1, 2, 3]},
                                             {"name": "background", "color": [4, 5, 6]}])
    assert [c["name"] for c in result["classes"]] == ["blob", "background"]


def test_a_closed_scene_stops_the_job_and_drops_its_follow_up(painted, sessions):
    path, image_id = painted
    s = sessions()
    s.open(path)
    followed = []
    f = s.run("train", lambda c: c.train(time_budget_s=60, device="cpu"),
              on_finished=lambda job: followed.append(job) or "imported")
    client = s.client
    while not (f.job.progress and f.job.progress.get("phase") == "train"):
        client.poll(0.05)
        assert not f.job.finished, f.job.final
    s.scene_closed()
    client.wait(f.job, timeout=10)
    assert f.job.state == "cancelled" and f.over
    assert followed == [] and f.outcome is None     # nothing imported into the new scene
