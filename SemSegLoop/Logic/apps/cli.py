"""The `semsegloop` command: init | add | train | predict | refine | suggest | evaluate | export |
demo | serve | web.

Every error the user can fix prints one line `semsegloop: error: ...` and exits with 2;
Ctrl-C during training stops at the next step and keeps the model trained so far."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path

from semsegloop.errors import SemSegLoopError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semsegloop", description=(
        "Human-in-the-loop semantic segmentation: train a UNet on a few painted strokes, "
        "predict every image, correct, train again."))
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("init", help="create a project folder",
                       description="Create a project folder with its classes.")
    s.add_argument("project", type=Path)
    s.add_argument("--classes", required=True,
                   help="comma-separated class names in label order, e.g. collagen,cell,background")
    s.add_argument("--dims", type=int, choices=(2, 3), default=2, help="2D images/stacks or 3D volumes")
    s.add_argument("--preset", help="network preset from models/ (default: unet2d_fast / unet3d)")
    s.add_argument("--colors", help="semicolon-separated r,g,b per class, e.g. '255,0,0;0,255,0'")

    s = sub.add_parser("add", help="add images (and their painted labels)",
                       description="Add image files or folders (2D stack / DICOM series).")
    s.add_argument("project", type=Path)
    s.add_argument("images", nargs="+", type=Path)
    s.add_argument("--labels", nargs="+", type=Path,
                   help="label maps (0 = unlabeled, k = class k), one per image, same order")
    s.add_argument("--spacing", type=_floats, help="override spacing: y,x (2D) or z,y,x")
    s.add_argument("--reference", action="store_true",
                   help="keep a reference to the files instead of copying them into the project")

    s = sub.add_parser("train", help="train one round on the painted labels",
                       description="Train one round (warm start from the previous round).")
    s.add_argument("project", type=Path)
    g = s.add_argument_group("budget (default: 60 s)")
    g.add_argument("--time", type=float, dest="time_budget_s", help="seconds of training")
    g.add_argument("--steps", type=int, help="number of training steps")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    s.add_argument("--preset", help="network preset for this round")
    s.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("predict", help="predict images with the latest model",
                       description="Predict images; results go to predictions/round_NNN/.")
    s.add_argument("project", type=Path)
    s.add_argument("--images", nargs="+", help="image ids (default: all)")
    s.add_argument("--device", default="auto")
    _postprocess_flags(s)

    s = sub.add_parser("refine", help="correct a prediction with strokes, without retraining",
                       description="Refine the latest round's prediction of one image with "
                                   "correction strokes (a label map on the image's grid, 0 = none; "
                                   "old strokes may be included). The strokes join the image's "
                                   "labels; the result goes to predictions/round_NNN/ID_refined.nrrd.")
    s.add_argument("project", type=Path)
    s.add_argument("image", help="image id")
    s.add_argument("strokes", type=Path, help="label map file of the strokes")
    s.add_argument("--out", type=Path, help="also write the refined label map here")
    s.add_argument("--device", default="auto")

    s = sub.add_parser("suggest", help="where to paint next: the most uncertain images / slices",
                       description="Rank unpainted images (2D, or volumes) or unpainted slices of "
                                   "volumes by the latest model's uncertainty.")
    s.add_argument("project", type=Path)
    s.add_argument("-n", type=int, default=3, help="how many (default 3)")
    s.add_argument("--by", choices=("auto", "image", "slice"), default="auto")
    s.add_argument("--json", type=Path, help="also write the list as JSON")
    s.add_argument("--device", default="auto")

    s = sub.add_parser("evaluate", help="Dice / Jaccard / HD95 / MSD against reference labels",
                       description="Compare the latest predictions with reference label maps.")
    s.add_argument("project", type=Path)
    s.add_argument("--reference", nargs="+", required=True, metavar="ID=PATH",
                   help="reference label map per image id (values 1..K, 0 = not annotated)")
    s.add_argument("--json", type=Path, help="also write the full report as JSON")

    s = sub.add_parser("export", help="write label maps and the class-fraction table",
                       description="Export the latest predictions and per-class fractions.")
    s.add_argument("project", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--format", default="nrrd", choices=("nrrd", "tif", "nii.gz", "mha"))
    s.add_argument("--fractions", type=Path, help="CSV path (default: OUT/class_fractions.csv)")

    s = sub.add_parser("serve", help="run the engine service for one project (JSON lines)",
                       description="Run one persistent engine process for a project: requests "
                                   "as JSON lines on stdin, events as JSON lines on stdout, logs "
                                   "on stderr (protocol 1, see the README). EOF ends it.")
    s.add_argument("project", type=Path)
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (reported in ready)")
    s.add_argument("--new-process-group", action="store_true",
                   help="lead a new process group, so a client can kill the whole tree")

    s = sub.add_parser("demo", help="run the whole loop on built-in synthetic data",
                       description="Simulated strokes on synthetic tiles, train, predict, "
                                   "one correction round, train again; prints Dice per round.")
    s.add_argument("--out", type=Path, default=Path("demo_output"))
    s.add_argument("--seconds", type=float, default=20.0, help="training seconds per round")
    s.add_argument("--images", type=int, default=6)
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--device", default="auto")

    s = sub.add_parser("web", help="open the project in the browser (needs semsegloop[web])",
                       description="Serve the web app: slice views, Segment Editor effects and the "
                                   "SemSegLoop panel; compute runs in an engine service process.")
    s.add_argument("project", type=Path, nargs="?",
                   help="project folder (none: the page offers to create one)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1; anything else is reachable by "
                        "others: the page then needs the access token printed at start-up)")
    s.add_argument("--sample", action="store_true",
                   help="fill an empty or new PROJECT folder with the built-in sample tiles first")
    s.add_argument("--device", default="auto", help="device of the engine service")
    return p


def _version() -> str:
    from semsegloop import __version__
    return f"semsegloop {__version__}"


class _TrainBar:
    """tqdm bar fed by TrainProgress (time- or step-based). It appears with the first step, so
    an error raised before training starts stays a single line."""

    def __init__(self, desc: str, total: float | None, unit: str):
        self.desc, self.total, self.unit = desc, total, unit
        self.bar = None
        self.by_time = unit == "s"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __call__(self, p) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, file=sys.stderr,
                            dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} "
                            "{unit} [{elapsed}<{remaining}{postfix}]")
        value = p.elapsed_s if self.by_time else p.step
        if self.bar.total is not None:
            value = min(value, self.bar.total)
        self.bar.n = value
        post = {"step": p.step, "loss": f"{p.loss:.3f}"}
        if p.val_dice:
            post["dice"] = f"{sum(p.val_dice.values()) / len(p.val_dice):.3f}"
        self.bar.set_postfix(post, refresh=True)
        if p.phase != "train":
            self.bar.close()


@contextlib.contextmanager
def _cancel_on_sigint():
    """First Ctrl-C asks training to stop after the current step; a second one aborts.

    The previous handler comes back afterwards (main() also runs inside Slicer's console and
    notebooks); off the main thread, where signals cannot be caught, Ctrl-C simply aborts.
    """
    ev = threading.Event()

    def handler(signum, frame):
        if ev.is_set():
            raise KeyboardInterrupt
        ev.set()
        print("\nstopping after this step (Ctrl-C again to abort)...", file=sys.stderr)
    if threading.current_thread() is not threading.main_thread():
        yield ev
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield ev
    finally:
        signal.signal(signal.SIGINT, previous)


_opened: list = []  # projects a command opened; main() closes them, releasing the lock


def _open(path, read_only: bool = False):
    from semsegloop.project import Project

    proj = Project.open(path, read_only=read_only)
    _opened.append(proj)
    return proj


def _color(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    try:
        values = tuple(int(v) for v in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise SemSegLoopError(f"--colors: '{text}' is not a colour r,g,b of three whole numbers "
                              f"in 0..255 (colours are separated by ';')")
    return values


def _writable_file_target(path: Path, option: str) -> None:
    """Refuse an output file path that cannot be written, before any work is done."""
    if path.is_dir():
        raise SemSegLoopError(f"{option} '{path}' is a folder; give a file name")
    if path.parent.exists() and not path.parent.is_dir():
        raise SemSegLoopError(f"{option} '{path}': '{path.parent}' is not a folder")


def cmd_init(a) -> int:
    from semsegloop.project import Project

    colors = None
    if a.colors:
        colors = [_color(c) for c in a.colors.split(";")]
    proj = Project.create(a.project, [c for c in a.classes.split(",")], dims=a.dims,
                          preset=a.preset, colors=colors)
    _opened.append(proj)
    print(f"created {proj}")
    return 0


def cmd_add(a) -> int:
    from tqdm import tqdm

    from semsegloop.data import imageio

    proj = _open(a.project)
    if a.labels and len(a.labels) != len(a.images):
        raise SemSegLoopError(f"--labels gives {len(a.labels)} files for {len(a.images)} images")
    for n, path in enumerate(tqdm(a.images, desc="adding", unit="image", file=sys.stderr,
                                  disable=len(a.images) < 3)):
        # Labels are read and checked first, so a bad labels file adds nothing.
        labels = imageio.read_labels(a.labels[n])[0] if a.labels else None
        image = imageio.read_image(path, dims=proj.dims)
        if labels is not None:
            proj.check_labels(image.array.shape[:3], labels, f"labels '{a.labels[n]}'")
        image_id = proj.add_image(image, spacing=a.spacing, copy=not a.reference)
        if labels is not None:
            proj.set_labels(image_id, labels)
        print(f"{image_id}\t{path}")
    return 0


def cmd_train(a) -> int:

    proj = _open(a.project)
    budget = a.time_budget_s
    if budget is None and a.steps is None:
        budget = 60.0
    bar = _TrainBar(f"round {proj.round + 1}", a.steps if a.steps else budget,
                    "steps" if a.steps else "s")
    with _cancel_on_sigint() as cancel:
        try:
            res = proj.train(time_budget_s=budget, steps=a.steps, device=a.device, progress=bar,
                             cancel=cancel, seed=a.seed, preset=a.preset)
        finally:
            bar.close()
    state = "stopped early" if res.cancelled else "done"
    print(f"round {res.round} {state}: {res.steps} steps in {res.seconds:.1f} s on {res.device}, "
          f"final loss {res.final_loss if res.final_loss is None else round(res.final_loss, 4)}, "
          f"model {res.checkpoint}")
    return EXIT_INTERRUPTED if res.cancelled and res.steps == 0 else 0


def _postprocess_flags(s) -> None:
    g = s.add_argument_group("post-processing (stored in the project, used by every later "
                             "prediction; CLASS is a name or value 1..K)")
    g.add_argument("--largest-component", metavar="CLASS", nargs="+", default=[],
                   help="keep only the largest connected piece of these classes")
    g.add_argument("--min-size", metavar="CLASS=SIZE", nargs="+", default=[],
                   help="remove pieces smaller than SIZE mm^2 (2D) / mm^3 (3D)")
    g.add_argument("--fill-holes", metavar="CLASS", nargs="+", default=[],
                   help="fill holes enclosed by these classes")
    g.add_argument("--smooth", metavar="CLASS=closing|median:MM", nargs="+", default=[],
                   help="light smoothing of radius MM mm, e.g. nucleus=median:1.5")
    g.add_argument("--clear-postprocess", action="store_true",
                   help="remove the stored post-processing first")
    g.add_argument("--no-postprocess", action="store_true",
                   help="predict this time without post-processing (settings stay stored)")


def _postprocess_settings(a, current: dict) -> dict | None:
    """The project's settings updated by the flags, or None when no flag changes them."""
    if not (a.largest_component or a.min_size or a.fill_holes or a.smooth or a.clear_postprocess):
        return None
    out = {} if a.clear_postprocess else {k: dict(v) for k, v in current.items()}

    def pair(item: str, flag: str) -> tuple[str, str]:
        if "=" not in item:
            raise SemSegLoopError(f"{flag} '{item}' must be CLASS=VALUE")
        return tuple(item.split("=", 1))
    for c in a.largest_component:
        out.setdefault(c, {})["largest_component"] = True
    for c in a.fill_holes:
        out.setdefault(c, {})["fill_holes"] = True
    for item in a.min_size:
        c, v = pair(item, "--min-size")
        out.setdefault(c, {})["min_size"] = v
    for item in a.smooth:
        c, v = pair(item, "--smooth")
        how, _, mm = v.partition(":")
        out.setdefault(c, {}).update(smoothing=how, smoothing_mm=mm or "0")
    return out


