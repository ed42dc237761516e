"""Refine and Suggest benchmark: Dice after each simulated click (Refine vs Grow from seeds vs a
retraining round with the same strokes), Refine's speed, and Suggest vs evenly spread images.

Clicks: a disk (radius 3) at the deepest point of the largest remaining error region of the
image, one at a time, 5 clicks (``semsegloop.measure.simulate.simulate_correction`` with one
region). Grow from seeds is Slicer's ``vtkImageGrowCutSegment`` (slicer-core wheel) on every
stroke painted on that image so far. The retraining round trains one more round (as many steps
as the first) on all strokes including the clicks. Rounds are budgeted in steps, so the models do
not depend on the load; timings are on this machine under the load of the other sessions.

Suggest: copies of round 1 paint 3 more images (collections) or axial slices (volume cases) in
round 2: the 3 Project.suggest puts first, 3 evenly spread, and the 3 it puts last; mean Dice on
what none of them painted, for each of --suggest-seeds (round 1, strokes and training) and on
average, with each arm's fusion shares.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402

RADIUS = 3


def log(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def dice(pred: np.ndarray, ref: np.ndarray, K: int) -> float:
    """Mean Dice over the classes present in the reference or the prediction."""
    vals = []
    for k in range(1, K + 1):
        a, b = pred == k, ref == k
        den = a.sum() + b.sum()
        if den:
            vals.append(2.0 * (a & b).sum() / den)
    return float(np.mean(vals))


def grow_from_seeds(image: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Slicer's Grow from seeds on (S, Y, X, C) image and (S, Y, X) seeds; 2D runs on three
    copies of the slice (the filter needs three voxels along every axis)."""
    import vtk
    from slicer import vtkImageGrowCutSegment
    from vtk.util import numpy_support as ns

    grey = image.astype(np.float32).mean(axis=-1)
    lo, hi = np.percentile(grey, [0.5, 99.5])
    grey = np.clip((grey - lo) / max(hi - lo, 1e-6), 0, 1) * 1000
    flat = grey.shape[0] < 3
    reps = 3 if flat else 1
    grey = np.repeat(grey, reps, axis=0) if flat else grey
    seed = np.repeat(seeds, reps, axis=0) if flat else seeds

    def to_vtk(a):
        im = vtk.vtkImageData()
        im.SetDimensions(a.shape[2], a.shape[1], a.shape[0])
        im.GetPointData().SetScalars(ns.numpy_to_vtk(np.ascontiguousarray(a, np.int16).ravel(),
                                                     deep=True, array_type=vtk.VTK_SHORT))
        return im
    g = vtkImageGrowCutSegment()
    g.SetIntensityVolume(to_vtk(grey))
    g.SetSeedLabelVolume(to_vtk(seed))
    g.Update()
    out = ns.vtk_to_numpy(g.GetOutput().GetPointData().GetScalars()).reshape(grey.shape)
    return out[1:2].astype(np.uint8) if flat else out.astype(np.uint8)


def make_strokes(case, idx, args):
    from semsegloop.measure.simulate import simulate_strokes

    return simulate_strokes(case.samples[idx].reference, case.n_classes, pixels_per_class=args.pixels,
                            brush_radius=1, seed=args.seed + idx, dims=case.dims)


def new_project(case, workdir: Path, name: str, indices):
    from semsegloop import Project

    proj = Project.create(workdir / f"{case.key}_{name}", classes=case.classes, dims=case.dims)
    ids = {i: proj.add_image(case.samples[i].image, name=case.samples[i].name) for i in indices}
    return proj, ids


# ------------------------------------------------------------------------------ Refine
def first_round(case, args, workdir: Path, indices, name: str, steps: int | None = None):
    """A project holding ``indices`` with the usual strokes on the painted images, round 1 done."""
    steps = steps or args.train_steps
    proj, ids = new_project(case, workdir, name, indices)
    strokes = {i: make_strokes(case, i, args) for i in case.paint}
    for i in case.paint:
        proj.set_labels(ids[i], strokes[i])
    log(f"{case.key}: round 1, {steps} steps")
    proj.train(steps=steps, device=args.device, seed=args.seed)
    return proj, ids, strokes


