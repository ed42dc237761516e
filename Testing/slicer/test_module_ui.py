"""The Slicer module checked without a Slicer application: the widget against its .ui file and
its logic, the CMake file lists, the icon, the engine loader, and the panel's decisions
(semsegloop.slicer.panel) with the messages a person sees."""

from __future__ import annotations

import ast
import math
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from semsegloop.slicer import panel as session
from semsegloop.errors import LabelError, ProjectError, TrainingError

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "SemSegLoop"
MODULE_FILE = MODULE_DIR / "SemSegLoop.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SemSegLoop.ui"
ICON_FILE = MODULE_DIR / "Resources" / "Icons" / "SemSegLoop.png"

SOURCE = MODULE_FILE.read_text(encoding="utf-8")
TREE = ast.parse(SOURCE, filename=str(MODULE_FILE))
CLASSES = {node.name: node for node in TREE.body if isinstance(node, ast.ClassDef)}
UI = ET.parse(UI_FILE).getroot()


def _methods(cls: ast.ClassDef) -> set[str]:
    return {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _attribute_uses(cls: ast.ClassDef, owner: str) -> dict[str, int]:
    """Names X in ``self.<owner>.X`` inside a class, with the first line they appear on."""
    found: dict[str, int] = {}
    for node in ast.walk(cls):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == owner and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            found.setdefault(node.attr, node.lineno)
    return found


def _ui_widgets() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in UI.iter("widget")}


# ------------------------------------------------------------------------------ module shape

def test_module_has_the_four_slicer_classes_and_a_parameter_node_wrapper():
    assert {"SemSegLoop", "SemSegLoopWidget", "SemSegLoopLogic", "SemSegLoopTest"} <= set(CLASSES)
    bases = {name: [ast.unparse(b) for b in cls.bases] for name, cls in CLASSES.items()}
    assert "ScriptedLoadableModule" in bases["SemSegLoop"]
    assert "ScriptedLoadableModuleWidget" in bases["SemSegLoopWidget"]
    assert "ScriptedLoadableModuleLogic" in bases["SemSegLoopLogic"]
    assert "ScriptedLoadableModuleTest" in bases["SemSegLoopTest"]
    wrapped = [name for name, cls in CLASSES.items()
               if any(ast.unparse(d) == "parameterNodeWrapper" for d in cls.decorator_list)]
    assert wrapped == ["SemSegLoopParameterNode"]
    assert "getParameterNode" in _methods(CLASSES["SemSegLoopLogic"])
    tests = [m for m in _methods(CLASSES["SemSegLoopTest"]) if m.startswith("test_")]
    assert len(tests) >= 2


def test_module_imports_nothing_heavy_and_uses_slicer_conventions():
    top_imports = set()
    for node in TREE.body:
        if isinstance(node, ast.Import):
            top_imports |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_imports.add(node.module.split(".")[0])
    # Importing the module happens at Slicer start-up: never torch/MONAI, never pip.
    assert not top_imports & {"torch", "monai", "pip", "PyTorchUtils"}
    assert "from slicer.i18n import tr as _" in SOURCE
    assert "slicer.util.loadUI(self.resourcePath(\"UI/SemSegLoop.ui\"))" in SOURCE
    assert "slicer.util.childWidgetVariables" in SOURCE
    assert "tryWithErrorDisplay" in SOURCE
    assert 'GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")' in SOURCE
    assert not re.search(r"sys\.path\.(insert|append|extend)|sys\.path\s*[+]?=", SOURCE), \
        "the engine must not go on sys.path"


# ------------------------------------------------------------------------------ widget <-> .ui

def test_every_ui_name_the_widget_uses_exists_in_the_ui_file():
    widgets = _ui_widgets()
    used = _attribute_uses(CLASSES["SemSegLoopWidget"], "ui")
    missing = {name: line for name, line in used.items() if name not in widgets}
    assert not missing, f"self.ui.<name> not in SemSegLoop.ui (name: line): {missing}"
    assert len(used) >= 15  # the test must actually see the widget's uses


