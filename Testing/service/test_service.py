"""The engine service as the panel uses it: a real `semsegloop serve` process started with
subprocess, a real tiny UNet. Paint, train from a snapshot, predict, Stop ends the round, a
service that ignores Stop is killed and restarted, a crash is reported, the project stays whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import semsegloop
from helpers_engine import make_square_project, square_image, square_strokes, tiny_models  # noqa: F401
from semsegloop.data import imageio
from semsegloop.service.client import ServiceClient, ServiceError, service_command

posix_only = pytest.mark.skipif(os.name != "posix", reason="uses POSIX signals")


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_models):
    """One warm engine on a painted 2D project, shared by the tests that need training."""
    proj, image_id, ref = make_square_project(tmp_path_factory.mktemp("engine") / "proj")
    proj.close()                              # the service is the project's one writer
    # A long Stop grace: these tests check that cancel reaches the job, not the kill backstop
    # (another test), whatever the machine's load; bench/bench_service.py measures latency.
    client = ServiceClient(proj.path, device="cpu", stop_grace_s=30.0)
    yield client, proj.path, image_id, ref
    client.close(timeout=10)


@pytest.fixture
def clients():
    made = []

    def make(path, **kw):
        c = ServiceClient(path, device="cpu", **kw)
        made.append(c)
        return c
    yield make
    for c in made:
        c.close(timeout=10)


def _until(client, job, predicate, what: str, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client.poll(0.05)
        assert not job.finished, job.final
        if predicate(job):
            return
    pytest.fail(f"no {what} within {timeout:.0f} s")


def _training(client, job):
    _until(client, job, lambda j: j.progress and j.progress.get("phase") == "train", "training step")


def test_every_line_gets_an_answer_and_stdout_holds_only_events(tmp_path, tiny_models):
    proj = make_square_project(tmp_path / "proj")[0]
    proj.close()
    path = proj.path
    lines = ['{"id": 1, "op": "ping"}', "this is not json", '{"id": 2, "op": "fly"}',
             '{"id": 3, "op": "cancel"}', '{"id": 4, "op": "train", "steps": "many"}',
             '{"id": 5, "op": "ping"}']
    proc = subprocess.run([sys.executable, "-m", "semsegloop", "serve", str(path)],
                          input="\n".join(lines) + "\n", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr     # EOF ends it cleanly
    events = [json.loads(line) for line in proc.stdout.splitlines()]   # nothing but JSON
    ready = events[0]
    assert ready["event"] == "ready" and ready["protocol"] == 1
    assert ready["version"] == semsegloop.__version__ and ready["device"] == "cpu"
    finals = {e["id"]: e for e in events if e["event"] in ("done", "error", "cancelled")}
    assert finals[1]["event"] == "done" and finals[5]["event"] == "done"   # still serving
    assert "not JSON" in finals[None]["message"] and finals[None]["user_error"] is True
    assert "unknown op 'fly'" in finals[2]["message"]
    assert "lacks the field 'target'" in finals[3]["message"]
    assert "'steps' must be an integer" in finals[4]["message"]
    assert all(finals[i]["user_error"] for i in (2, 3, 4))
    assert "serving project" in proc.stderr      # logs go to stderr


def test_train_from_a_snapshot_then_predict_export_and_measure_on_one_warm_engine(engine, tmp_path):
    client, path, image_id, ref = engine
    snapshot = square_strokes()[None].copy()
    snapshot[0, 30:34, 2:6] = 2              # a stroke painted just before Train
    job = client.train(labels={image_id: snapshot}, steps=4, device="cpu")
    assert job.request["labels"] == {image_id: f"incoming/{job.id}/{image_id}.nrrd"}
    client.wait(job, timeout=120)
    assert job.state == "done", job.final
    steps = [e for e in job.events if e["event"] == "progress" and e["phase"] == "train"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert {"loss", "elapsed_s", "eta_s", "phase"} <= set(steps[-1])
    assert job.result["round"] == 1 and job.result["checkpoint"] == "checkpoints/round_001"
    proj = semsegloop.Project.open(path, read_only=True)   # the client only reads
    np.testing.assert_array_equal(proj.labels(image_id).reshape(snapshot.shape), snapshot)  # stored
    assert not any((path / "incoming").rglob("*.nrrd"))            # the inbox was consumed

    pred = client.wait(client.predict(uncertainty=True), timeout=120)
    assert pred.state == "done", pred.final
    labels, _ = imageio.read_labels(client.output_path(pred.result["outputs"][image_id]))
    assert labels.shape == (1, 64, 64) and set(np.unique(labels)) <= {1, 2}
    np.testing.assert_array_equal(labels[snapshot > 0], snapshot[snapshot > 0])  # strokes win
    assert client.output_path(pred.result["uncertainty"][image_id]).is_file()

    frac = client.wait(client.request("fractions"), timeout=60)
    assert frac.state == "done" and {r["class"] for r in frac.result["rows"]} >= {"square"}
    exp = client.wait(client.request("export", out_dir=str(tmp_path / "out")), timeout=60)
    assert [os.path.basename(p) for p in exp.result["outputs"]] == [f"{image_id}.nrrd"]
    ev = client.wait(client.evaluate({image_id: ref}), timeout=60)
    assert ev.state == "done", ev.final
    assert set(ev.result["report"]["mean_dice"]) == {"square", "background"}

    # A bad request fails as its own job, with the engine's error class, and the engine goes on.
    bad = client.wait(client.request("predict", image_ids=["nope"]), timeout=60)
    assert bad.state == "error" and bad.result["user_error"] is True
    with pytest.raises(semsegloop.ProjectError, match="no image 'nope'"):
        raise bad.error()
    nolabels = client.wait(client.request("train", labels={image_id: "incoming/missing.nrrd"}), 60)
    assert nolabels.state == "error" and "incoming/missing.nrrd" in nolabels.result["message"]
    assert client.wait(client.request("ping"), timeout=30).state == "done"
    assert client.starts == 1   # one process served every job


def test_stop_ends_training_within_a_step_and_keeps_the_model_while_the_engine_stays(engine):
    client, path, image_id, _ = engine
    before = semsegloop.Project.open(path, read_only=True).round
    job = client.train(time_budget_s=60, device="cpu")
    _training(client, job)
    # While training: a second job is refused, an image can still be added (finding 1).
    second = client.wait(client.request("train", steps=1), timeout=30)
    assert second.state == "error" and "running 'train'" in second.result["message"]
    img, _ = square_image(64, seed=3)
    added = client.wait(client.add_image(imageio.as_image_data(img, name="later")), timeout=30)
    assert added.state == "done" and added.result["image_id"] == "later"
    assert not job.finished                   # added while the round was still training
    steps_at_stop = job.progress["step"]
    client.stop(job)
    client.wait(job, timeout=30)
    assert job.state == "cancelled" and not job.result.get("killed"), job.final
    assert job.result["steps"] >= steps_at_stop and job.result["round"] == before + 1
    proj = semsegloop.Project.open(path, read_only=True)
    assert proj.round == before + 1 and proj.load_model(device="cpu")[0] == before + 1
    assert "later" in proj.image_ids
    ping = client.wait(client.request("ping"), 30)
    assert ping.state == "done" and ping.result["busy"] is None


@posix_only
def test_a_frozen_engine_is_killed_2_s_after_stop_a_crash_is_reported_and_the_next_request_starts_anew(
        tmp_path, tiny_models, clients):
    proj, image_id, _ = make_square_project(tmp_path / "proj")
    proj.train(steps=1, device="cpu")                     # the last good model
    proj.close()
    client = clients(proj.path)
    job = client.train(time_budget_s=60, device="cpu")
    _until(client, job, lambda j: j.accepted, "accepted event")
    pid = client.ready["pid"]
    os.kill(pid, signal.SIGSTOP)              # frozen: it cannot read the cancel
    t0 = time.monotonic()
    client.stop(job)
    client.wait(job, timeout=10)
    assert job.state == "cancelled" and job.result["killed"] is True
    assert 1.9 <= time.monotonic() - t0 < 10.0   # the 2-s grace, then the kill
    assert not _alive(pid)

    job = client.train(time_budget_s=60, device="cpu")   # a new engine takes the request
    _until(client, job, lambda j: j.accepted, "accepted event")
    assert client.starts == 2 and client.ready["pid"] != pid
    os.kill(client.ready["pid"], signal.SIGKILL)   # as an out-of-memory kill would
    client.wait(job, timeout=30)
    assert job.state == "error" and job.result["crashed"] is True
    assert job.result["user_error"] is False
    assert "ended unexpectedly (killed by signal SIGKILL)" in job.result["message"]
    assert "labels and the project are intact" in job.result["message"]
    with semsegloop.Project.open(proj.path) as again:   # the dead engine's lock is taken over
        assert again.round == 1 and again.load_model(device="cpu")[0] == 1
        np.testing.assert_array_equal(again.labels(image_id).reshape(64, 64), square_strokes())
    ping = client.wait(client.request("ping"), timeout=120)
    assert ping.state == "done" and client.starts == 3


def test_a_second_service_on_the_same_project_gets_a_clear_error_naming_the_holder(engine, clients):
    first, path, _, _ = engine
    holder = first.wait_ready(timeout=120)["pid"]
    second = clients(path)
    with pytest.raises(ServiceError, match=f"process {holder} on host") as e:
        second.wait_ready(timeout=60)
    assert str(path) in str(e.value)
    assert first.wait(first.request("ping"), timeout=30).state == "done"   # the first goes on


def test_a_folder_that_is_no_project_is_named_before_torch_loads(tmp_path, clients):
    client = clients(tmp_path)
    with pytest.raises(ServiceError, match="is not a SemSegLoop project"):
        client.wait_ready(timeout=60)
    job = client.request("ping")              # the next request tries again, and says why
    client.wait(job, timeout=60)
    assert job.state == "error" and job.result["user_error"] is True
    assert str(tmp_path) in job.result["message"]
    assert isinstance(job.error(), semsegloop.ProjectError)


def test_service_command_runs_the_engine_with_the_given_python(tmp_path):
    argv = service_command(tmp_path, python="/opt/Slicer/bin/PythonSlicer", device="cuda")
    assert argv[:5] == ["/opt/Slicer/bin/PythonSlicer", "-m", "semsegloop", "serve", str(tmp_path)]
    assert "--new-process-group" in argv and argv[argv.index("--device") + 1] == "cuda"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