def refine_case(case, args, proj, ids, strokes, steps: int | None = None,
                component: str = "fused") -> dict:
    """5 clicks on each target image. ``component`` "fused": ``Project.refine`` (the engine's
    Refine, on the round's fused probabilities), then a retraining round; "network":
    ``refine_labels`` on the network's probabilities alone (a diagnostic: no retraining)."""
    from semsegloop.data.normalization import normalize
    from semsegloop.measure.simulate import simulate_correction
    from semsegloop.predict.refine import refine_labels

    steps = steps or args.train_steps
    targets = case.paint[: args.targets]
    K = case.n_classes
    rows = []
    for i in targets:
        ref = case.samples[i].reference
        if component == "fused":
            pred = proj.predict(ids[i], device=args.device)
        else:
            full = proj.predict_full(ids[i], device=args.device, save=False, component=component)
            pred, probs = full.labels, full.probabilities
            x = normalize(proj.image(ids[i]).array, proj._meta["normalization"])
        row = {"image": case.samples[i].name, "start": dice(pred, ref, K), "refine": [],
               "grow": [], "refine_s": []}
        so_far, current = strokes[i].copy(), pred
        for c in range(args.clicks):
            after = simulate_correction(so_far, current, ref, n_regions=1, radius=RADIUS,
                                        dims=case.dims, seed=args.seed + c)
            click = np.where(after != so_far, after, 0).astype(np.uint8)
            if not click.any():
                break
            t0 = time.perf_counter()
            if component == "fused":
                current = proj.refine(ids[i], click)
            else:
                current = refine_labels(x, probs, current, after, proj.geometry(ids[i]).spacing,
                                        case.dims)
            row["refine_s"].append(time.perf_counter() - t0)
            so_far = after
            row["refine"].append(dice(current, ref, K))
            row["grow"].append(dice(grow_from_seeds(case.samples[i].image.array, so_far), ref, K))
        rows.append(row)
        log(f"{case.key} {component} {row['image']}: start {row['start']:.3f} refine "
            f"{' '.join(f'{d:.3f}' for d in row['refine'])} | grow "
            f"{' '.join(f'{d:.3f}' for d in row['grow'])}")
    if component == "fused":
        log(f"{case.key}: retraining round with the clicks, {steps} steps")
        proj.train(steps=steps, device=args.device, seed=args.seed)
    for row, i in zip(rows, targets):
        row["retrain"] = (dice(proj.predict(ids[i], device=args.device), case.samples[i].reference, K)
                          if component == "fused" else float("nan"))
    out = summarise_refine(case, rows, args)
    out.update(steps=steps, component=component)
    return out


def summarise_refine(case, rows, args) -> dict:
    n = min(len(r["refine"]) for r in rows)
    start = float(np.mean([r["start"] for r in rows]))
    ref_curve = [float(np.mean([r["refine"][c] for r in rows])) for c in range(n)]
    grow_curve = [float(np.mean([r["grow"][c] for r in rows])) for c in range(n)]
    retrain = float(np.mean([r["retrain"] for r in rows]))
    gain_refine = ref_curve[-1] - start if n else 0.0
    gain_retrain = retrain - start
    curve = [start] + ref_curve
    return {"case": case.key, "title": case.title, "dims": case.dims, "images": rows,
            "start": start, "refine": ref_curve, "grow": grow_curve, "retrain": retrain,
            "refine_s_max": max(s for r in rows for s in r["refine_s"]),
            "refine_s_mean": float(np.mean([s for r in rows for s in r["refine_s"]])),
            "never_drops": all(b >= a - 1e-9 for a, b in zip(curve, curve[1:])),
            "half_of_retrain": bool(gain_refine >= 0.5 * gain_retrain),
            "beats_grow": all(a > b for a, b in zip(ref_curve, grow_curve))}


