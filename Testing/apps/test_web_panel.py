"""The web panel's decisions without a browser: the job state machine fed by service events,
progress/ETA text, class edits, tables, and the host/token rules."""

from __future__ import annotations

import numpy as np
import pytest

from semsegloop.apps.web import panel
from semsegloop.project import Project


def test_train_progress_done_then_predict():
    m = panel.PanelModel()
    with pytest.raises(panel.WebInputError, match="no trained model"):
        m.start_predict("current")
    assert m.start_train("20") == {"time_budget_s": 20.0}
    assert m.view()["train_label"] == "Stop"
    with pytest.raises(panel.WebInputError, match="still running"):
        m.start_train(5)
    m.on_event({"event": "progress", "step": 3, "loss": 0.9, "elapsed_s": 5.0, "eta_s": 15.0,
                "phase": "train"})
    m.on_event({"event": "progress", "step": 4, "loss": 0.7, "elapsed_s": 10.0, "eta_s": 10.0,
                "phase": "train"})
    v = m.view()
    assert v["progress"] == 50.0 and v["loss_values"] == [0.9, 0.7]
    assert "step 4" in v["status"] and "ETA 0:10" in v["status"]
    assert m.on_event({"event": "done", "round": 1}) == "train_done"
    assert m.round == 1 and not m.busy and m.view()["train_label"] == "Train"
    m.start_predict("current")
    assert m.on_event({"event": "done", "round": 1, "outputs": {"a": "x"}}) == "predict_done"


def test_bad_budget_and_stop_when_idle_are_refused():
    m = panel.PanelModel()
    for bad in ("ten", -1, 0, float("nan")):
        with pytest.raises(panel.WebInputError, match="Time budget"):
            m.start_train(bad)
    for bad in ("x", 2.5, -3):
        with pytest.raises(panel.WebInputError, match="Steps"):
            m.start_train(10, steps=bad)
    assert panel.PanelModel().start_train(10, steps="40") == {"steps": 40}
    assert panel.PanelModel().start_train(10, steps=0) == {"time_budget_s": 10.0}
    assert not m.busy
    with pytest.raises(panel.WebInputError, match="nothing is running"):
        m.stopping()


def test_cancel_error_and_crash_end_the_job_with_a_message():
    m = panel.PanelModel()
    m.start_train(10)
    assert m.on_event({"event": "cancelled"}) is None
    assert not m.busy and "last finished step is kept" in m.status
    m.start_train(10)
    assert m.on_event({"event": "error", "message": "only class 'a' is painted"}) is None
    assert m.error == "only class 'a' is painted" and not m.busy
    m.start_train(10)
    m.on_event({"event": "crashed", "message": "killed by signal SIGKILL"})
    assert not m.busy and "SIGKILL" in m.error
    m.on_event({"event": "crashed"})
    assert "next request starts a new one" in m.error


def test_class_edits_keep_order_and_refuse_clashes():
    classes = [{"name": "cell", "color": [1, 2, 3]}, {"name": "bg", "color": [4, 5, 6]}]
    assert panel.rename_class(classes, 2, " background ")[1]["name"] == "background"
    with pytest.raises(panel.WebInputError, match="exists already"):
        panel.rename_class(classes, 1, "bg")
    with pytest.raises(panel.WebInputError, match="no class 3"):
        panel.rename_class(classes, 3, "x")
    assert panel.recolor_class(classes, 1, "#ff8000")[0]["color"] == [255, 128, 0]
    with pytest.raises(panel.WebInputError, match="#rrggbb"):
        panel.recolor_class(classes, 1, "orange")
    added = panel.add_class(classes, "nucleus")
    assert [c["name"] for c in added] == ["cell", "bg", "nucleus"] and len(added[2]["color"]) == 3
    assert panel.classes_for_page(classes)[0] == {"value": 1, "name": "cell", "color": "#010203"}


