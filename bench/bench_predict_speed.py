"""Prediction throughput on 2 CPU cores: SemSegLoop's sliding window (predict_image, as a round
and Predict run it) beside MONAI's SlidingWindowInferer called as its docs show (float32, same
model, same window, same overlap), in the same process, for the 2D CPU preset and the 3D one;
also predict_image with the network as trained (sliding_window.CPU_INFERENCE_NETWORK off).

    python bench/bench_predict_speed.py                # ~2-4 minutes on 2 cores
    python bench/bench_predict_speed.py --repeats 3

Targets (issue 10): 2D >= 2 Mpx/s, 3D >= 0.5 Mvox/s. The networks are untrained: time does not
depend on the weights. Labels are compared (bf16 on CPUs with native bf16 changes near-ties,
which an untrained net has everywhere; bench_predict_agreement.py compares trained ones)."""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def _image(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, shape + (1,)).astype(np.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape2d", default="4,1024,1024", help="slices,y,x of the 2D stack")
    ap.add_argument("--shape3d", default="96,192,192", help="z,y,x of the volume")
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    import torch
    from monai.inferers import SlidingWindowInferer

    import semsegloop.predict.sliding_window as sw
    from semsegloop.learn.networks import build_network, load_preset, plan_network
    from semsegloop.learn.training import cpu_bf16
    from semsegloop.predict.sliding_window import inference_roi, predict_image

    dev = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}, native bf16 "
          f"{'yes' if cpu_bf16(dev, 3) else 'no'} (predictions use it when yes)")
    print(f"{'case':<34}{'method':<34}{'s':>7}{'Mpx/s':>8}{'target':>8}  labels agree")
    for dims, preset, shape_s, target in ((2, "unet2d_fast", a.shape2d, 2.0),
                                          (3, "unet3d", a.shape3d, 0.5)):
        shape = tuple(int(v) for v in shape_s.split(","))
        img = _image(shape)
        spatial = shape[1:] if dims == 2 else shape
        plan = plan_network(load_preset(preset), 1, a.classes, spacing=(1.0, 1.0, 1.0),
                            image_shape=spatial)
        torch.manual_seed(0)
        model = build_network(plan).eval()
        roi = inference_roi(plan, spatial, a.classes)
        n = float(np.prod(shape)) / 1e6
        # predict_image as it runs (the CPU inference network) and with the network as trained,
        # alternately, so a change of load hits both.
        times, labels = {True: [], False: []}, {}
        for _ in range(a.repeats):
            for fast in (True, False):
                sw.CPU_INFERENCE_NETWORK = fast
                t0 = time.perf_counter()
                labels[fast] = predict_image(model, img, plan, dev, a.classes,
                                             keep_probabilities=False).labels
                times[fast].append(time.perf_counter() - t0)
        sw.CPU_INFERENCE_NETWORK = True
        ours, t_ours, t_plain = labels[True], min(times[True]), min(times[False])
        inferer = SlidingWindowInferer(roi, sw_batch_size=2, overlap=0.25, mode="gaussian")
        times, base = [], None
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            with torch.inference_mode():
                if dims == 2:  # MONAI's 2D inferer takes one (B, C, Y, X) batch of slices
                    x = torch.from_numpy(np.moveaxis(img, -1, 1))
                else:
                    x = torch.from_numpy(img[..., 0])[None, None]
                out = inferer(x, model)
                base = (out.argmax(1) + 1).to(torch.uint8).numpy()
            times.append(time.perf_counter() - t0)
        t_base = min(times)
        base = base if dims == 2 else base[0]
        agree = float((base == ours).mean())
        case = f"{dims}D {preset} {'x'.join(map(str, shape))}"
        print(f"{case:<34}{'semsegloop predict_image':<34}{t_ours:>7.2f}{n / t_ours:>8.2f}"
              f"{target:>8.1f}  {agree:.4%}")
        print(f"{'':<34}{'  same, network as trained':<34}{t_plain:>7.2f}{n / t_plain:>8.2f}"
              f"{target:>8.1f}  {float((labels[False] == ours).mean()):.4%} (vs above)")
        print(f"{'':<34}{'MONAI SlidingWindowInferer fp32':<34}{t_base:>7.2f}{n / t_base:>8.2f}"
              f"{target:>8.1f}")
        print(f"{'':<34}{'roi ' + 'x'.join(map(str, roi)) + ', overlap 0.25, gaussian'}"
              f"  target {'met' if n / t_ours >= target else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