def cmd_predict(a) -> int:
    from tqdm import tqdm


    proj = _open(a.project)
    settings = _postprocess_settings(a, proj.postprocessing)
    if settings is not None:
        # Keys may mix names and values; merging them through the project's check keeps one
        # entry per class.
        merged: dict = {}
        from semsegloop.predict.postprocess import validate_settings
        for k, v in settings.items():
            key = next(iter(validate_settings({k: {"fill_holes": True}}, proj.n_classes,
                                              proj.class_names)))
            merged.setdefault(key, {}).update(v)
        proj.set_postprocessing(merged)
        print(f"post-processing: {json.dumps(proj.postprocessing) if proj.postprocessing else 'none'}")
    ids = a.images or proj.image_ids
    for image_id in tqdm(ids, desc=f"predicting (round {proj.round})", unit="image",
                         file=sys.stderr):
        proj.predict(image_id, device=a.device, postprocess=not a.no_postprocess)
    print(f"predicted {len(ids)} image(s) -> {proj.path / 'predictions' / f'round_{proj.round:03d}'}")
    return 0


def cmd_refine(a) -> int:
    from semsegloop.data import imageio

    proj = _open(a.project)
    strokes, geometry = imageio.read_labels(a.strokes)
    before = proj.refined_prediction(a.image)
    if before is None:
        before = proj.saved_prediction(a.image)
    refined = proj.refine(a.image, strokes, geometry=geometry, device=a.device)
    changed = int((refined != before).sum()) if before is not None else int(refined.size)
    if a.out:
        imageio.write_labels(a.out, refined, proj.geometry(a.image))
    print(f"refined '{a.image}' (round {proj.round}): {changed} voxel(s) changed -> "
          f"{proj.path / 'predictions' / f'round_{proj.round:03d}' / f'{a.image}_refined.nrrd'}")
    return 0


