"""Peak memory and speed of predicting a 512x512x300 CT with 40 classes: SemSegLoop's row-by-row
labels + uncertainty (no K probabilities kept) side by side with MONAI's whole-volume
SlidingWindowInferer (float32) on the same model and volume, in the same process.

    python bench/bench_memory.py                 # full size (takes minutes on 2 CPU cores)
    python bench/bench_memory.py --shape 64,256,256 --classes 3

The network is untrained (memory and time do not depend on the weights). Target: < 4 GB;
throughput printed in Mvox/s (target 0.5 Mvox/s on 2 cores for 3D).
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np

from bench_sparse import PeakRSS


def synthetic_ct(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, y, x = shape
    vol = np.full(shape, -1000, np.int16)
    yy, xx = np.ogrid[:y, :x]
    body = ((yy - y / 2) / (0.42 * y)) ** 2 + ((xx - x / 2) / (0.45 * x)) ** 2 < 1
    vol[:, body] = 40
    organ = ((yy - y / 2) / (0.15 * y)) ** 2 + ((xx - x / 3) / (0.12 * x)) ** 2 < 1
    vol[:, organ] = 120
    vol += rng.integers(-20, 20, size=(1, y, x), dtype=np.int16)
    return vol


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="300,512,512", help="z,y,x")
    ap.add_argument("--classes", type=int, default=40)
    ap.add_argument("--skip-baseline", action="store_true")
    a = ap.parse_args(argv)
    import torch

    from semsegloop.predict.sliding_window import inference_roi, predict_image
    from semsegloop.learn.networks import build_network, load_preset, plan_network
    from semsegloop.data.normalization import normalize

    shape = tuple(int(v) for v in a.shape.split(","))
    vol = synthetic_ct(shape)
    plan = plan_network(load_preset("unet3d"), 1, a.classes, spacing=(1.0, 0.8, 0.8),
                        image_shape=shape)
    torch.manual_seed(0)
    model = build_network(plan).eval()
    device = torch.device("cpu")
    spec = {"method": "ct", "window": [-1000.0, 1000.0]}
    print(f"volume {shape} int16 ({vol.nbytes / 2**20:.0f} MiB), K={a.classes}, "
          f"roi {inference_roi(plan, shape, a.classes)}, torch threads {torch.get_num_threads()}")
    rows = []
    with PeakRSS() as m:
        t0 = time.perf_counter()
        x = normalize(vol[..., None], spec)
        pred = predict_image(model, x, plan, device, a.classes, keep_probabilities=False)
        secs = time.perf_counter() - t0
    rows.append(("semsegloop (labels+uncertainty)", secs, m.delta_mb, m.peak_mb))
    labels = pred.labels
    del pred, x
    gc.collect()
    if not a.skip_baseline:
        from monai.inferers import SlidingWindowInferer

        with PeakRSS() as m:
            t0 = time.perf_counter()
            x = torch.from_numpy(normalize(vol[..., None], spec)[..., 0])[None, None]
            inferer = SlidingWindowInferer(inference_roi(plan, shape, a.classes), sw_batch_size=2,
                                           overlap=0.25, mode="gaussian")
            with torch.inference_mode():
                out = inferer(x, model)
                base_labels = (out.argmax(1)[0] + 1).to(torch.uint8).numpy()
            secs = time.perf_counter() - t0
        rows.append(("MONAI SlidingWindowInferer", secs, m.delta_mb, m.peak_mb))
        agree = float((base_labels == labels).mean())
        del out, x
    vox = float(np.prod(shape)) / 1e6
    print(f"{'method':<32}{'seconds':>9}{'Mvox/s':>8}{'added GiB':>11}{'peak RSS GiB':>14}")
    for name, s, added, peak in rows:
        print(f"{name:<32}{s:>9.1f}{vox / s:>8.2f}{added / 1024:>11.2f}{peak / 1024:>14.2f}")
    if not a.skip_baseline:
        print(f"label agreement between the two: {agree:.4%}")
    print(f"target: peak RSS < 4 GiB -> {'met' if rows[0][3] < 4 * 1024 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
