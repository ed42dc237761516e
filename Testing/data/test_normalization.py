"""Tests for semsegloop.data.normalization: method detection per kind of image, the value ranges each
method produces, determinism, constant images, and spec validation."""

import json
from pathlib import Path

import numpy as np
import pytest

from semsegloop import ProjectError
from semsegloop.data.imageio import as_image_data, read_image
from semsegloop.data.normalization import (MAX_SAMPLES, describe_normalization, detect_normalization,
                                      normalization_stats, normalize, validate_normalization)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _ct_volume():
    rng = np.random.default_rng(1)
    vol = np.full((8, 32, 32), -1000, np.int16)            # air
    vol[:, 8:24, 8:24] = rng.normal(40, 20, (8, 16, 16))     # soft tissue
    vol[:, 14:18, 14:18] = 1200                              # bone
    return as_image_data(vol, spacing=(3.0, 0.8, 0.8), dims=3)


def _mri_volume():
    rng = np.random.default_rng(2)
    vol = rng.gamma(4.0, 50.0, (10, 24, 24)).astype(np.float32)
    return as_image_data(vol, dims=3)


# ---------------------------------------------------------------- detection

def test_detect_ct():
    spec = detect_normalization(_ct_volume(), dims=3)
    assert spec == {"method": "ct", "window": [-1000.0, 1000.0]}


def test_detect_rgb_uint8():
    img = as_image_data(np.zeros((20, 30, 3), np.uint8))
    spec = detect_normalization(img, dims=2)
    assert spec["method"] == "scale" and spec["factor"] == pytest.approx(1 / 255)


def test_detect_uint16_grey_microscopy():
    img = as_image_data((np.random.default_rng(3).random((40, 50)) * 4000).astype(np.uint16))
    assert detect_normalization(img, dims=2)["method"] == "percentile"
    img8 = as_image_data(np.zeros((3, 40, 50), np.uint8))
    assert detect_normalization(img8, dims=2)["method"] == "percentile"


def test_detect_float_mri_volume():
    assert detect_normalization(_mri_volume(), dims=3)["method"] == "zscore"
    # Without a project mode, several slices count as a volume.
    assert detect_normalization(_mri_volume())["method"] == "zscore"


def test_detect_float_2d():
    img = as_image_data(np.random.default_rng(4).random((20, 20)).astype(np.float32))
    assert detect_normalization(img)["method"] == "percentile"


def test_detect_accepts_plain_array():
    assert detect_normalization(_ct_volume().array)["method"] == "ct"


# ---------------------------------------------------------------- normalize

def test_normalize_ct_window():
    img = _ct_volume()
    out = normalize(img.array, {"method": "ct", "window": [-1000, 1000]})
    assert out.dtype == np.float32 and out.shape == img.array.shape
    assert out.min() == -1.0 and out.max() == 1.0          # air -> -1, bone clipped -> 1
    assert out[0, 16, 10, 0] == pytest.approx(img.array[0, 16, 10, 0] / 1000.0, abs=1e-6)


def test_normalize_zscore():
    img = _mri_volume()
    out = normalize(img.array, {"method": "zscore"})
    assert out.dtype == np.float32
    assert abs(float(out.mean())) < 0.1
    assert 0.9 < float(out.std()) < 1.3   # stats exclude the extreme tails, so std is a bit > 1


def test_normalize_percentile_uint16():
    rng = np.random.default_rng(5)
    a = (rng.random((2, 40, 50, 1)) * 3000 + 500).astype(np.uint16)
    a[0, 0, 0, 0] = 65535     # a hot pixel must not squash the range
    out = normalize(a, {"method": "percentile", "low": 0.5, "high": 99.5})
    assert out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    assert 0.4 < float(np.median(out)) < 0.6


def test_normalize_percentile_per_channel():
    rng = np.random.default_rng(6)
    a = np.stack([rng.random((30, 30)) * 10, rng.random((30, 30)) * 1000 + 5000], -1)
    out = normalize(a[None].astype(np.float32), {"method": "percentile"})
    for c in range(2):
        assert out[..., c].min() == 0.0 and out[..., c].max() == 1.0


def test_normalize_scale_rgb():
    a = np.array([[[[0, 128, 255]]]], np.uint8)
    out = normalize(a, {"method": "scale", "factor": 1 / 255})
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [0.0, 128 / 255, 1.0], rtol=1e-6)


def test_normalize_none_is_float32_copy():
    a = np.arange(12, dtype=np.int32).reshape(1, 3, 4, 1)
    out = normalize(a, {"method": "none"})
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("method", ["zscore", "percentile", "ct", "scale", "none"])
def test_constant_image_is_finite(method):
    spec = validate_normalization({"method": method, "factor": 0.5} if method == "scale"
                                  else method)
    a = np.full((2, 16, 16, 1), 77, np.uint16)
    out = normalize(a, spec)
    assert np.isfinite(out).all()
    if method in ("zscore", "percentile"):
        assert (out == 0).all()


