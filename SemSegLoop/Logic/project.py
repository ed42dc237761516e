"""A SemSegLoop project: one folder holding the classes, images, sparse labels, models,
predictions and training log of a labelling effort, and the API that runs the loop on it.

Layout (every write is atomic; nothing painted or trained is overwritten in place):
    project.json                 versioned settings, images, rounds history
    images/<id>.nrrd             copied images with geometry (or a reference to the source)
    labels/<id>.nrrd             sparse labels, 0 = unlabeled, k = class k
    checkpoints/round_NNN.*      safetensors weights + JSON (one per round; earlier ones kept)
    predictions/round_NNN/       <id>.nrrd (+ .tif for 2D), <id>_uncertainty.nrrd
    train_log.jsonl              one JSON object per training step / event
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import numbers
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from semsegloop.data import folder_lock, imageio
from semsegloop.data.atomic import atomic_write_text, remove_temporaries
from semsegloop.errors import (CheckpointError, ImageReadError, LabelError, ProjectError,
                     TrainingError)
from semsegloop.data.imageio import Geometry, ImageData

log = logging.getLogger("semsegloop")

FORMAT_NAME = "semsegloop-project"
FORMAT_VERSION = 1
PROJECT_FILE = "project.json"
# Unpainted images the teacher may pseudo-label for one round (more cost little per step).
MAX_PSEUDO_ONLY_IMAGES = 8

# Distinct, colour-blind-friendly defaults (Okabe-Ito) for classes without a colour.
DEFAULT_COLORS = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
                  (213, 94, 0), (204, 121, 167), (153, 153, 153), (128, 64, 0), (64, 0, 128)]


class Project:
    """The scripting surface of SemSegLoop (see README "Python API")."""

    def __init__(self, path: Path, meta: dict, read_only: bool = False):
        self.path = Path(path)
        self._meta = meta
        self._image_cache: dict[str, ImageData] = {}
        self._model = None          # (round, plan, torch module) of the loaded model
        self._teacher = None        # (round, Teacher, fusion record) of the loaded round
        self._grown = {}            # (round, image id): (spacing, grown labels), see _grown_for
        self._lock = threading.RLock()
        self._read_only = read_only
        self._folder_lock: folder_lock.FolderLock | None = None
        self._train_lock = threading.Lock()   # one round at a time
        # image_id -> (round, Prediction, refine's per-image cache), for refine
        self._recent: dict[str, tuple] = {}

    # ---------------------------------------------------------------- create / open / save
    @classmethod
    def create(cls, path, classes: Iterable[str], dims: int = 2, colors=None,
               channels: int | None = None, normalization: dict | None = None,
               preset: str | None = None, exist_ok: bool = False) -> "Project":
        """Make a new project folder. ``classes`` are names in label order (label k = k-th)."""
        path = Path(path)
        names = _check_class_names([str(c).strip() for c in classes])
        if dims not in (2, 3):
            raise ProjectError(f"dims must be 2 or 3, got {dims!r}")
        if colors is not None and len(colors) != len(names):
            raise ProjectError(f"{len(colors)} colours given for {len(names)} classes")
        if colors is not None:
            colors = [_check_color(c, n) for c, n in zip(colors, names)]
        if (path / PROJECT_FILE).exists() and not exist_ok:
            raise ProjectError(f"'{path}' already holds a project; use Project.open")
        if path.exists() and not path.is_dir():
            raise ProjectError(f"'{path}' exists and is not a folder")
        from semsegloop.learn.networks import DEFAULT_PRESET, load_preset

        preset = preset or DEFAULT_PRESET[dims]
        if load_preset(preset)["dims"] != dims:
            raise ProjectError(f"network preset '{preset}' is not a {dims}D network")
        if normalization is not None:
            from semsegloop.data.normalization import validate_normalization
            normalization = validate_normalization(normalization)
        cls_list = []
        for i, n in enumerate(names):
            col = colors[i] if colors is not None else DEFAULT_COLORS[i % len(DEFAULT_COLORS)]
            cls_list.append({"name": n, "color": list(col)})
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "classes": cls_list,
                "dims": dims, "channels": channels, "normalization": normalization,
                "preset": preset, "images": [], "rounds": [],
                "created": _now()}
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ProjectError(f"cannot create project folder '{path}': {e.strerror or e}") from None
        proj = cls(path, meta)
        proj._folder_lock = folder_lock.acquire(path)
        try:
            proj.save()
        except BaseException:
            proj.close()
            raise
        return proj

    @classmethod
    def open(cls, path, read_only: bool = False) -> "Project":
        """Open a project folder for writing (one writer at a time: it takes the folder's lock,
        released by close(), leaving a ``with`` block, or at exit) or, with ``read_only=True``,
        to predict/evaluate without writing anything in the folder (no lock is taken)."""
        path = Path(path)
        f = path / PROJECT_FILE
        if path.is_file():
            raise ProjectError(f"'{path}' is a file, not a project folder")
        if not path.is_dir():
            raise ProjectError(f"project folder '{path}' does not exist")
        if not f.is_file():
            raise ProjectError(f"'{path}' is not a SemSegLoop project (no {PROJECT_FILE})")
        try:
            meta = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ProjectError(f"'{f}' is damaged: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise ProjectError(f"'{f}' is not a SemSegLoop project file (format "
                               f"{meta.get('format') if isinstance(meta, dict) else None!r})")
        version = meta.get("version")
        if not isinstance(version, int):
            raise ProjectError(f"'{f}' has no valid format version")
        if version > FORMAT_VERSION:
            raise ProjectError(f"'{f}' was written by a newer SemSegLoop (format version "
                               f"{version}; this one reads up to {FORMAT_VERSION}); upgrade")
        _check_meta(meta, f)
        proj = cls(path, meta, read_only=read_only)
        if read_only:
            proj._count_labels_from_files()
            return proj
        proj._folder_lock = folder_lock.acquire(path)
        try:
            proj._remove_interrupted_writes()
            if proj._count_labels_from_files():
                proj.save()
        except BaseException:
            proj.close()
            raise
        return proj

    def save(self) -> None:
        with self._lock:
            self._check_writable("save project.json")
            atomic_write_text(self.path / PROJECT_FILE, json.dumps(self._meta, indent=2))

    @property
    def read_only(self) -> bool:
        return self._read_only

    def close(self) -> None:
        """Give back the folder's write lock (idempotent); the object is read-only afterwards."""
        lock, self._folder_lock = self._folder_lock, None
        self._read_only = True
        if lock is not None:
            lock.release()

    def __enter__(self) -> "Project":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_writable(self, what: str) -> None:
        if self._read_only:
            raise ProjectError(f"project '{self.path}' is open read-only (or closed): cannot "
                               f"{what}; open it with Project.open('{self.path}') to write")

    def _remove_interrupted_writes(self) -> None:
        # Safe only because we hold the lock: nobody else is writing a temporary right now.
        dirs = [self.path, self.path / "images", self.path / "labels", self.path / "checkpoints"]
        dirs += sorted((self.path / "predictions").glob("round_*"))
        removed = [p for d in dirs for p in remove_temporaries(d)]
        if removed:
            log.info("removed %d file(s) left by interrupted writes in '%s': %s", len(removed),
                     self.path, ", ".join(p.name for p in removed[:5]))

    def _count_labels_from_files(self) -> bool:
        """Make each image's painted-pixel counts those of its labels file (a kill between
        writing a labels file and project.json leaves the counts behind); True if any changed.
        A file whose size and modification time match the stamp recorded with its counts is
        not read again."""
        changed = False
        for entry in self._meta["images"]:
            p = self._labels_path(entry["id"])
            try:
                st = p.stat()
            except FileNotFoundError:
                if entry.get("labeled_pixels"):
                    entry["labeled_pixels"], changed = {}, True
                entry.pop("labels_file", None)
                continue
            stamp = [st.st_size, st.st_mtime_ns]
            if entry.get("labels_file") == stamp and "labeled_pixels" in entry:
                continue
            try:
                arr, _ = imageio.read_labels(p)
            except ImageReadError as e:
                log.warning("labels of image '%s' cannot be read: %s", entry["id"], e)
                continue
            counts = _counts(arr, self.n_classes)
            if counts != entry.get("labeled_pixels"):
                log.info("labels of image '%s' counted from %s", entry["id"], p.name)
            entry["labeled_pixels"], entry["labels_file"], changed = counts, stamp, True
        return changed

    # ---------------------------------------------------------------- properties
    @property
    def classes(self) -> list[dict]:
        return [dict(c) for c in self._meta["classes"]]

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self._meta["classes"]]

    @property
    def n_classes(self) -> int:
        return len(self._meta["classes"])

    @property
    def dims(self) -> int:
        return int(self._meta["dims"])

    @property
    def channels(self) -> int | None:
        return self._meta.get("channels")

    @property
    def preset(self) -> str:
        return self._meta["preset"]

    @property
    def normalization(self) -> dict | None:
        n = self._meta.get("normalization")
        return dict(n) if n else None

    @property
    def round(self) -> int:
        done = [r for r in self._meta["rounds"] if r.get("checkpoint")]
        return int(done[-1]["round"]) if done else 0

    @property
    def rounds(self) -> list[dict]:
        return [dict(r) for r in self._meta["rounds"]]

    @property
    def image_ids(self) -> list[str]:
        return [im["id"] for im in self._meta["images"]]

    def set_classes(self, classes: list[dict]) -> None:
        """Rename/recolour classes or append new ones; removing or reordering is refused, since
        label values already painted refer to positions."""
        self._check_writable("change the classes")
        old = self._meta["classes"]
        if len(classes) < len(old):
            raise ProjectError("classes cannot be removed from a project with labels; "
                               "relabel instead")
        new = []
        for i, c in enumerate(classes):
            name = str(c["name"]).strip()
            color = _check_color(c.get("color", DEFAULT_COLORS[i % len(DEFAULT_COLORS)]), name)
            new.append({"name": name, "color": color})
        _check_class_names([c["name"] for c in new])
        self._meta["classes"] = new
        self.save()

    # ---------------------------------------------------------------- images and labels
    def _entry(self, image_id: str) -> dict:
        for im in self._meta["images"]:
            if im["id"] == image_id:
                return im
        raise ProjectError(f"no image '{image_id}' in project '{self.path}' "
                           f"(images: {', '.join(self.image_ids) or 'none'})")

    def add_image(self, source, spacing=None, name: str | None = None, copy: bool = True,
                  geometry: Geometry | None = None) -> str:
        """Add an image file, folder (2D stack or DICOM series), numpy array or ImageData.

        Arrays: (Y,X[,C]) or (N,Y,X[,C]) in 2D, (Z,Y,X[,C]) in 3D. ``copy=False`` keeps only a
        reference to a file on disk (the project then needs that file to stay where it is).
        Returns the new image id.
        """
        self._check_writable("add an image")
        if isinstance(source, (ImageData, str, os.PathLike)):
            image = source if isinstance(source, ImageData) else imageio.read_image(source, dims=self.dims)
            if spacing is not None:  # the file's spacing is wrong or missing (PNG, TIFF)
                g = image.geometry
                image = ImageData(image.array, Geometry(imageio._spacing_tuple(spacing, image.name),
                                                        g.origin, g.direction),
                                  image.name, image.source)
        else:
            image = imageio.as_image_data(source, spacing=spacing, name=name or "image",
                                          dims=self.dims, channels=self.channels)
        if geometry is not None:
            image = ImageData(image.array, geometry, image.name, image.source)
        name = name or image.name
        self._check_image_size(image.array.shape, name)
        imageio.check_finite(image.array, name)
        if self.dims == 3 and image.array.shape[0] < 2:
            log.info("3D project: image '%s' has a single slice", name)
        if self.channels is None:
            self._meta["channels"] = image.channels
        elif image.channels != self.channels:
            raise ImageReadError(f"image '{name}' has {image.channels} channel(s) but project "
                                 f"'{self.path.name}' has {self.channels}")
        if not self._meta.get("normalization"):
            from semsegloop.data.normalization import detect_normalization
            self._meta["normalization"] = detect_normalization(image, dims=self.dims)
        image_id = self._new_id(name)
        added_2d = (not isinstance(source, (ImageData, str, os.PathLike)) and self.dims == 2
                    and np.ndim(source) in (2, 3) and image.array.shape[0] == 1
                    and np.shape(source)[:2] == image.array.shape[1:3])
        entry = {"id": image_id, "name": name, "shape": list(image.array.shape),
                 "dtype": str(image.array.dtype), "geometry": image.geometry.to_json(),
                 "source": image.source, "added": _now()}
        if added_2d:
            entry["added_2d"] = True
        if copy or image.source is None:
            rel = f"images/{image_id}.nrrd"
            imageio.write_image(self.path / rel, image)
            entry["file"] = rel
        else:
            entry["file"] = str(Path(image.source).resolve())
        with self._lock:
            self._meta["images"].append(entry)
            try:
                self.save()
            except BaseException:
                self._meta["images"].pop()
                raise
        self._image_cache[image_id] = ImageData(image.array, image.geometry, name, image.source)
        return image_id

    def _check_image_size(self, shape: tuple, name: str) -> None:
        from semsegloop.learn.networks import MIN_IMAGE_SIDE

        rows, cols = shape[1], shape[2]
        if min(rows, cols) < MIN_IMAGE_SIDE:
            raise ImageReadError(f"image '{name}' is {rows} x {cols} pixels; the network needs "
                                 f"at least {MIN_IMAGE_SIDE} x {MIN_IMAGE_SIDE} (rows x columns)")

    def _new_id(self, name: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:40] or "image"
        taken = set(self.image_ids)
        candidate, n = base, 2
        while candidate in taken:
            candidate, n = f"{base}_{n}", n + 1
        return candidate

    def image(self, image_id: str) -> ImageData:
        entry = self._entry(image_id)
        if image_id not in self._image_cache:
            f = Path(entry["file"])
            f = f if f.is_absolute() else self.path / f
            if not f.exists():
                raise ImageReadError(f"image '{image_id}' file '{f}' is missing")
            img = imageio.read_image(f, dims=self.dims)
            self._image_cache[image_id] = ImageData(img.array, Geometry.from_json(entry["geometry"]),
                                                    entry["name"], entry.get("source"))
        return self._image_cache[image_id]

    def image_info(self, image_id: str) -> dict:
        return json.loads(json.dumps(self._entry(image_id)))

    def geometry(self, image_id: str) -> Geometry:
        return Geometry.from_json(self._entry(image_id)["geometry"])

    def _labels_path(self, image_id: str) -> Path:
        return self.path / "labels" / f"{image_id}.nrrd"

    def set_labels(self, image_id: str, labels, geometry: Geometry | None = None) -> None:
        """Store the sparse labels of an image: 0 = unlabeled, k = class k (1..K).

        ``labels`` is (S, Y, X) or, for a single 2D slice, (Y, X). ``geometry`` (optional) is
        checked against the image's so labels painted on another grid are refused.
        """
        self._check_writable(f"store the labels of image '{image_id}'")
        entry = self._entry(image_id)
        arr = self.check_labels(tuple(entry["shape"][:3]), labels, f"labels for image '{image_id}'")
        if geometry is not None and not geometry.matches(self.geometry(image_id), tol=1e-3):
            raise LabelError(f"labels for image '{image_id}' are on a different grid "
                             f"(spacing/origin/direction {geometry.to_json()} vs "
                             f"{self.geometry(image_id).to_json()})")
        with self._lock:   # another thread may be saving project.json (a round ending)
            p = self._labels_path(image_id)
            imageio.write_labels(p, arr.astype(np.uint8), self.geometry(image_id))
            st = p.stat()
            entry["labels_file"] = [st.st_size, st.st_mtime_ns]
            entry["labeled_pixels"] = _counts(arr, self.n_classes)
            entry["labels_updated"] = _now()
            self.save()

    def check_labels(self, shape: tuple, labels, what: str) -> np.ndarray:
        """Validate a label map for an image of (S, Y, X) ``shape``; returns it as (S, Y, X)."""
        arr = np.asarray(labels)
        if arr.dtype.kind not in "uib":
            raise LabelError(f"{what} must be integers, got {arr.dtype}")
        if arr.ndim == 2 and shape[0] == 1:
            arr = arr[None]
        if arr.shape != tuple(shape):
            raise LabelError(f"{what} have shape {arr.shape} but the image is {tuple(shape)} "
                             f"(slices, y, x)")
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi > self.n_classes:
                bad = hi if hi > self.n_classes else lo
                raise LabelError(f"{what} contain value {bad}; values must be 0 (unlabeled) or "
                                 f"1..{self.n_classes} ({', '.join(self.class_names)})")
        return arr

    def labels(self, image_id: str) -> np.ndarray:
        """The painted labels, (S, Y, X) uint8 ((Y, X) for an image added as a (Y, X) array)."""
        return self._as_added(image_id, self._labels3(image_id))

    def _labels3(self, image_id: str) -> np.ndarray:
        entry = self._entry(image_id)
        p = self._labels_path(image_id)
        if not p.exists():
            return np.zeros(tuple(entry["shape"][:3]), dtype=np.uint8)
        arr, _ = imageio.read_labels(p)
        return arr

    def labeled_image_ids(self) -> list[str]:
        return [im["id"] for im in self._meta["images"]
                if sum(im.get("labeled_pixels", {}).values()) > 0]

    # ---------------------------------------------------------------- training
    def train(self, time_budget_s: float | None = None, steps: int | None = None,
              device: str = "auto", progress: Callable | None = None, cancel: Any = None,
              seed: int = 0, reference: dict | None = None, preset: str | None = None,
              pairwise_weight: float | None = None, image_ids: list[str] | None = None,
              pseudo_labels: bool | None = None):
        """Train one round on the painted labels, warm-starting from the previous round.

        Runs for ``time_budget_s`` seconds or ``steps`` steps (60 s when neither is given).
        ``progress(TrainProgress)`` is called after every step from the calling thread;
        ``cancel`` (threading.Event or callable) is checked every step: the round then ends
        within one step and its model is kept (the earlier rounds' checkpoints are untouched).
        ``reference`` ({image_id: labels}) adds validation Dice to the progress reports.
        ``pseudo_labels`` (default: on when scikit-learn is installed) first fits a quick
        pixel classifier on the strokes and trains on its confident pixels too; its time
        counts in the budget. Returns a TrainResult.
        """
        import time as _time

        t_start = _time.perf_counter()
        self._check_writable("train (a round saves a model)")
        if time_budget_s is not None and not (
                isinstance(time_budget_s, numbers.Real) and not isinstance(time_budget_s, bool)
                and math.isfinite(time_budget_s) and time_budget_s > 0):
            raise TrainingError(f"time_budget_s must be a positive number of seconds "
                                f"(got {time_budget_s!r})")
        if steps is not None and (not isinstance(steps, numbers.Integral)
                                  or isinstance(steps, bool)):
            raise TrainingError(f"steps must be a whole number (got {steps!r})")
        if steps is not None and steps < 1:
            raise TrainingError(f"steps must be at least 1 (got {steps})")
        from semsegloop.learn import training as tr
        from semsegloop.learn.checkpoint import save_checkpoint
        from semsegloop.learn.networks import load_preset
        from semsegloop.learn.round import RoundImage, RoundSettings, run_round
        from semsegloop.learn.teacher import available as teacher_available
        from semsegloop.data.normalization import normalize

        with self._train_lock, self._lock:
            t_start = _time.perf_counter()  # waiting for another round is not this one's budget
            ids = image_ids or self.labeled_image_ids()
            data = [(i, self._labels3(i)) for i in ids]
            data = [(i, lab) for i, lab in data if lab.any()]
            if not data:
                raise LabelError("no labels painted yet: paint strokes of at least two classes "
                                 "on at least one image before training")
            painted = sorted({int(v) for _, lab in data for v in np.unique(lab) if v})
            if len(painted) < 2:
                only = self.class_names[painted[0] - 1]
                raise LabelError(f"only class '{only}' is painted; paint at least two classes "
                                 f"so the network has something to tell apart")
            preset_name = preset or self.preset
            pre = load_preset(preset_name)
            if pre["dims"] != self.dims:
                raise TrainingError(f"network preset '{preset_name}' is {pre['dims']}D but the "
                                    f"project is {self.dims}D")
            norm = self._meta["normalization"]
            use_teacher = pseudo_labels if pseudo_labels is not None else teacher_available()
            if use_teacher:
                # Unpainted images of the collection join as pseudo-labelled context, spread
                # over the collection, while the teacher's share of the budget lasts.
                painted_ids = {i for i, _ in data}
                others = [i for i in self.image_ids if i not in painted_ids and
                          self.image_info(i)["shape"][3] == self.channels]
                others = [others[j] for j in _spread(len(others), MAX_PSEUDO_ONLY_IMAGES)]
                data = data + [(i, np.zeros(tuple(self._entry(i)["shape"][:3]), np.uint8))
                               for i in others]
            before = self._round_strokes()
            from semsegloop.learn.teacher import teacher_input
            images = [RoundImage(i, normalize(self.image(i).array, norm), lab,
                                 before.get(i) if before is not None else None,
                                 teacher_input(self.image(i).array, norm) if use_teacher else None)
                      for i, lab in data]
            if before is not None:  # an image painted for the first time: all its strokes are new
                for im in images:
                    if im.previous is None:
                        im.previous = np.zeros(im.labels.shape, bool)
            round_index = self.round + 1
            settings = RoundSettings(
                n_classes=self.n_classes, dims=self.dims, channels=self.channels,
                spacing=self.geometry(data[0][0]).spacing, preset=pre, round_index=round_index,
                time_budget_s=time_budget_s, steps=steps, device=device, seed=seed,
                pairwise_weight=pairwise_weight, use_teacher=use_teacher,
                class_names=self.class_names)
            validator = None
            if reference:
                validator = lambda model, plan, dev: self._validator(model, plan, dev, reference)
            logf = self._logger()
            # The folder lock is not held while the round trains, so images can be added and
            # labels stored meanwhile (the round uses the data read above).
            with _released(self._lock):
                from semsegloop.predict.sliding_window import seconds_per_voxel
                out = run_round(images, settings, warm_start=self._warm_start,
                                make_validator=validator, progress=progress, cancel=cancel,
                                log=logf, started=t_start, predict_cost=seconds_per_voxel)
            strokes = {im.image_id: im.labels for im in images if im.labels.any()}
            del images
            n_steps, last_loss, cancelled, val = out.steps, out.final_loss, out.cancelled, out.val_dice
            seconds, plan, model, device_t = out.seconds, out.plan, out.model, out.device
            ckpt = None
            if n_steps > 0:
                name = f"round_{round_index:03d}"
                meta = {"preset": preset_name, "plan": plan.to_json(), "classes": self.classes,
                        "channels": self.channels, "dims": self.dims,
                        "normalization": norm, "round": round_index, "steps": n_steps,
                        "seconds": round(seconds, 3), "final_loss": last_loss}
                save_checkpoint(self.path / "checkpoints", name, model.state_dict(), meta)
                ckpt = f"checkpoints/{name}"
                fusion = out.extra.get("fusion") or {"weight": 1.0}
                teacher_ckpt = None
                if out.extra.get("teacher") is not None:
                    from semsegloop.learn.teacher import save_teacher
                    save_teacher(self.path / "checkpoints", f"{name}_teacher", out.extra["teacher"],
                                 strokes, fusion)
                    teacher_ckpt = f"checkpoints/{name}_teacher"
                    self._teacher = (round_index, out.extra["teacher"], fusion, strokes)
                    self._grown = {(round_index, i): (tuple(settings.spacing), g)
                                   for i, g in (out.extra.get("grown") or {}).items()}
                self._meta["rounds"].append({
                    "round": round_index, "finished": _now(), "preset": preset_name,
                    "steps": n_steps, "seconds": round(seconds, 3), "final_loss": last_loss,
                    "cancelled": cancelled, "checkpoint": ckpt, "device": str(device_t),
                    "warm_start": out.warm_start, "images": ids, "val_dice": val,
                    "labeled_pixels": _counts_total(data, self.n_classes),
                    "teacher": teacher_ckpt, "fusion": fusion})
                self.save()
                self._model = (round_index, plan, model)
            result = tr.TrainResult(round=round_index if n_steps else self.round, steps=n_steps,
                                    seconds=seconds, final_loss=last_loss, cancelled=cancelled,
                                    checkpoint=ckpt, device=str(device_t), val_dice=val,
                                    estimate=(out.extra.get("fusion") or {}).get("estimate"))
            logf({"event": "train_end", "round": round_index, "steps": n_steps,
                  "seconds": round(seconds, 3), "cancelled": cancelled, "checkpoint": ckpt})
            if progress is not None:
                progress(tr.TrainProgress(round=round_index, step=n_steps, total_steps=steps,
                                          elapsed_s=seconds, eta_s=0.0, loss=last_loss or 0.0,
                                          throughput=0.0, val_dice=val,
                                          phase="cancelled" if cancelled else "done",
                                          device=str(device_t)))
            return result

    def _warm_start(self, model) -> str | None:
        """Load the newest readable checkpoint's matching weights; returns its name or None.

        Layers whose shapes changed (a class added, other channels) start fresh; a damaged
        newest checkpoint falls back to the round before it, with a warning.
        """
        from semsegloop.learn.checkpoint import load_checkpoint

        for r in reversed(self._meta["rounds"]):
            if not r.get("checkpoint"):
                continue
            d, name = self._ckpt_location(r["checkpoint"])
            try:
                state, _ = load_checkpoint(d, name)
            except CheckpointError as e:
                log.warning("warm start skips %s: %s", r["checkpoint"], e)
                continue
            own = model.state_dict()
            usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
            if not usable:
                return None
            model.load_state_dict(usable, strict=False)
            return r["checkpoint"]
        return None

    def _round_strokes(self) -> dict | None:
        """{image id: bool mask painted at the latest trained round}, None before round 1 or
        when that round kept no teacher (the next round then treats no stroke as new)."""
        try:
            got = self.load_teacher()
        except CheckpointError as e:
            log.warning("strokes of the last round unreadable (%s): no stroke counts as new", e)
            return None
        return None if got is None else {i: lab > 0 for i, lab in got[2].items()}

    def load_teacher(self, round: int | None = None):
        """(Teacher, fusion record, {image id: stroke mask}) of ``round`` (default the latest),
        or None when that round has no teacher (trained without pseudo-labels)."""
        from semsegloop.learn import training as tr
        from semsegloop.learn.teacher import load_teacher

        done = [r for r in self._meta["rounds"] if r.get("checkpoint")]
        if round is not None:
            done = [r for r in done if r["round"] == round]
        if not done or not done[-1].get("teacher"):
            return None
        entry = done[-1]
        d, name = self._ckpt_location(entry["teacher"])
        teacher, fusion, strokes = load_teacher(d, name, n_jobs=tr.cpu_threads())
        return teacher, fusion, strokes

    def _fusion_for(self, round_index: int, image_id: str) -> dict:
        """What predict_fused needs besides the network for ``round_index``: its teacher, the
        fusion record and, for an image painted in that round, its strokes."""
        entry = next((r for r in self._meta["rounds"] if r["round"] == round_index), {})
        if not entry.get("teacher"):
            return {"teacher": None, "fusion": {"weight": 1.0}, "seeds": None, "grown": None}
        if self._teacher is None or self._teacher[0] != round_index:
            self._teacher = (round_index,) + tuple(self.load_teacher(round_index))
        _, teacher, fusion, strokes = self._teacher
        kept = self._grown.get((round_index, image_id))
        grown = None  # grown from these seeds by the round (or by an earlier prediction)
        if kept is not None and kept[0] == tuple(self.geometry(image_id).spacing):
            grown = kept[1]
        return {"teacher": teacher, "fusion": entry.get("fusion") or fusion,
                "seeds": strokes.get(image_id), "grown": grown}

    def _grown_for(self, round_index: int, image_id: str, parts: dict, raw: np.ndarray,
                   component: str = "fused") -> np.ndarray | None:
        """The round's grow-from-seeds labels of an image painted in it, when its prediction
        uses them: kept from the round, else grown now and kept (Refine reads them, and a
        volume's growing takes seconds)."""
        from semsegloop.learn import seeded
        from semsegloop.predict.fused import blend_weights

        seeds = parts["seeds"]
        if parts["grown"] is not None or seeds is None or not seeds.any():
            return parts["grown"]
        try:
            share = blend_weights(parts["fusion"], True, True, component)[2]
        except ValueError:
            return None
        if share <= 0 or not seeded.available():
            return None
        spacing = tuple(self.geometry(image_id).spacing)
        grown = seeded.grow_from_seeds(raw, seeds, self.dims, spacing)
        self._grown = {k: v for k, v in self._grown.items() if k[0] == round_index}
        self._grown[(round_index, image_id)] = (spacing, grown)
        return grown

    def _ckpt_location(self, rel: str) -> tuple[Path, str]:
        p = self.path / rel
        return p.parent, p.name

    def _validator(self, model, plan, device, reference: dict):
        from semsegloop.measure.metrics import dice_per_class
        from semsegloop.data.normalization import normalize
        from semsegloop.predict.sliding_window import predict_image

        refs = {i: self._check_reference(i, r) for i, r in reference.items()}
        imgs = {i: normalize(self.image(i).array, self._meta["normalization"]) for i in refs}

        def validate() -> dict[str, float]:
            scores = []
            for i, ref in refs.items():
                pred = predict_image(model, imgs[i], plan, device, self.n_classes).labels
                scores.append(dice_per_class(pred, ref, self.n_classes))
            mean = np.nanmean(np.stack(scores), axis=0)
            return {n: float(v) for n, v in zip(self.class_names, mean) if np.isfinite(v)}
        return validate

    def _check_reference(self, image_id: str, reference) -> np.ndarray:
        shape = tuple(self._entry(image_id)["shape"][:3])
        ref = np.asarray(reference)
        what = f"reference for image '{image_id}'"
        if ref.ndim == 2 and shape[0] == 1:
            ref = ref[None]
        if ref.shape != shape:
            raise LabelError(f"{what} has shape {ref.shape}, image is {shape}")
        if ref.dtype.kind == "f":  # some tools store label maps as float: whole numbers only
            bad = ~np.isfinite(ref) | (ref != np.round(ref))
            if bad.any():
                raise LabelError(f"{what} holds the non-integer value {ref[bad].flat[0]:g}; a "
                                 f"reference holds class numbers 0..{self.n_classes}")
            ref = ref.astype(np.int64)
        return self.check_labels(shape, ref, what).astype(np.uint8)

    def _logger(self) -> Callable[[dict], None]:
        path = self.path / "train_log.jsonl"

        def write(rec: dict) -> None:
            rec = {"time": _now(), **rec}
            try:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec, default=float) + "\n")
            except OSError as e:  # a full disk must not stop training; the model save will tell
                log.warning("cannot append to '%s': %s", path, e)
        return write

    def training_log(self) -> list[dict]:
        """Records of train_log.jsonl; a torn last line (crash mid-write) is skipped."""
        path = self.path / "train_log.jsonl"
        out = []
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    # ---------------------------------------------------------------- prediction
    def load_model(self, round: int | None = None, device: str = "auto"):
        """(round, plan, model) for ``round`` (default: the latest trained round)."""
        from semsegloop.learn import training as tr
        from semsegloop.learn.checkpoint import load_checkpoint
        from semsegloop.learn.networks import NetworkPlan, build_network

        done = [r for r in self._meta["rounds"] if r.get("checkpoint")]
        if not done:
            raise CheckpointError(f"project '{self.path}' has no trained model yet; train first")
        if round is None:
            entry = done[-1]
        else:
            match = [r for r in done if r["round"] == round]
            if not match:
                raise CheckpointError(f"no model for round {round} (rounds with models: "
                                      f"{[r['round'] for r in done]})")
            entry = match[0]
        device_t = tr.select_device(device)
        cached = self._model
        if cached is not None and cached[0] == entry["round"]:
            return cached[0], cached[1], cached[2].to(device_t)
        d, name = self._ckpt_location(entry["checkpoint"])
        try:
            state, meta = load_checkpoint(d, name)
        except CheckpointError as e:
            earlier = [r["round"] for r in done if r["round"] < entry["round"]]
            hint = (f"; the model of round {earlier[-1]} is intact: predict with round="
                    f"{earlier[-1]} or train again" if earlier else "; train again")
            raise CheckpointError(f"{str(e).rstrip('.')}{hint}") from None
        plan = NetworkPlan.from_json(meta["plan"])
        if plan.out_channels > self.n_classes:
            raise CheckpointError(f"checkpoint '{d / name}' (round {entry['round']}) predicts "
                                  f"{plan.out_channels} classes but project '{self.path.name}' "
                                  f"has {self.n_classes} ({', '.join(self.class_names)}); it "
                                  f"belongs to another project: train again")
        model = build_network(plan)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint '{d / name}' does not fit its network plan: {e}") from None
        model.eval().to(device_t)
        self._model = (entry["round"], plan, model)
        return self._model

    def predict_full(self, image_id: str, device: str = "auto", round: int | None = None,
                     save: bool | None = None, keep_strokes: bool = True, cancel: Any = None,
                     progress: Callable[[float], None] | None = None, postprocess: bool = True,
                     component: str = "fused", keep_probabilities: bool = True):
        """Prediction of one image: .labels (S,Y,X) uint8 1..K, .probabilities (K,S,Y,X) float16,
        .entropy (S,Y,X) float16 in [0, 1].

        ``keep_strokes``: painted pixels keep their painted class in .labels (the person's
        strokes win over the network). ``postprocess``: apply the project's per-class clean-up
        (``set_postprocessing``) to .labels, never to painted pixels. ``save`` (default: unless
        opened read-only) writes
        predictions/round_NNN/<id>.nrrd (and a TIFF for 2D) plus the uncertainty map; the labels
        file is never touched.
        The network's probabilities are fused with the round's teacher forest (and, on images
        painted in that round, grow-from-seeds) by the weights the round chose on held-out
        strokes; ``component`` "network", "teacher" or "seeded" gives one model alone (for
        comparisons). ``keep_probabilities=False`` keeps only labels and entropy (bounded memory
        for many classes; .probabilities is then None).
        """
        if save is None:
            save = not self._read_only
        elif save:
            self._check_writable(f"save the prediction of image '{image_id}'")
        from semsegloop.learn import training as tr
        from semsegloop.predict.fused import predict_fused
        from semsegloop.data.normalization import normalize

        with self._lock:
            r, plan, model = self.load_model(round=round, device=device)
            image = self.image(image_id)
            if image.channels != plan.in_channels:
                raise TrainingError(f"image '{image_id}' has {image.channels} channels, the model "
                                    f"of round {r} expects {plan.in_channels}")
            x = normalize(image.array, self._meta["normalization"])
            device_t = next(model.parameters()).device
            parts = self._fusion_for(r, image_id)
            raw = None
            if parts["teacher"] is not None and component != "network":
                from semsegloop.learn.teacher import teacher_input
                raw = teacher_input(image.array, self._meta["normalization"])
                parts["grown"] = self._grown_for(r, image_id, parts, raw, component)
            try:
                pred = predict_fused(model, parts["teacher"], parts["fusion"], x, plan, device_t,
                                     plan.out_channels, cancel=tr.cancel_checker(cancel),
                                     progress=progress, component=component,
                                     keep_probabilities=keep_probabilities, seeds=parts["seeds"],
                                     spacing=self.geometry(image_id).spacing,
                                     teacher_image=raw, grown=parts["grown"])
            except InterruptedError:
                raise TrainingError(f"prediction of '{image_id}' was cancelled") from None
            del x, raw
            lab = self._labels3(image_id) if keep_strokes or postprocess else None
            if keep_strokes:
                painted = lab > 0
                if painted.any():
                    pred.labels[painted] = lab[painted]
            if postprocess and self.postprocessing:
                from semsegloop.predict.postprocess import postprocess_labels
                pred.labels = postprocess_labels(pred.labels, self.postprocessing,
                                                 self.geometry(image_id).spacing, self.dims,
                                                 strokes=lab if keep_strokes else None)
            if save:
                self._save_prediction(image_id, r, pred)
                self._remember_prediction(image_id, r, pred)
            return pred

    def predict(self, image_id: str, device: str = "auto", save: bool | None = None,
                **kw) -> np.ndarray:
        """Label map (S, Y, X) uint8 with values 1..K, on the image's grid ((Y, X) for an
        image added as a (Y, X) or (Y, X, C) array)."""
        return self._as_added(image_id, self.predict_full(image_id, device=device, save=save,
                                                          **kw).labels)

    def predict_proba(self, image_id: str, device: str = "auto", **kw) -> np.ndarray:
        """Per-class probabilities (K, S, Y, X) float16 ((K, Y, X) for a (Y, X) image)."""
        kw.setdefault("save", False)
        p = self.predict_full(image_id, device=device, **kw).probabilities
        return p[:, 0] if self._added_2d(image_id) else p

    def _added_2d(self, image_id: str) -> bool:
        return bool(self._entry(image_id).get("added_2d"))

    def _as_added(self, image_id: str, arr: np.ndarray) -> np.ndarray:
        """(S, Y, X) -> (Y, X) for an image that was added as a single 2D array."""
        return arr[0] if self._added_2d(image_id) and arr.ndim == 3 else arr

    def _save_prediction(self, image_id: str, round_index: int, pred) -> None:
        d = self.path / "predictions" / f"round_{round_index:03d}"
        geom = self.geometry(image_id)
        imageio.write_labels(d / f"{image_id}.nrrd", pred.labels, geom)
        if self.dims == 2:
            imageio.write_labels(d / f"{image_id}.tif", pred.labels, geom)
        imageio.write_float_map(d / f"{image_id}_uncertainty.nrrd", pred.entropy, geom)

    def prediction_path(self, image_id: str, round: int | None = None) -> Path | None:
        r = self.round if round is None else round
        p = self.path / "predictions" / f"round_{r:03d}" / f"{image_id}.nrrd"
        return p if p.exists() else None

    def saved_prediction(self, image_id: str, round: int | None = None) -> np.ndarray | None:
        """The saved label map of ``round`` (shaped as predict() returns it), or None."""
        got = self._saved3(image_id, round)
        return None if got is None else self._as_added(image_id, got)

    def _saved3(self, image_id: str, round: int | None = None) -> np.ndarray | None:
        p = self.prediction_path(image_id, round)
        return imageio.read_labels(p)[0] if p else None

    # ---------------------------------------------------------------- refine, clean up, suggest
    def _remember_prediction(self, image_id: str, round_index: int, pred) -> None:
        self._keep_recent(image_id, round_index, pred)
        (self._refined_path(image_id, round_index)).unlink(missing_ok=True)

    def _keep_recent(self, image_id: str, round_index: int, pred) -> tuple:
        # Refine needs the probabilities; the last two predicted images keep theirs in memory.
        self._recent.pop(image_id, None)
        self._recent[image_id] = (round_index, pred, {})
        while len(self._recent) > 2:
            self._recent.pop(next(iter(self._recent)))
        return self._recent[image_id]

    def _refined_path(self, image_id: str, round_index: int) -> Path:
        return self.path / "predictions" / f"round_{round_index:03d}" / f"{image_id}_refined.nrrd"

    def refined_prediction(self, image_id: str) -> np.ndarray | None:
        """The latest round's refined segmentation of an image, if it was refined."""
        p = self._refined_path(image_id, self.round)
        return imageio.read_labels(p)[0] if p.exists() else None

    def refine(self, image_id: str, strokes, geometry: Geometry | None = None,
               device: str = "auto", settings=None) -> np.ndarray:
        """The current round's prediction of ``image_id`` corrected by ``strokes``, in about a
        second and without retraining; returns the refined (S, Y, X) uint8 label map, 1..K.

        ``strokes``: a label map on the image's grid (0 = nothing, k = class k): only new
        strokes, or the whole current labels with old strokes included (same result). The
        strokes join the image's labels (new ones win where they overlap old ones), so the next
        round trains on them; the result keeps every painted pixel and is saved as
        predictions/round_NNN/<id>_refined.nrrd. Refining again starts from it.
        """
        from semsegloop.data.normalization import normalize
        from semsegloop.predict.refine import refine_labels

        self._check_writable(f"refine image '{image_id}'")
        with self._lock:
            entry = self._entry(image_id)
            r = self.round
            saved = self._saved3(image_id) if r else None
            if saved is None:
                raise ProjectError(f"image '{image_id}' has no prediction of round {r} yet: "
                                   f"{'train and ' if not r else ''}predict it before refining")
            what = f"strokes for image '{image_id}'"
            arr = self.check_labels(tuple(entry["shape"][:3]), strokes, what)
            if geometry is not None and not geometry.matches(self.geometry(image_id), tol=1e-3):
                raise LabelError(f"{what} are on a different grid (spacing/origin/direction "
                                 f"{geometry.to_json()} vs {self.geometry(image_id).to_json()})")
            if not arr.any():
                raise LabelError(f"{what} are empty: paint at least one stroke to refine with")
            cached = self._recent.get(image_id)
            if cached is None or cached[0] != r:
                # Not saved: the shown prediction (and any refinement of it) stays as it is.
                cached = self._keep_recent(
                    image_id, r, self.predict_full(image_id, device=device, save=False))
            probs = cached[1].probabilities
            labels = self._labels3(image_id)
            labels[arr > 0] = arr[arr > 0]
            current = self.refined_prediction(image_id)
            current = saved if current is None else current
            x = normalize(self.image(image_id).array, self._meta["normalization"])
            if self.dims == 3:
                probs = self._regrown(image_id, r, probs, labels, current)
            refined = refine_labels(x, probs, current, labels, self.geometry(image_id).spacing,
                                    self.dims, settings, cache=cached[2])
            self.set_labels(image_id, labels)
            imageio.write_labels(self._refined_path(image_id, r), refined, self.geometry(image_id))
            return refined

    def _regrown(self, image_id: str, r: int, probs: np.ndarray, strokes: np.ndarray,
                 current: np.ndarray) -> np.ndarray:
        """Refine's probabilities of a volume painted in round ``r``: the round's
        grow-from-seeds share regrown with every stroke around the corrections
        (predict/regrow.py); ``probs`` unchanged elsewhere."""
        from semsegloop.learn.teacher import teacher_input
        from semsegloop.predict.fused import blend_weights
        from semsegloop.predict.refine import active_strokes
        from semsegloop.predict.regrow import with_regrown_seeds

        parts = self._fusion_for(r, image_id)
        if parts["teacher"] is None or parts["seeds"] is None or not parts["seeds"].any():
            return probs
        share = blend_weights(parts["fusion"], True, True, "fused")[2]
        if share <= 0:
            return probs
        raw = teacher_input(self.image(image_id).array, self._meta["normalization"])
        grown = self._grown_for(r, image_id, parts, raw)
        return with_regrown_seeds(probs, grown, raw.mean(axis=-1), strokes,
                                  active_strokes(strokes, current),
                                  self.geometry(image_id).spacing, share)

    @property
    def postprocessing(self) -> dict:
        """Per-class clean-up applied to predictions: {"k": {option: value}} (see
        ``set_postprocessing``)."""
        return json.loads(json.dumps(self._meta.get("postprocessing") or {}))

    def set_postprocessing(self, settings: dict) -> None:
        """Store the per-class clean-up of predictions, keyed by class name or value 1..K:
        ``largest_component`` (bool), ``min_size`` (remove islands below this many mm^2 in 2D /
        mm^3 in 3D), ``fill_holes`` (bool), ``smoothing`` ("none" | "closing" | "median") with
        ``smoothing_mm``. An empty dict turns it off. Painted pixels are never changed."""
        from semsegloop.predict.postprocess import validate_settings

        self._meta["postprocessing"] = validate_settings(settings, self.n_classes, self.class_names)
        self.save()

    def suggest(self, n: int = 3, by: str = "auto", image_ids: list[str] | None = None,
                device: str = "auto") -> list[dict]:
        """Where to paint next: the ``n`` most uncertain unpainted images (``by="image"``) or
        unpainted slices (``by="slice"``), each {"image_id", "slice", "score"} (score = mean
        uncertainty, 0..1), most uncertain first. ``auto``: images in 2D (each slice of a stack
        counts as one), slices in 3D when every volume is painted or there is only one.
        Uses the saved uncertainty maps of the latest round, predicting images that lack one.
        """
        from semsegloop.predict import suggest as sg

        if n < 1:
            raise ProjectError(f"suggest needs n >= 1, got {n}")
        if by not in ("auto", "image", "slice"):
            raise ProjectError(f"suggest by must be auto, image or slice, got '{by}'")
        if self.round == 0:
            raise CheckpointError(f"project '{self.path}' has no trained model yet; train first")
        ids = image_ids or self.image_ids
        painted = {i for i in ids if self._labels3(i).any()}
        if by == "auto":
            by = "image" if self.dims == 2 or (len(ids) > 1 and painted != set(ids)) else "slice"
        candidates, taken = [], {}
        for i in ids:
            if by == "image" and self.dims == 3 and i in painted:
                continue
            ent = self._uncertainty(i, device)
            lab = self._labels3(i)
            if by == "image" and self.dims == 3:
                candidates += sg.image_scores({i: ent})
            else:
                candidates += sg.slice_scores(i, ent, lab)
                taken[i] = set(np.flatnonzero(lab.reshape(lab.shape[0], -1).any(axis=1)).tolist())
        # 2D images are independent; slices of a volume are spread out.
        gap = 0 if by == "image" else max(1, max(len(self._labels3(i)) for i in ids) // (4 * n))
        best = sg.top(candidates, n, min_gap=gap, painted=taken if gap else None)
        if self.dims == 2:
            for c in best:  # a single 2D image is the image, not slice 0 of it
                if self._entry(c.image_id)["shape"][0] == 1:
                    c.slice = None
        return [c.to_json() for c in best]

    def _uncertainty(self, image_id: str, device: str) -> np.ndarray:
        p = self.path / "predictions" / f"round_{self.round:03d}" / f"{image_id}_uncertainty.nrrd"
        if p.exists():
            shape = tuple(self._entry(image_id)["shape"][:3])
            return imageio.read_image(p).array[..., 0].reshape(shape)
        return self.predict_full(image_id, device=device).entropy

    def _predict3(self, image_id: str) -> np.ndarray:
        return self.predict_full(image_id, keep_probabilities=False).labels

    # ---------------------------------------------------------------- measuring
    def evaluate(self, references: dict, predict_missing: bool = True) -> dict:
        """Dice, Jaccard, 95% Hausdorff and mean surface distance per class, per image.

        ``references``: {image_id: label map (values 1..K, 0 = not annotated, ignored)}.
        Uses the saved prediction of the latest round, predicting it when missing.
        """
        from semsegloop.measure.metrics import evaluate_labels

        out = {"round": self.round, "images": {}}
        per_class: dict[str, list[float]] = {n: [] for n in self.class_names}
        # Every reference is checked before the first image is predicted.
        references = {i: self._check_reference(i, r) for i, r in references.items()}
        for image_id, ref in references.items():
            pred = self._saved3(image_id)
            if pred is None:
                if not predict_missing:
                    raise ProjectError(f"image '{image_id}' has no prediction for round {self.round}")
                pred = self._predict3(image_id)
            rep = evaluate_labels(pred, ref, self.class_names,
                                  spacing=self.geometry(image_id).spacing, dims=self.dims)
            out["images"][image_id] = rep
            for n in self.class_names:
                d = rep.get("classes", {}).get(n, {}).get("dice")
                if d is not None and np.isfinite(d):
                    per_class[n].append(float(d))
        out["mean_dice"] = {n: float(np.mean(v)) for n, v in per_class.items() if v}
        return out

    def class_fractions(self, image_ids: list[str] | None = None, csv_path=None,
                        predict_missing: bool = True) -> list[dict]:
        """Per image and class: pixel count, fraction, physical area (2D) or volume (3D)."""
        from semsegloop.measure.class_fractions import class_fractions, write_fractions_csv

        rows = []
        for image_id in image_ids or self.image_ids:
            pred = self._saved3(image_id)
            if pred is None:
                if not predict_missing:
                    continue
                pred = self._predict3(image_id)
            rows += class_fractions(pred, self.class_names, self.geometry(image_id).spacing,
                                    self.dims, self._entry(image_id)["name"])
        if csv_path is not None:
            write_fractions_csv(csv_path, rows)
        return rows

    def export(self, out_dir, image_ids: list[str] | None = None, fmt: str = "nrrd",
               predict_missing: bool = True) -> list[Path]:
        """Write the latest prediction of each image to ``out_dir`` as NRRD or TIFF."""
        fmt = fmt.lower().lstrip(".")
        if fmt not in ("nrrd", "tif", "tiff", "nii.gz", "mha"):
            raise ProjectError(f"export format '{fmt}' is not one of nrrd, tif, nii.gz, mha")
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise ProjectError(f"export target '{out_dir}' is a file; give a folder")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ProjectError(f"cannot create export folder '{out_dir}': {e.strerror or e}") from None
        if not os.access(out_dir, os.W_OK):
            raise ProjectError(f"export folder '{out_dir}' is not writable")
        written = []
        for image_id in image_ids or self.image_ids:
            pred = self._saved3(image_id)
            if pred is None:
                if not predict_missing:
                    continue
                pred = self._predict3(image_id)
            p = out_dir / f"{image_id}.{fmt}"
            imageio.write_labels(p, pred, self.geometry(image_id))
            written.append(p)
        return written

    def __repr__(self) -> str:
        return (f"Project('{self.path}', classes={self.class_names}, dims={self.dims}, "
                f"images={len(self.image_ids)}, round={self.round})")


@contextlib.contextmanager
def _released(lock):
    """Release a held RLock for the block and take it back afterwards."""
    lock.release()
    try:
        yield
    finally:
        lock.acquire()


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n)."""
    k = min(k, n)
    return sorted({int((i + 0.5) * n / k) for i in range(k)})


def _check_class_names(names: list[str]) -> list[str]:
    if len(names) < 2:
        raise ProjectError(f"a project needs at least two classes, got {names}")
    if any(not n for n in names) or len(set(names)) != len(names):
        raise ProjectError(f"class names must be non-empty and unique, got {names}")
    if len(names) > 255:
        raise ProjectError("at most 255 classes fit a uint8 label map")
    return names


def _check_color(color, class_name: str) -> list[int]:
    """An (r, g, b) colour of whole numbers 0..255, or ProjectError naming the class."""
    try:
        values = list(color)
    except TypeError:
        values = None
    if (values is None or len(values) != 3
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                       and 0 <= v <= 255 for v in values)):
        raise ProjectError(f"colour {color!r} of class '{class_name}' must be three whole "
                           f"numbers r, g, b in 0..255")
    return [int(v) for v in values]


def _check_meta(meta: dict, f: Path) -> None:
    """project.json's schema, so a damaged or hand-edited file is refused on open, naming the
    entry, instead of failing at the end of a training round."""
    def bad(key: str, want: str):
        raise ProjectError(f"'{f}' is damaged: '{key}' must be {want}, got {meta.get(key)!r}"[:400])

    for key in ("classes", "dims", "images", "rounds", "preset"):
        if key not in meta:
            raise ProjectError(f"'{f}' is damaged: the '{key}' entry is missing")
    classes = meta["classes"]
    if not isinstance(classes, list) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) for c in classes):
        bad("classes", "a list of {\"name\": ..., \"color\": [r, g, b]}")
    try:
        _check_class_names([c["name"] for c in classes])
        for c in classes:
            _check_color(c.get("color"), c["name"])
    except ProjectError as e:
        raise ProjectError(f"'{f}' is damaged: 'classes': {e}") from None
    if meta["dims"] not in (2, 3) or isinstance(meta["dims"], bool):
        bad("dims", "2 or 3")
    ch = meta.get("channels")
    if ch is not None and (not isinstance(ch, int) or isinstance(ch, bool) or ch < 1):
        bad("channels", "a positive whole number or null")
    if not isinstance(meta["preset"], str) or not meta["preset"]:
        bad("preset", "a network preset name")
    norm = meta.get("normalization")
    if norm is not None and not isinstance(norm, dict):
        bad("normalization", "an object or null")
    images = meta["images"]
    need = {"id": str, "name": str, "shape": list, "geometry": dict, "file": str}
    if not isinstance(images, list) or not all(
            isinstance(im, dict) and all(isinstance(im.get(k), t) for k, t in need.items())
            and len(im["shape"]) == 4 for im in images):
        bad("images", "a list of image entries with id, name, shape (S, Y, X, C), geometry "
                      "and file")
    if len({im["id"] for im in images}) != len(images):
        bad("images", "entries with unique ids")
    rounds = meta["rounds"]
    if not isinstance(rounds, list) or not all(
            isinstance(r, dict) and isinstance(r.get("round"), int) for r in rounds):
        bad("rounds", "a list of round entries with a round number")


def _counts(arr: np.ndarray, k: int) -> dict[str, int]:
    c = np.bincount(arr.ravel().astype(np.int64), minlength=k + 1)
    return {str(i): int(c[i]) for i in range(1, k + 1) if c[i]}


def _counts_total(data, k: int) -> dict[str, int]:
    total = np.zeros(k + 1, dtype=np.int64)
    for _, lab in data:
        total += np.bincount(lab.ravel(), minlength=k + 1)[: k + 1]
    return {str(i): int(total[i]) for i in range(1, k + 1)}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
