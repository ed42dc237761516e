"""Sparse-label benchmark: the engine (through the Project API) against the classical tools a
person would otherwise use on the same simulated strokes (an ilastik-style random forest and
Slicer's Grow from seeds), scored on unseen images or unpainted voxels of real data.

Run from the repository root (see bench/README.md):
    python bench/bench_sparse.py                 # all cases, 60 s of training per round
    python bench/bench_sparse.py --quick         # smoke run: few images, short budgets
Exits 0 with a message when ../shared/data is missing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets  # noqa: E402  (bench/ is not a package; the script's folder is on sys.path)

ALL_CASES = ("isbi", "nuclei", "drosophila", "hippo3d", "brain1", "ctorgans")
KNOWN_CASES = ALL_CASES + ("hippocampus",)
# Error ratio = (1 - Dice_engine) / (1 - Dice_best anchor), mean Dice over classes.
FLOOR = 1.0               # every round: never worse than the best classical tool
TARGET_R0, TARGET_R1 = 0.8, 0.7
TARGET_FIRST_S = 20.0     # first full prediction of the 3 painted ISBI images


# ------------------------------------------------------------------------------ measuring

class PeakRSS:
    """Peak resident memory of this process during a ``with`` block, sampled from
    /proc/self/statm every few ms (getrusage's maxrss never goes down, so it cannot tell one
    phase from the previous ones; tracemalloc does not see torch's or numpy's C allocations).
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = None

    def rss_mb(self) -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self.page / 2 ** 20
        except (OSError, ValueError, IndexError):
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, self.rss_mb())

    def __enter__(self):
        gc.collect()
        self.start_mb = self.peak_mb = self.rss_mb()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.rss_mb())
        return False

    @property
    def delta_mb(self) -> float:
        return self.peak_mb - self.start_mb


class Score:
    """Dice per class pooled over several images (pixel counts summed, then the ratio)."""

    def __init__(self, n_classes: int):
        self.K = n_classes
        self.tp = np.zeros(n_classes + 1)
        self.pred = np.zeros(n_classes + 1)
        self.ref = np.zeros(n_classes + 1)

    def add(self, prediction: np.ndarray, reference: np.ndarray) -> None:
        valid = reference > 0
        p = prediction[valid].astype(np.int64)
        r = reference[valid].astype(np.int64)
        n = self.K + 1
        conf = np.bincount(r * n + np.clip(p, 0, self.K), minlength=n * n).reshape(n, n)
        self.tp += np.diag(conf)
        self.pred += conf.sum(axis=0)
        self.ref += conf.sum(axis=1)

    def dice(self) -> list[float]:
        den = self.pred + self.ref
        with np.errstate(invalid="ignore", divide="ignore"):
            d = np.where(den > 0, 2 * self.tp / np.maximum(den, 1), np.nan)
        return [float(v) for v in d[1:]]


def mean_dice(dice: list[float]) -> float:
    vals = [d for d in dice if not np.isnan(d)]
    return float(np.mean(vals)) if vals else float("nan")