def test_every_logic_method_the_widget_calls_exists():
    logic_methods = _methods(CLASSES["SemSegLoopLogic"])
    used = _attribute_uses(CLASSES["SemSegLoopWidget"], "logic")
    missing = {name: line for name, line in used.items() if name not in logic_methods}
    assert not missing, f"self.logic.<method> not defined on SemSegLoopLogic: {missing}"
    assert {"train", "predict", "acceptCorrections", "cancel", "addJobObservers"} <= set(used)


def test_every_connected_handler_exists_on_the_widget():
    widget = CLASSES["SemSegLoopWidget"]
    methods = _methods(widget)
    handlers = set()
    for node in ast.walk(widget):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("connect", "addObserver") and node.args):
            target = node.args[-1]
            if isinstance(target, ast.Attribute) and ast.unparse(target.value) == "self":
                handlers.add(target.attr)
    assert handlers, "no signal connections found"
    assert handlers <= methods, sorted(handlers - methods)


def test_ui_parses_and_declares_every_custom_widget_it_uses():
    used = set(_ui_widgets().values())
    declared = {c.findtext("class") for c in UI.iter("customwidget")}
    custom = {c for c in used if not c.startswith("Q")}
    assert custom <= declared, f"undeclared custom widgets: {custom - declared}"
    assert {"qMRMLNodeComboBox", "qMRMLSegmentEditorWidget", "ctkCollapsibleButton",
            "ctkPathLineEdit"} <= custom
    for section in ("input", "classes", "paint", "train", "predict", "correct", "finish"):
        assert f"{section}CollapsibleButton" in _ui_widgets()


def test_parameter_names_in_the_ui_match_the_parameter_node_and_widget_types():
    fields = {}
    for node in CLASSES["SemSegLoopParameterNode"].body:
        if isinstance(node, ast.AnnAssign):
            fields[node.target.id] = ast.unparse(node.annotation)
    compatible = {
        "qMRMLNodeComboBox": lambda t: t.startswith("vtkMRML") or (
            t.startswith("Union[") and all(p.strip().startswith("vtkMRML") for p in t[6:-1].split(","))),
        "QCheckBox": lambda t: t == "bool",
        "QSpinBox": lambda t: "int" in t,
        "QComboBox": lambda t: t in ("Dims", "Device", "ExportFormat"),
        "ctkPathLineEdit": lambda t: t == "pathlib.Path",
    }
    bound = {}
    for widget in UI.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = (widget.get("class"), prop.findtext("string"))
    assert len(bound) >= 12
    for name, (cls, param) in bound.items():
        assert param in fields, f"{name} binds unknown parameter '{param}'"
        assert compatible[cls](fields[param]), f"{name} ({cls}) cannot show {param}: {fields[param]}"
    assert len({p for _, p in bound.values()}) == len(bound), "a parameter is bound twice"


def test_enum_combos_are_filled_by_the_parameter_node_not_the_ui():
    # connectGui fills enum combo boxes itself; items in the .ui would be duplicated.
    for widget in UI.iter("widget"):
        if widget.get("class") == "QComboBox":
            assert widget.find("item") is None, widget.get("name")


# ------------------------------------------------------------------------------ packaging

