"""The service's op registry (op name -> handler, fields, lane) and the built-in ops: ping,
cancel, shutdown, train, predict, export, fractions, evaluate and the project edits.

Other modules add ops with :func:`register` and are listed in ``server.OP_MODULES``. A handler is
``handler(ctx, request) -> dict`` (the ``done`` event's fields); it raises :class:`Cancelled`
when it stopped on request, and any exception for an ``error`` event.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from semsegloop.errors import LabelError, ProjectError, TrainingError
from semsegloop.service.protocol import Field, OpSpec

log = logging.getLogger("semsegloop.service")

# Where an op runs. control: on the request reader, at once (must not wait for the project);
# job: the one job thread, one job at a time (a second gets an error); edit: a queue of quick
# project edits that may run while a job does (adding an image during training).
CONTROL, JOB, EDIT = "control", "job", "edit"
INBOX = "incoming"


@dataclass(frozen=True)
class Op:
    name: str
    handler: Callable[[Any, dict], dict]
    spec: OpSpec
    lane: str


OPS: dict[str, Op] = {}


def register(name: str, lane: str = JOB, doc: str = "", /, **fields: Field):
    """Decorator: make ``handler(ctx, request)`` the op ``name`` with these request fields."""
    if lane not in (CONTROL, JOB, EDIT):
        raise ValueError(f"op '{name}': lane must be control, job or edit, got {lane!r}")

    def add(handler):
        if name in OPS:
            raise ValueError(f"op '{name}' is registered twice")
        OPS[name] = Op(name, handler, OpSpec(dict(fields), doc), lane)
        return handler
    return add


class Cancelled(Exception):
    """Raised by a handler that stopped because it was cancelled; ``fields`` go into the
    ``cancelled`` event (e.g. what was finished before the stop)."""

    def __init__(self, **fields):
        super().__init__("cancelled")
        self.fields = fields


# ---------------------------------------------------------------------- files named by requests

def inbox_file(project_path: Path, rel: str, what: str) -> Path:
    """The file a request names (relative to the project, or absolute); it must exist."""
    p = Path(rel)
    p = p if p.is_absolute() else project_path / p
    if not p.is_file():
        raise ProjectError(f"{what} file '{rel}' does not exist (paths are relative to the "
                           f"project folder '{project_path}')")
    return p


def consume(project_path: Path, path: Path) -> None:
    """Remove a file of the project's inbox once its content is stored (others are left)."""
    inbox = (project_path / INBOX).resolve()
    try:
        path.resolve().relative_to(inbox)
    except ValueError:
        return
    path.unlink(missing_ok=True)
    parent = path.parent
    while parent.resolve() != inbox and parent.resolve().is_relative_to(inbox):
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent


def relative(project_path: Path, path: Path) -> str:
    try:
        return Path(path).resolve().relative_to(project_path.resolve()).as_posix()
    except ValueError:
        return str(path)


def store_labels(ctx, labels: dict) -> list[str]:
    """Read every label file a request names, check them all, then store them (set_labels).
    A bad file stores nothing, so a train request never runs on half its snapshot."""
    from semsegloop.data import imageio

    proj = ctx.project
    arrays = {}
    for image_id, rel in labels.items():
        if not isinstance(rel, str):
            raise LabelError(f"labels of image '{image_id}' must be a file path, got {rel!r}")
        path = inbox_file(proj.path, rel, f"labels of image '{image_id}'")
        info = proj.image_info(image_id)  # names the image if it is not in the project
        arr, geometry = imageio.read_labels(path)
        arrays[image_id] = (proj.check_labels(tuple(info["shape"][:3]), arr,
                                              f"labels file '{rel}'"), geometry, path)
    for image_id, (arr, geometry, path) in arrays.items():
        proj.set_labels(image_id, arr, geometry=geometry)
        consume(proj.path, path)
    return list(arrays)


def read_references(ctx, references: dict) -> dict:
    from semsegloop.data import imageio

    out = {}
    for image_id, rel in references.items():
        if not isinstance(rel, str):
            raise LabelError(f"reference of image '{image_id}' must be a file path, got {rel!r}")
        ctx.project.image_info(image_id)
        out[image_id] = imageio.read_labels(inbox_file(ctx.project.path, rel,
                                                       f"reference of image '{image_id}'"))[0]
    return out


# ---------------------------------------------------------------------- control ops

@register("ping", CONTROL, "is the service alive; what is it running")
def op_ping(ctx, request):
    return {"busy": ctx.service.running_job()}


@register("cancel", CONTROL, "stop the job `target`; it ends with a `cancelled` event",
          target=Field((str, int), required=True, doc="the id of the job to stop"))
def op_cancel(ctx, request):
    return {"target": request["target"], "found": ctx.service.cancel(request["target"])}


@register("shutdown", CONTROL, "cancel the running job, wait for it to end, exit")
def op_shutdown(ctx, request):
    ctx.service.request_shutdown()
    return {}


# ---------------------------------------------------------------------- jobs

_TRAIN_FIELDS = dict(
    time_budget_s=Field((int, float, None), doc="seconds of training (default 60)"),
    steps=Field((int, None), doc="a fixed number of steps instead of a time budget"),
    device=Field((str,), doc="auto | cpu | cuda | mps"),
    preset=Field((str, None), doc="network preset for this round"),
    seed=Field((int,)),
    labels=Field((dict,), doc="{image_id: label file} snapshot to store first"),
    image_ids=Field((list, None), doc="images to train on (default: every painted one)"),
    reference=Field((dict,), doc="{image_id: reference label file} for validation Dice"),
)