def test_sparse_bright_spots_still_visible():
    a = np.zeros((1, 100, 100, 1), np.uint16)
    a[0, 50, 50, 0] = 1000     # fewer bright pixels than the top 0.5 %
    out = normalize(a, {"method": "percentile"})
    assert out[0, 50, 50, 0] == 1.0 and out[0, 0, 0, 0] == 0.0


def test_int32_input_stays_float32():
    # int32 with a float32 scalar would promote to float64 under NumPy's rules.
    a = np.arange(64, dtype=np.int32).reshape(1, 8, 8, 1)
    assert normalize(a, {"method": "zscore"}).dtype == np.float32


def test_subsampled_stats_are_deterministic_and_close():
    rng = np.random.default_rng(7)
    big = rng.normal(100.0, 15.0, (5, 500, 500, 1)).astype(np.float32)
    assert big.size > MAX_SAMPLES
    s1 = normalization_stats(big, {"method": "zscore"})
    s2 = normalization_stats(big.copy(), {"method": "zscore"})
    assert s1 == s2
    assert s1[0][0] == pytest.approx(100.0, abs=0.2)
    out_a = normalize(big, {"method": "zscore"})
    out_b = normalize(big, {"method": "zscore"}, stats=s1)
    np.testing.assert_array_equal(out_a, out_b)
    # Patches normalised with whole-image stats equal the slice of the whole normalised image.
    patch = normalize(big[1:2, 10:50, 20:60], {"method": "zscore"}, stats=s1)
    np.testing.assert_array_equal(patch, out_a[1:2, 10:50, 20:60])


# ---------------------------------------------------------------- specs

@pytest.mark.parametrize("spec", [
    {"method": "ct", "window": [-1000.0, 1000.0]}, {"method": "zscore"},
    {"method": "percentile", "low": 1.0, "high": 99.0}, {"method": "scale", "factor": 1 / 65535},
    {"method": "none"}])
def test_spec_json_round_trip(spec):
    v = validate_normalization(spec)
    back = validate_normalization(json.loads(json.dumps(v)))
    assert back == v
    assert v["method"] == spec["method"]
    for k, val in spec.items():
        assert v[k] == val
    assert isinstance(describe_normalization(v), str) and describe_normalization(v)


def test_validate_fills_defaults_and_shorthand():
    assert validate_normalization("ct") == {"method": "ct", "window": [-1000.0, 1000.0]}
    assert validate_normalization({"method": "zscore"}) == {"method": "zscore", "low": 0.5,
                                                            "high": 99.5}


@pytest.mark.parametrize("spec,match", [
    ({"method": "foo"}, r"normalization\.method='foo' is not one of 'ct'"),
    ({"method": "ct", "window": [100, -100]}, r"normalization\.window"),
    ({"method": "ct", "window": "wide"}, r"normalization\.window"),
    ({"method": "percentile", "low": 99, "high": 1}, r"normalization\.low"),
    ({"method": "scale"}, r"normalization\.factor is required"),
    ({"method": "scale", "factor": -1}, r"normalization\.factor"),
    ({"method": "zscore", "windw": [1, 2]}, r"normalization\.windw is not a setting"),
    ({"window": [0, 1]}, r"normalization\.method=None"),
    (42, "normalization=42")])
def test_validate_rejects(spec, match):
    with pytest.raises(ProjectError, match=match):
        validate_normalization(spec)
    with pytest.raises(ProjectError):
        normalize(np.zeros((1, 2, 2, 1), np.float32), spec)


def test_describe():
    assert describe_normalization({"method": "ct", "window": [-1000, 1000]}) == \
        "CT window [-1000, 1000] HU -> [-1, 1]"
    assert describe_normalization({"method": "scale", "factor": 1 / 255}) == "scale x 1/255"
    assert "z-score" in describe_normalization({"method": "zscore"})
    assert "0.5-99.5" in describe_normalization({"method": "percentile"})


# ---------------------------------------------------------------- real data

def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


def test_real_data_detection():
    ct = read_image(_need(DATA / "totalsegmentator_example_ct_3d" / "example_ct_sm.nii.gz"))
    assert detect_normalization(ct, dims=3)["method"] == "ct"
    mri = read_image(_need(DATA / "pyradiomics_mri_lesions_3d" / "brain1_image.nrrd"))
    assert detect_normalization(mri, dims=3)["method"] == "zscore"
    he = read_image(_need(DATA / "miccai2015_he_nuclei_2d" / "image" / "image01.png"))
    assert detect_normalization(he, dims=2)["method"] == "scale"
    em = read_image(_need(DATA / "isbi2012_em_membranes" / "image" / "00.png"))
    spec = detect_normalization(em, dims=2)
    assert spec["method"] == "percentile"
    out = normalize(em.array, spec)
    assert out.min() == 0.0 and out.max() == 1.0