def cmd_suggest(a) -> int:
    proj = _open(a.project)   # images without an uncertainty map get predicted (and saved)
    ranked = proj.suggest(a.n, by=a.by, device=a.device)
    print(f"{'rank':<6}{'image':<28}{'slice':>6}{'uncertainty':>13}")
    for n, r in enumerate(ranked, 1):
        sl = "-" if r["slice"] is None else str(r["slice"])
        print(f"{n:<6}{r['image_id']:<28}{sl:>6}{r['score']:>13.4f}")
    if a.json:
        from semsegloop.data.atomic import atomic_write_text
        atomic_write_text(a.json, json.dumps(ranked, indent=2))
    return 0


def cmd_evaluate(a) -> int:
    from semsegloop.data import imageio

    if a.json:
        _writable_file_target(a.json, "--json")
    proj = _open(a.project, read_only=True)  # evaluating writes nothing in the project
    refs = {}
    for item in a.reference:
        if "=" not in item:
            raise SemSegLoopError(f"--reference '{item}' must be ID=PATH")
        image_id, path = item.split("=", 1)
        refs[image_id] = imageio.read_labels(path)[0]
    report = proj.evaluate(refs)
    print(f"{'image':<20}{'class':<16}{'dice':>8}{'jaccard':>9}{'hd95':>9}{'msd':>9}")
    for image_id, rep in report["images"].items():
        for name, c in rep["classes"].items():
            print(f"{image_id:<20}{name:<16}{c['dice']:>8.3f}{c['jaccard']:>9.3f}"
                  f"{c['hd95']:>9.2f}{c['msd']:>9.2f}")
    if a.json:
        from semsegloop.data.atomic import atomic_write_text
        atomic_write_text(a.json, json.dumps(report, indent=2, default=float))
    return 0


