"""Tests of the `semsegloop` command: --help for every subcommand, the whole init -> add -> train
-> predict -> evaluate -> export loop on real files, one-line errors with exit code 2, and demo."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

import semsegloop
from helpers_engine import square_image, square_strokes, tiny_models  # noqa: F401
from semsegloop.data import imageio
from semsegloop.apps.cli import main

SUBCOMMAND_OPTIONS = {
    "init": ["--classes", "--dims", "--preset", "--colors"],
    "add": ["--labels", "--spacing", "--reference"],
    "train": ["--time", "--steps", "--device", "--preset", "--seed"],
    "predict": ["--images", "--device"],
    "evaluate": ["--reference", "--json"],
    "export": ["--format", "--fractions"],
    "demo": ["--out", "--seconds", "--images", "--size", "--device"],
}


@pytest.fixture(autouse=True)
def _keep_sigint_handler():
    # `train` installs a Ctrl-C handler (stop after this step); it must not outlive the test.
    old = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, old)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected a one-line error, got: {err!r}"
    assert lines[0].startswith("semsegloop: error:"), lines[0]
    return lines[0]


def test_module_help_runs_in_a_fresh_interpreter_and_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "semsegloop.apps.cli", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for cmd in SUBCOMMAND_OPTIONS:
        assert cmd in out.stdout


@pytest.mark.parametrize("command", sorted(SUBCOMMAND_OPTIONS))
def test_help_of_each_command_exits_0_and_lists_its_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: semsegloop {command}" in out
    for option in SUBCOMMAND_OPTIONS[command]:
        assert option in out, f"{command} --help does not list {option}"


@pytest.fixture
def painted_files(tmp_path):
    """A PNG image and its sparse labels as NRRD, as a person would bring them."""
    from PIL import Image

    img, ref = square_image(64)
    png = tmp_path / "square.png"
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(png)
    labels = tmp_path / "square_labels.nrrd"
    geom = imageio.Geometry.identity()
    imageio.write_labels(labels, square_strokes(64)[None], geom)
    reference = tmp_path / "square_reference.nrrd"
    imageio.write_labels(reference, ref[None], geom)
    return png, labels, reference


def test_init_add_train_predict_evaluate_export_on_files(tmp_path, painted_files, capsys, tiny_models):
    png, labels, reference = painted_files
    proj_dir = tmp_path / "proj"

    assert main(["init", str(proj_dir), "--classes", "square,background", "--preset", "tiny2d",
                 "--colors", "255,0,0;0,0,255"]) == 0
    assert "created" in capsys.readouterr().out
    proj = semsegloop.Project.open(proj_dir, read_only=True)
    assert proj.class_names == ["square", "background"] and proj.preset == "tiny2d"
    assert [c["color"] for c in proj.classes] == [[255, 0, 0], [0, 0, 255]]

    assert main(["add", str(proj_dir), str(png), "--labels", str(labels)]) == 0
    image_id = capsys.readouterr().out.split("\t")[0].strip()
    proj = semsegloop.Project.open(proj_dir, read_only=True)
    assert proj.image_ids == [image_id]
    np.testing.assert_array_equal(proj.labels(image_id)[0], square_strokes(64))

    assert main(["train", str(proj_dir), "--steps", "3", "--device", "cpu", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert "round 1 done: 3 steps" in captured.out
    assert "round 1" in captured.err and "3/3" in captured.err, "a progress bar on stderr"
    assert semsegloop.Project.open(proj_dir, read_only=True).round == 1

    assert main(["predict", str(proj_dir)]) == 0
    assert "predicted 1 image(s)" in capsys.readouterr().out
    saved = proj_dir / "predictions" / "round_001" / f"{image_id}.nrrd"
    assert saved.is_file()

    report_json = tmp_path / "report.json"
    assert main(["evaluate", str(proj_dir), "--reference", f"{image_id}={reference}",
                 "--json", str(report_json)]) == 0
    out = capsys.readouterr().out
    assert "dice" in out and "square" in out and "background" in out
    report = json.loads(report_json.read_text())
    dice = report["images"][image_id]["classes"]["square"]["dice"]
    assert 0.0 <= dice <= 1.0

    out_dir = tmp_path / "export"
    assert main(["export", str(proj_dir), str(out_dir), "--format", "tif"]) == 0
    assert "exported 1 label map(s)" in capsys.readouterr().out
    exported, _ = imageio.read_labels(out_dir / f"{image_id}.tif")
    np.testing.assert_array_equal(exported, imageio.read_labels(saved)[0])
    with open(out_dir / "class_fractions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == ["square", "background"]
    assert sum(int(r["pixels"]) for r in rows) == 64 * 64


def test_train_command_restores_the_ctrl_c_handler(tmp_path, painted_files, capsys, tiny_models):
    png, labels, _ = painted_files
    main(["init", str(tmp_path / "p"), "--classes", "square,background", "--preset", "tiny2d"])
    main(["add", str(tmp_path / "p"), str(png), "--labels", str(labels)])
    before = signal.getsignal(signal.SIGINT)
    assert main(["train", str(tmp_path / "p"), "--steps", "1", "--device", "cpu"]) == 0
    assert signal.getsignal(signal.SIGINT) is before


def test_missing_project_is_a_one_line_error_with_exit_code_2(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    for argv in (["train", str(missing), "--steps", "1"], ["predict", str(missing)],
                 ["add", str(missing), str(tmp_path / "x.png")]):
        assert main(argv) == 2
        assert "nowhere" in _error_line(capsys)


def test_unreadable_image_is_a_one_line_error_naming_it(tmp_path, capsys):
    main(["init", str(tmp_path / "p"), "--classes", "a,b"])
    capsys.readouterr()
    garbage = tmp_path / "broken.png"
    garbage.write_bytes(b"this is not a PNG at all")
    assert main(["add", str(tmp_path / "p"), str(garbage)]) == 2
    assert "broken.png" in _error_line(capsys)
    assert semsegloop.Project.open(tmp_path / "p", read_only=True).image_ids == []


def test_labels_with_values_above_the_classes_are_refused(tmp_path, painted_files, capsys):
    png, _, _ = painted_files
    bad = np.zeros((1, 64, 64), np.uint8)
    bad[0, 5, 5] = 7
    bad_path = tmp_path / "bad_labels.nrrd"
    imageio.write_labels(bad_path, bad, imageio.Geometry.identity())
    main(["init", str(tmp_path / "p"), "--classes", "a,b"])
    capsys.readouterr()
    assert main(["add", str(tmp_path / "p"), str(png), "--labels", str(bad_path)]) == 2
    line = _error_line(capsys)
    assert "7" in line and "labels" in line
    proj = semsegloop.Project.open(tmp_path / "p", read_only=True)
    for image_id in proj.image_ids:
        assert not proj.labels(image_id).any(), "refused labels must not be stored"


def _project_without_labels(tmp_path, png, capsys):
    main(["init", str(tmp_path / "p"), "--classes", "a,b"])
    main(["add", str(tmp_path / "p"), str(png)])
    capsys.readouterr()
    return tmp_path / "p"


def test_training_without_labels_exits_2_and_says_paint(tmp_path, painted_files, capsys):
    proj_dir = _project_without_labels(tmp_path, painted_files[0], capsys)
    assert main(["train", str(proj_dir), "--steps", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "semsegloop: error: no labels painted yet" in err and "paint" in err
    assert semsegloop.Project.open(proj_dir, read_only=True).round == 0


def test_training_without_labels_is_a_one_line_error(tmp_path, painted_files, capsys):
    proj_dir = _project_without_labels(tmp_path, painted_files[0], capsys)
    assert main(["train", str(proj_dir), "--steps", "1", "--device", "cpu"]) == 2
    assert "paint" in _error_line(capsys)


def test_init_refuses_to_overwrite_a_project(tmp_path, capsys):
    assert main(["init", str(tmp_path / "p"), "--classes", "a,b"]) == 0
    capsys.readouterr()
    assert main(["init", str(tmp_path / "p"), "--classes", "c,d"]) == 2
    assert "project" in _error_line(capsys)
    assert semsegloop.Project.open(tmp_path / "p", read_only=True).class_names == ["a", "b"]


def test_evaluate_with_a_malformed_reference_argument(tmp_path, capsys):
    main(["init", str(tmp_path / "p"), "--classes", "a,b"])
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "p"), "--reference", "no_equals_sign"]) == 2
    assert "ID=PATH" in _error_line(capsys)


def test_demo_runs_the_loop_and_writes_overlays_and_fractions(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--seconds", "3", "--images", "3", "--size", "96", "--out", str(out),
                 "--device", "cpu"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "round 0:" in stdout and "round 1:" in stdout
    line = next(ln for ln in stdout.splitlines() if ln.startswith("Dice per round"))
    values = [float(v) for v in line.split(":", 1)[1].split("->")]
    assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)
    overlays = sorted((out / "overlays").glob("*.png"))
    assert len(overlays) == 3
    from PIL import Image
    with Image.open(overlays[0]) as im:
        assert im.size == (96, 96) and im.mode == "RGB"
    with open(out / "class_fractions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 3
    assert {r["class"] for r in rows} == {"collagen", "cell", "background"}
    proj = semsegloop.Project.open(out / "project", read_only=True)
    assert proj.round == 2 and proj.rounds[1]["warm_start"] == "checkpoints/round_001"


@pytest.mark.parametrize("colors, named", [("1,2;3", "'1,2'"), ("1,2,3;4,5", "'4,5'"),
                                           ("300,0,0;0,0,0", "'300,0,0'"),
                                           ("a,b,c;0,0,0", "'a,b,c'")])
def test_init_with_bad_colours_is_a_one_line_error_and_creates_nothing(tmp_path, capsys, colors,
                                                                        named):
    assert main(["init", str(tmp_path / "p"), "--classes", "a,b", "--colors", colors]) == 2
    line = _error_line(capsys)
    assert "--colors" in line and named in line and "0..255" in line
    assert not (tmp_path / "p" / "project.json").exists()


@pytest.fixture
def trained_cli_project(tmp_path, painted_files, capsys, tiny_models):
    png, labels, reference = painted_files
    proj_dir = tmp_path / "proj"
    main(["init", str(proj_dir), "--classes", "square,background", "--preset", "tiny2d"])
    main(["add", str(proj_dir), str(png), "--labels", str(labels)])
    assert main(["train", str(proj_dir), "--steps", "2", "--device", "cpu"]) == 0
    capsys.readouterr()
    return proj_dir, reference


def test_evaluate_json_into_a_folder_is_refused_before_evaluating(trained_cli_project, tmp_path,
                                                                  capsys):
    proj_dir, reference = trained_cli_project
    folder = tmp_path / "reports"
    folder.mkdir()
    assert main(["evaluate", str(proj_dir), "--reference", f"square={reference}",
                 "--json", str(folder)]) == 2
    line = _error_line(capsys)
    assert "--json" in line and "reports" in line and "folder" in line
    assert not (proj_dir / "predictions").exists(), "nothing was predicted"


def test_export_into_a_file_is_a_one_line_error_before_predicting(trained_cli_project, tmp_path,
                                                                  capsys):
    proj_dir, _ = trained_cli_project
    target = tmp_path / "out.nrrd"
    target.write_text("x")
    assert main(["export", str(proj_dir), str(target)]) == 2
    assert "out.nrrd" in _error_line(capsys)
    assert not (proj_dir / "predictions").exists()


def test_add_and_predict_on_a_read_only_project_are_one_line_errors(trained_cli_project,
                                                                    painted_files, capsys):
    from helpers_engine import read_only_folder

    proj_dir, reference = trained_cli_project
    with read_only_folder(proj_dir):
        for argv in (["add", str(proj_dir), str(painted_files[0])], ["predict", str(proj_dir)],
                     ["train", str(proj_dir), "--steps", "1"]):
            assert main(argv) == 2, argv
            line = _error_line(capsys)
            assert "cannot write in project folder" in line and str(proj_dir) in line
        # Evaluating writes nothing in the project, so it still works there.
        assert main(["evaluate", str(proj_dir), "--reference", f"square={reference}"]) == 0


def test_a_second_writer_is_a_one_line_error_naming_the_holder(trained_cli_project, capsys):
    import os

    proj_dir, _ = trained_cli_project
    holder = semsegloop.Project.open(proj_dir)
    assert main(["train", str(proj_dir), "--steps", "1", "--device", "cpu"]) == 2
    assert f"process {os.getpid()}" in _error_line(capsys)
    holder.close()