# ------------------------------------------------------------------------------ speed
def speed(args) -> list[dict]:
    """refine_labels on a 512^2 image (grey and RGB) and a 200^3 volume with one click in a
    missed region; in 2D older strokes of both classes are passed too, so the global step
    (predict.recalibrate) runs, its filter bank computed in the call (no cache)."""
    from scipy import ndimage as ndi

    from semsegloop.learn import seeded
    from semsegloop.predict.geodesic import geodistk_available
    from semsegloop.predict.refine import RefineSettings, refine_labels

    rng = np.random.default_rng(0)
    out = []
    for shape, dims, channels in (((1, 512, 512), 2, 1), ((1, 512, 512), 2, 3),
                                  ((200, 200, 200), 3, 1)):
        grids = np.ogrid[tuple(slice(0, n) for n in shape)]
        centre = [n // 2 for n in shape]
        r2 = sum((g - c) ** 2 for g, c in zip(grids[3 - dims:], centre[3 - dims:]))
        ref = np.where(r2 <= (shape[-1] // 5) ** 2, 2, 1).astype(np.uint8)
        img = ndi.gaussian_filter((ref == 2).astype(np.float32) + rng.normal(0, 0.3, shape)
                                  .astype(np.float32), 1)[..., None]
        if channels > 1:
            img = np.concatenate([img * (1.0 - 0.2 * c) for c in range(channels)], axis=-1)
        p = np.where(ref == 2, 0.9, 0.1).astype(np.float32)
        # The network misses a wedge of the object; the click goes in it.
        wedge = (ref == 2) & (grids[-1] > centre[-1] + shape[-1] // 20)
        p[wedge] = 0.1
        probs = np.stack([1 - p, p]).astype(np.float16)
        current = (np.argmax(probs, axis=0) + 1).astype(np.uint8)
        click = np.zeros(shape, np.uint8)
        z = centre[0]
        cy, cx = centre[1], centre[2] + shape[-1] // 8
        click[z, cy - RADIUS:cy + RADIUS + 1, cx - RADIUS:cx + RADIUS + 1] = 2
        if dims == 2:  # earlier strokes: background near the border, the object's found part
            click[z, 20:24, 40:shape[-1] - 40] = 1
            click[z, cy - 2:cy + 3, centre[2] - 60:centre[2] - 20] = 2
        methods = ["numpy"] + (["geodistk"] if geodistk_available() else [])
        for m in methods:
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                res = refine_labels(img, probs, current, click, (1.0, 1.0, 1.0), dims,
                                    RefineSettings(method=m))
                times.append(time.perf_counter() - t0)
            fixed = float((res[wedge] == 2).mean())
            out.append({"shape": "x".join(map(str, shape)) + (f"x{channels}" if channels > 1 else ""),
                        "method": m, "median_s": float(np.median(times)),
                        "max_s": float(np.max(times)), "target_s": 1.0 if dims == 2 else 3.0,
                        "wedge_fixed": fixed})
            log(f"speed {out[-1]}")
        if dims == 3 and seeded.available():
            out.append(_speed_regrown(img, probs, click, wedge, args))
            log(f"speed {out[-1]}")
    return out


def _speed_regrown(img, probs, click, wedge, args) -> dict:
    """What Project.refine adds on a volume painted in the round whose fusion gave Grow from
    seeds a share (0.2 here): that share regrown with the click (predict/regrow.py), then
    refine_labels on the result. The round's own growing (from a background stroke and the
    object's found part) is kept from the round, so it is not timed."""
    from semsegloop.learn import seeded
    from semsegloop.predict.refine import active_strokes, refine_labels
    from semsegloop.predict.regrow import with_regrown_seeds

    shape = click.shape
    z, c = shape[0] // 2, shape[1] // 2
    old = np.zeros(shape, np.uint8)
    old[z, 20:24, 40:shape[-1] - 40] = 1
    old[z, c - 2:c + 3, c - 60:c - 20] = 2
    grey = img[..., 0]
    grown = seeded.grow(grey, old, (1.0, 1.0, 1.0))
    w = 0.2
    fused = (probs.astype(np.float32) * (1 - w)
             + w * np.stack([grown == 1, grown == 2]).astype(np.float32)).astype(np.float16)
    strokes = np.where(click > 0, click, old).astype(np.uint8)
    cur = (np.argmax(fused, axis=0) + 1).astype(np.uint8)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        p = with_regrown_seeds(fused, grown, grey, strokes, active_strokes(strokes, cur),
                               (1.0, 1.0, 1.0), w)
        res = refine_labels(img, p, cur, strokes, (1.0, 1.0, 1.0), 3)
        times.append(time.perf_counter() - t0)
    return {"shape": "x".join(map(str, shape)), "method": "+regrow", "median_s": float(np.median(times)),
            "max_s": float(np.max(times)), "target_s": 3.0,
            "wedge_fixed": float((res[wedge] == 2).mean())}
    return out


# ------------------------------------------------------------------------------ Suggest
def copy_project(proj, dst: Path):
    from semsegloop import Project

    shutil.copytree(proj.path, dst, ignore=shutil.ignore_patterns("project.lock"))
    return Project.open(dst)


def suggest_case(case, args, arms: dict, ids) -> dict:
    """``arms``: {"suggest": project, "spread": project, "least": project}, copies of one
    project after round 1. "least" paints the 3 images Suggest ranks last: if the ranking
    means anything, it should come out below the suggested ones."""
    if case.score_painted:
        return suggest_slices(case, args, arms, ids)
    by_id = {v: k for k, v in ids.items()}
    unpainted = [i for i in ids if i not in case.paint]
    t0 = time.perf_counter()
    ranked = arms["suggest"].suggest(len(unpainted), device=args.device)
    suggest_s = time.perf_counter() - t0
    order = [by_id[s["image_id"]] for s in ranked]
    chosen, rest = pick_arms(order[:3], order, unpainted, arms)
    result = {"case": case.key, "seed": args.seed, "rest": len(rest), "suggest_s": suggest_s,
              "scores": {case.samples[by_id[s["image_id"]]].name: s["score"] for s in ranked},
              "arms": {}}

    def paint(p, picks):
        for i in picks:
            p.set_labels(ids[i], make_strokes(case, i, args))

    def score(p):
        return float(np.mean([dice(p.predict(ids[i], device=args.device, save=False),
                                   case.samples[i].reference, case.n_classes) for i in rest]))
    return run_arms(case, args, arms, chosen, result, paint, score,
                    lambda i: case.samples[i].name)


def pick_arms(top: list, order: list, unpainted: list, arms: dict) -> tuple[dict, list]:
    """({arm: what it paints}, what none of them paints): Suggest's ``top``, the last 3 of its
    whole ``order``, 3 evenly spread; every arm is scored on the same rest."""
    chosen = {"suggest": top, "least": order[-3:],
              "spread": [unpainted[j] for j in datasets.spread(len(unpainted), 3)]}
    chosen = {k: v for k, v in chosen.items() if k in arms}
    used = {i for v in chosen.values() for i in v}
    return chosen, [i for i in unpainted if i not in used]


def run_arms(case, args, arms: dict, chosen: dict, result: dict, paint, score, label) -> dict:
    """Round 2 in each arm's copy: ``paint(project, picks)``, train, ``score(project)``."""
    for name, p in arms.items():
        paint(p, chosen[name])
        log(f"{case.key}: round 2 with the {name} picks {chosen[name]}, {args.train_steps} steps")
        p.train(steps=args.train_steps, device=args.device, seed=args.seed)
        result["arms"][name] = {"images": [label(x) for x in chosen[name]], "dice": score(p),
                                "fusion": fusion_of(p)}
        log(f"{case.key}: {name} {result['arms'][name]}")
    a = result["arms"]
    result["suggest_wins"] = a["suggest"]["dice"] > a["spread"]["dice"]
    return result


def fusion_of(proj) -> dict:
    """The latest round's shares (network against the teacher; network, teacher, Grow from
    seeds on painted images) and the held-out pixels they were chosen on: what moved an arm."""
    f = (proj.rounds[-1] if proj.rounds else {}).get("fusion") or {}
    return {k: f.get(k) for k in ("weight", "seeded_weights", "scored_pixels", "kept_previous")}


def suggest_slices(case, args, arms: dict, ids) -> dict:
    """Suggest on a volume case: round 2 paints 3 more axial slices of the (first) painted
    volume, with as many pixels per slice as round 1's; scored on the slices no arm painted
    (nor round 1)."""
    from semsegloop.measure.simulate import simulate_strokes

    i = case.paint[0]
    ref = case.samples[i].reference
    K = case.n_classes
    first = make_strokes(case, i, args)
    painted = set(np.flatnonzero(first.reshape(len(first), -1).any(axis=1)).tolist())
    unpainted = [z for z in range(len(first)) if z not in painted]
    t0 = time.perf_counter()
    ranked = [r for r in arms["suggest"].suggest(len(unpainted), by="slice", device=args.device)
              if r["image_id"] == ids[i]]
    suggest_s = time.perf_counter() - t0
    # What the panel asks (3 slices, kept apart: the gap depends on how many are asked);
    # the whole ranking gives the last three.
    top3 = [r["slice"] for r in arms["suggest"].suggest(3, by="slice", device=args.device)]
    chosen, rest = pick_arms(top3, [r["slice"] for r in ranked], unpainted, arms)
    chosen = {k: sorted(v) for k, v in chosen.items()}
    # simulate_strokes shares a volume's pixels among its painted slices.
    per_slice = -(-args.pixels // max(len(painted), 1))
    result = {"case": case.key, "seed": args.seed, "rest": len(rest), "suggest_s": suggest_s,
              "unit": "slices", "scores": {f"slice {r['slice']}": r["score"] for r in ranked},
              "arms": {}}

    def paint(p, picks):
        more = simulate_strokes(ref, K, pixels_per_class=per_slice * len(picks), brush_radius=1,
                                seed=args.seed + i, dims=3, slices=picks)
        p.set_labels(ids[i], np.where(first > 0, first, more).astype(np.uint8))

    def score(p):
        pred = p.predict(ids[i], device=args.device, save=False)
        return dice(pred[rest], ref[rest], K)
    return run_arms(case, args, arms, chosen, result, paint, score, lambda z: f"slice {z}")


def mean_suggest(runs: list[dict]) -> dict:
    """One Suggest case over several seeds: each seed's arms, and the arms' mean Dice."""
    out = {"case": runs[0]["case"], "unit": runs[0].get("unit", "images"), "seeds": runs}
    out["mean"] = {name: float(np.mean([r["arms"][name]["dice"] for r in runs]))
                   for name in runs[0]["arms"]}
    out["suggest_wins"] = out["mean"]["suggest"] > out["mean"]["spread"]
    return out


# ------------------------------------------------------------------------------ report
def print_report(report: dict) -> None:
    s = report["settings"]
    print(f"SemSegLoop Refine/Suggest benchmark, {s['date']}; {s['cpu_count']} CPU cores shared "
          f"with other sessions; training {s['train_steps']} steps per round; {s['clicks']} clicks "
          f"(disk r={RADIUS}); GeodisTK installed: {s['geodistk']}")
    print("\nRefine speed (refine_labels, one click in a missed region; target 1 s 2D / 3 s 3D;"
          "\n'+regrow': with the round's Grow-from-seeds share regrown first, as Project.refine "
          "does on a painted volume)")
    print(f"{'shape':<14}{'geodesic':<10}{'median s':>9}{'max s':>8}{'target':>8}{'fixed':>7}")
    for r in report["speed"]:
        print(f"{r['shape']:<14}{r['method']:<10}{r['median_s']:>9.3f}{r['max_s']:>8.3f}"
              f"{r['target_s']:>8.1f}{r['wedge_fixed']:>7.2f}")
    for c in report["refine"]:
        what = ("Project.refine on the round's fused probabilities" if c["component"] == "fused"
                else f"refine_labels on the {c['component']}'s probabilities alone (diagnostic)")
        title = c["title"] if f"({c['dims']}D" in c["title"] else f"{c['title']} ({c['dims']}D)"
        print(f"\n{title}, round 1 of {c['steps']} steps, {len(c['images'])} "
              f"painted image(s), {what}: mean Dice")
        print(f"{'clicks':<10}" + "".join(f"{n:>7}" for n in range(len(c['refine']) + 1)))
        print(f"{'refine':<10}{c['start']:>7.3f}" + "".join(f"{d:>7.3f}" for d in c["refine"]))
        print(f"{'grow':<10}{'':>7}" + "".join(f"{d:>7.3f}" for d in c["grow"]))
        if c["component"] == "fused":
            print(f"{'retrain':<10}{c['start']:>7.3f}{'':>{7 * (len(c['refine']) - 1)}}"
                  f"{c['retrain']:>7.3f}  (one more round on the same strokes)")
        half = (f">= half the retraining gain: {c['half_of_retrain']}; "
                if c["component"] == "fused" else "")
        print(f"Refine seconds (incl. I/O for Project.refine): mean {c['refine_s_mean']:.3f}, max "
              f"{c['refine_s_max']:.3f}; never drops: {c['never_drops']}; {half}"
              f"beats Grow from seeds after every click: {c['beats_grow']}")
    labels = {"suggest": "suggested (most uncertain)", "spread": "evenly spread",
              "least": "least uncertain (control)"}
    for c in report["suggest"]:
        unit = c["unit"]
        print(f"\nSuggest on {c['case']}: round 2 paints 3 more {unit} ({s['train_steps']} more "
              f"steps); mean Dice on the {unit} no arm painted, per seed (round 1, strokes and "
              f"training) and their mean")
        for r in c["seeds"]:
            print(f"  seed {r['seed']}: {r['rest']} {unit} scored (Project.suggest over all "
                  f"unpainted: {r['suggest_s']:.1f} s)")
            for name, arm in r["arms"].items():
                sc = [round(r["scores"][n], 3) for n in arm["images"]]
                f = arm.get("fusion") or {}
                print(f"    {labels[name]:<28}{arm['dice']:>7.3f}   {arm['images']} uncertainty {sc}"
                      f"; shares {f.get('seeded_weights') or f.get('weight')}"
                      f" on {f.get('scored_pixels')} held-out px")
        print("  mean over seeds " + ", ".join(str(r["seed"]) for r in c["seeds"]) + ": "
              + ", ".join(f"{labels[k]} {v:.3f}" for k, v in c["mean"].items()))
        print(f"  suggested higher than evenly spread (mean): {c['suggest_wins']}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--refine-cases", default="isbi,nuclei,hippocampus,ctorgans")
    p.add_argument("--suggest-cases", default="isbi,nuclei",
                   help="collections: 3 more images; volume cases (ctorgans, brain1): 3 more slices")
    # Steps, not seconds: the machine is shared, and a time budget would give a model whose
    # quality depends on the other sessions' load (60 s on two free cores is ~120-170 steps).
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--poor-cases", default="nuclei",
                   help="cases also refined after a round 1 of only --poor-steps steps")
    p.add_argument("--poor-steps", type=int, default=5)
    p.add_argument("--clicks", type=int, default=5)
    p.add_argument("--targets", type=int, default=2, help="painted images refined per case")
    p.add_argument("--context", type=int, default=3, help="unpainted images in the refine project")
    p.add_argument("--pixels", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", type=Path, default=datasets.DEFAULT_DATA)
    p.add_argument("--arms", default="suggest,spread,least",
                   help="Suggest arms (suggest and spread are needed)")
    p.add_argument("--suggest-seeds", default="0,1,2",
                   help="seeds of the Suggest experiment (the first is --seed's round 1)")
    p.add_argument("--json", type=Path)
    p.add_argument("--no-speed", action="store_true")
    args = p.parse_args(argv)
    args.refine_cases = [c for c in args.refine_cases.split(",") if c]
    args.suggest_cases = [c for c in args.suggest_cases.split(",") if c]
    args.arms = [a for a in args.arms.split(",") if a]
    # The first Suggest run reuses the Refine cases' round 1, trained with --seed.
    args.suggest_seeds = [args.seed] + [int(v) for v in args.suggest_seeds.split(",")
                                        if v and int(v) != args.seed]
    args.poor_cases = [c for c in args.poor_cases.split(",") if c]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from semsegloop.predict.geodesic import geodistk_available

    settings = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), cpu_count=os.cpu_count(),
                    train_steps=args.train_steps, clicks=args.clicks, geodistk=geodistk_available(),
                    seed=args.seed, pixels=args.pixels)
    report = {"settings": settings, "speed": [], "refine": [], "suggest": [], "skipped": []}
    t_all = time.perf_counter()
    if not args.no_speed:
        report["speed"] = speed(args)
    workdir = Path(tempfile.mkdtemp(prefix="semsegloop_refine_"))
    try:
        for key in dict.fromkeys(args.refine_cases + args.suggest_cases + args.poor_cases):
            try:
                # Suggest on volumes needs the full set (4 painted + 20 unseen); Refine two.
                quick = key == "hippocampus" and key not in args.suggest_cases
                case = datasets.load(key, args.data, quick=quick)
            except FileNotFoundError as e:
                report["skipped"].append(f"{key}: {e}")
                print(f"{key}: skipped ({e})")
                continue
            # Suggest needs the whole collection; Refine only the painted images and some context.
            if key in args.suggest_cases:
                indices = list(range(len(case.samples)))
            else:
                indices = case.paint + [case.predict[j] for j in datasets.spread(len(case.predict), args.context)]
            arms = {}
            if key in args.refine_cases or key in args.suggest_cases:
                proj, ids, strokes = first_round(case, args, workdir, indices, "main")
            if key in args.suggest_cases:   # copies of round 1, before Refine adds clicks
                arms = {a: copy_project(proj, workdir / f"{key}_{a}") for a in args.arms}
            if key in args.refine_cases:
                report["refine"].append(refine_case(case, args, proj, ids, strokes))
            if arms:
                # Which 3 images a round paints moves the rest's Dice by about as much as the
                # seed does (strokes, training): one seed decides nothing, their mean does.
                runs = [suggest_case(case, args, arms, ids)]
                for seed in args.suggest_seeds[1:]:
                    a2 = argparse.Namespace(**{**vars(args), "seed": seed})
                    p2, ids2, _ = first_round(case, a2, workdir, indices, f"s{seed}")
                    runs.append(suggest_case(case, a2, {a: copy_project(p2, workdir / f"{key}_{a}_s{seed}")
                                                        for a in args.arms}, ids2))
                report["suggest"].append(mean_suggest(runs))
            if key in args.poor_cases:
                # A poor model (few steps): the engine's Refine beside Refine on the network
                # alone, which is what lost to Grow from seeds before the fused prediction.
                proj, ids, strokes = first_round(case, args, workdir, indices, "poor",
                                                 steps=args.poor_steps)
                for comp in ("network", "fused"):
                    report["refine"].append(refine_case(case, args, proj, ids, strokes,
                                                        steps=args.poor_steps, component=comp))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    settings["total_s"] = time.perf_counter() - t_all
    print_report(report)
    print(f"\ntotal {settings['total_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
