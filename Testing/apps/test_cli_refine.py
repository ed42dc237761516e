"""The `semsegloop refine`, `suggest` and post-processing flags of `predict` on real files:
results on disk, settings stored in project.json, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

import semsegloop
from helpers_engine import make_square_project, tiny_models  # noqa: F401
from semsegloop.apps.cli import main
from semsegloop.data import imageio


@pytest.fixture
def trained_dir(tmp_path, tiny_models):
    proj, image_id, ref = make_square_project(tmp_path / "proj")
    proj.add_image(np.full((64, 64), 0.5, np.float32), name="grey")
    proj.train(steps=20, device="cpu", seed=0)
    proj.close()
    return tmp_path / "proj", image_id, ref


def _error_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("semsegloop: error:"), lines
    return lines[0]


@pytest.mark.parametrize("command,options", [
    ("refine", ["--out", "--device"]), ("suggest", ["-n", "--by", "--json"]),
    ("predict", ["--largest-component", "--min-size", "--fill-holes", "--smooth",
                 "--no-postprocess", "--clear-postprocess"])])
def test_help_lists_the_new_options(command, options, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert all(o in out for o in options)


def test_predict_flags_store_post_processing_and_apply_it(trained_dir, capsys):
    proj_dir, image_id, _ = trained_dir
    assert main(["predict", str(proj_dir), "--images", image_id, "--fill-holes", "square",
                 "--min-size", "square=12.5", "--smooth", "2=median:1"]) == 0
    stored = json.loads((proj_dir / "project.json").read_text())["postprocessing"]
    assert stored == {"1": {"fill_holes": True, "min_size": 12.5},
                      "2": {"smoothing": "median", "smoothing_mm": 1.0}}
    assert "post-processing:" in capsys.readouterr().out
    assert main(["predict", str(proj_dir), "--clear-postprocess"]) == 0
    assert json.loads((proj_dir / "project.json").read_text())["postprocessing"] == {}
    capsys.readouterr()
    assert main(["predict", str(proj_dir), "--fill-holes", "cell"]) == 2
    assert "'cell' is neither a class name" in _error_line(capsys)
    assert main(["predict", str(proj_dir), "--min-size", "square"]) == 2
    assert "CLASS=VALUE" in _error_line(capsys)


def test_refine_and_suggest_on_files(trained_dir, tmp_path, capsys):
    proj_dir, image_id, ref = trained_dir
    strokes = np.zeros(ref.shape, np.uint8)
    strokes[0, 30:33, 30:33] = 1
    sfile = tmp_path / "click.nrrd"
    imageio.write_labels(sfile, strokes, imageio.Geometry.identity())
    assert main(["refine", str(proj_dir), image_id, str(sfile)]) == 2
    assert "no prediction of round 1" in _error_line(capsys)
    assert main(["predict", str(proj_dir)]) == 0
    out_file = tmp_path / "refined.nrrd"
    assert main(["refine", str(proj_dir), image_id, str(sfile), "--out", str(out_file)]) == 0
    assert "voxel(s) changed" in capsys.readouterr().out
    refined = imageio.read_labels(out_file)[0]
    assert (refined[strokes > 0] == 1).all()
    proj = semsegloop.Project.open(proj_dir, read_only=True)
    np.testing.assert_array_equal(proj.refined_prediction(image_id), refined)
    assert (proj.labels(image_id).reshape(strokes.shape)[strokes > 0] == 1).all()
    imageio.write_labels(sfile, strokes, imageio.Geometry.identity((1.0, 2.0, 2.0)))
    assert main(["refine", str(proj_dir), image_id, str(sfile)]) == 2
    assert "different grid" in _error_line(capsys)

    js = tmp_path / "suggest.json"
    assert main(["suggest", str(proj_dir), "-n", "1", "--json", str(js)]) == 0
    assert "grey" in capsys.readouterr().out
    assert json.loads(js.read_text())[0]["image_id"] == "grey"
