"""Tests of sliding-window prediction: windows blended row by row equal MONAI's sliding window,
probabilities stay float16, and the memory of a volume prediction stays bounded."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import semsegloop
import semsegloop.predict.sliding_window as inference
from helpers_engine import (blob_volume, copy_project, make_square_project, square_image,  # noqa: F401
                            tiny_models, volume_strokes)


@pytest.fixture(scope="module")
def trained_2d(tmp_path_factory, tiny_models):
    path = tmp_path_factory.mktemp("inf2d") / "p"
    proj, image_id, _ = make_square_project(path)
    proj.train(steps=25, device="cpu")
    return path, image_id


@pytest.fixture(scope="module")
def trained_3d(tmp_path_factory, tiny_models):
    path = tmp_path_factory.mktemp("inf3d") / "p"
    proj = semsegloop.Project.create(path, ["ball", "background", "rim"], dims=3, preset="tiny3d")
    img, ref = blob_volume((8, 32, 32))
    image_id = proj.add_image(img, name="ball")
    lab = volume_strokes(ref)
    lab[4, 10, 10:14] = 3                 # a third class, so K=3 in the memory bound
    proj.set_labels(image_id, lab)
    proj.train(steps=15, device="cpu")
    return path, image_id


def _starts(windows, ax: int) -> int:
    """How many window positions ``windows`` have along axis ``ax``."""
    return len({w[ax].start for w in windows})


def _monai_probabilities(model, vol, roi):
    """MONAI's own gaussian sliding window on a (*spatial, C) array: the reference."""
    import torch
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol, -1, 0)))[None]
    with torch.inference_mode():
        logits = sliding_window_inference(x, roi, 2, model, overlap=0.25, mode="gaussian")
    return torch.softmax(logits.float(), 1)[0].numpy()


@pytest.mark.parametrize("preset,shape,classes", [("tiny2d", (1, 150, 37), 3),
                                                  ("tiny3d", (40, 90, 13), 4)])
@pytest.mark.parametrize("band", ["float32", "float16"])
def test_windows_blended_row_by_row_equal_monai_sliding_window(tiny_models, monkeypatch, preset,
                                                                shape, classes, band):
    """Many windows along every axis but the last, which is narrower than a window (padded, as
    MONAI pads): the row-by-row blend gives MONAI's probabilities without holding them all."""
    import scipy.ndimage as ndi
    import torch

    from semsegloop.learn.networks import build_network, load_preset, plan_network

    monkeypatch.setenv("SEMSEGLOOP_CPU_BF16", "0")       # the reference runs in float32
    monkeypatch.setattr(inference, "MAX_WINDOW_VOXELS", {2: 32 * 32, 3: 8 * 16 * 16})
    if band == "float16":
        monkeypatch.setattr(inference, "MAX_BAND_BYTES", 0)
    torch.manual_seed(0)
    plan = plan_network(load_preset(preset), 1, classes, image_shape=shape)
    model = build_network(plan).eval()
    rng = np.random.default_rng(1)
    img = ndi.gaussian_filter(rng.normal(size=shape + (1,)), 1.5).astype(np.float32) * 5
    spatial = shape if plan.dims == 3 else shape[1:]
    roi = inference.inference_roi(plan, spatial, classes)
    padded = [max(n, r) for n, r in zip(spatial, roi)]
    assert all(_starts(inference.window_grid(padded, roi), ax) >= 3 for ax in range(len(roi) - 1))
    assert roi[-1] > spatial[-1], (roi, spatial)

    pred = inference.predict_image(model, img, plan, torch.device("cpu"), classes)
    ref = _monai_probabilities(model, img if plan.dims == 3 else img[0], roi)
    ref = ref if plan.dims == 3 else ref[:, None]
    ours = pred.probabilities.astype(np.float32)
    diff = float(np.abs(ours - ref).max())
    agree = float((pred.labels == ref.argmax(0) + 1).mean())
    print(f"{preset} {band}: max |p - p_monai| {diff:.5f}, labels agree {agree:.5f}")
    assert diff < (1e-3 if band == "float32" else 4e-3), diff
    assert agree > 0.995, agree
    np.testing.assert_allclose(ours.sum(0), 1.0, atol=5e-3)