def log(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ the runs

def make_strokes(case: datasets.Case, args) -> dict[int, np.ndarray]:
    from semsegloop.measure.simulate import default_slices, simulate_strokes

    out = {}
    for i in case.paint:
        ref = case.samples[i].reference
        if case.dims == 3:
            # A person paints a few axial slices, each about as much as one 2D image.
            slices = default_slices(ref, case.n_classes, datasets.AXIAL_SLICES)
            out[i] = simulate_strokes(ref, case.n_classes, pixels_per_class=args.pixels * len(slices),
                                      brush_radius=1, seed=args.seed + i, dims=3, slices=slices)
        else:
            out[i] = simulate_strokes(ref, case.n_classes, pixels_per_class=args.pixels,
                                      brush_radius=1, seed=args.seed + i, dims=2)
    return out


def labeled_counts(labels: dict[int, np.ndarray], K: int) -> list[int]:
    return [int(sum((lab == k).sum() for lab in labels.values())) for k in range(1, K + 1)]


def correct(case, labels, predictions, args) -> dict[int, np.ndarray]:
    from semsegloop.measure.simulate import simulate_correction

    return {i: simulate_correction(labels[i], predictions[i], case.samples[i].reference,
                                   n_regions=5, radius=3, dims=case.dims, seed=args.seed + i)
            for i in case.paint}


def round_budget(case: datasets.Case, args) -> float:
    """Seconds per round: --train-seconds for 2D collections; for volumes 120 s per 200^3
    voxels painted, at least --min-3d-seconds."""
    if case.dims == 2:
        return args.train_seconds
    voxels = sum(int(np.prod(case.samples[i].reference.shape)) for i in case.paint)
    return max(args.min_3d_seconds, args.seconds_3d * voxels / 200 ** 3)


def score_mask(case, i, labels) -> np.ndarray | None:
    """Volumes are scored where the person did not paint; unseen images everywhere."""
    return (labels[i] == 0) if case.score_painted else None


def add_score(score, pred, case, i, labels):
    ref = case.samples[i].reference
    m = score_mask(case, i, labels)
    if m is not None:
        ref = np.where(m, ref, 0)
    score.add(pred, ref)


# Engine variants: the default (teacher pseudo-labels + gated pairwise term + masked CE, fused
# with the teacher) and the ablation "ce" (masked cross-entropy on the strokes alone).
ENGINE_VARIANTS = {"engine": {}, "ce": dict(pseudo_labels=False, pairwise_weight=0.0)}


def _row(method, rnd, score, labels, K, **kw):
    return dict(method=method, round=rnd, dice=score.dice(), labeled=labeled_counts(labels, K), **kw)


def run_engine(case: datasets.Case, strokes, args, workdir: Path, method: str = "engine") -> list[dict]:
    """Rows for the engine as the person gets it ("engine": the fused prediction) and, from the
    same trained rounds, its two parts alone ("net", "teacher") as ablation rows."""
    from semsegloop import Project

    proj = Project.create(workdir / f"{case.key}_{method}", classes=case.classes, dims=case.dims)
    order = list(dict.fromkeys(case.paint + case.predict))
    ids = {i: proj.add_image(case.samples[i].image, name=case.samples[i].name) for i in order}
    labels = dict(strokes)
    budget = round_budget(case, args)
    rows = []
    painted_pred = {}
    K = case.n_classes
    for rnd in (0, 1):
        if rnd == 1:
            # The person looks at the painted images' predictions and fixes the worst errors.
            labels = correct(case, labels, painted_pred, args)
        for i in case.paint:
            proj.set_labels(ids[i], labels[i])
        log(f"{case.key}: {method} round {rnd}, training {budget:g} s")
        with PeakRSS() as mem_train:
            t0 = time.perf_counter()
            result = proj.train(time_budget_s=budget, device=args.device,
                                seed=args.seed, **ENGINE_VARIANTS[method])
            train_s = time.perf_counter() - t0
        fusion = proj.rounds[-1].get("fusion") or {}
        w = float(fusion.get("weight", 1.0))
        w3 = fusion.get("seeded_weights")
        has_teacher = bool(proj.rounds[-1].get("teacher"))
        scores = {m: Score(K) for m in ("fused", "net", "teacher", "painted")}
        log(f"{case.key}: {method} round {rnd} (w_net {w:.1f}), predicting {len(case.predict)} images")
        painted_s = 0.0
        with PeakRSS() as mem_pred:
            t0 = time.perf_counter()
            for i in order:
                ti = time.perf_counter()
                if i not in case.predict:
                    # A painted image that is not scored: what the person waits for at the
                    # round's end is its one fused prediction (timed in the round), nothing else.
                    fused = proj.predict_full(ids[i], device=args.device, save=False,
                                              keep_strokes=False).labels
                    painted_pred[i] = fused
                    painted_s += time.perf_counter() - ti
                    scores["painted"].add(fused, np.where(labels[i] == 0,
                                                          case.samples[i].reference, 0))
                    continue
                pn = proj.predict_full(ids[i], device=args.device, save=False, keep_strokes=False,
                                       component="network").probabilities.astype(np.float32)
                pt = (proj.predict_full(ids[i], device=args.device, save=False, keep_strokes=False,
                                        component="teacher").probabilities.astype(np.float32)
                      if has_teacher else pn)
                # The engine's fused prediction is exactly this blend (Testing/predict/test_fused.py):
                # network and teacher, plus grow-from-seeds on images painted in the round.
                blend = w * pn + (1 - w) * pt
                if w3 and i in case.paint and has_teacher:
                    ps = proj.predict_full(ids[i], device=args.device, save=False,
                                           keep_strokes=False, component="seeded"
                                           ).probabilities.astype(np.float32)
                    blend = w3[0] * pn + w3[1] * pt + w3[2] * ps
                    del ps
                fused = np.argmax(blend, axis=0).astype(np.uint8) + 1
                del blend
                if i in case.paint:
                    painted_pred[i] = fused
                    painted_s += time.perf_counter() - ti
                    # What the person sees on the images they paint (unpainted pixels).
                    scores["painted"].add(fused, np.where(labels[i] == 0,
                                                          case.samples[i].reference, 0))
                if i in case.predict:
                    add_score(scores["fused"], fused, case, i, labels)
                    add_score(scores["net"], np.argmax(pn, axis=0) + 1, case, i, labels)
                    add_score(scores["teacher"], np.argmax(pt, axis=0) + 1, case, i, labels)
                del pn, pt
            pred_s = time.perf_counter() - t0
        common = dict(train_s=train_s, predict_s=pred_s, round_s=train_s + painted_s,
                      budget_s=budget, steps=result.steps, device=result.device,
                      peak_train_mb=mem_train.peak_mb, peak_predict_mb=mem_pred.peak_mb,
                      delta_train_mb=mem_train.delta_mb, delta_predict_mb=mem_pred.delta_mb,
                      weight=w, weights3=w3, estimate=result.estimate,
                      painted_mean=mean_dice(scores["painted"].dice()),
                      kept_previous=bool((proj.rounds[-1].get("fusion") or {}).get("kept_previous")))
        name = "engine" if method == "engine" else method
        rows.append(_row(name, rnd, scores["fused"], labels, K, **common))
        if method == "engine":
            for part in ("net", "teacher"):
                if part == "teacher" and not has_teacher:
                    continue
                rows.append(_row(f"  {part}", rnd, scores[part], labels, K,
                                 **{**common, "ablation": True}))
    return rows


def run_rf(case: datasets.Case, strokes, args) -> list[dict]:
    from baseline_rf import RandomForestBaseline

    labels = dict(strokes)
    rows = []
    rf = None
    painted_pred = {}
    for rnd in (0, 1):
        if rnd == 1:
            # Its own mistakes get corrected, as a person would correct what the tool showed.
            labels = correct(case, labels, painted_pred, args)
        log(f"{case.key}: random forest round {rnd}, training")
        with PeakRSS() as mem_train:
            t0 = time.perf_counter()
            # A forest has no warm start: each round is trained afresh on all labels so far.
            rf = RandomForestBaseline(dims=case.dims, random_state=args.seed).fit(
                [case.samples[i].image.array for i in case.paint],
                [labels[i] for i in case.paint])
            train_s = time.perf_counter() - t0
        score = Score(case.n_classes)
        log(f"{case.key}: random forest round {rnd}, predicting")
        painted_s = 0.0
        with PeakRSS() as mem_pred:
            t0 = time.perf_counter()
            for i in dict.fromkeys(case.paint + case.predict):
                ti = time.perf_counter()
                pred = rf.predict(case.samples[i].image.array)
                if i in case.paint:
                    painted_pred[i] = pred
                    painted_s += time.perf_counter() - ti
                if i in case.predict:
                    add_score(score, pred, case, i, labels)
            pred_s = time.perf_counter() - t0
        rows.append(_row("rf", rnd, score, labels, case.n_classes, train_s=train_s,
                         predict_s=pred_s, round_s=train_s + painted_s, steps=None, device="cpu",
                         peak_train_mb=mem_train.peak_mb, peak_predict_mb=mem_pred.peak_mb,
                         delta_train_mb=mem_train.delta_mb, delta_predict_mb=mem_pred.delta_mb,
                         anchor=True))
    return rows


def run_growcut(case: datasets.Case, strokes, args) -> list[dict]:
    """Slicer's Grow from seeds on each painted image, seeded with the strokes (volume cases:
    the painted volume is the scored one)."""
    from baseline_growcut import grow_from_seeds

    labels = dict(strokes)
    rows = []
    pred = {}
    for rnd in (0, 1):
        if rnd == 1:
            labels = correct(case, labels, pred, args)
        log(f"{case.key}: grow from seeds round {rnd}")
        score = Score(case.n_classes)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            for i in case.paint:
                sm = case.samples[i]
                pred[i] = grow_from_seeds(sm.image.array, labels[i], sm.image.geometry.spacing)
            run_s = time.perf_counter() - t0
        for i in case.predict:
            add_score(score, pred[i], case, i, labels)
        rows.append(_row("growcut", rnd, score, labels, case.n_classes, train_s=run_s,
                         predict_s=0.0, round_s=run_s, steps=None, device="cpu",
                         peak_train_mb=mem.peak_mb, peak_predict_mb=mem.peak_mb,
                         delta_train_mb=mem.delta_mb, delta_predict_mb=mem.delta_mb, anchor=True))
    return rows


def first_prediction(case: datasets.Case, strokes, args, workdir: Path, methods) -> dict:
    """Wall time from starting training on the painted ISBI images to having their predictions."""
    out = {"images": len(case.paint), "train_budget_s": args.first_seconds,
           "target_s": TARGET_FIRST_S}
    if "engine" in methods:
        from semsegloop import Project

        proj = Project.create(workdir / "first_engine", classes=case.classes, dims=case.dims)
        ids = {i: proj.add_image(case.samples[i].image, name=case.samples[i].name)
               for i in case.paint}
        for i in case.paint:
            proj.set_labels(ids[i], strokes[i])
        log(f"time to first prediction: engine, {args.first_seconds:g} s budget")
        score = Score(case.n_classes)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            proj.train(time_budget_s=args.first_seconds, device=args.device, seed=args.seed)
            t_train = time.perf_counter() - t0
            preds = {i: proj.predict_full(ids[i], device=args.device, save=False,
                                          keep_strokes=False).labels for i in case.paint}
            total = time.perf_counter() - t0
        for i in case.paint:
            score.add(preds[i], case.samples[i].reference)
        out["engine"] = dict(train_s=t_train, total_s=total, dice=score.dice(),
                             peak_mb=mem.peak_mb, met=total <= TARGET_FIRST_S)
    if "rf" in methods:
        from baseline_rf import RandomForestBaseline

        log("time to first prediction: random forest")
        score = Score(case.n_classes)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            rf = RandomForestBaseline(dims=case.dims, random_state=args.seed).fit(
                [case.samples[i].image.array for i in case.paint], [strokes[i] for i in case.paint])
            t_train = time.perf_counter() - t0
            preds = {i: rf.predict(case.samples[i].image.array) for i in case.paint}
            total = time.perf_counter() - t0
        for i in case.paint:
            score.add(preds[i], case.samples[i].reference)
        out["rf"] = dict(train_s=t_train, total_s=total, dice=score.dice(), peak_mb=mem.peak_mb,
                         met=total <= TARGET_FIRST_S)
    return out


# ------------------------------------------------------------------------------ reporting

def fmt(v, width=6, digits=3) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-".rjust(width)
    return f"{v:{width}.{digits}f}"


def print_case(res: dict) -> None:
    names = [n[:8] for n in res["classes"]]
    print()
    where = ("scored on the painted volumes' unpainted voxels" if res.get("score_painted")
             else f"scored on {res['n_unseen']} unseen")
    print(f"{res['title']}  ({res['dims']}D; painted {res['n_paint']}, {where}; strokes "
          f"~{res['pixels']} px/class per painted {'image' if res['dims'] == 2 else 'slice'}; "
          f"budget {res['budget_s']:.0f} s per round incl. teacher and predicting the painted "
          f"{'images' if res['dims'] == 2 else 'volumes'})")
    head = (f"  {'method':<9} {'rnd':>3} " + " ".join(f"{n:>8}" for n in names)
            + f" {'mean':>6} {'ratio':>6} {'labeled':>8} {'train s':>8} {'round s':>8}"
            f" {'steps':>6} {'pred s':>7} {'peak MB train/pred':>19}  w_net")
    print(head)
    print("  " + "-" * (len(head) - 2))
    for r in res["runs"]:
        dice = " ".join(fmt(d, 8) for d in r["dice"])
        steps = str(r["steps"]) if r["steps"] is not None else "-"
        mem = f"{r['peak_train_mb']:.0f}/{r['peak_predict_mb']:.0f}"
        over = "*" if r.get("budget_s") and r["round_s"] > r["budget_s"] else " "
        extra = f"  {r['weight']:.1f}" if "weight" in r and not r.get("ablation") else ""
        if r.get("weights3") and not r.get("ablation") and res.get("score_painted"):
            extra += " (painted: net/teacher/seeds " + "/".join(f"{v:.1f}" for v in r["weights3"]) + ")"
        if r.get("kept_previous") and not r.get("ablation"):
            extra += " (kept previous network)"
        print(f"  {r['method']:<9} {r['round']:>3} {dice} {fmt(r['mean'], 6)} "
              f"{fmt(r.get('ratio'), 6, 2)} {sum(r['labeled']):>8} {r['train_s']:8.1f} "
              f"{r['round_s']:7.1f}{over} {steps:>6} {r['predict_s']:7.1f} {mem:>19}{extra}")
    for r in res["runs"]:
        if r["method"] == "engine" and r.get("estimate"):
            key = "fused_painted" if res.get("score_painted") and "fused_painted" in r["estimate"] else "fused"
            est = r["estimate"].get(key, {})
            print(f"  engine self-estimate, round {r['round']} (held-out strokes, fused): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in est.items()))
    for v in res.get("verdicts", []):
        print(f"  {v['text']}")


def add_ratios(res: dict) -> None:
    """Error ratio of every row to the best classical anchor of the same round."""
    for rnd in (0, 1):
        anchors = [r["mean"] for r in res["runs"] if r["round"] == rnd and r.get("anchor")]
        best = max(anchors) if anchors else None
        for r in res["runs"]:
            if r["round"] == rnd:
                r["ratio"] = ((1 - r["mean"]) / max(1 - best, 1e-6)) if best is not None else None
                r["best_anchor"] = best


def verdicts(res: dict) -> list[dict]:
    runs = {(r["method"], r["round"]): r for r in res["runs"]}
    e0, e1 = runs.get(("engine", 0)), runs.get(("engine", 1))
    if e0 is None or e0.get("ratio") is None:
        return []
    ratios = [e["ratio"] for e in (e0, e1) if e is not None]
    floor = all(q <= FLOOR for q in ratios)
    target = e0["ratio"] <= TARGET_R0 and (e1 is None or e1["ratio"] <= TARGET_R1)
    over = [f"round {e['round']} {e['round_s']:.0f} s > {e['budget_s']:.0f} s"
            for e in (e0, e1) if e is not None and e["round_s"] > e["budget_s"]]
    painted = ""
    if e1 is not None and e0.get("painted_mean") is not None and e1.get("painted_mean") is not None:
        ok = e1["painted_mean"] >= e0["painted_mean"]
        painted = (f"  painted images {e0['painted_mean']:.3f} -> {e1['painted_mean']:.3f} "
                   f"(never worse: {'MET' if ok else 'MISSED'})")
    text = (f"ratio round 0 {e0['ratio']:.2f}" + (f", round 1 {e1['ratio']:.2f}" if e1 else "")
            + f"  floor (<= {FLOOR:.1f} every round): {'MET' if floor else 'MISSED'}"
            f"  target (<= {TARGET_R0} / {TARGET_R1}): {'MET' if target else 'MISSED'}"
            + (f"  budget overrun: {'; '.join(over)}" if over else "  within budget") + painted)
    return [dict(floor=floor, target=target, ratios=ratios, overruns=over, text=text)]


def print_first(first: dict) -> None:
    print()
    print(f"Time to first prediction: train on {first['images']} painted ISBI images (512^2, "
          f"budget {first['train_budget_s']:g} s) + predict them; target <= {TARGET_FIRST_S:g} s")
    for m in ("engine", "rf"):
        if m in first:
            r = first[m]
            dice = "/".join(fmt(d, 5) for d in r["dice"])
            print(f"  {m:<7} train {r['train_s']:6.1f} s  total {r['total_s']:6.1f} s  "
                  f"Dice (membrane/interior, painted images) {dice}  peak {r['peak_mb']:.0f} MB"
                  f"  {'MET' if r['met'] else 'MISSED'}")


# ------------------------------------------------------------------------------ main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(ALL_CASES),
                   help=f"comma-separated subset of {','.join(KNOWN_CASES)}")
    p.add_argument("--methods", default="engine,rf,growcut",
                   help="comma-separated: engine (the default training), ce (ablation: masked "
                        "cross-entropy on strokes only), rf (baseline); default all three")
    p.add_argument("--max-unseen", type=int, default=None,
                   help="score at most this many unseen images per 2D collection (spread)")
    p.add_argument("--no-prefer-new", action="store_true",
                   help="ablation: held-out strokes drawn from all strokes, not new ones first")
    p.add_argument("--seconds-3d", type=float, default=120.0,
                   help="volume round budget per 200^3 painted voxels (default 120)")
    p.add_argument("--min-3d-seconds", type=float, default=30.0,
                   help="smallest volume round budget (default 30 s; small volumes scale to it)")
    p.add_argument("--train-seconds", type=float, default=None,
                   help="engine training budget per round (default 60; 8 with --quick)")
    p.add_argument("--first-seconds", type=float, default=None,
                   help="engine budget for the time-to-first-prediction run (default 10; 5 with "
                        "--quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 unseen images per 2D case, 2+4 hippocampus cases, short budgets")
    p.add_argument("--no-first", action="store_true", help="skip the time-to-first-prediction run")
    p.add_argument("--pixels", type=int, default=300, help="stroke pixels per class per painted image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="engine device: auto, cpu, cuda, mps")
    p.add_argument("--data", type=Path, default=datasets.DEFAULT_DATA,
                   help=f"shared data folder (default {datasets.DEFAULT_DATA})")
    p.add_argument("--json", type=Path, default=None, help="also write all figures to this file")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the engine's projects go (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in args.cases if c not in KNOWN_CASES]
    if bad:
        p.error(f"unknown case(s) {bad}; choose from {','.join(KNOWN_CASES)}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods or any(m not in ("engine", "ce", "rf", "growcut") for m in args.methods):
        p.error("--methods takes a comma-separated subset of engine, ce, rf, growcut")
    if args.train_seconds is None:
        args.train_seconds = 8.0 if args.quick else 60.0
    if args.first_seconds is None:
        args.first_seconds = 5.0 if args.quick else 10.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(f"skipped: shared data folder {args.data} not found (it lives beside the "
              "repository as ../shared/data; pass --data to point elsewhere)")
        return 0
    try:
        import skimage  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as e:
        print(f"skipped: the benchmark needs scikit-image and scikit-learn ({e}); "
              "pip install -e '.[bench]'")
        return 0
    import semsegloop

    if args.no_prefer_new:
        import semsegloop.learn.round as round_module
        round_module.PREFER_NEW_STROKES = False
    settings = dict(no_prefer_new=args.no_prefer_new, train_seconds=args.train_seconds, first_seconds=args.first_seconds,
                    quick=args.quick, pixels=args.pixels, seed=args.seed, device=args.device,
                    methods=args.methods, cases=args.cases, data=str(args.data),
                    cpu_count=os.cpu_count(), semsegloop=semsegloop.__version__)
    try:
        import torch
        settings["torch"] = torch.__version__
        settings["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    print(f"SemSegLoop sparse-label benchmark: engine (fused) vs the classical anchors on the same "
          f"strokes: random forest (multiscale features, 100 trees) and Slicer's Grow from seeds; "
          f"budget {args.train_seconds:g} s per round (2D), {args.seconds_3d:g} s per 200^3 "
          f"voxels, at least {args.min_3d_seconds:g} s (3D); {os.cpu_count()} CPU cores "
          f"(load average at start {os.getloadavg()[0]:.1f}); data {args.data}")
    report = {"settings": settings, "cases": [], "first_prediction": None, "skipped": []}
    own_tmp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="semsegloop_bench_")) if own_tmp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        for key in args.cases:
            try:
                case = datasets.load(key, args.data, quick=args.quick, max_unseen=args.max_unseen)
            except FileNotFoundError as e:
                print(f"\n{key}: skipped ({e})")
                report["skipped"].append({"case": key, "why": str(e)})
                continue
            strokes = make_strokes(case, args)
            if key == "isbi" and not args.no_first:
                report["first_prediction"] = first_prediction(case, strokes, args, workdir,
                                                              args.methods)
                print_first(report["first_prediction"])
            runs = []
            for method in ENGINE_VARIANTS:
                if method in args.methods:
                    runs += run_engine(case, strokes, args, workdir, method)
            if "rf" in args.methods:
                runs += run_rf(case, strokes, args)
            if "growcut" in args.methods and case.score_painted:
                from baseline_growcut import available as growcut_available
                if growcut_available():
                    runs += run_growcut(case, strokes, args)
            for r in runs:
                r["mean"] = mean_dice(r["dice"])
            res = dict(key=key, title=case.title, dims=case.dims, classes=case.classes,
                       n_paint=len(case.paint), n_unseen=len(case.predict),
                       painted=[case.samples[i].name for i in case.paint],
                       unseen=[case.samples[i].name for i in case.predict],
                       pixels=args.pixels, runs=runs, score_painted=case.score_painted,
                       budget_s=round_budget(case, args))
            add_ratios(res)
            res["verdicts"] = verdicts(res)
            report["cases"].append(res)
            print_case(res)
            sys.stdout.flush()
    finally:
        if own_tmp:
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)
    if report["cases"]:
        print()
        print("Summary: mean Dice over classes (unseen images / unpainted voxels); error ratio "
              "= (1 - engine) / (1 - best anchor); floor <= 1.0 every round, target <= 0.8 "
              "round 0 and <= 0.7 round 1")
        print(f"  {'case':<11} {'rnd':>3} {'engine':>7} {'net':>6} {'teacher':>7} {'rf':>6} "
              f"{'growcut':>7} {'ratio':>6}  {'round s':>7}/budget")
        for res in report["cases"]:
            for rnd in (0, 1):
                m = {r["method"].strip(): r for r in res["runs"] if r["round"] == rnd}
                e = m.get("engine")
                print(f"  {res['key']:<11} {rnd:>3} " + " ".join(
                    fmt(m[k]["mean"] if k in m else None, w) for k, w in
                    (("engine", 7), ("net", 6), ("teacher", 7), ("rf", 6), ("growcut", 7)))
                    + f" {fmt(e.get('ratio') if e else None, 6, 2)}  "
                    + (f"{e['round_s']:7.1f}/{e['budget_s']:.0f}" if e else ""))
            for v in res["verdicts"]:
                print(f"  {res['key']:<11} {v['text']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_no_nan(report), indent=2, default=_json_default) + "\n")
        print(f"\nfigures written to {args.json}")
    return 0


def _no_nan(o):
    # Strict JSON has no NaN (a class absent from the unseen images): write null instead.
    if isinstance(o, float) and np.isnan(o):
        return None
    if isinstance(o, dict):
        return {k: _no_nan(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_no_nan(v) for v in o]
    return o


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


if __name__ == "__main__":
    sys.exit(main())
