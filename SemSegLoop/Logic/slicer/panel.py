"""Decisions and wording of the SemSegLoop panel, as plain functions without Slicer or Qt:
2D/3D choice, class list edits, whether the painted labels can train, progress and result texts.

The widget and the module logic call these so that what the person sees can be tested with pytest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from semsegloop.errors import LabelError, ProjectError, TrainingError

# Okabe-Ito colours (colour-blind friendly), the same defaults as the engine's projects.
DEFAULT_COLORS = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
                  (213, 94, 0), (204, 121, 167), (153, 153, 153), (128, 64, 0), (64, 0, 128)]
DEFAULT_CLASSES = ["foreground", "background"]
PREDICTION_PREFIX = "SemSegLoop round"


# ------------------------------------------------------------------------------------ paths

def is_unset_path(path) -> bool:
    """The parameter node stores an unset folder as Path() ("."); treat that, None and "" alike."""
    return path is None or str(path).strip() in ("", ".")


def project_folder_state(path) -> str:
    """"unset", "project" (holds project.json), "empty" (missing or empty folder: a new project
    can be created there) or "other" (a non-empty folder that is not a project)."""
    if is_unset_path(path):
        return "unset"
    p = Path(path)
    if (p / "project.json").is_file():
        return "project"
    if not p.exists() or (p.is_dir() and not any(p.iterdir())):
        return "empty"
    return "other"


# ------------------------------------------------------------------------------------ 2D / 3D

def resolve_dims(choice: str, n_slices: int | None, from_folder: bool = False) -> int:
    """2 or 3 from the panel's choice ("auto", "2D", "3D").

    Auto: a folder of 2D images or a one-slice volume trains a 2D net; any other volume a 3D net.
    """
    choice = (choice or "auto").strip().lower()
    if choice in ("2", "2d"):
        return 2
    if choice in ("3", "3d"):
        return 3
    if choice != "auto":
        raise ProjectError(f"2D/3D setting '{choice}' is not one of auto, 2D, 3D")
    if from_folder:
        return 2
    if n_slices is None:
        raise ProjectError("select or load an image first so SemSegLoop can choose 2D or 3D "
                           "(or set 2D/3D explicitly)")
    return 2 if n_slices <= 1 else 3


# ------------------------------------------------------------------------------------ classes

def hex_color(rgb: Sequence[float]) -> str:
    r, g, b = (int(round(float(c))) for c in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def rgb_from_hex(text: str) -> list[int]:
    t = str(text).strip().lstrip("#")
    if len(t) != 6:
        raise ProjectError(f"colour '{text}' is not of the form #rrggbb")
    try:
        return [int(t[i:i + 2], 16) for i in (0, 2, 4)]
    except ValueError:
        raise ProjectError(f"colour '{text}' is not of the form #rrggbb") from None


def default_color(index: int) -> tuple[int, int, int]:
    return DEFAULT_COLORS[index % len(DEFAULT_COLORS)]


def new_class_name(existing: Sequence[str]) -> str:
    n = len(existing) + 1
    while f"class {n}" in existing:
        n += 1
    return f"class {n}"


def make_classes(names: Sequence[str], colors: Sequence[str] | None = None) -> list[dict]:
    """Validated ``[{"name", "color": [r, g, b]}]`` from the panel's lists (colours as #rrggbb;
    missing ones get defaults). Raises ProjectError naming the offending class."""
    classes = []
    seen = set()
    for i, raw in enumerate(names):
        name = str(raw).strip()
        if not name:
            raise ProjectError(f"class {i + 1} has no name; give every class a name")
        if name in seen:
            raise ProjectError(f"two classes are named '{name}'; class names must be unique")
        seen.add(name)
        color = (rgb_from_hex(colors[i]) if colors is not None and i < len(colors) and colors[i]
                 else list(default_color(i)))
        classes.append({"name": name, "color": color})
    return classes


def check_class_edit(old: Sequence[str], new: Sequence[str], project_has_labels: bool) -> None:
    """Refuse edits that would change what painted label values mean.

    Renaming, recolouring and appending are fine (segments keep their identity through tags);
    removing a class, or reordering them, once labels exist would relabel strokes silently.
    """
    if len(new) < 2:
        raise ProjectError("SemSegLoop needs at least two classes (e.g. the structure you want "
                           "and 'background')")
    if not project_has_labels:
        return
    if len(new) < len(old):
        removed = [n for n in old if n not in new]
        raise ProjectError(f"class {', '.join(repr(n) for n in removed) or 'removed'} cannot be "
                           "removed once the project has labels (the label values of the classes "
                           "after it would shift). Rename it instead, or start a new project folder")


# ------------------------------------------------------------------------------------ labels

def painted_pixels(label_arrays: Iterable[np.ndarray], n_classes: int) -> np.ndarray:
    """Painted pixel count per class value 0..K (index 0 = unlabeled) over all arrays."""
    counts = np.zeros(n_classes + 1, dtype=np.int64)
    for arr in label_arrays:
        a = np.asarray(arr)
        if a.size:
            counts += np.bincount(a.ravel().astype(np.int64), minlength=n_classes + 1)[:n_classes + 1]
    return counts


def check_ready_to_train(label_arrays: Iterable[np.ndarray], class_names: Sequence[str]) -> dict:
    """Raise LabelError unless at least two classes have strokes; return {class: pixels}."""
    counts = painted_pixels(label_arrays, len(class_names))
    painted = {name: int(counts[k]) for k, name in enumerate(class_names, 1) if counts[k]}
    missing = [name for name in class_names if name not in painted]
    if not painted:
        raise LabelError("nothing is painted yet: in Paint, select a class and paint a few strokes "
                         "of at least two classes before pressing Train")
    if len(painted) < 2:
        (only,) = painted
        raise LabelError(f"only '{only}' is painted; paint at least two classes so the network has "
                         f"something to tell apart (not painted yet: {', '.join(missing)})")
    return painted


def remap_labels(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Map label k (1..len(values)) to ``values[k-1]``; 0 stays 0. Used when a reference
    segmentation has segments for only some of the classes."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[1:len(values) + 1] = np.asarray(values, dtype=np.uint8)
    return lut[np.asarray(labels, dtype=np.uint8)]


# ------------------------------------------------------------------------------------ training

def training_kwargs(time_budget_s: float | None, steps: int | None, device: str,
                    preset: str | None) -> dict:
    """Arguments for Project.train from the panel: steps win when set (> 0), else the budget."""
    kwargs: dict = {"device": (device or "auto").lower()}
    if steps:
        if steps < 0:
            raise TrainingError(f"steps must be positive (got {steps})")
        kwargs["steps"] = int(steps)
    else:
        if not time_budget_s or time_budget_s <= 0:
            raise TrainingError("set a time budget (seconds) or a number of steps greater than 0")
        kwargs["time_budget_s"] = float(time_budget_s)
    if preset:
        kwargs["preset"] = preset
    return kwargs


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def progress_percent(progress, time_budget_s: float | None = None) -> int:
    """0..100 for the progress bar, from steps, or elapsed vs ETA when time-based."""
    if getattr(progress, "phase", "train") in ("done", "cancelled"):
        return 100
    if progress.total_steps:
        frac = progress.step / progress.total_steps
    elif progress.eta_s is not None and progress.elapsed_s + progress.eta_s > 0:
        frac = progress.elapsed_s / (progress.elapsed_s + progress.eta_s)
    elif time_budget_s:
        frac = progress.elapsed_s / time_budget_s
    else:
        return 0
    return int(max(0, min(100, round(100 * frac))))


def progress_text(progress) -> str:
    """One line for the panel: round, step, loss, speed, ETA, validation Dice."""
    steps = f"{progress.step}/{progress.total_steps}" if progress.total_steps else f"{progress.step}"
    parts = [f"Round {progress.round}", f"step {steps}", f"loss {progress.loss:.3f}"]
    if progress.throughput:
        parts.append(f"{progress.throughput:.1f} patches/s")
    if getattr(progress, "phase", "train") == "train":
        parts.append(f"ETA {format_duration(progress.eta_s)}")
    if progress.val_dice:
        parts.append(f"val Dice {np.mean(list(progress.val_dice.values())):.3f}")
    return " · ".join(parts)


@dataclass(frozen=True)
class ButtonState:
    text: str
    enabled: bool
    tooltip: str


def train_button_state(busy_job: str | None, stopping: bool) -> ButtonState:
    """Train becomes Stop while training; disabled while another job runs or a stop is pending
    (at most 2 s: then the engine is ended)."""
    if busy_job is None:
        return ButtonState("Train", True, "Train the network on the painted labels of all images "
                                          "of the project (warm start from the last round)")
    if stopping:
        return ButtonState("Stopping…", False, "Waiting for the current step to finish")
    if busy_job == "train":
        return ButtonState("Stop", True, "Stop training; the model of the last finished step is "
                                         "kept")
    return ButtonState("Train", False, f"Wait for the running {busy_job} job to finish")


# ------------------------------------------------------------------------------------ names

def prediction_name(round_index: int, image_name: str | None = None) -> str:
    base = f"{PREDICTION_PREFIX} {round_index}"
    return f"{base} ({image_name})" if image_name else base


def uncertainty_name(round_index: int, image_name: str) -> str:
    return f"SemSegLoop uncertainty round {round_index} ({image_name})"


def labels_name(volume_name: str) -> str:
    return f"{volume_name} labels"


def predict_after_training(job, auto_predict: bool, has_image: bool) -> bool:
    """Whether a finished train job is followed by predicting the current image: it trained at
    least one step (done, or stopped after some steps) and the person asked for it."""
    steps = (job.result or {}).get("steps") or 0
    return bool(auto_predict and has_image and job.state in ("done", "cancelled") and steps > 0
                and not job.result.get("killed"))


def missing_training_packages(find_spec) -> list[str]:
    """The packages training needs that ``find_spec`` (importlib.util.find_spec) cannot find."""
    return [name for name in ("torch", "monai") if find_spec(name) is None]


# ------------------------------------------------------------------------------------ results

def final_message(job) -> tuple[str, str, str]:
    """(level, text, details) for a job of the engine service that has its final event; level is
    "info", "warning" or "error". ``job`` is a semsegloop.service.client.Job (.op, .state,
    .result: the final event's fields)."""
    kind, op, r = job.state, job.op, job.result
    if kind == "error":
        text = r.get("message") or "the engine reported an error"
        if r.get("user_error"):
            return "error", text, ""
        if r.get("crashed"):
            return "error", f"The SemSegLoop engine stopped: {text}", r.get("traceback", "")
        return "error", f"{op.capitalize()} failed unexpectedly: {text}", r.get("traceback", "")
    if op == "train":
        steps = r.get("steps") or 0
        if kind == "cancelled":
            if r.get("killed"):
                return "warning", ("Training was stopped by ending the engine (it did not stop within "
                                   "2 s); the last saved model and your labels are kept."), ""
            if "steps" not in r:
                return "warning", "Training was stopped before it started; labels and model unchanged.", ""
            if steps:
                return "warning", (f"Training stopped after {steps} step{'s' if steps != 1 else ''} "
                                   f"({format_duration(r.get('seconds'))}); the model of round "
                                   f"{r.get('round')} is kept."), ""
            return "warning", ("Training stopped during its first step; labels and the previous "
                               "model are unchanged."), ""
        loss = "" if r.get("final_loss") is None else f", final loss {r['final_loss']:.3f}"
        return "info", (f"Round {r.get('round')} trained: {steps} steps in "
                        f"{format_duration(r.get('seconds'))} on {r.get('device')}{loss}."), ""
    if op == "predict":
        n = len(r.get("outputs") or {})
        if kind == "cancelled":
            return "warning", f"Prediction stopped; {n} image(s) were predicted.", ""
        return "info", f"Predicted {n} image(s).", ""
    if kind == "cancelled":
        return "warning", f"{op.capitalize()} was stopped.", ""
    return "info", f"{op.capitalize()} finished.", ""


def metric_rows(report: dict, image_names: dict[str, str] | None = None,
                class_names: Sequence[str] | None = None) -> list[dict]:
    """Flatten Project.evaluate's report into table rows: image, class, Dice, Jaccard, HD95, MSD.

    class_names: only these classes (those the reference annotates); default all."""
    rows = []
    for image_id, rep in report.get("images", {}).items():
        for name, m in rep.get("classes", {}).items():
            if class_names is not None and name not in class_names:
                continue
            rows.append({"image": (image_names or {}).get(image_id, image_id), "class": name,
                         "dice": m.get("dice", math.nan), "jaccard": m.get("jaccard", math.nan),
                         "hd95_mm": m.get("hd95", math.nan), "msd_mm": m.get("msd", math.nan),
                         "predicted_voxels": m.get("pred_voxels", 0),
                         "reference_voxels": m.get("ref_voxels", 0)})
    return rows