@pytest.mark.parametrize("preset,shape", [("tiny2d", (2, 61, 45)), ("tiny3d", (11, 38, 21))])
def test_one_window_takes_the_logits_as_monai_blends_them(tiny_models, monkeypatch, preset, shape):
    """An image that fits one window (padded up to it) skips the blend: MONAI's gaussian
    sum(w * l) / sum(w) of one window is the logits, so the probabilities are still MONAI's."""
    import scipy.ndimage as ndi
    import torch

    from semsegloop.learn.networks import build_network, load_preset, plan_network

    monkeypatch.setenv("SEMSEGLOOP_CPU_BF16", "0")
    torch.manual_seed(0)
    plan = plan_network(load_preset(preset), 1, 3, image_shape=shape)
    model = build_network(plan).eval()
    img = ndi.gaussian_filter(np.random.default_rng(2).normal(size=shape + (1,)), 1.5)
    img = img.astype(np.float32) * 5
    spatial = shape if plan.dims == 3 else shape[1:]
    roi = inference.inference_roi(plan, spatial, 3)
    assert len(inference.window_grid([max(n, r) for n, r in zip(spatial, roi)], roi)) == 1
    assert any(r > n for r, n in zip(roi, spatial)), (roi, spatial)     # padded, as MONAI pads
    pred = inference.predict_image(model, img, plan, torch.device("cpu"), 3)
    if plan.dims == 3:
        ref = _monai_probabilities(model, img, roi)
    else:
        ref = np.stack([_monai_probabilities(model, img[s], roi) for s in range(shape[0])], 1)
    diff = float(np.abs(pred.probabilities.astype(np.float32) - ref).max())
    print(f"{preset}: max |p - p_monai| {diff:.5f}")
    assert diff < 1e-3, diff
    assert (pred.labels == ref.argmax(0) + 1).mean() > 0.999


def test_tall_2d_image_predicted_in_many_windows_keeps_the_labels(trained_2d, tmp_path, monkeypatch):
    path, _ = trained_2d
    proj = copy_project(path, tmp_path / "copy")
    tile, _ = square_image(64, seed=5)
    tall = np.concatenate([tile] * 17, axis=0)          # 1088 x 64
    tall_id = proj.add_image(tall, name="tall")
    whole = proj.predict_full(tall_id, save=False, component="network")
    # Windows of 128 rows (a real slide is many windows tall).
    monkeypatch.setattr(inference, "MAX_WINDOW_VOXELS", {2: 128 * 64, 3: 64 * 32 * 32})
    windowed = proj.predict_full(tall_id, save=False, component="network")
    r, plan, _ = proj.load_model(device="cpu")
    roi = inference.inference_roi(plan, (1088, 64), 2)
    assert _starts(inference.window_grid((1088, max(64, roi[1])), roi), 0) >= 8
    assert windowed.labels.shape == whole.labels.shape == (1, 1088, 64)
    agreement = float((windowed.labels == whole.labels).mean())
    print(f"2D windowed agreement {agreement:.5f}")
    assert agreement > 0.98, agreement
    assert windowed.probabilities.dtype == np.float16
    # The tall image really holds squares: the windowed prediction finds them.
    assert (windowed.labels[0, 16:48, 16:48] == 1).mean() > 0.8


_BAND_SCRIPT = """
import resource, sys, numpy as np, torch
import semsegloop.predict.sliding_window as sw
from semsegloop.learn.networks import build_network, load_preset, plan_network
K, shape = 32, (160, 64, 64)
plan = plan_network(load_preset("tiny3d"), 1, K, image_shape=shape)
model = build_network(plan).eval()
sw.MAX_WINDOW_VOXELS = {2: 64 * 64, 3: 16 * 64 * 64}
img = np.random.default_rng(0).normal(size=shape + (1,)).astype(np.float32)
sw.predict_image(model, img[:16], plan, torch.device("cpu"), K, keep_probabilities=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
pred = sw.predict_image(model, img, plan, torch.device("cpu"), K, keep_probabilities=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(after - before, sw.inference_roi(plan, shape[:], K)[0])
"""


