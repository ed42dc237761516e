"""Does the CPU inference network (predict/inference_network.py: group norms, channels-last)
predict what the network as trained predicts? On real data, after a short real training round:
label agreement of the two, Dice of each against the reference, and the time of each, in one
process, the two run alternately on every image.

    python bench/bench_predict_agreement.py                    # drosophila, isbi, brain1
    python bench/bench_predict_agreement.py --cases drosophila --steps 80

Scored as bench_sparse.py scores: unseen images of a 2D collection, the unpainted voxels of a
volume. Exits 0 with a message when ../shared/data is missing."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets  # noqa: E402  (bench/ is not a package; the script's folder is on sys.path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="drosophila,isbi,brain1")
    ap.add_argument("--steps", type=int, default=80, help="training steps of the one round")
    ap.add_argument("--unseen", type=int, default=4, help="unseen images scored (2D)")
    ap.add_argument("--pixels", type=int, default=300, help="stroke pixels per class per image")
    ap.add_argument("--data", type=Path, default=datasets.DEFAULT_DATA)
    a = ap.parse_args(argv)
    if not a.data.is_dir():
        print(f"no data at {a.data}: nothing to measure")
        return 0
    import torch

    import semsegloop.predict.sliding_window as sw
    from semsegloop import Project
    from semsegloop.measure.metrics import dice_per_class
    from semsegloop.measure.simulate import default_slices, simulate_strokes

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f}; {a.steps} training steps, {a.pixels} stroke px/class")
    print(f"{'case':<26}{'predictor':<30}{'s':>7}{'mean Dice':>11}  labels agree")
    for key in a.cases.split(","):
        case = datasets.load(key, a.data, max_unseen=a.unseen if key in ("isbi", "nuclei",
                                                                           "drosophila") else None)
        K = case.n_classes
        strokes = {}
        for i in case.paint:
            ref = case.samples[i].reference
            if case.dims == 3:
                sl = default_slices(ref, K, datasets.AXIAL_SLICES)
                strokes[i] = simulate_strokes(ref, K, pixels_per_class=a.pixels * len(sl),
                                              brush_radius=1, seed=i, dims=3, slices=sl)
            else:
                strokes[i] = simulate_strokes(ref, K, pixels_per_class=a.pixels, brush_radius=1,
                                              seed=i, dims=2)
        scored = case.paint if case.score_painted else case.predict
        with tempfile.TemporaryDirectory() as tmp:
            proj = Project.create(Path(tmp) / key, classes=case.classes, dims=case.dims)
            ids = {i: proj.add_image(case.samples[i].image, name=case.samples[i].name)
                   for i in dict.fromkeys(case.paint + scored)}
            for i in case.paint:
                proj.set_labels(ids[i], strokes[i])
            proj.train(steps=a.steps, device="cpu", seed=0)
            preds = {False: [], True: []}
            refs, secs = [], {False: 0.0, True: 0.0}
            for i in scored:
                for fast in (False, True):
                    sw.CPU_INFERENCE_NETWORK = fast
                    t0 = time.perf_counter()
                    p = proj.predict_full(ids[i], device="cpu", save=False, keep_strokes=False,
                                          postprocess=False, component="network",
                                          keep_probabilities=False).labels
                    secs[fast] += time.perf_counter() - t0
                    keep = (strokes[i] == 0) if case.score_painted else np.ones(p.shape, bool)
                    preds[fast].append(p[keep])
                refs.append(case.samples[i].reference[keep])
            sw.CPU_INFERENCE_NETWORK = True
        ref = np.concatenate(refs)
        old, new = np.concatenate(preds[False]), np.concatenate(preds[True])
        agree = float((old == new).mean())
        shape = case.samples[scored[0]].reference.shape
        title = f"{key} {len(scored)} x {'x'.join(map(str, shape[1:] if case.dims == 2 else shape))}"
        for fast, name in ((False, "model as trained"), (True, "inference_network")):
            d = float(np.nanmean(dice_per_class(new if fast else old, ref, K)))
            print(f"{title if not fast else '':<26}{name:<30}{secs[fast]:>7.2f}{d:>11.4f}"
                  + (f"  {agree:.4%}" if fast else ""))
        print(f"{'':<26}speed-up {secs[False] / secs[True]:.2f}x, {old.size / 1e6:.1f} M voxels scored")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
