"""The service's ops for corrections and guidance: refine a prediction from strokes, suggest
where to paint next, store the per-class post-processing of predictions."""

from __future__ import annotations

from semsegloop.service.ops import EDIT, JOB, consume, inbox_file, register, relative
from semsegloop.service.protocol import Field


@register("refine", JOB, "correct the latest prediction of an image with strokes, no retraining",
          image_id=Field((str,), required=True),
          strokes=Field((str,), required=True, doc="label file of the strokes (0 = none)"),
          device=Field((str,)))
def op_refine(ctx, request):
    from semsegloop.data import imageio

    proj = ctx.project
    image_id = request["image_id"]
    proj.image_info(image_id)   # an unknown id is named before the file is read
    path = inbox_file(proj.path, request["strokes"], f"strokes of image '{image_id}'")
    strokes, geometry = imageio.read_labels(path)
    before = proj.refined_prediction(image_id)
    before = proj.saved_prediction(image_id) if before is None else before
    refined = proj.refine(image_id, strokes, geometry=geometry,
                          device=request.get("device", "auto"))
    consume(proj.path, path)
    out = proj.path / "predictions" / f"round_{proj.round:03d}" / f"{image_id}_refined.nrrd"
    return {"image_id": image_id, "round": proj.round, "output": relative(proj.path, out),
            "changed": int((refined != before).sum()) if before is not None else None}


@register("suggest", JOB, "rank unpainted images or slices by the model's uncertainty",
          n=Field((int,), doc="how many (default 3)"),
          by=Field((str,), doc="auto | image | slice"), device=Field((str,)))
def op_suggest(ctx, request):
    return {"suggestions": ctx.project.suggest(request.get("n", 3), by=request.get("by", "auto"),
                                               device=request.get("device", "auto"))}


@register("set_postprocessing", EDIT, "store the per-class clean-up applied to predictions",
          settings=Field((dict,), required=True,
                         doc="{class name or value: {largest_component, min_size, fill_holes, "
                             "smoothing, smoothing_mm}}; {} turns it off"))
def op_set_postprocessing(ctx, request):
    ctx.project.set_postprocessing(request["settings"])
    return {"postprocessing": ctx.project.postprocessing}
