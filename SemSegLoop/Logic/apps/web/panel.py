"""The web panel's decisions as plain Python (no trame, no MRML): the job state machine fed by
the engine service's events, progress/ETA/loss text, class edits, page tables, host/token rules.

Words follow the Slicer module: Train / Stop, Predict current image / all images, Copy prediction
into labels, Export label maps, Class fractions.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import math
import re
from pathlib import Path

from semsegloop.errors import SemSegLoopError

JOB_TITLES = {"train": "Training", "predict": "Predicting", "export": "Exporting",
              "fractions": "Counting class fractions", "refine": "Refining",
              "suggest": "Ranking images"}
LOSS_POINTS = 200   # the chart keeps the last this many steps


class WebInputError(SemSegLoopError):
    """Something typed or clicked on the web page cannot be done (the message says why)."""


class PanelModel:
    """What the panel shows about the engine's work: idle, or one job with progress.

    ``on_event`` takes the service's events (protocol 1: accepted / progress / done /
    cancelled / error, plus ``crashed`` from the client when the process died) and returns
    ``"<job>_done"`` when a job finished well, so the app can load its files.
    """

    def __init__(self):
        self.busy = ""            # "" or the running job: train, predict, export, ...
        self.progress = 0.0       # 0..100
        self.status = "Ready."
        self.error = ""
        self.losses: list[float] = []
        self.round = 0
        self.stopping_since = None

    # ------------------------------------------------------------------ starting jobs
    def _check_idle(self, what: str) -> None:
        if self.busy:
            raise WebInputError(f"{JOB_TITLES[self.busy].lower()} is still running; wait for it "
                                f"or press Stop before {what}")

    def start_train(self, time_budget_s, steps=None) -> dict:
        """Validate the budget (seconds, or a fixed number of steps when ``steps`` is a positive
        whole number) and enter the training state; returns the train request's fields."""
        self._check_idle("training again")
        fields = {}
        if steps not in (None, "", 0, "0"):
            try:
                n = float(steps)
            except (TypeError, ValueError):
                raise WebInputError(f"Steps '{steps}' is not a whole number") from None
            if not math.isfinite(n) or n < 1 or n != int(n):
                raise WebInputError(f"Steps must be a whole number of at least 1 (0: use the time "
                                    f"budget), got {steps}")
            fields["steps"] = int(n)
        else:
            try:
                budget = float(time_budget_s)
            except (TypeError, ValueError):
                raise WebInputError(f"Time budget '{time_budget_s}' is not a number of seconds") from None
            if not math.isfinite(budget) or budget <= 0:
                raise WebInputError(f"Time budget must be a positive number of seconds, got {time_budget_s}")
            fields["time_budget_s"] = budget
        self.start_job("train")
        self.losses = []
        self.status = f"Training round {self.round + 1} ..."
        return fields

    def start_predict(self, scope: str) -> None:
        if scope not in ("current", "all"):
            raise WebInputError(f"predict scope must be 'current' or 'all', got {scope!r}")
        if self.round == 0:
            raise WebInputError("no trained model yet: press Train first")
        self.start_job("predict")
        self.status = "Predicting the current image ..." if scope == "current" else "Predicting all images ..."

    def start_job(self, job: str) -> None:
        self._check_idle(JOB_TITLES.get(job, job).lower())
        self.busy, self.progress, self.error = job, 0.0, ""
        self.stopping_since = None
        self.status = f"{JOB_TITLES.get(job, job)} ..."

    def stopping(self) -> None:
        if not self.busy:
            raise WebInputError("nothing is running")
        self.status = "Stopping ..."

    # ------------------------------------------------------------------ events
    def on_event(self, ev: dict) -> str | None:
        kind = ev.get("event")
        if kind == "progress" and self.busy:
            self._on_progress(ev)
            return None
        if kind == "crashed":
            job = self.busy
            self.busy, self.progress = "", 0.0
            # The client's message says what happened and that the next request restarts it.
            self.error = str(ev.get("message") or "the engine service stopped; your labels and "
                             "the last model are kept, the next request starts a new one")
            self.status = f"{JOB_TITLES.get(job, 'Work')} did not finish." if job else "Ready."
            return None
        if kind not in ("done", "cancelled", "error") or not self.busy:
            return None
        job, self.busy = self.busy, ""
        if kind == "error":
            self.error = str(ev.get("message") or "the engine reported an error")
            self.status = f"{JOB_TITLES.get(job, job)} failed."
            return None
        if kind == "cancelled":
            self.status = ("Stopped; the model of the last finished step is kept."
                           if job == "train" else f"{JOB_TITLES.get(job, job)} stopped.")
            self.progress = 0.0
            return None
        self.progress = 100.0
        if job == "train":
            self.round = int(ev.get("round", self.round + 1) or self.round + 1)
            loss = self.losses[-1] if self.losses else None
            self.status = (f"Round {self.round} trained" +
                           (f", final loss {loss:.3f}." if loss is not None else "."))
        elif job == "predict":
            self.status = f"Prediction of round {self.round} ready."
        else:
            self.status = f"{JOB_TITLES.get(job, job)} done."
        return f"{job}_done"

    def _on_progress(self, ev: dict) -> None:
        loss = ev.get("loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            self.losses = (self.losses + [float(loss)])[-LOSS_POINTS:]
        elapsed, eta = ev.get("elapsed_s"), ev.get("eta_s")
        frac = ev.get("fraction")
        if frac is None and isinstance(elapsed, (int, float)) and isinstance(eta, (int, float)):
            total = elapsed + max(eta, 0.0)
            frac = elapsed / total if total > 0 else 0.0
        if isinstance(frac, (int, float)):
            self.progress = max(self.progress, min(100.0, 100.0 * float(frac)))
        if self.busy == "train":
            parts = [f"Training round {self.round + 1}"]
            if ev.get("step") is not None:
                parts.append(f"step {ev['step']}")
            if self.losses:
                parts.append(f"loss {self.losses[-1]:.3f}")
            if isinstance(eta, (int, float)):
                parts.append(f"ETA {format_eta(eta)}")
            phase = ev.get("phase")
            if phase and phase not in ("train", "done"):
                parts.append(f"({phase})")
            self.status = ", ".join(parts)

    # ------------------------------------------------------------------ errors / messages
    def fail(self, message: str) -> None:
        self.error = message

    def say(self, message: str) -> None:
        self.error, self.status = "", message

    def view(self) -> dict:
        """The trame state keys the page binds to."""
        return {"engine_job": self.busy, "progress": round(self.progress, 1), "status": self.status,
                "error": self.error, "loss_values": [round(v, 4) for v in self.losses],
                "round": self.round, "train_label": "Stop" if self.busy == "train" else "Train"}


def format_eta(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    return f"{s // 60}:{s % 60:02d}"


# ---------------------------------------------------------------------- classes
def _hex(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*[int(c) for c in rgb])


def parse_color(text: str) -> list[int]:
    m = re.fullmatch(r"#?([0-9a-fA-F]{6})", str(text).strip())
    if not m:
        raise WebInputError(f"colour '{text}' is not #rrggbb")
    h = m.group(1)
    return [int(h[i:i + 2], 16) for i in (0, 2, 4)]


def classes_for_page(classes: list[dict]) -> list[dict]:
    return [{"value": k, "name": c["name"], "color": _hex(c["color"])} for k, c in enumerate(classes, 1)]


def _class_index(classes, value: int) -> int:
    if not 1 <= value <= len(classes):
        raise WebInputError(f"there is no class {value} (classes 1..{len(classes)})")
    return value - 1


def rename_class(classes: list[dict], value: int, name: str) -> list[dict]:
    out = [dict(c) for c in classes]
    i = _class_index(out, value)
    name = str(name).strip()
    if not name:
        raise WebInputError(f"class {value} needs a name")
    if any(c["name"] == name for j, c in enumerate(out) if j != i):
        raise WebInputError(f"a class named '{name}' exists already")
    out[i]["name"] = name
    return out


def recolor_class(classes: list[dict], value: int, color: str) -> list[dict]:
    out = [dict(c) for c in classes]
    out[_class_index(out, value)]["color"] = parse_color(color)
    return out


def add_class(classes: list[dict], name: str) -> list[dict]:
    from semsegloop.project import DEFAULT_COLORS

    name = str(name or "").strip()
    if not name:
        raise WebInputError("type a name for the new class")
    if any(c["name"] == name for c in classes):
        raise WebInputError(f"a class named '{name}' exists already")
    color = list(DEFAULT_COLORS[len(classes) % len(DEFAULT_COLORS)])
    return [dict(c) for c in classes] + [{"name": name, "color": color}]


def mask_range(lo, hi) -> tuple[float, float]:
    try:
        a, b = float(lo), float(hi)
    except (TypeError, ValueError):
        raise WebInputError(f"masked painting range '{lo}'..'{hi}' is not two numbers") from None
    return (a, b) if a <= b else (b, a)


def copied_message(added: dict[int, int], names: list[str]) -> str:
    total = sum(added.values())
    if not total:
        return "Nothing copied: every predicted pixel is painted already (or erased)."
    parts = [f"{names[k - 1]} {n}" for k, n in sorted(added.items()) if n]
    return f"Copied {total} predicted pixels into the labels ({', '.join(parts)})."


# ---------------------------------------------------------------------- opening a project
def new_project_request(project_path, image_path, class_text, dims):
    """What "Open / create" does with the fields typed on the page.

    Returns (project folder, image source or None to open an existing project, class names,
    dims). A folder holding project.json is opened; otherwise the image file or folder of 2D
    images is needed, with at least two class names.
    """
    text = str(project_path or "").strip()
    if not text:
        raise WebInputError("type a project folder first")
    target = Path(text).expanduser()
    if (target / "project.json").is_file():
        return target, None, [], 0
    if target.exists() and not target.is_dir():
        raise WebInputError(f"project folder '{target}' is a file")
    if target.is_dir() and any(target.iterdir()):
        raise WebInputError(f"'{target}' is not a SemSegLoop project (no project.json) and is "
                            "not empty; give a new or empty folder")
    source_text = str(image_path or "").strip()
    if not source_text:
        raise WebInputError(f"no project in '{target}' yet: type the image file or folder of 2D "
                            "images to make it from")
    source = Path(source_text).expanduser()
    if not source.exists():
        raise WebInputError(f"image or folder '{source}' does not exist")
    names = [n.strip() for n in str(class_text or "").split(",") if n.strip()]
    if len(names) < 2:
        raise WebInputError(f"give at least two classes, comma-separated (got '{class_text}')")
    try:
        d = int(dims)
    except (TypeError, ValueError):
        d = 0
    if d not in (2, 3):
        raise WebInputError(f"choose 2D or 3D (got {dims!r})")
    return target, source, names, d


# ---------------------------------------------------------------------- images / tables
def images_for_page(project, ranking=None) -> list[dict]:
    """One row per image: id, name, painted pixels and, with a Suggest ranking, its rank."""
    rank = {}
    if ranking:
        for i, item in enumerate(ranking, 1):
            image_id = item.get("image_id", item.get("id")) if isinstance(item, dict) else item
            rank.setdefault(image_id, len(rank) + 1)   # 3D: several slices of one image
    rows = []
    for image_id in project.image_ids:
        info = project.image_info(image_id)
        painted = sum(info.get("labeled_pixels", {}).values())
        rows.append({"id": image_id, "name": info["name"], "painted": int(painted),
                     "rank": rank.get(image_id)})
    if rank:
        rows.sort(key=lambda r: (r["rank"] is None, r["rank"] or 0))
    return rows


def suggest_message(suggestions: list[dict], project) -> str:
    if not suggestions:
        return "Nothing to suggest: every image is painted."
    first = suggestions[0]
    name = project.image_info(first["image_id"])["name"] if first.get("image_id") in project.image_ids \
        else first.get("image_id")
    where = f" slice {first['slice']}" if first.get("slice") not in (None, 0) else ""
    return (f"Paint next: {name}{where} (uncertainty {float(first.get('score', 0)):.2f}); "
            "the images list is ranked.")


def read_fractions(path: Path) -> tuple[list[dict], str]:
    """The class-fraction CSV as table rows and as text for the page's download button."""
    path = Path(path)
    if not path.is_file():
        raise WebInputError(f"class fractions file '{path}' was not written")
    text = path.read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    for r in rows:
        try:
            r["fraction"] = f"{float(r['fraction']):.4f}"
            r["area_or_volume"] = f"{float(r['area_or_volume']):.4g}"
        except (KeyError, ValueError):
            pass
    return rows, text


def read_uncertainty(path) -> "np.ndarray":
    """The uncertainty map (S, Y, X) float32 in [0, 1] the service wrote next to a prediction."""
    import numpy as np
    import SimpleITK as sitk

    try:
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as e:
        raise WebInputError(f"uncertainty map '{path}' cannot be read: {e}") from None
    return np.asarray(arr, np.float32).reshape((-1,) + arr.shape[-2:])


# ---------------------------------------------------------------------- serving
def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def page_url(host: str, port: int, token: str) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/index.html?secret={token}"