def _cmake_list(text: str, variable: str) -> list[str]:
    m = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert m, f"{variable} not found"
    return [line.strip() for line in m.group(1).splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_module_cmake_lists_every_python_file_and_resource():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = [s.replace("${MODULE_NAME}", "SemSegLoop") for s in _cmake_list(text, "MODULE_PYTHON_SCRIPTS")]
    on_disk = {"SemSegLoop.py"} | {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Logic").rglob("*.py")}
    assert set(scripts) == on_disk, (f"missing from CMakeLists: {sorted(on_disk - set(scripts))}; "
                                     f"listed but absent: {sorted(set(scripts) - on_disk)}")
    resources = [r.replace("${MODULE_NAME}", "SemSegLoop") for r in _cmake_list(text, "MODULE_PYTHON_RESOURCES")]
    for r in resources:
        assert (MODULE_DIR / r).is_file(), r
    assert {"Resources/UI/SemSegLoop.ui", "Resources/Icons/SemSegLoop.png",
            "Resources/requirements.txt"} <= set(resources)
    assert "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert "Resources/Models" in text and list((REPO / "models").glob("*.json"))


def test_extension_cmake_declares_the_extension():
    text = (REPO / "CMakeLists.txt").read_text()
    for needle in ("project(SemSegLoop)", 'set(EXTENSION_CATEGORY "Segmentation")',
                   'set(EXTENSION_DEPENDS "PyTorch")', "find_package(Slicer REQUIRED)",
                   "include(${Slicer_USE_FILE})", "add_subdirectory(SemSegLoop)",
                   "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert needle in text, needle
    for key in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL"):
        assert re.search(rf'set\(EXTENSION_{key} "[^"]+"\)', text), key
    # Finding 9: a URL into this repository's main branch must name a file that exists.
    urls = re.findall(r"https://raw\.githubusercontent\.com/semsegloop/SemSegLoop/main/(\S+?)[\s\"]", text)
    assert urls, "the icon URL points into the repository"
    for path in urls:
        assert (REPO / path).is_file(), f"CMakeLists.txt links {path}, which does not exist"


def test_icon_is_a_128_pixel_png():
    from PIL import Image
    with Image.open(ICON_FILE) as icon:
        assert icon.format == "PNG"
        assert icon.size == (128, 128)
        assert len(icon.convert("RGB").getcolors(maxcolors=128 * 128)) > 8, "icon looks blank"


def test_selftest_script_prints_usage_without_a_slicer():
    script = REPO / "Testing" / "run_slicer_selftest.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "usage" in (done.stdout + done.stderr).lower()
    missing = subprocess.run(["bash", str(script), "/nonexistent/Slicer"], capture_output=True,
                             text=True, timeout=30)
    assert missing.returncode != 0 and "/nonexistent/Slicer" in missing.stderr


def _fake_tool(path: Path, log: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\necho "$(basename "$0") $*" >> "{log}"\n')
    path.chmod(0o755)


@pytest.mark.skipif(sys.platform == "win32", reason="runs bash scripts")
def test_selftest_script_finds_pythonslicer_in_a_macos_bundle_and_uses_xvfb_only_without_a_display(tmp_path):
    script = REPO / "Testing" / "run_slicer_selftest.sh"
    log = tmp_path / "calls.txt"
    contents = tmp_path / "Slicer.app" / "Contents"
    _fake_tool(contents / "MacOS" / "Slicer", log)
    _fake_tool(contents / "bin" / "PythonSlicer", log)
    _fake_tool(tmp_path / "tools" / "xvfb-run", log)
    # xvfb-run must run the command it is given, like the real one.
    (tmp_path / "tools" / "xvfb-run").write_text(f'#!/bin/sh\necho "xvfb-run $*" >> "{log}"\nshift\nexec "$@"\n')
    env = {"PATH": f"{tmp_path / 'tools'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    with_display = subprocess.run(["bash", str(script), str(contents / "MacOS" / "Slicer")], capture_output=True,
                                  text=True, timeout=60, env={**env, "DISPLAY": ":0"})
    assert with_display.returncode == 0, with_display.stderr
    calls = log.read_text().splitlines()
    assert any(c.startswith("PythonSlicer -m pip install") for c in calls), calls
    assert any(c.startswith("Slicer --no-splash --no-main-window --testing") for c in calls), calls
    assert not any(c.startswith("xvfb-run") for c in calls)
    log.unlink()
    headless = subprocess.run(["bash", str(script), str(contents / "MacOS" / "Slicer")], capture_output=True,
                              text=True, timeout=60, env={**env, "SEMSEGLOOP_SKIP_INSTALL": "1"})
    assert headless.returncode == 0, headless.stderr
    calls = log.read_text().splitlines()
    expect_xvfb = sys.platform.startswith("linux")
    assert any(c.startswith("xvfb-run -a") for c in calls) == expect_xvfb, calls
    assert not any(c.startswith("PythonSlicer") for c in calls)


# ------------------------------------------------------------------------------ engine loader

def _loader_source() -> str:
    fn = next(n for n in TREE.body if isinstance(n, ast.FunctionDef) and n.name == "_importEngine")
    return "import os\n" + ast.get_source_segment(SOURCE, fn)


def test_import_engine_loads_semsegloop_from_the_module_folder_only():
    """In a Python that has no semsegloop installed (-S: no site-packages), the loader finds the
    engine in SemSegLoop/Logic, registers it as `semsegloop`, and adds nothing to sys.path."""
    code = _loader_source() + f"""
import importlib.util, sys
assert importlib.util.find_spec("semsegloop") is None, "semsegloop must not be importable here"
before = list(sys.path)
m = _importEngine({str(MODULE_DIR)!r})
import semsegloop, semsegloop.errors, semsegloop.data.atomic
assert semsegloop is m
assert semsegloop.__file__ == {str(MODULE_DIR / "Logic" / "__init__.py")!r}, semsegloop.__file__
assert issubclass(semsegloop.errors.LabelError, semsegloop.SemSegLoopError)
assert sys.path == before, "loader changed sys.path"
assert "Logic" not in sys.modules and importlib.util.find_spec("Logic") is None
assert _importEngine({str(MODULE_DIR)!r}) is m, "a second call must reuse the loaded engine"
print("loaded", semsegloop.__version__)
"""
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                          timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    assert "loaded" in done.stdout


def test_import_engine_reuses_an_engine_already_imported():
    namespace: dict = {}
    exec(_loader_source(), namespace)
    import semsegloop
    assert namespace["_importEngine"](str(MODULE_DIR)) is semsegloop


# ------------------------------------------------------------------------------ panel decisions

def test_2d_or_3d_is_chosen_from_the_input():
    assert session.resolve_dims("auto", 1) == 2
    assert session.resolve_dims("auto", 40) == 3
    assert session.resolve_dims("auto", 40, from_folder=True) == 2
    assert session.resolve_dims("2D", 40) == 2 and session.resolve_dims("3D", 1) == 3
    with pytest.raises(ProjectError, match="select or load an image"):
        session.resolve_dims("auto", None)
    with pytest.raises(ProjectError, match="'4d'"):
        session.resolve_dims("4D", 3)


def test_project_folder_states(tmp_path):
    assert session.project_folder_state(Path(".")) == "unset"
    assert session.project_folder_state("") == "unset"
    assert session.project_folder_state(tmp_path / "new") == "empty"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    assert session.project_folder_state(tmp_path / "other") == "other"
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "project.json").write_text("{}")
    assert session.project_folder_state(tmp_path / "proj") == "project"


def test_classes_from_the_table_are_validated_with_named_errors():
    classes = session.make_classes(["collagen", "cell", "background"], ["#ff0000", "", "#00ff00"])
    assert classes[0] == {"name": "collagen", "color": [255, 0, 0]}
    assert classes[1]["color"] == list(session.default_color(1))
    with pytest.raises(ProjectError, match="two classes are named 'cell'"):
        session.make_classes(["cell", "cell"])
    with pytest.raises(ProjectError, match="class 2 has no name"):
        session.make_classes(["cell", "  "])
    with pytest.raises(ProjectError, match="#rrggbb"):
        session.make_classes(["a", "b"], ["red", "#00ff00"])
    assert session.new_class_name(["class 3", "x"]) == "class 4"
    assert session.rgb_from_hex(session.hex_color((1, 128, 255))) == [1, 128, 255]


def test_class_edits_that_would_relabel_strokes_are_refused():
    session.check_class_edit(["a", "b", "c"], ["a", "b"], project_has_labels=False)
    session.check_class_edit(["a", "b"], ["a2", "b", "c"], project_has_labels=True)
    with pytest.raises(ProjectError, match="'c' cannot be removed"):
        session.check_class_edit(["a", "b", "c"], ["a", "b"], project_has_labels=True)
    with pytest.raises(ProjectError, match="at least two classes"):
        session.check_class_edit(["a", "b"], ["a"], project_has_labels=False)


def test_training_needs_two_painted_classes_and_says_which_are_missing():
    names = ["collagen", "cell", "background"]
    one = np.zeros((1, 8, 8), np.uint8)
    one[0, 1, 1:4] = 2
    with pytest.raises(LabelError, match="nothing is painted"):
        session.check_ready_to_train([np.zeros((1, 8, 8), np.uint8)], names)
    with pytest.raises(LabelError, match=r"only 'cell' is painted.*not painted yet: collagen, background"):
        session.check_ready_to_train([one], names)
    other = np.zeros((2, 4, 4), np.uint8)
    other[1, 0, 0] = 3
    assert session.check_ready_to_train([one, other], names) == {"cell": 3, "background": 1}


def test_training_arguments_from_the_panel():
    assert session.training_kwargs(60, 0, "Auto", "") == {"device": "auto", "time_budget_s": 60.0}
    assert session.training_kwargs(60, 25, "cpu", "unet2d_fast") == {
        "device": "cpu", "steps": 25, "preset": "unet2d_fast"}
    with pytest.raises(TrainingError, match="time budget"):
        session.training_kwargs(0, 0, "cpu", None)


def _progress(**kw):
    from semsegloop.learn.training import TrainProgress
    base = dict(round=2, step=10, total_steps=None, elapsed_s=15.0, eta_s=45.0, loss=0.4321,
                throughput=12.34, val_dice=None)
    base.update(kw)
    return TrainProgress(**base)


def test_progress_bar_and_line():
    assert session.progress_percent(_progress()) == 25
    assert session.progress_percent(_progress(total_steps=40)) == 25
    assert session.progress_percent(_progress(eta_s=None), time_budget_s=30) == 50
    assert session.progress_percent(_progress(phase="cancelled")) == 100
    text = session.progress_text(_progress(total_steps=40, val_dice={"a": 0.8, "b": 0.6}))
    assert text == "Round 2 · step 10/40 · loss 0.432 · 12.3 patches/s · ETA 45 s · val Dice 0.700"
    assert session.format_duration(3725) == "1 h 02 min"
    assert session.format_duration(65) == "1 min 05 s"
    assert session.format_duration(None) == "?"


def test_train_button_becomes_stop_while_training():
    assert session.train_button_state(None, False) == session.ButtonState(
        "Train", True, session.train_button_state(None, False).tooltip)
    assert session.train_button_state("train", False).text == "Stop"
    stopping = session.train_button_state("train", True)
    assert stopping.text == "Stopping…" and not stopping.enabled
    assert not session.train_button_state("predict", False).enabled


def _job(op, state, **result):
    from semsegloop.service.client import Job
    job = Job("j1", op, {"id": "j1", "op": op}, state=state)
    job.final = {"event": state, "id": "j1", **result}
    return job


def test_messages_for_finished_jobs():
    done = _job("train", "done", round=3, steps=120, seconds=61.2, final_loss=0.2345, device="cpu")
    assert session.final_message(done) == (
        "info", "Round 3 trained: 120 steps in 1 min 01 s on cpu, final loss 0.234.", "")
    level, text, _ = session.final_message(_job("train", "cancelled", round=2, steps=0, seconds=0.4))
    assert level == "warning" and "first step" in text and "unchanged" in text
    assert "before it started" in session.final_message(_job("train", "cancelled"))[1]
    killed = session.final_message(_job("train", "cancelled", killed=True, message="..."))[1]
    assert "ending the engine" in killed and "labels are kept" in killed
    user = _job("train", "error", message="only 'cell' is painted", user_error=True, traceback="T")
    assert session.final_message(user) == ("error", "only 'cell' is painted", "")
    bug = _job("predict", "error", message="ZeroDivisionError: division by zero", user_error=False,
               traceback="Traceback: ZeroDivisionError")
    level, text, details = session.final_message(bug)
    assert text.startswith("Predict failed unexpectedly") and "ZeroDivisionError" in details
    crash = _job("train", "error", message="the SemSegLoop engine process ended unexpectedly",
                 user_error=False, crashed=True)
    assert session.final_message(crash)[1].startswith("The SemSegLoop engine stopped")
    assert session.final_message(_job("predict", "done", outputs={"a": "x", "b": "y"}))[1] == "Predicted 2 image(s)."


def test_prediction_follows_training_only_when_a_model_came_out_of_it():
    assert session.predict_after_training(_job("train", "done", steps=5), True, True)
    assert session.predict_after_training(_job("train", "cancelled", steps=5), True, True)
    assert not session.predict_after_training(_job("train", "cancelled", steps=0), True, True)
    assert not session.predict_after_training(_job("train", "cancelled", killed=True), True, True)
    assert not session.predict_after_training(_job("train", "error", message="x"), True, True)
    assert not session.predict_after_training(_job("train", "done", steps=5), False, True)
    assert not session.predict_after_training(_job("train", "done", steps=5), True, False)


def test_the_training_self_test_is_skipped_with_a_reason_without_torch_or_monai():
    assert session.missing_training_packages(lambda name: None) == ["torch", "monai"]
    assert session.missing_training_packages(lambda name: object() if name == "torch" else None) == ["monai"]
    full_loop = next(n for n in ast.walk(CLASSES["SemSegLoopTest"])
                     if isinstance(n, ast.FunctionDef) and n.name == "test_SemSegLoop_full_loop")
    assert "self.skipTest(reason)" in ast.get_source_segment(SOURCE, full_loop)


def _method(cls: str, name: str) -> str:
    fn = next(n for n in CLASSES[cls].body if isinstance(n, ast.FunctionDef) and n.name == name)
    return ast.get_source_segment(SOURCE, fn)


def test_findings_read_against_slicer_are_fixed_in_the_module():
    # 2: RGB (vector) volumes stay selectable; the default image is never a label map.
    field = next(n for n in CLASSES["SemSegLoopParameterNode"].body
                 if isinstance(n, ast.AnnAssign) and n.target.id == "inputVolume")
    assert ast.unparse(field.annotation) == "Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode]"
    assert "GetFirstNodeByClass" not in _method("SemSegLoopWidget", "initializeParameterNode")
    # 5: leaving the module does not stop training.
    assert "cancel" not in _method("SemSegLoopWidget", "exit")
    # 7: PyTorch Utils does not ask a second time.
    assert "installTorch(askConfirmation=False" in _method("SemSegLoopLogic", "ensureDependencies")
    # 9: an imported scene re-selects the editor node, as the core Segment Editor does.
    assert "EndImportEvent, self.onSceneEndImport" in _method("SemSegLoopWidget", "setup")
    # No Python thread and no polling timer in the module: the engine is a child process.
    assert "threading" not in SOURCE and "QTimer()" not in SOURCE
    assert 'qt.QProcess()' in SOURCE and "readyReadStandardOutput()" in SOURCE


def test_prediction_names_and_reference_remapping():
    assert session.prediction_name(3) == "SemSegLoop round 3"
    assert session.prediction_name(3, "slide 2") == "SemSegLoop round 3 (slide 2)"
    assert session.labels_name("CT") == "CT labels"
    ref = np.array([[[0, 1, 2, 2]]], np.uint8)
    np.testing.assert_array_equal(session.remap_labels(ref, [1, 3]), [[[0, 1, 3, 3]]])


def test_metric_rows_flatten_a_real_evaluation_report():
    from semsegloop.measure.metrics import evaluate_labels

    ref = np.zeros((1, 16, 16), np.uint8)
    ref[0, :, :8] = 1
    ref[0, :, 8:] = 2
    pred = ref.copy()
    pred[0, :, 7] = 2
    report = {"round": 1, "images": {"img": evaluate_labels(pred, ref, ["a", "b"], dims=2)}}
    rows = session.metric_rows(report, {"img": "Image 1"})
    assert [(r["image"], r["class"]) for r in rows] == [("Image 1", "a"), ("Image 1", "b")]
    assert rows[0]["dice"] == pytest.approx(2 * 112 / (112 + 128))
    assert math.isfinite(rows[0]["hd95_mm"]) and rows[0]["reference_voxels"] == 128
    assert [r["class"] for r in session.metric_rows(report, None, ["b"])] == ["b"]
