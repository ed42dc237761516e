"""Refine, suggest and post-processing through a real `semsegloop serve` process: strokes pass
as a file in the inbox, the refined map comes back as a file, errors are the engine's."""

from __future__ import annotations

import numpy as np
import pytest

import semsegloop
from helpers_engine import make_square_project, tiny_models  # noqa: F401
from semsegloop.data import imageio
from semsegloop.service.client import ServiceClient


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_models):
    proj, image_id, ref = make_square_project(tmp_path_factory.mktemp("serve") / "proj")
    proj.add_image(np.full((64, 64), 0.5, np.float32), name="grey")
    proj.close()
    client = ServiceClient(proj.path, device="cpu")
    yield client, proj.path, image_id, ref
    client.close(timeout=10)


def test_refine_suggest_and_postprocessing_ops(served):
    client, path, image_id, ref = served
    strokes = np.zeros(ref.shape, np.uint8)
    strokes[0, 30:33, 30:33] = 1
    rel = "incoming/click/strokes.nrrd"
    imageio.write_labels(path / rel, strokes, imageio.Geometry.identity())
    early = client.wait(client.request("refine", image_id=image_id, strokes=rel), timeout=60)
    assert early.state == "error" and "no prediction of round 0" in early.result["message"]
    assert client.wait(client.train(steps=20, device="cpu"), timeout=180).state == "done"

    pp = client.wait(client.request("set_postprocessing",
                                    settings={"square": {"fill_holes": True}}), timeout=30)
    assert pp.state == "done" and pp.result["postprocessing"] == {"1": {"fill_holes": True}}
    assert client.wait(client.predict(), timeout=120).state == "done"

    job = client.wait(client.request("refine", image_id=image_id, strokes=rel), timeout=60)
    assert job.state == "done", job.final
    refined, _ = imageio.read_labels(client.output_path(job.result["output"]))
    assert (refined[strokes > 0] == 1).all() and isinstance(job.result["changed"], int)
    assert not (path / rel).exists()               # the inbox file was consumed
    proj = semsegloop.Project.open(path, read_only=True)
    assert (proj.labels(image_id).reshape(strokes.shape)[strokes > 0] == 1).all()      # joins the next round's labels
    assert proj.postprocessing == {"1": {"fill_holes": True}}

    sug = client.wait(client.request("suggest", n=1), timeout=60)
    assert sug.state == "done" and sug.result["suggestions"][0]["image_id"] == "grey"
    bad = client.wait(client.request("set_postprocessing", settings={"cell": {}}), timeout=30)
    assert bad.state == "error" and "'cell' is neither a class name" in bad.result["message"]


def test_client_refine_writes_the_strokes_into_the_inbox(served):
    client, path, image_id, ref = served
    strokes = np.zeros(ref.shape, np.uint8)
    strokes[0, 2:4, 2:4] = 2
    job = client.wait(client.refine(image_id, strokes), timeout=120)
    assert job.request["strokes"] == f"incoming/{job.id}/{image_id}.nrrd"
    if job.state == "error":        # run alone, before any prediction: the engine's message
        assert "no prediction" in job.result["message"]
    else:
        refined, _ = imageio.read_labels(client.output_path(job.result["output"]))
        assert (refined[strokes > 0] == 2).all()