def test_many_classes_hold_one_window_row_not_the_volume(tiny_models):
    """40-class CTs: without K probabilities kept, memory grows by about one window row's
    blended logits, not by the K x volume float32 MONAI's sliding window allocates."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _BAND_SCRIPT], capture_output=True, text=True,
                         timeout=300)           # the tiny presets' folder is in the environment
    assert out.returncode == 0, out.stderr[-2000:]
    grown, roi0 = (int(v) for v in out.stdout.split())
    K, voxels = 32, 160 * 64 * 64
    whole = K * voxels * 4                               # MONAI's float32 output: 84 MB
    print(f"RSS grew {grown / 1e6:.1f} MB; all-class float32 {whole / 1e6:.1f} MB; roi0 {roi0}")
    assert roi0 <= 32
    assert grown < whole / 3, grown


def test_probabilities_are_float16_never_float64(trained_3d):
    path, image_id = trained_3d
    proj = semsegloop.Project.open(path)
    pred = proj.predict_full(image_id, save=False)
    assert pred.probabilities.dtype == np.float16
    assert pred.entropy.dtype == np.float16
    assert pred.labels.dtype == np.uint8
    assert pred.probabilities.shape == (3, 8, 32, 32)
    assert proj.predict_proba(image_id).dtype == np.float16
    # The low-level entry point gives the same types for any input dtype it is handed.
    from semsegloop.data.normalization import normalize

    r, plan, model = proj.load_model(device="cpu")
    x = normalize(proj.image(image_id).array, proj.normalization).astype(np.float32)
    low = inference.predict_image(model, x, plan, next(model.parameters()).device, 3)
    assert low.probabilities.dtype == np.float16
    np.testing.assert_array_equal(low.labels, proj.predict(image_id, save=False, keep_strokes=False,
                                                          component="network"))


def test_volume_prediction_memory_is_bounded_by_the_float16_probabilities(trained_3d, tmp_path):
    path, _ = trained_3d
    proj = copy_project(path, tmp_path / "copy")
    shape = (48, 64, 64)
    img, _ = blob_volume(shape, seed=4)
    vol_id = proj.add_image(img, name="big")
    proj.load_model(device="cpu")           # model loading is not part of what is measured
    proj.image(vol_id)
    voxels, K = int(np.prod(shape)), 3

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        pred = proj.predict_full(vol_id, save=False, keep_strokes=False, component="network")
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert pred.probabilities.shape == (K,) + shape
    # Kept: K float16 maps, uint8 labels, float16 entropy. Transient: the float32 normalised
    # image and the entropy pass's float32 work arrays (at most ~3 alive, each K x one chunk of
    # at most 4M voxels). A float64 (K, ...) array would add 4x the float16 maps and fail this.
    f16 = K * voxels * 2
    kept = f16 + voxels * (1 + 2)
    transient = voxels * 4 + 3 * K * min(voxels, 4_000_000) * 4
    bound = kept + transient + 2_000_000
    print(f"peak {peak / 1e6:.2f} MB, bound {bound / 1e6:.2f} MB, float16 maps {f16 / 1e6:.2f} MB")
    assert peak < bound, f"peak {peak / 1e6:.1f} MB > bound {bound / 1e6:.1f} MB"


def test_label_and_entropy_pass_works_in_chunks_with_bounded_temporaries():
    rng = np.random.default_rng(0)
    K, V = 4, 1_000_000
    logits = rng.normal(size=(K, V)).astype(np.float32)
    p = np.exp(logits)
    probs = (p / p.sum(axis=0)).astype(np.float16).reshape(K, 10, 100, 1000)
    del logits, p
    reference = inference.labels_and_entropy(probs, chunk=V)
    chunk = 50_000
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        labels, entropy = inference.labels_and_entropy(probs, chunk=chunk)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(labels, reference[0])
    np.testing.assert_array_equal(entropy, reference[1])
    assert labels.dtype == np.uint8 and entropy.dtype == np.float16
    assert labels.min() >= 1 and labels.max() <= K
    # Outputs (3 bytes per voxel) plus float32 work arrays of one chunk, never of the volume.
    assert peak < V * 3 + 6 * K * chunk * 4 + 500_000, peak / 1e6


def test_predicting_with_a_round_that_does_not_exist_names_the_rounds(trained_2d):
    path, image_id = trained_2d
    proj = semsegloop.Project.open(path)
    with pytest.raises(semsegloop.CheckpointError, match="round 7"):
        proj.predict(image_id, round=7)


def test_predict_before_any_training_says_train_first(tmp_path, tiny_models):
    proj, image_id, _ = make_square_project(tmp_path / "p")
    with pytest.raises(semsegloop.CheckpointError, match="train first"):
        proj.predict(image_id)


def test_a_cancel_inside_one_window_stops_the_prediction(tmp_path, tiny_models):
    """A 3D volume predicted as one window still honours Stop: it is asked before every layer,
    not only between window rows (one row of a large volume is many windows)."""
    from semsegloop.learn.networks import build_network, load_preset, plan_network

    plan = plan_network(load_preset("tiny3d"), 1, 2, image_shape=(16, 32, 32))
    model = build_network(plan)
    vol = np.zeros((16, 32, 32, 1), np.float32)
    roi = inference.inference_roi(plan, (16, 32, 32))
    assert len(inference.window_grid([max(n, r) for n, r in zip((16, 32, 32), roi)], roi)) == 1, \
        "the test needs a single window"
    asked = []

    def cancel():
        asked.append(1)
        return len(asked) >= 6

    with pytest.raises(InterruptedError):
        inference.predict_image(model, vol, plan, __import__("torch").device("cpu"), 2,
                                cancel=cancel)
    assert len(asked) == 6, "it stopped at the first question asked inside the network"
    # The hooks are gone afterwards: the same model predicts without asking anything.
    pred = inference.predict_image(model, vol, plan, __import__("torch").device("cpu"), 2)
    assert pred.labels.shape == (16, 32, 32) and len(asked) == 6


def test_prediction_speed_is_probed_then_taken_from_the_latest_prediction():
    # A round reserves the painted images' prediction at this speed (learn/round.py).
    import time

    import torch

    from semsegloop.learn.networks import build_network, load_preset, plan_network

    plan = plan_network(load_preset("unet2d_fast"), 3, 4, image_shape=(256, 256))
    device = torch.device("cpu")
    image = np.random.default_rng(0).normal(size=(1, 256, 256, 3)).astype(np.float32)
    inference._SPEED.pop(inference._speed_key(plan, device), None)
    probed = inference.seconds_per_voxel(plan, device, image)
    assert 0 < probed < 1e-4  # a fresh network timed on the image (< 10 s per Mpx)
    model = build_network(plan)
    t = time.perf_counter()
    inference.predict_image(model, image, plan, device, 4)
    took = time.perf_counter() - t
    known = inference.seconds_per_voxel(plan, device, image)
    assert 0 < known <= took / image[..., 0].size
