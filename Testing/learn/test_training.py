"""Tests of training on sparse labels: spacing-aware 3D plans, multichannel input, time budgets,
cancel from another thread, determinism, class-balanced patches and the sparse-label losses."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

import semsegloop
from helpers_engine import (blob_volume, make_square_project, tiny_models,  # noqa: F401
                            square_image, square_strokes, volume_strokes)
from semsegloop import ImageReadError, TrainingError
from semsegloop.learn.networks import load_preset, plan_network


def _step_losses(proj, rnd):
    return [r["loss"] for r in proj.training_log() if r.get("event") == "step" and r["round"] == rnd]


# ------------------------------------------------------------------------------ 3D

def test_anisotropic_plan_keeps_the_thin_axis():
    # 0.8 x 0.8 x 6.5 mm: pooling z at the first level would leave 3 slices of 13 mm.
    plan = plan_network(load_preset("unet3d"), 1, 3, spacing=(6.5, 0.8, 0.8), image_shape=(6, 48, 48))
    assert plan.strides[1] == [1, 2, 2]
    assert plan.kernel_size[0][0] == 1, "in-plane kernels while z is much coarser than y/x"
    assert plan.kernel_size[0][1:] == [3, 3]
    assert plan.divisor[0] <= 2 and plan.patch_size[0] <= 8
    # The same preset on an isotropic volume does downsample z: the rule follows the spacing.
    iso = plan_network(load_preset("unet3d"), 1, 3, spacing=(0.8, 0.8, 0.8), image_shape=(48, 48, 48))
    assert iso.strides[1] == [2, 2, 2] and iso.kernel_size[0] == [3, 3, 3]


def test_anisotropic_volume_trains_and_predicts_on_its_grid(tmp_path, tiny_models):
    proj = semsegloop.Project.create(tmp_path / "p", ["ball", "background"], dims=3, preset="tiny3d")
    img, ref = blob_volume((6, 48, 48))
    image_id = proj.add_image(img, spacing=(6.5, 0.8, 0.8), name="mri")
    proj.set_labels(image_id, volume_strokes(ref))
    res = proj.train(steps=3, device="cpu")
    assert res.steps == 3 and not res.cancelled
    plan = json.loads((tmp_path / "p" / "checkpoints" / "round_001.json").read_text())["plan"]
    assert plan["strides"][1][0] == 1, plan["strides"]
    assert plan["kernel_size"][0][0] == 1
    pred = proj.predict_full(image_id)
    assert pred.labels.shape == (6, 48, 48) and pred.labels.dtype == np.uint8
    assert set(np.unique(pred.labels)) <= {1, 2}
    assert pred.probabilities.shape == (2, 6, 48, 48)
    saved = proj.saved_prediction(image_id)
    np.testing.assert_array_equal(saved, pred.labels)
    assert proj.geometry(image_id).spacing == (6.5, 0.8, 0.8)


def test_two_channel_volume_trains_and_predicts(tmp_path, tiny_models):
    proj = semsegloop.Project.create(tmp_path / "p", ["ball", "background"], dims=3, preset="tiny3d")
    img, ref = blob_volume((8, 32, 32), channels=2)
    assert img.shape == (8, 32, 32, 2)
    image_id = proj.add_image(img, name="t1_t2")
    assert proj.channels == 2
    proj.set_labels(image_id, volume_strokes(ref))
    proj.train(steps=3, device="cpu")
    plan = json.loads((tmp_path / "p" / "checkpoints" / "round_001.json").read_text())["plan"]
    assert plan["in_channels"] == 2 and plan["out_channels"] == 2
    probs = proj.predict_proba(image_id)
    assert probs.shape == (2, 8, 32, 32) and probs.dtype == np.float16
    # A one-channel volume cannot join a two-channel project: the network would not fit it.
    with pytest.raises(ImageReadError, match="channel"):
        proj.add_image(img[..., 0], name="t1_only")


# ------------------------------------------------------------------------------ budgets / cancel

def test_time_budget_stops_training_after_about_that_long(tmp_path, tiny_models):
    proj, _, _ = make_square_project(tmp_path / "p")
    t0 = time.perf_counter()
    res = proj.train(time_budget_s=1.5, device="cpu")
    wall = time.perf_counter() - t0
    # A step that would end past the budget is not started, so the round ends near it.
    assert 0.75 <= res.seconds < 4.5, [(r.get("event"), r.get("seconds"), r.get("elapsed_s"))
                                       for r in proj.training_log() if r.get("event") != "step"]
    assert wall < 8.0
    assert res.steps >= 1 and not res.cancelled
    assert res.steps == len(_step_losses(proj, 1)) == proj.rounds[0]["steps"]


def test_cancel_from_another_thread_stops_within_two_seconds_and_keeps_a_usable_model(tmp_path, tiny_models):
    proj, image_id, _ = make_square_project(tmp_path / "p")
    proj.train(steps=2, device="cpu")
    cancel = threading.Event()
    set_at = []

    def press_stop():
        time.sleep(1.0)
        set_at.append(time.perf_counter())
        cancel.set()

    th = threading.Thread(target=press_stop)
    seen = []
    th.start()
    res = proj.train(time_budget_s=60, cancel=cancel, device="cpu", progress=seen.append)
    returned = time.perf_counter()
    th.join()
    assert set_at, "train returned before cancel was requested"
    assert returned - set_at[0] < 2.0
    assert res.cancelled is True
    assert seen[-1].phase == "cancelled"
    again = semsegloop.Project.open(tmp_path / "p", read_only=True)
    if res.steps:
        # The steps done before the cancel are a round of their own, marked as cancelled.
        assert again.round == 2 and again.rounds[-1]["cancelled"] is True
        assert again.rounds[-1]["warm_start"] == "checkpoints/round_001"
    else:
        assert again.round == 1
    pred = again.predict(image_id, save=False)
    assert pred.shape == (64, 64) and pred.min() >= 1


def test_cancel_before_the_first_step_adds_no_round_and_keeps_the_previous_model(tmp_path, tiny_models):
    proj, image_id, _ = make_square_project(tmp_path / "p")
    proj.train(steps=2, device="cpu")
    ckpt = tmp_path / "p" / "checkpoints" / "round_001.safetensors"
    before = ckpt.read_bytes()
    json_before = (tmp_path / "p" / "project.json").read_text()
    cancel = threading.Event()
    cancel.set()
    seen = []
    res = proj.train(steps=50, cancel=cancel, device="cpu", progress=seen.append)
    assert res.cancelled and res.steps == 0 and res.checkpoint is None
    assert res.round == 1
    assert seen[-1].phase == "cancelled"
    assert proj.round == 1 and len(proj.rounds) == 1
    assert not (tmp_path / "p" / "checkpoints" / "round_002.safetensors").exists()
    assert ckpt.read_bytes() == before
    assert json.loads((tmp_path / "p" / "project.json").read_text()) == json.loads(json_before)
    assert semsegloop.Project.open(tmp_path / "p", read_only=True).predict(image_id, save=False).shape == (64, 64)


def test_a_callable_works_as_cancel_and_a_bad_cancel_object_is_refused(tmp_path, tiny_models):
    proj, _, _ = make_square_project(tmp_path / "p")
    res = proj.train(steps=50, cancel=lambda: True, device="cpu")
    assert res.cancelled and res.steps == 0
    with pytest.raises(TrainingError, match="cancel"):
        proj.train(steps=2, cancel="stop", device="cpu")


# ------------------------------------------------------------------------------ determinism / devices

def test_same_seed_gives_identical_first_step_loss_and_weights(tmp_path, tiny_models):
    runs = []
    for n, seed in enumerate((7, 7, 8)):
        proj, _, _ = make_square_project(tmp_path / f"p{n}")
        proj.train(steps=2, device="cpu", seed=seed)
        record = json.loads((tmp_path / f"p{n}" / "checkpoints" / "round_001.json").read_text())
        runs.append((_step_losses(proj, 1), record["sha256"]))
    assert runs[0][0][0] == runs[1][0][0]
    assert runs[0] == runs[1], "same seed, same data, same CPU: same losses and weights"
    assert runs[2][0][0] != runs[0][0][0], "another seed draws other patches and weights"


def test_unavailable_or_unknown_device_is_a_training_error(tmp_path, tiny_models):
    import torch

    proj, _, _ = make_square_project(tmp_path / "p")
    with pytest.raises(TrainingError, match="tpu"):
        proj.train(steps=1, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="cuda"):
            proj.train(steps=1, device="cuda")
    assert proj.round == 0


def test_bad_budgets_are_training_errors(tmp_path, tiny_models):
    proj, _, _ = make_square_project(tmp_path / "p")
    with pytest.raises(TrainingError, match="steps"):
        proj.train(steps=0, device="cpu")
    with pytest.raises(TrainingError, match="time_budget_s"):
        proj.train(time_budget_s=-1, device="cpu")
    with pytest.raises(TrainingError, match="nosuchnet"):
        proj.train(steps=1, preset="nosuchnet")
    assert proj.round == 0


# ------------------------------------------------------------------------------ sparse labels

def test_patches_are_drawn_around_painted_pixels_with_class_balance():
    from semsegloop.learn.sampling import PatchSampler, TrainingImage

    rng = np.random.default_rng(0)
    img = rng.normal(size=(1, 96, 96, 1)).astype(np.float32)
    lab = np.zeros((1, 96, 96), np.uint8)
    lab[0, 10, 10:14] = 1            # 4 pixels of the rare class
    lab[0, 40:90, 40:80] = 2         # 2000 pixels of the common one
    sampler = PatchSampler([TrainingImage(img, lab, "x")], 2, (16, 16), dims=2, seed=0)
    xb, yb = sampler.sample(300)
    assert xb.shape == (300, 1, 16, 16) and xb.dtype == np.float32
    assert yb.shape == (300, 16, 16) and yb.dtype == np.int64
    assert (yb.reshape(300, -1) > 0).any(axis=1).all(), "every patch holds painted pixels"
    with_rare = (yb == 1).reshape(300, -1).any(axis=1).mean()
    assert 0.35 < with_rare < 0.65, with_rare


def test_augmentation_is_on_by_default_flipping_rotating_and_jittering():
    from semsegloop.learn.sampling import PatchSampler, TrainingImage

    # Intensity grows with x, so a patch's gradient direction tells how it was flipped/rotated.
    ramp = np.tile(np.arange(64, dtype=np.float32), (64, 1))[None, :, :, None] / 64
    lab = np.zeros((1, 64, 64), np.uint8)
    lab[0, 30:34, 20:24] = 1
    lab[0, 30:34, 40:44] = 2
    xb, _ = PatchSampler([TrainingImage(ramp, lab, "ramp")], 2, (16, 16), dims=2, seed=1).sample(64)
    gx = np.sign(np.round((xb[:, 0, :, -1] - xb[:, 0, :, 0]).mean(axis=1), 3))
    gy = np.sign(np.round((xb[:, 0, -1, :] - xb[:, 0, 0, :]).mean(axis=1), 3))
    directions = set(zip(gx.tolist(), gy.tolist()))
    assert len(directions) >= 3, directions
    xb0, _ = PatchSampler([TrainingImage(ramp, lab, "ramp")], 2, (16, 16), dims=2, seed=1,
                          augment=False).sample(64)
    assert (xb0[:, 0, :, -1] > xb0[:, 0, :, 0]).all(), "without augmentation nothing is flipped"
    # Jitter changes values, not just positions.
    assert not np.isin(np.round(xb * 64, 3), np.arange(64)).all()


def test_masked_cross_entropy_ignores_unlabeled_pixels():
    import torch

    from semsegloop.learn.losses import masked_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    labels = torch.zeros(2, 8, 8, dtype=torch.int64)
    labels[0, 2, 2:5] = 1
    labels[1, 6, 1:3] = 3
    base = masked_cross_entropy(logits, labels)
    mask = (labels > 0)[:, None]
    changed = torch.where(mask, logits, logits + 5 * torch.randn_like(logits))
    assert torch.allclose(masked_cross_entropy(changed, labels), base)
    worse = logits.clone()
    worse[0, :, 2, 2:5] = torch.tensor([-10.0, 10.0, 10.0])[:, None]
    assert masked_cross_entropy(worse, labels) > base + 1
    nothing = logits.clone().requires_grad_(True)
    zero = masked_cross_entropy(nothing, torch.zeros_like(labels))
    assert float(zero.detach()) == 0.0
    zero.backward()                   # a batch with no strokes still gives a usable graph
    assert nothing.grad is not None


def test_pairwise_term_prefers_boundaries_on_image_edges():
    import torch

    from semsegloop.learn.losses import pairwise_potts_loss

    img = torch.zeros(1, 1, 32, 32)
    img[..., 16:] = 1.0               # an edge at x = 16
    on_edge = torch.zeros(1, 2, 32, 32)
    on_edge[:, 0, :, :16] = 1
    on_edge[:, 1, :, 16:] = 1
    off_edge = torch.zeros(1, 2, 32, 32)
    off_edge[:, 0, :, :8] = 1
    off_edge[:, 1, :, 8:] = 1
    uniform = torch.zeros(1, 2, 32, 32)
    uniform[:, 0] = 1
    l_on = float(pairwise_potts_loss(on_edge, img))
    l_off = float(pairwise_potts_loss(off_edge, img))
    l_uni = float(pairwise_potts_loss(uniform, img))
    assert l_uni == pytest.approx(0.0, abs=1e-6)
    assert l_on < 0.1 * l_off, (l_on, l_off)


def test_training_uses_the_pairwise_term_on_unlabeled_pixels(tmp_path, tiny_models):
    proj, _, _ = make_square_project(tmp_path / "p")
    proj.train(steps=2, device="cpu", pseudo_labels=False)
    steps = [r for r in proj.training_log() if r.get("event") == "step"]
    assert all("loss_ce" in r and "loss_pairwise" in r for r in steps)
    # The regulariser ramps in: the first step's loss is the cross-entropy alone.
    assert steps[0]["loss"] == pytest.approx(steps[0]["loss_ce"])


def test_teacher_pseudo_labels_add_a_weighted_term_on_unpainted_pixels(tmp_path, tiny_models):
    proj, _, _ = make_square_project(tmp_path / "p")
    proj.train(steps=2, device="cpu", pseudo_labels=True)
    steps = [r for r in proj.training_log() if r.get("event") == "step"]
    assert all("loss_pseudo" in r for r in steps)
    assert steps[0]["loss"] == pytest.approx(steps[0]["loss_ce"] + 1.0 * steps[0]["loss_pseudo"],
                                             rel=1e-5)


def test_teacher_labels_confident_pixels_and_stops_when_cancelled():
    # The teacher runs before the first training step, so Stop must reach it too.
    from semsegloop.learn.teacher import teacher_pseudo_labels

    img, ref = square_image(64, seed=0)
    x = (img.astype(np.float32) / 255.0).reshape(1, 64, 64, 1)
    strokes = square_strokes(64)[None]
    unpainted = np.zeros_like(strokes)
    out = teacher_pseudo_labels([x, x], [strokes, unpainted], 2, dims=2, seed=0)
    assert all(o is not None and o.shape == strokes.shape for o in out)
    painted = strokes > 0
    assert np.array_equal(out[0][painted], strokes[painted])   # strokes always win
    sure = out[1] > 0
    assert sure.mean() > 0.5                                   # most pixels get a label
    assert (out[1][sure] == ref[None][sure]).mean() > 0.9      # and they are mostly right
    assert teacher_pseudo_labels([x, x], [strokes, unpainted], 2, dims=2,
                                 cancel=lambda: True) == [None, None]


@pytest.mark.parametrize("flag", ["1", "0"])
def test_cpu_bfloat16_runs_3d_rounds_and_2d_predictions_only_when_enabled(tmp_path, tiny_models, monkeypatch, flag):
    import torch

    from semsegloop.learn import training as tr
    from semsegloop.learn.networks import build_network

    monkeypatch.setenv("SEMSEGLOOP_CPU_BF16", flag)
    cpu = torch.device("cpu")
    assert tr.cpu_bf16(cpu, 3) is (flag == "1")
    assert tr.cpu_bf16(cpu, 2) is False  # 2D training steps were slower in bf16 on CPU
    assert tr.cpu_bf16(cpu, 2, inference=True) is (flag == "1")   # 2D prediction is faster
    net2 = build_network(plan_network(load_preset("unet2d_fast"), 1, 2, image_shape=(64, 64))).eval()
    with torch.inference_mode(), tr.autocast(cpu, 2, inference=True):
        assert net2(torch.zeros(1, 1, 64, 64)).dtype == (torch.bfloat16 if flag == "1" else torch.float32)
    with torch.inference_mode(), tr.autocast(cpu, 2):
        assert net2(torch.zeros(1, 1, 64, 64)).dtype == torch.float32
    plan = plan_network(load_preset("unet3d"), 1, 2, spacing=(1.0, 1.0, 1.0), image_shape=(16, 32, 32))

    net = build_network(plan).eval()
    with torch.inference_mode(), tr.autocast(cpu, 3):
        out = net(torch.zeros(1, 1, 16, 32, 32))
    assert out.dtype == (torch.bfloat16 if flag == "1" else torch.float32)
    # A whole round trains with finite losses and predicts on the grid either way.
    proj = semsegloop.Project.create(tmp_path / "p", ["ball", "background"], dims=3, preset="tiny3d")
    img, ref = blob_volume((12, 32, 32))
    iid = proj.add_image(img)
    proj.set_labels(iid, volume_strokes(ref))
    proj.train(steps=3, pseudo_labels=False)
    losses = _step_losses(proj, 1)
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert proj.predict(iid).shape == ref.shape


class _SlowStart:
    """A real patch sampler whose first two batches take ``delay`` s more, as the first steps
    of a round do on a loaded machine (optimiser state, oneDNN primitives)."""

    def __init__(self, sampler, delay: float):
        self.sampler, self.delay, self.calls = sampler, delay, 0

    def sample(self, n):
        self.calls += 1
        if self.calls <= 2:
            time.sleep(self.delay)
        return self.sampler.sample(n)


def _tiny_training(reserve, budget, delay):
    from semsegloop.learn import training as tr
    from semsegloop.learn.losses import SparseLabelLoss
    from semsegloop.learn.networks import build_network
    from semsegloop.learn.sampling import PatchSampler, TrainingImage

    img, _ = square_image(64)
    ti = TrainingImage(img[None, :, :, None], square_strokes(64)[None], "sq")
    plan = plan_network({"name": "t", "dims": 2, "network": "DynUNet", "filters": [8, 16, 32],
                         "patch_size": [32, 32], "batch_size": 2, "learning_rate": 0.01,
                         "norm": "instance"}, 1, 2, image_shape=(64, 64))
    sampler = _SlowStart(PatchSampler([ti], 2, plan.patch_size, 2, seed=0), delay)
    log = []
    out = tr.run_training(build_network(plan), sampler, SparseLabelLoss(), device=tr.select_device("cpu"),
                          round_index=1, batch_size=2, learning_rate=0.01, time_budget_s=budget,
                          reserve=reserve, log=log.append, dims=2)
    return out, next((r for r in log if r["event"] == "train_stop"), {})


def test_slow_first_steps_do_not_make_the_reserve_stop_training():
    # A reserve of 12 steps' time: estimated from a 2 s warm-up step it is 24 s, past the
    # 10 s budget, and the round gave up after two steps; from the steady steps (~0.1 s
    # here, more on a loaded machine) it is a few seconds.
    (steps, seconds, *_), stop = _tiny_training(lambda step_s: 12 * step_s, budget=10.0, delay=2.0)
    assert steps > 2 and stop.get("step_s", 99) < 2.0, (stop, seconds)
    assert stop["why"] in ("reserve", "budget"), stop
    assert seconds <= 10.0 + 1.0


def test_a_steady_reserve_is_kept_free_of_training():
    # What follows training (predicting the painted images) gets its reserve.
    (steps, seconds, *_), stop = _tiny_training(lambda step_s: 3.0, budget=8.0, delay=0.0)
    assert stop["why"] == "reserve" and steps > 2, stop
    assert seconds <= 8.0 - 3.0 + 1.0, stop