@register("train", JOB, "store the label snapshot, train one round", **_TRAIN_FIELDS)
def op_train(ctx, request):
    if request.get("labels"):
        store_labels(ctx, request["labels"])
    reference = read_references(ctx, request["reference"]) if request.get("reference") else None
    budget, steps = request.get("time_budget_s"), request.get("steps")

    def progress(p):
        fields = {"round": p.round, "step": p.step, "total_steps": p.total_steps,
                  "loss": p.loss, "elapsed_s": p.elapsed_s, "eta_s": p.eta_s, "phase": p.phase,
                  "throughput": p.throughput, "device": p.device}
        if p.val_dice:
            fields["val_dice"] = p.val_dice
        # The round's own last report (phase done/cancelled) is the final event's job.
        if p.phase == "train":
            ctx.progress(**fields)

    ctx.progress(step=0, loss=None, elapsed_s=0.0, eta_s=budget, phase="prepare",
                 round=ctx.project.round + 1)
    result = ctx.project.train(time_budget_s=budget, steps=steps,
                               device=request.get("device", "auto"), preset=request.get("preset"),
                               seed=request.get("seed", 0), image_ids=request.get("image_ids"),
                               reference=reference, progress=progress, cancel=ctx.cancel_event)
    fields = {"round": result.round, "steps": result.steps, "seconds": result.seconds,
              "final_loss": result.final_loss, "checkpoint": result.checkpoint,
              "device": result.device, "val_dice": result.val_dice,
              "cancelled": result.cancelled}
    if result.cancelled:
        raise Cancelled(**fields)
    return fields


@register("predict", JOB, "predict images with the latest model; files in predictions/",
          image_ids=Field((list, None), doc="image ids (absent or null: all)"),
          uncertainty=Field((bool,), doc="also report the uncertainty maps"),
          device=Field((str,)), round=Field((int, None), doc="model of this round (default latest)"),
          labels=Field((dict,), doc="{image_id: label file} to store first (strokes win)"))
def op_predict(ctx, request):
    proj = ctx.project
    if request.get("labels"):
        store_labels(ctx, request["labels"])
    ids = request.get("image_ids")
    ids = list(proj.image_ids if ids is None else ids)
    for image_id in ids:
        proj.image_info(image_id)   # an unknown id fails before any work
    outputs, uncertainty = {}, {}
    for n, image_id in enumerate(ids):
        if ctx.cancelled():
            raise Cancelled(outputs=outputs, uncertainty=uncertainty)
        ctx.progress(step=n, total_steps=len(ids), phase="predict", image_id=image_id)
        try:
            proj.predict_full(image_id, device=request.get("device", "auto"),
                              round=request.get("round"), cancel=ctx.cancel_event)
        except TrainingError:
            if ctx.cancelled():   # the engine reports a stopped prediction as an error
                raise Cancelled(outputs=outputs, uncertainty=uncertainty) from None
            raise
        r = proj.round if request.get("round") is None else request["round"]
        d = proj.path / "predictions" / f"round_{r:03d}"
        outputs[image_id] = relative(proj.path, d / f"{image_id}.nrrd")
        if request.get("uncertainty"):
            uncertainty[image_id] = relative(proj.path, d / f"{image_id}_uncertainty.nrrd")
    fields = {"round": proj.round if request.get("round") is None else request["round"],
              "outputs": outputs}
    if request.get("uncertainty"):
        fields["uncertainty"] = uncertainty
    return fields


@register("export", JOB, "write the latest predictions as label maps",
          out_dir=Field((str,), required=True, doc="folder to write into"),
          format=Field((str,), doc="nrrd | tif | nii.gz | mha"),
          image_ids=Field((list, None)))
def op_export(ctx, request):
    paths = ctx.project.export(request["out_dir"], image_ids=request.get("image_ids"),
                               fmt=request.get("format", "nrrd"))
    return {"outputs": [str(p) for p in paths]}


@register("fractions", JOB, "pixels, fraction, area/volume per class and image",
          csv_path=Field((str, None)), image_ids=Field((list, None)))
def op_fractions(ctx, request):
    rows = ctx.project.class_fractions(image_ids=request.get("image_ids"),
                                       csv_path=request.get("csv_path"))
    return {"rows": rows, "csv_path": request.get("csv_path")}


@register("evaluate", JOB, "Dice, Jaccard, HD95, MSD against reference label files",
          references=Field((dict,), required=True, doc="{image_id: reference label file}"))
def op_evaluate(ctx, request):
    refs = read_references(ctx, request["references"])
    return {"report": ctx.project.evaluate(refs)}


@register("set_classes", JOB, "rename, recolour or append classes",
          classes=Field((list,), required=True, doc="[{name, color}] in label order"))
def op_set_classes(ctx, request):
    classes = request["classes"]
    if not all(isinstance(c, dict) and "name" in c for c in classes):
        raise ProjectError("'set_classes' classes must be objects with a 'name' (and 'color')")
    ctx.project.set_classes(classes)
    return {"classes": ctx.project.classes}


# ---------------------------------------------------------------------- edits

@register("add_image", EDIT, "add an image file (e.g. written into incoming/)",
          file=Field((str,), required=True, doc="image file, relative to the project or absolute"),
          name=Field((str, None)))
def op_add_image(ctx, request):
    proj = ctx.project
    path = inbox_file(proj.path, request["file"], "image")
    image_id = proj.add_image(path, name=request.get("name"))
    consume(proj.path, path)
    return {"image_id": image_id, "image_ids": proj.image_ids}


@register("set_labels", EDIT, "store label files as the images' labels",
          labels=Field((dict,), required=True, doc="{image_id: label file}"))
def op_set_labels(ctx, request):
    return {"image_ids": store_labels(ctx, request["labels"])}