def cmd_export(a) -> int:

    csv = a.fractions or a.out / "class_fractions.csv"
    if a.out.exists() and not a.out.is_dir():
        raise SemSegLoopError(f"export target '{a.out}' is a file; give a folder")
    _writable_file_target(csv, "--fractions")
    proj = _open(a.project, read_only=True)  # exporting writes only to OUT
    files = proj.export(a.out, fmt=a.format)
    proj.class_fractions(csv_path=csv)
    print(f"exported {len(files)} label map(s) to {a.out} and class fractions to {csv}")
    return 0


def cmd_serve(a) -> int:
    from semsegloop.service.server import serve

    code = serve(a.project, device=a.device, new_process_group=a.new_process_group)
    # Every file is written and every event flushed: skip the interpreter's slow teardown of
    # torch, so a client waiting for the exit (Stop, restart, tests) gets it at once.
    sys.stderr.flush()
    os._exit(code)


def cmd_demo(a) -> int:
    from semsegloop.apps.demo import run_demo

    res = run_demo(a.out, n_images=a.images, size=a.size, seconds=a.seconds, device=a.device,
                   progress_factory=lambda desc, total: _TrainBar(desc, total, "s"))
    first, last = res["dice"][0], res["dice"][-1]
    print("Dice per round (unseen tiles): " + " -> ".join(
        f"{sum(d.values()) / len(d):.3f}" for d in res["dice"]))
    return 0 if first and last else 1


def cmd_web(a) -> int:
    from semsegloop.apps.web.server import main as web_main

    return web_main(a.project, port=a.port, host=a.host, sample=a.sample, device=a.device)


COMMANDS = {"init": cmd_init, "add": cmd_add, "train": cmd_train, "predict": cmd_predict,
            "refine": cmd_refine, "suggest": cmd_suggest,
            "evaluate": cmd_evaluate, "export": cmd_export, "demo": cmd_demo, "serve": cmd_serve,
            "web": cmd_web}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except SemSegLoopError as e:
        print(f"semsegloop: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except FileExistsError as e:
        print(f"semsegloop: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("semsegloop: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args) -> int:
    try:
        return COMMANDS[args.command](args)
    finally:
        while _opened:
            _opened.pop().close()


if __name__ == "__main__":
    sys.exit(main())
