"""The engine service under Stop, start-up and kill -9, on a small 2D and a small 3D project with
the shipped presets (unet2d_fast, unet3d), each figure beside a baseline from the same run:

- Stop latency (cancel sent -> final event) through the service and the client the panel uses
  (2-s kill backstop), beside the engine's own latency in-process (Project.train + Event);
- service start -> `ready` with a warm and a cold-ish disk cache, beside a bare `import torch`;
- kill -9 of the service during training and during checkpoint writing: the project reopens,
  the labels equal what was painted, the last checkpoint loads.

    python bench/bench_service.py                    # 20 trials each (~40 min on 2 busy CPU cores)
    python bench/bench_service.py --trials 5         # quicker

"Cold-ish": the pages of torch, MONAI, scikit-learn, SciPy, NumPy, SimpleITK and the engine are
evicted with posix_fadvise(DONTNEED) first; pages another process has mapped stay resident, so
on a shared machine this is a lower bound of a truly cold start. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

import semsegloop
from semsegloop.service.client import ServiceClient

STOP_GRACE_S = 2.0   # the panel's


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ projects

def disks_image(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bright disks on noise (float32 (Y, X)) and sparse strokes: 1 inside disks, 2 outside."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0.2, 0.08, (size, size)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    inside = np.zeros((size, size), bool)
    for _ in range(6):
        cy, cx, r = rng.integers(size // 8, size - size // 8, 2).tolist() + [int(rng.integers(size // 16, size // 8))]
        inside |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    img[inside] += 0.6
    strokes = np.zeros((size, size), np.uint8)
    rows = np.arange(4, size - 4, 12)
    for r in rows:
        line = np.zeros((size, size), bool)
        line[r:r + 2, 4:size - 4] = True
        strokes[line & inside] = 1
        strokes[line & ~inside & (rng.random((size, size)) < 0.3)] = 2
    return img, strokes


def ball_volume(shape, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]].astype(np.float32)
    c = [(n - 1) / 2 for n in shape]
    ball = ((z - c[0]) / (shape[0] / 3)) ** 2 + ((y - c[1]) / (shape[1] / 3)) ** 2 + \
           ((x - c[2]) / (shape[2] / 3)) ** 2 < 1
    vol = rng.normal(0.0, 0.3, shape).astype(np.float32)
    vol[ball] += 2.0
    strokes = np.zeros(shape, np.uint8)
    for s in (shape[0] // 2 - 3, shape[0] // 2, shape[0] // 2 + 3):
        row = np.zeros(shape[1:], bool)
        row[shape[1] // 2 - 1:shape[1] // 2 + 1, :] = True
        strokes[s][row & ball[s]] = 1
        strokes[s, 2:4, 2:shape[2] - 2] = 2
        strokes[s, shape[1] - 4:shape[1] - 2, 2:shape[2] - 2] = 2
    return vol, strokes


def make_project(kind: str, root: Path):
    """(path, image_id, painted labels) of a fresh project, closed for the service to open."""
    path = root / f"project_{kind}"
    if kind == "2d":
        proj = semsegloop.Project.create(path, ["disk", "background"], dims=2)
        ids = []
        for seed in range(2):
            img, strokes = disks_image(256, seed)
            ids.append(proj.add_image(img, name=f"tile{seed}"))
            proj.set_labels(ids[-1], strokes)
        painted = proj.labels(ids[0])
    else:
        proj = semsegloop.Project.create(path, ["ball", "background"], dims=3)
        vol, strokes = ball_volume((16, 64, 64), 0)
        ids = [proj.add_image(vol, spacing=(2.0, 1.0, 1.0), name="volume")]
        proj.set_labels(ids[0], strokes)
        painted = proj.labels(ids[0])
    proj.close()
    return path, ids[0], painted


def extra_stroke(painted: np.ndarray, rng) -> np.ndarray:
    """The painted labels plus one new short stroke (what the person painted before Train)."""
    out = painted.copy()
    s = int(rng.integers(0, out.shape[0]))
    r = int(rng.integers(2, out.shape[1] - 3))
    c0 = int(rng.integers(2, out.shape[2] // 2))
    out[s, r:r + 2, c0:c0 + 8] = int(rng.integers(1, 3))
    return out


# ------------------------------------------------------------------------------ helpers

def percentile(values, q) -> float:
    return float(np.percentile(np.asarray(values, float), q)) if values else float("nan")


def until(client, predicate, timeout: float, job=None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client.poll(0.02)
        if predicate():
            return True
        if job is not None and job.finished:
            return False
    return False


def first_step(job) -> bool:
    return bool(job.progress and job.progress.get("phase") == "train")


def steady(job) -> bool:
    """Past the first step (which pays one-off start-up costs), so a Stop meets a typical step."""
    return first_step(job) and int(job.progress.get("step") or 0) >= 2


def step_seconds(job) -> float:
    """Seconds of the latest step, from the last two progress events."""
    steps = [e for e in job.events if e.get("event") == "progress" and e.get("phase") == "train"]
    if len(steps) < 2:
        return float(steps[-1]["elapsed_s"]) if steps else 0.0
    return float(steps[-1]["elapsed_s"]) - float(steps[-2]["elapsed_s"])


# ------------------------------------------------------------------------------ Stop latency

def stop_through_service(path: Path, trials: int, rng) -> dict:
    client = ServiceClient(path, device="cpu", stop_grace_s=STOP_GRACE_S)
    client.wait_ready(timeout=300)
    lat, killed, steps = [], 0, []
    for i in range(trials):
        job = client.train(time_budget_s=600, device="cpu")
        if not until(client, lambda: steady(job), 600, job):
            raise RuntimeError(f"trial {i}: no training step ({job.final})")
        steps.append(step_seconds(job))
        time.sleep(float(rng.uniform(0, steps[-1])))     # land anywhere within a step
        t0 = time.monotonic()
        client.stop(job)
        client.wait(job, timeout=60)
        lat.append(time.monotonic() - t0)
        killed += bool(job.result.get("killed"))
        log(f"  service stop {i + 1}/{trials}: {lat[-1]:.3f} s ({job.state}{', killed' if job.result.get('killed') else ''})")
    client.close()
    return {"latency": lat, "killed": killed, "step_s": steps}


def stop_in_process(path: Path, trials: int, rng) -> dict:
    lat, steps = [], []
    with semsegloop.Project.open(path) as proj:
        for i in range(trials):
            cancel, started, last = threading.Event(), threading.Event(), {}

            def progress(p):
                if p.phase == "train":
                    last["step_s"] = p.elapsed_s - last.get("elapsed", 0.0)
                    last["elapsed"] = p.elapsed_s
                    if p.step >= 2:
                        started.set()
            th = threading.Thread(target=lambda: proj.train(time_budget_s=600, device="cpu",
                                                            progress=progress, cancel=cancel))
            th.start()
            started.wait(600)
            steps.append(last["step_s"])
            time.sleep(float(rng.uniform(0, steps[-1])))
            t0 = time.monotonic()
            cancel.set()
            th.join()
            lat.append(time.monotonic() - t0)
            log(f"  in-process stop {i + 1}/{trials}: {lat[-1]:.3f} s")
    return {"latency": lat, "step_s": steps}


# ------------------------------------------------------------------------------ start -> ready

def _evict_paths() -> list[Path]:
    import importlib.util
    roots = []
    for name in ("torch", "monai", "sklearn", "scipy", "numpy", "SimpleITK", "safetensors"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            roots += [Path(p) for p in spec.submodule_search_locations]
    roots.append(Path(semsegloop.__file__).parent)
    return roots


def evict(roots) -> int:
    """posix_fadvise(DONTNEED) every file under ``roots``; returns the bytes advised."""
    total = 0
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for f in files:
                p = os.path.join(dirpath, f)
                try:
                    fd = os.open(p, os.O_RDONLY)
                except OSError:
                    continue
                try:
                    total += os.fstat(fd).st_size
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                except OSError:
                    pass
                finally:
                    os.close(fd)
    return total


def time_ready(path: Path) -> float:
    t0 = time.monotonic()
    client = ServiceClient(path, device="cpu")
    client.wait_ready(timeout=300)
    t = time.monotonic() - t0
    client.close()
    return t


def time_import_torch() -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.monotonic() - t0


def start_ready(path: Path, trials: int) -> dict:
    roots = _evict_paths()
    out = {"service_cold": [], "service_warm": [], "torch_cold": [], "torch_warm": []}
    evicted = 0
    for i in range(trials):
        evicted = evict(roots)
        out["service_cold"].append(time_ready(path))
        out["service_warm"].append(time_ready(path))
        evict(roots)
        out["torch_cold"].append(time_import_torch())
        out["torch_warm"].append(time_import_torch())
        log(f"  start {i + 1}/{trials}: service cold {out['service_cold'][-1]:.2f} s, warm "
            f"{out['service_warm'][-1]:.2f} s; import torch cold {out['torch_cold'][-1]:.2f} s, "
            f"warm {out['torch_warm'][-1]:.2f} s")
    out["evicted_bytes"] = evicted
    return out


# ------------------------------------------------------------------------------ kill -9

def _tmp_files(d: Path) -> list[str]:
    try:
        return [n for n in os.listdir(d) if ".tmp" in n]
    except FileNotFoundError:
        return []


def kill_trial(path: Path, image_id: str, painted: np.ndarray, phase: str, rng) -> dict:
    snapshot = extra_stroke(painted, rng)
    before = semsegloop.Project.open(path, read_only=True).round
    client = ServiceClient(path, device="cpu")
    client.wait_ready(timeout=300)
    pid = client.ready["pid"]
    ckpt_dir = path / "checkpoints"
    hit = False
    if phase == "training":
        job = client.train(labels={image_id: snapshot}, time_budget_s=600, device="cpu")
        until(client, lambda: first_step(job), 600, job)
        time.sleep(float(rng.uniform(0, 2 * step_seconds(job))))
        os.killpg(pid, signal.SIGKILL)
    else:
        job = client.train(labels={image_id: snapshot}, steps=3, device="cpu")
        until(client, lambda: first_step(job), 600, job)
        final = ckpt_dir / f"round_{before + 1:03d}.json"
        deadline = time.monotonic() + 300
        # Busy-watch the folder: the kill lands while a temporary checkpoint file exists.
        while time.monotonic() < deadline:
            if _tmp_files(ckpt_dir):
                os.killpg(pid, signal.SIGKILL)
                hit = True
                break
            if final.exists():
                os.killpg(pid, signal.SIGKILL)
                break
            time.sleep(0.0002)
        hit = hit and bool(_tmp_files(ckpt_dir))   # still half-written after the kill
    client.wait(job, timeout=60)
    detected = job.state == "error" and bool(job.result.get("crashed"))
    client.close()
    reopened = labels_ok = model_ok = False
    round_after = None
    try:
        with semsegloop.Project.open(path) as proj:     # takes the dead service's lock over
            reopened = True
            labels_ok = bool(np.array_equal(proj.labels(image_id), snapshot))
            round_after = proj.round
            model_ok = proj.round == 0 or proj.load_model(device="cpu")[0] == proj.round
            leftovers = _tmp_files(ckpt_dir)
    except Exception as e:  # a failure is a result here, not a crash of the benchmark
        log(f"    reopen failed: {type(e).__name__}: {e}")
        leftovers = _tmp_files(ckpt_dir)
    return {"hit": hit, "detected": detected, "reopened": reopened, "labels": labels_ok,
            "model": model_ok, "round_before": before, "round_after": round_after,
            "leftovers": len(leftovers)}


def kills(projects: dict, trials: int, rng) -> dict:
    out = {}
    for phase in ("training", "checkpoint"):
        rows = []
        for i in range(trials):
            kind = ("2d", "3d")[i % 2]
            path, image_id, painted = projects[kind]
            rows.append(kill_trial(path, image_id, painted, phase, rng))
            r = rows[-1]
            log(f"  kill -9 during {phase} {i + 1}/{trials} ({kind}): reopened={r['reopened']} "
                f"labels={r['labels']} model={r['model']} in-write={r['hit']} round "
                f"{r['round_before']}->{r['round_after']}")
        out[phase] = rows
    return out


# ------------------------------------------------------------------------------ report

def report(args, stops, starts, kill_rows) -> str:
    lines = [f"bench_service.py, {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
             f"{platform.platform()}, {os.cpu_count()} CPUs (shared with other sessions), "
             f"torch threads = all cores, CPU only; trials: Stop {args.trials} per project through "
             f"the service, {args.baseline_trials or args.trials} in-process, start "
             f"{args.start_trials or args.trials}, kill -9 {args.trials} per phase",
             "",
             "Stop latency: cancel sent -> final event (seconds)",
             f"{'project':<10}{'path':<34}{'p50':>8}{'p95':>8}{'max':>8}{'killed':>8}{'step s':>9}"]
    for kind, res in stops.items():
        for name, key in (("service + client (2-s kill)", "service"), ("in-process (baseline)", "inproc")):
            r = res[key]
            killed = f"{r['killed']}/{len(r['latency'])}" if "killed" in r else "-"
            lines.append(f"{kind:<10}{name:<34}{percentile(r['latency'], 50):>8.3f}"
                         f"{percentile(r['latency'], 95):>8.3f}{max(r['latency']):>8.3f}{killed:>8}"
                         f"{percentile(r['step_s'], 50):>9.3f}")
    lines += ["goal: p95 <= 2 s (the client kills a service that has not ended 2 s after cancel)", ""]
    lines += ["Service start -> ready (seconds), beside a bare `python -c 'import torch'`",
              f"{'what':<34}{'p50':>8}{'p95':>8}{'max':>8}"]
    for key, name in (("service_warm", "service, warm cache"), ("service_cold", "service, cold-ish cache"),
                      ("torch_warm", "import torch, warm (baseline)"), ("torch_cold", "import torch, cold-ish (baseline)")):
        v = starts[key]
        lines.append(f"{name:<34}{percentile(v, 50):>8.2f}{percentile(v, 95):>8.2f}{max(v):>8.2f}")
    lines += [f"cold-ish: {starts['evicted_bytes'] / 2**20:.0f} MiB of package files advised out "
              f"of the page cache before each cold start (pages mapped by other processes stay)", ""]
    lines += ["kill -9 of the service (its process group), then Project.open on the folder",
              f"{'during':<12}{'trials':>7}{'in write':>9}{'detected':>9}{'reopens':>8}{'labels ok':>10}"
              f"{'model ok':>9}{'tmp left':>9}"]
    for phase, rows in kill_rows.items():
        n = len(rows)
        lines.append(f"{phase:<12}{n:>7}{sum(r['hit'] for r in rows):>9}{sum(r['detected'] for r in rows):>9}"
                     f"{sum(r['reopened'] for r in rows):>8}{sum(r['labels'] for r in rows):>10}"
                     f"{sum(r['model'] for r in rows):>9}{sum(r['leftovers'] for r in rows):>9}")
    lines += ["in write: the kill landed while a temporary checkpoint file existed (checkpoint rows);",
              "detected: the client reported the crash; labels ok: the labels equal the snapshot sent",
              "with that Train; model ok: the project's latest round's checkpoint loads; tmp left:",
              "temporary files still in checkpoints/ after reopening (reopening removes them).",
              "Kill trials alternate the 2D (2 x 256^2, unet2d_fast) and 3D (16x64x64, unet3d) projects.",
              "Stop trials cancel at a random point of a step after the second one (the first pays",
              "one-off start-up costs); 'step s' is the median duration of that step."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="Stop trials per project, kills per phase")
    ap.add_argument("--baseline-trials", type=int, help="in-process Stop trials (default: --trials)")
    ap.add_argument("--start-trials", type=int, help="start -> ready trials (default: --trials)")
    ap.add_argument("--workdir", type=Path, help="keep the projects here (default: a temporary folder)")
    ap.add_argument("--out", type=Path, help="also write the report to this file")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    import tempfile
    rng = np.random.default_rng(a.seed)
    root = a.workdir or Path(tempfile.mkdtemp(prefix="bench_service_"))
    root.mkdir(parents=True, exist_ok=True)
    projects = {kind: make_project(kind, root) for kind in ("2d", "3d")}
    stops = {}
    for kind in ("2d", "3d"):
        log(f"Stop latency, {kind}")
        stops[kind] = {"service": stop_through_service(projects[kind][0], a.trials, rng),
                       "inproc": stop_in_process(projects[kind][0], a.baseline_trials or a.trials, rng)}
    log("start -> ready")
    starts = start_ready(projects["2d"][0], a.start_trials or a.trials)
    log("kill -9")
    kill_rows = kills(projects, a.trials, rng)
    text = report(a, stops, starts, kill_rows)
    print(text, end="")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
