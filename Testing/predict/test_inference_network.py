"""Tests of the CPU inference network: its group norms are the instance norms, its predictions
are the trained model's (equal in float32, agreeing labels in bfloat16), the model is untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import semsegloop
import semsegloop.predict.sliding_window as inference
from semsegloop.learn.networks import build_network, load_preset, plan_network
from semsegloop.predict.inference_network import ChannelNorm, inference_network
from helpers_engine import blob_volume, make_square_project, volume_strokes, tiny_models  # noqa: F401


@pytest.fixture(scope="module")
def trained_2d(tmp_path_factory, tiny_models):
    proj, image_id, _ = make_square_project(tmp_path_factory.mktemp("net2d") / "p")
    proj.train(steps=25, device="cpu")
    return proj, image_id


@pytest.mark.parametrize("dims,affine", [(2, False), (2, True), (3, False)])
def test_channel_norm_is_instance_norm(dims, affine):
    """Per sample and channel, over the spatial axes, with eps and the affine weights."""
    norm = (torch.nn.InstanceNorm2d if dims == 2 else torch.nn.InstanceNorm3d)(5, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.uniform_(-1.0, 1.0)
    g = torch.Generator().manual_seed(0)
    # Samples and channels with their own offsets and scales, so a wrong grouping shows.
    x = (torch.randn((3, 5) + (11, 7, 6)[:dims], generator=g)
         * torch.arange(1, 16, dtype=torch.float32).view(3, 5, *[1] * dims)
         + torch.arange(15, dtype=torch.float32).view(3, 5, *[1] * dims))
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    got = ChannelNorm(norm)(x.contiguous(memory_format=fmt))
    torch.testing.assert_close(got, norm(x), atol=1e-5, rtol=1e-5)


def test_the_copy_has_no_instance_norm_and_the_model_is_untouched(trained_2d):
    proj, _ = trained_2d
    _, _, model = proj.load_model(device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = inference_network(model, torch.device("cpu"))
    assert net is not model
    assert not any(isinstance(m, torch.nn.modules.instancenorm._InstanceNorm) for m in net.modules())
    n_norms = sum(isinstance(m, ChannelNorm) for m in net.modules())
    assert n_norms == sum(isinstance(m, torch.nn.InstanceNorm2d) for m in model.modules()) > 0
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    # The trained model keeps its norms, its layout and its weights: training goes on with it.
    assert all(c.weight.is_contiguous() for c in model.modules() if isinstance(c, torch.nn.Conv2d))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # Off the CPU the model itself runs (nothing measured there).
    assert inference_network(model, torch.device("meta")) is model


@pytest.mark.parametrize("dims", [2, 3])
def test_float32_logits_equal_the_trained_models(dims, tiny_models):
    plan = plan_network(load_preset("tiny2d" if dims == 2 else "tiny3d"), 2, 3,
                        image_shape=(64, 48) if dims == 2 else (8, 32, 32))
    torch.manual_seed(1)
    model = build_network(plan).eval()
    x = torch.randn((2, 2) + ((64, 48) if dims == 2 else (8, 32, 32)))
    with torch.inference_mode():
        ref = model(x)
        got = inference_network(model, torch.device("cpu"))(x)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bf16", ["0", "1"])
def test_predictions_agree_with_the_model_as_trained(trained_2d, monkeypatch, bf16):
    """predict_image with the inference network against the trained model itself, on a trained
    net: float32 probabilities equal within float16 storage; in bfloat16 (on CPUs where
    predictions use it) near-ties may move, at most 0.5 % of the labels."""
    monkeypatch.setenv("SEMSEGLOOP_CPU_BF16", bf16)
    proj, image_id = trained_2d
    preds = {}
    for fast in (False, True):
        monkeypatch.setattr(inference, "CPU_INFERENCE_NETWORK", fast)
        preds[fast] = proj.predict_full(image_id, device="cpu", save=False, keep_strokes=False,
                                        postprocess=False, component="network")
    p_old = preds[False].probabilities.astype(np.float32)
    p_new = preds[True].probabilities.astype(np.float32)
    agree = float((preds[False].labels == preds[True].labels).mean())
    diff = float(np.abs(p_old - p_new).max())
    print(f"bf16={bf16}: labels agree {agree:.5f}, max |dp| {diff:.4f}")
    if bf16 == "0":
        assert diff <= 2e-3, diff
        assert agree >= 0.9995, agree
    else:
        assert agree >= 0.995, agree
    # The trained net finds the square either way.
    assert (preds[True].labels[0, 16:48, 16:48] == 1).mean() > 0.8


def test_the_copy_is_kept_until_the_weights_change(tiny_models):
    """One copy per model while its weights stay as they are; a training step (an in-place
    change of a weight) or loading other weights gives a new copy that follows them."""
    plan = plan_network(load_preset("tiny2d"), 1, 2, image_shape=(32, 32))
    torch.manual_seed(2)
    model = build_network(plan).eval()
    cpu = torch.device("cpu")
    x = torch.randn(1, 1, 32, 32)
    first = inference_network(model, cpu)
    assert inference_network(model, cpu) is first
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        conv.weight.mul_(-2.0)
    second = inference_network(model, cpu)
    assert second is not first
    with torch.inference_mode():
        torch.testing.assert_close(second(x), model(x), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(first(x), model(x), atol=1e-3)
    other = build_network(plan)
    model.load_state_dict(other.state_dict())
    third = inference_network(model, cpu)
    assert third is not second
    with torch.inference_mode():
        torch.testing.assert_close(third(x), model(x), atol=1e-4, rtol=1e-4)