def test_images_rows_follow_the_suggest_ranking(tmp_path):
    p = Project.create(tmp_path / "p", ["a", "b"], dims=2)
    for n in ("one", "two", "three"):
        p.add_image(np.zeros((8, 8), np.uint8), name=n)
    lab = np.zeros((1, 8, 8), np.uint8)
    lab[0, :2] = 1
    p.set_labels("two", lab)
    p.close()
    rows = panel.images_for_page(p)
    assert [r["id"] for r in rows] == ["one", "two", "three"] and rows[1]["painted"] == 16
    ranked = panel.images_for_page(p, [{"image_id": "three"}, {"image_id": "one"}])
    assert [(r["id"], r["rank"]) for r in ranked] == [("three", 1), ("one", 2), ("two", None)]


def test_fractions_csv_becomes_table_and_download_text(tmp_path):
    f = tmp_path / "class_fractions.csv"
    f.write_text("image,class,pixels,fraction,area_or_volume,unit\nt,a,10,0.25,2.5,mm2\n")
    rows, text = panel.read_fractions(f)
    assert rows[0]["class"] == "a" and rows[0]["fraction"] == "0.2500" and text.startswith("image,")
    with pytest.raises(panel.WebInputError, match="was not written"):
        panel.read_fractions(tmp_path / "missing.csv")


def test_host_rules_and_page_url():
    assert panel.is_loopback("127.0.0.1") and panel.is_loopback("::1") and panel.is_loopback("localhost")
    assert not panel.is_loopback("0.0.0.0") and not panel.is_loopback("192.0.2.7")
    assert panel.page_url("127.0.0.1", 8080, "T") == "http://127.0.0.1:8080/index.html?secret=T"
    assert panel.mask_range(200, 10) == (10.0, 200.0)
    assert "Nothing copied" in panel.copied_message({1: 0, 2: 0}, ["a", "b"])
    assert panel.copied_message({1: 5, 2: 0}, ["a", "b"]) == "Copied 5 predicted pixels into the labels (a 5)."


def test_suggest_message_names_the_image_and_slice(tmp_path):
    with Project.create(tmp_path / "p", ["a", "b"], dims=2) as p:
        p.add_image(np.zeros((8, 8), np.uint8), name="left tile")
    p = Project.open(tmp_path / "p", read_only=True)
    msg = panel.suggest_message([{"image_id": "left_tile", "slice": 0, "score": 0.41}], p)
    assert msg.startswith("Paint next: left tile (uncertainty 0.41)")
    assert "slice 3" in panel.suggest_message([{"image_id": "left_tile", "slice": 3, "score": 0.2}], p)
    assert "every image is painted" in panel.suggest_message([], p)
    rows = panel.images_for_page(p, [{"image_id": "left_tile", "slice": 2}, {"image_id": "left_tile", "slice": 5}])
    assert rows[0]["rank"] == 1


def test_open_or_create_reads_the_page_fields(tmp_path):
    img = tmp_path / "cells.png"
    from PIL import Image
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(img)
    with pytest.raises(panel.WebInputError, match="type a project folder"):
        panel.new_project_request(" ", img, "a,b", "2")
    with pytest.raises(panel.WebInputError, match="type the image file or folder"):
        panel.new_project_request(tmp_path / "new", "", "a,b", "2")
    with pytest.raises(panel.WebInputError, match="does not exist"):
        panel.new_project_request(tmp_path / "new", tmp_path / "missing.tif", "a,b", "2")
    with pytest.raises(panel.WebInputError, match="at least two classes"):
        panel.new_project_request(tmp_path / "new", img, "cell, ", "2")
    with pytest.raises(panel.WebInputError, match="2D or 3D"):
        panel.new_project_request(tmp_path / "new", img, "a,b", "4")
    with pytest.raises(panel.WebInputError, match="is not a SemSegLoop project"):
        panel.new_project_request(tmp_path, img, "a,b", "2")       # holds cells.png
    target, source, names, dims = panel.new_project_request(f" {tmp_path / 'new'} ", img, "cell, background", "3")
    assert (target, source, names, dims) == (tmp_path / "new", img, ["cell", "background"], 3)
    with Project.create(tmp_path / "p", ["a", "b"], dims=2):
        pass
    assert panel.new_project_request(tmp_path / "p", "", "", "") == (tmp_path / "p", None, [], 0)
