"""Bad input gives a clear error that names what is wrong, and nothing already in the project is
lost: unreadable files, mismatched or invalid labels, NaN pixels, damaged checkpoints and
project files, a cancel in the middle of a step, and a disk that fills up while saving."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest

import semsegloop
import semsegloop.data.atomic
from helpers_engine import make_square_project, square_image, tiny_models  # noqa: F401
from semsegloop import (CheckpointError, ImageReadError, LabelError, ProjectError,
                        SemSegLoopError)
from semsegloop.data.imageio import Geometry


@pytest.fixture
def project(tmp_path):
    proj = semsegloop.Project.create(tmp_path / "p", ["tumour", "healthy", "air"], dims=2)
    image_id = proj.add_image(square_image(48)[0], name="slice")
    return proj, image_id


def _files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------ files

def test_garbage_png_is_an_image_read_error_naming_the_file(project, tmp_path):
    proj, _ = project
    bad = tmp_path / "scan_0001.png"
    bad.write_bytes(b"\x89PNG but then nothing sensible" * 3)
    with pytest.raises(ImageReadError, match="scan_0001.png"):
        proj.add_image(bad)
    assert len(semsegloop.Project.open(proj.path, read_only=True).image_ids) == 1


def test_unsupported_extension_is_an_image_read_error_naming_it(project, tmp_path):
    proj, _ = project
    bad = tmp_path / "points.xyz"
    bad.write_text("1 2 3\n4 5 6\n")
    with pytest.raises(ImageReadError, match=r"points\.xyz") as info:
        proj.add_image(bad)
    assert ".xyz" in str(info.value) and "supported" in str(info.value)


def test_missing_file_is_an_image_read_error_naming_it(project, tmp_path):
    proj, _ = project
    with pytest.raises(ImageReadError, match="gone.tif"):
        proj.add_image(tmp_path / "gone.tif")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_pixels_are_refused_naming_the_image(project, bad_value):
    proj, _ = project
    img = square_image(48)[0]
    img[10, 20] = bad_value
    with pytest.raises(ImageReadError, match="mri_slice") as info:
        proj.add_image(img, name="mri_slice")
    assert "NaN/Inf" in str(info.value) and "(0, 10, 20" in str(info.value)
    assert len(proj.image_ids) == 1
    assert len(semsegloop.Project.open(proj.path, read_only=True).image_ids) == 1


# ------------------------------------------------------------------------------ labels

def test_labels_of_the_wrong_shape_are_refused_naming_the_image(project):
    proj, image_id = project
    with pytest.raises(LabelError, match=image_id) as info:
        proj.set_labels(image_id, np.zeros((48, 40), np.uint8))
    assert "(1, 48, 40)" in str(info.value) and "(1, 48, 48)" in str(info.value)
    assert not (proj.path / "labels" / f"{image_id}.nrrd").exists()


def test_labels_on_another_grid_are_refused(project):
    proj, image_id = project
    other = Geometry((1.0, 0.5, 0.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(LabelError, match="different grid"):
        proj.set_labels(image_id, np.zeros((48, 48), np.uint8), geometry=other)


def test_label_value_above_the_number_of_classes_is_refused(project):
    proj, image_id = project
    lab = np.zeros((48, 48), np.uint8)
    lab[3, 3] = 1
    lab[4, 4] = 4                      # three classes: 4 does not exist
    with pytest.raises(LabelError, match="value 4") as info:
        proj.set_labels(image_id, lab)
    assert image_id in str(info.value) and "tumour" in str(info.value)
    assert not proj.labels(image_id).any()


def test_float_labels_are_refused(project):
    proj, image_id = project
    with pytest.raises(LabelError, match="integers"):
        proj.set_labels(image_id, np.zeros((48, 48), np.float32))


def test_only_one_class_painted_says_paint_at_least_two(project):
    proj, image_id = project
    lab = np.zeros((48, 48), np.uint8)
    lab[10:20, 10:20] = 2
    proj.set_labels(image_id, lab)
    with pytest.raises(LabelError, match="at least two") as info:
        proj.train(steps=1, device="cpu")
    assert "healthy" in str(info.value)
    assert proj.round == 0 and proj.rounds == []


def test_no_labels_at_all_says_paint_first(project):
    proj, image_id = project
    with pytest.raises(LabelError, match="no labels"):
        proj.train(steps=1, device="cpu")
    proj.set_labels(image_id, np.zeros((48, 48), np.uint8))   # an all-zero map is still nothing
    with pytest.raises(LabelError, match="no labels"):
        proj.train(steps=1, device="cpu")
    assert not (proj.path / "checkpoints").exists() or not any((proj.path / "checkpoints").iterdir())


def test_reference_with_the_wrong_shape_or_values_is_refused(tmp_path, tiny_models):
    proj, image_id, ref = make_square_project(tmp_path / "p")
    with pytest.raises(LabelError, match="shape"):
        proj.train(steps=1, device="cpu", reference={image_id: ref[:, :10]})
    bad = ref.copy()
    bad[0, 0, 0] = 9
    with pytest.raises(LabelError, match="9"):
        proj.train(steps=1, device="cpu", reference={image_id: bad})
    assert proj.round == 0


# ------------------------------------------------------------------------------ project files

def test_a_folder_that_is_not_a_project(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(ProjectError, match="project.json"):
        semsegloop.Project.open(tmp_path / "photos")
    with pytest.raises(ProjectError, match="does not exist"):
        semsegloop.Project.open(tmp_path / "nothing_here")


@pytest.mark.parametrize("content", ["{not json at all", "", "[1, 2, 3]",
                                     '{"format": "something-else", "version": 1}',
                                     '{"format": "semsegloop-project", "version": 1}'])
def test_damaged_project_json_is_a_project_error_naming_it(tmp_path, content):
    semsegloop.Project.create(tmp_path / "p", ["a", "b"])
    (tmp_path / "p" / "project.json").write_text(content)
    with pytest.raises(ProjectError, match="project.json"):
        semsegloop.Project.open(tmp_path / "p")


def test_binary_garbage_project_json_is_a_project_error(tmp_path):
    semsegloop.Project.create(tmp_path / "p", ["a", "b"])
    (tmp_path / "p" / "project.json").write_bytes(os.urandom(256) + b"\xff\xfe")
    with pytest.raises(ProjectError, match="project.json"):
        semsegloop.Project.open(tmp_path / "p")


def test_newer_format_version_asks_to_upgrade(tmp_path):
    semsegloop.Project.create(tmp_path / "p", ["a", "b"])
    f = tmp_path / "p" / "project.json"
    meta = json.loads(f.read_text())
    meta["version"] = meta["version"] + 1
    f.write_text(json.dumps(meta))
    with pytest.raises(ProjectError, match="project.json") as info:
        semsegloop.Project.open(tmp_path / "p")
    assert "newer" in str(info.value)


def test_bad_project_settings_name_the_setting(tmp_path):
    with pytest.raises(ProjectError, match="at least two classes"):
        semsegloop.Project.create(tmp_path / "a", ["only"])
    with pytest.raises(ProjectError, match="unique"):
        semsegloop.Project.create(tmp_path / "b", ["x", "x"])
    with pytest.raises(ProjectError, match="dims"):
        semsegloop.Project.create(tmp_path / "c", ["x", "y"], dims=4)
    with pytest.raises(ProjectError, match="normalization.method"):
        semsegloop.Project.create(tmp_path / "d", ["x", "y"], normalization={"method": "magic"})
    with pytest.raises(ProjectError, match="colours"):
        semsegloop.Project.create(tmp_path / "e", ["x", "y"], colors=[(1, 2, 3)])
    semsegloop.Project.create(tmp_path / "f", ["x", "y"])
    with pytest.raises(ProjectError, match="already holds a project"):
        semsegloop.Project.create(tmp_path / "f", ["z", "w"])
    assert semsegloop.Project.open(tmp_path / "f", read_only=True).class_names == ["x", "y"]


def test_unknown_image_id_names_the_known_ones(project):
    proj, image_id = project
    with pytest.raises(ProjectError, match=image_id) as info:
        proj.labels("no_such_image")
    assert "no_such_image" in str(info.value)


def test_missing_image_file_in_a_project_is_named(project):
    proj, image_id = project
    (proj.path / "images" / f"{image_id}.nrrd").unlink()
    with pytest.raises(ImageReadError, match=f"{image_id}.nrrd"):
        semsegloop.Project.open(proj.path, read_only=True).image(image_id)


def test_damaged_labels_file_is_named_not_silently_emptied(project):
    proj, image_id = project
    lab = np.zeros((48, 48), np.uint8)
    lab[1, 1] = 1
    proj.set_labels(image_id, lab)
    f = proj.path / "labels" / f"{image_id}.nrrd"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(SemSegLoopError, match=f"{image_id}.nrrd"):
        semsegloop.Project.open(proj.path, read_only=True).labels(image_id)


# ------------------------------------------------------------------------------ checkpoints

def test_damaged_latest_checkpoint_is_named_and_the_previous_round_still_works(tmp_path, tiny_models):
    proj, image_id, _ = make_square_project(tmp_path / "p")
    proj.train(steps=2, device="cpu")
    proj.train(steps=2, device="cpu")
    latest = tmp_path / "p" / "checkpoints" / "round_002.safetensors"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])          # a copy cut off halfway

    proj.close()
    again = semsegloop.Project.open(tmp_path / "p")
    with pytest.raises(CheckpointError, match="round_002.safetensors") as info:
        again.predict(image_id)
    assert "round=1" in str(info.value) and ".;" not in str(info.value)
    pred = again.predict(image_id, round=1, save=False)
    assert pred.shape == (64, 64) and pred.min() >= 1

    # Training again warm-starts from the intact round 1, not from the damaged round 2.
    res = again.train(steps=2, device="cpu")
    assert res.round == 3
    assert again.rounds[-1]["warm_start"] == "checkpoints/round_001"
    assert again.predict(image_id, save=False).shape == (64, 64)


def test_checkpoint_with_a_flipped_byte_is_detected(tmp_path, tiny_models):
    proj, image_id, _ = make_square_project(tmp_path / "p")
    proj.train(steps=1, device="cpu")
    f = tmp_path / "p" / "checkpoints" / "round_001.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF                                    # same size, one weight changed
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="round_001"):
        semsegloop.Project.open(tmp_path / "p", read_only=True).predict(image_id)


# ------------------------------------------------------------------------------ cancel mid-step

@pytest.mark.parametrize("where", ["forward", "backward"])
def test_cancel_in_the_middle_of_a_step_keeps_the_weights_of_the_last_whole_step(tmp_path, tiny_models,
                                                                                 where):
    import torch

    # Reference: exactly one whole step.
    ref_proj, _, _ = make_square_project(tmp_path / "one_step")
    # (No teacher here: its own cancel checks are tested in test_training.py.)
    ref_proj.train(steps=1, device="cpu", seed=3, pseudo_labels=False)
    ref_sha = json.loads((tmp_path / "one_step" / "checkpoints" / "round_001.json").read_text())["sha256"]

    # The engine asks "cancelled?" before each step, before every layer of the forward pass and
    # as each gradient arrives in the backward pass (where autograd has switched grad mode
    # off). Saying yes inside step 2's forward or backward pass stops it before its update.
    proj, image_id, _ = make_square_project(tmp_path / "p")
    finished, asked = [], []

    def cancel():
        if not finished:
            return False
        asked.append(torch.is_grad_enabled())
        return len(asked) == 5 if where == "forward" else not asked[-1]

    res = proj.train(steps=5, device="cpu", seed=3, cancel=cancel, pseudo_labels=False,
                     progress=lambda p: finished.append(p.step) if p.phase == "train" else None)
    assert res.cancelled and res.steps == 1
    assert all(asked[:-1]) and asked[-1] == (where == "forward"), "stopped in the wrong pass"
    record = json.loads((tmp_path / "p" / "checkpoints" / "round_001.json").read_text())
    assert record["sha256"] == ref_sha, "the half-done step must not leak into the saved model"
    assert len([r for r in proj.training_log() if r.get("event") == "step"]) == 1
    again = semsegloop.Project.open(tmp_path / "p", read_only=True)
    assert again.round == 1 and again.rounds[0]["cancelled"] is True
    assert again.predict(image_id, save=False).shape == (64, 64)


# ------------------------------------------------------------------------------ disk full

def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_saving_labels_keeps_the_old_labels_and_project(tmp_path, tiny_models, monkeypatch):
    proj, image_id, _ = make_square_project(tmp_path / "p")
    labels_file = tmp_path / "p" / "labels" / f"{image_id}.nrrd"
    old_labels = proj.labels(image_id)
    old_bytes = labels_file.read_bytes()
    old_json = (tmp_path / "p" / "project.json").read_bytes()

    new = old_labels.copy()
    new[20:30, 20:30] = 2
    monkeypatch.setattr(semsegloop.data.atomic.os, "replace", _disk_full)
    with pytest.raises((OSError, SemSegLoopError)) as info:
        proj.set_labels(image_id, new)
    monkeypatch.undo()
    assert "space" in str(info.value).lower() or "ENOSPC" in str(info.value)

    assert labels_file.read_bytes() == old_bytes
    assert (tmp_path / "p" / "project.json").read_bytes() == old_json
    assert _files(tmp_path / "p" / "labels") == [f"{image_id}.nrrd"], "no temporary files left"
    again = semsegloop.Project.open(tmp_path / "p", read_only=True)
    np.testing.assert_array_equal(again.labels(image_id), old_labels)
    assert again.image_info(image_id)["labeled_pixels"] == proj.image_info(image_id)["labeled_pixels"]
    # Once there is room again, the same call succeeds.
    proj.set_labels(image_id, new)
    np.testing.assert_array_equal(semsegloop.Project.open(tmp_path / "p", read_only=True).labels(image_id), new)


def test_disk_full_while_adding_an_image_leaves_the_project_as_it_was(project, monkeypatch):
    proj, image_id = project
    old_json = (proj.path / "project.json").read_bytes()
    monkeypatch.setattr(semsegloop.data.atomic.os, "replace", _disk_full)
    with pytest.raises((OSError, SemSegLoopError)):
        proj.add_image(square_image(48, seed=9)[0], name="second")
    monkeypatch.undo()
    assert (proj.path / "project.json").read_bytes() == old_json
    assert proj.image_ids == [image_id]
    assert semsegloop.Project.open(proj.path, read_only=True).image_ids == [image_id]


def test_disk_full_while_saving_a_checkpoint_keeps_earlier_rounds(tmp_path, tiny_models, monkeypatch):
    proj, image_id, _ = make_square_project(tmp_path / "p")
    proj.train(steps=2, device="cpu")
    ckpt_dir = tmp_path / "p" / "checkpoints"
    before = {name: (ckpt_dir / name).read_bytes() for name in _files(ckpt_dir)}
    old_json = (tmp_path / "p" / "project.json").read_bytes()
    labels_before = (tmp_path / "p" / "labels" / f"{image_id}.nrrd").read_bytes()
    pred_before = proj.predict(image_id, save=False)

    monkeypatch.setattr(semsegloop.data.atomic.os, "replace", _disk_full)
    with pytest.raises(SemSegLoopError) as info:
        proj.train(steps=2, device="cpu")
    monkeypatch.undo()
    assert "round_002" in str(info.value)

    assert _files(ckpt_dir) == sorted(before), "no partial round-2 or temporary files"
    assert all((ckpt_dir / n).read_bytes() == b for n, b in before.items())
    assert (tmp_path / "p" / "project.json").read_bytes() == old_json
    assert (tmp_path / "p" / "labels" / f"{image_id}.nrrd").read_bytes() == labels_before
    proj.close()
    again = semsegloop.Project.open(tmp_path / "p")
    assert again.round == 1 and len(again.rounds) == 1
    np.testing.assert_array_equal(again.predict(image_id, save=False), pred_before)
    # With room again, the next round trains and saves normally.
    assert again.train(steps=1, device="cpu").round == 2


# ------------------------------------------------------------------------------ checked up front
# Each bad input below is refused with a SemSegLoopError naming the file, array, class or
# setting, before any work is done and without changing the project.

@pytest.mark.parametrize("shape", [(1, 2), (2, 2), (3, 40)])
def test_an_image_below_the_network_minimum_is_refused_naming_it(project, shape):
    proj, _ = project
    before = (proj.path / "project.json").read_bytes()
    with pytest.raises(ImageReadError, match="tiny_tile") as info:
        proj.add_image(np.ones(shape, np.float32), name="tiny_tile")
    assert f"{shape[0]} x {shape[1]} pixels" in str(info.value) and "at least 4 x 4" in str(info.value)
    assert (proj.path / "project.json").read_bytes() == before


def test_a_4x4_image_trains_and_predicts_beside_a_big_one(tmp_path, tiny_models):
    proj, big, _ = make_square_project(tmp_path / "p")
    small = proj.add_image(np.arange(16, dtype=np.float32).reshape(4, 4) / 16, name="small")
    lab = np.zeros((4, 4), np.uint8)
    lab[0, 0], lab[3, 3] = 1, 2
    proj.set_labels(small, lab)
    proj.train(steps=2, device="cpu")
    pred = proj.predict(small, save=False, keep_strokes=False)
    assert pred.shape == (4, 4) and pred.min() >= 1 and pred.max() <= 2   # added as (Y, X)
    assert proj.predict(big, save=False).shape == (64, 64)


def test_an_rgb_array_added_to_a_grey_project_is_refused_not_stored_as_slices(project):
    proj, _ = project
    rgb = np.random.default_rng(0).integers(0, 255, (96, 96, 3)).astype(np.uint8)
    with pytest.raises(ImageReadError, match="photo") as info:
        proj.add_image(rgb, name="photo")
    assert "(96, 96, 3)" in str(info.value) and "1 channel" in str(info.value)
    assert len(proj.image_ids) == 1


def test_a_checkpoint_of_a_project_with_more_classes_is_refused_before_predicting(tmp_path,
                                                                                  tiny_models):
    two, image_id, _ = make_square_project(tmp_path / "two")
    two.train(steps=1, device="cpu")
    three, _, _ = make_square_project(tmp_path / "three", classes=("a", "b", "c"))
    three.train(steps=1, device="cpu")
    for ext in ("safetensors", "json"):
        name = f"round_001.{ext}"
        (tmp_path / "two" / "checkpoints" / name).write_bytes(
            (tmp_path / "three" / "checkpoints" / name).read_bytes())
    two.close()
    again = semsegloop.Project.open(tmp_path / "two", read_only=True)
    with pytest.raises(CheckpointError, match="round_001") as info:
        again.predict(image_id)
    assert "predicts 3 classes" in str(info.value) and "has 2" in str(info.value)


@pytest.mark.parametrize("key, value, named", [
    ("classes", "ab", "'classes'"),
    ("classes", [{"name": "a", "color": [0, 0, 0]}], "'classes'"),
    ("classes", [{"name": "a", "color": [0, 0, 0]}, {"name": "b", "color": [300, 0, 0]}],
     "'classes'"),
    ("dims", 5, "'dims' must be 2 or 3"),
    ("channels", "grey", "'channels'"),
    ("preset", 7, "'preset'"),
    ("images", {"a": 1}, "'images'"),
    ("images", [{"id": "x"}], "'images'"),
    ("rounds", [{"steps": 3}], "'rounds'"),
])
def test_a_hand_edited_project_json_is_refused_on_open_naming_the_entry(tmp_path, key, value,
                                                                         named):
    semsegloop.Project.create(tmp_path / "p", ["a", "b"]).close()
    f = tmp_path / "p" / "project.json"
    meta = json.loads(f.read_text())
    meta[key] = value
    f.write_text(json.dumps(meta))
    with pytest.raises(ProjectError, match="project.json") as info:
        semsegloop.Project.open(tmp_path / "p", read_only=True)
    assert named in str(info.value)
    if key == "dims":
        assert "preset" not in str(info.value)


def test_opening_a_file_says_it_is_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ProjectError, match="is a file, not a project folder"):
        semsegloop.Project.open(tmp_path / "notes.txt")


@pytest.mark.parametrize("steps", [2.5, "3", True])
def test_steps_must_be_a_whole_number(project, steps):
    proj, image_id = project
    with pytest.raises(SemSegLoopError, match="steps must be a whole number"):
        proj.train(steps=steps, device="cpu")
    assert proj.rounds == []


@pytest.mark.parametrize("budget", ["10", float("nan"), float("inf"), -1])
def test_the_time_budget_must_be_a_positive_number(project, budget):
    proj, _ = project
    with pytest.raises(SemSegLoopError, match="time_budget_s"):
        proj.train(time_budget_s=budget, device="cpu")


@pytest.mark.parametrize("color", [(300, -5, 0), (1, 2), (1.5, 2, 3), "red"])
def test_colours_must_be_three_whole_numbers_in_0_255(tmp_path, color):
    with pytest.raises(ProjectError, match="class 'cell'") as info:
        semsegloop.Project.create(tmp_path / "p", ["cell", "background"],
                                  colors=[color, (0, 0, 0)])
    assert "0..255" in str(info.value) and not (tmp_path / "p" / "project.json").exists()
    proj = semsegloop.Project.create(tmp_path / "q", ["cell", "background"])
    with pytest.raises(ProjectError, match="class 'background'"):
        proj.set_classes([{"name": "cell"}, {"name": "background", "color": color}])
    assert proj.classes == semsegloop.Project.open(tmp_path / "q", read_only=True).classes


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models):
    proj, image_id, ref = make_square_project(tmp_path_factory.mktemp("t") / "p")
    proj.train(steps=2, device="cpu")
    proj.close()
    return proj.path, image_id, ref


@pytest.mark.parametrize("bad, named", [(1.5, "1.5"), (-1, "-1")])
def test_a_reference_with_fractional_or_negative_values_names_the_value(trained, bad, named):
    path, image_id, ref = trained
    proj = semsegloop.Project.open(path, read_only=True)
    reference = ref.astype(np.float32 if isinstance(bad, float) else np.int16)
    reference[0, 5, 5] = bad
    with pytest.raises(LabelError, match=image_id) as info:
        proj.evaluate({image_id: reference})
    assert f"value {named}" in str(info.value) and "255" not in str(info.value)
    whole = ref.astype(np.float32)                # whole-number floats are a label map
    assert proj.evaluate({image_id: whole})["images"][image_id]


def test_export_into_a_file_is_refused_before_predicting(trained, tmp_path):
    path, _, _ = trained
    proj = semsegloop.Project.open(path, read_only=True)
    target = tmp_path / "results.nrrd"
    target.write_text("not a folder")
    t0 = __import__("time").perf_counter()
    with pytest.raises(ProjectError, match="results.nrrd") as info:
        proj.export(target)
    assert "is a file" in str(info.value) and __import__("time").perf_counter() - t0 < 0.5


def test_a_read_only_folder_is_refused_up_front_and_can_still_be_read(trained, tmp_path):
    import shutil
    from helpers_engine import read_only_folder

    path, image_id, _ = trained
    copy = tmp_path / "shared"
    shutil.copytree(path, copy)
    with read_only_folder(copy):
        with pytest.raises(ProjectError, match="cannot write in project folder") as info:
            semsegloop.Project.open(copy)
        assert str(copy) in str(info.value) and ".tmp" not in str(info.value)
        assert "read_only=True" in str(info.value)
        viewer = semsegloop.Project.open(copy, read_only=True)
        assert viewer.predict(image_id).shape == (64, 64)
