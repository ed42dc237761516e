"""Tests for semsegloop.measure.metrics (Dice, Jaccard, HD95, mean surface distance in physical units)
and semsegloop.measure.class_fractions (class counts, fractions, area/volume and their CSV)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from semsegloop import LabelError
from semsegloop.measure import metrics
from semsegloop.measure.class_fractions import class_fractions, read_fractions_csv, write_fractions_csv
from semsegloop.measure.metrics import dice_per_class, evaluate_labels


def square(shape, y0, y1, x0, x1, value=1, s=None):
    a = np.zeros(shape, np.uint8)
    if s is None:
        a[..., y0:y1, x0:x1] = value
    else:
        a[s, y0:y1, x0:x1] = value
    return a


def dense(a: np.ndarray, background: int = 2) -> np.ndarray:
    """Fill unlabelled pixels with a background class so the reference covers every pixel."""
    a = a.copy()
    a[a == 0] = background
    return a


def edges(mask: np.ndarray) -> np.ndarray:
    """Independent edge definition: a mask voxel with a face neighbour outside (or off-image)."""
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            inner &= np.roll(padded, shift, axis=axis)[tuple(slice(1, -1) for _ in mask.shape)]
    return mask & ~inner


def brute_force(a: np.ndarray, b: np.ndarray, spacing) -> tuple[float, float]:
    pa = np.argwhere(edges(a)) * np.asarray(spacing)
    pb = np.argwhere(edges(b)) * np.asarray(spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    d_ab, d_ba = d.min(1), d.min(0)
    hd95 = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    return float(hd95), float(np.concatenate([d_ab, d_ba]).mean())


# ---------------------------------------------------------------- Dice / Jaccard

def test_dice_jaccard_hand_computed_and_ref_zero_ignored():
    ref = np.array([[[1, 1, 2, 2], [1, 2, 2, 0]]])
    pred = np.array([[[1, 2, 2, 2], [1, 1, 2, 1]]], np.uint8)
    r = evaluate_labels(pred, ref, ["a", "b", "c"], dims=2)
    a, b, c = (r["classes"][n] for n in "abc")
    # class a: ref {00,01,10}, pred (inside ref>0) {00,10,11}: TP 2 -> 4/6, 2/4
    assert a["dice"] == pytest.approx(2 / 3) and a["jaccard"] == pytest.approx(0.5)
    assert (a["pred_voxels"], a["ref_voxels"], a["intersection"]) == (3, 3, 2)
    # class b: ref {02,03,11,12}, pred {01,02,03,12}: TP 3 -> 6/8, 3/5
    assert b["dice"] == pytest.approx(0.75) and b["jaccard"] == pytest.approx(0.6)
    assert math.isnan(c["dice"]) and math.isnan(c["jaccard"]) and math.isnan(c["hd95"])
    assert r["mean"]["dice"] == pytest.approx((2 / 3 + 0.75) / 2)
    assert r["evaluated_voxels"] == 7
    np.testing.assert_allclose(dice_per_class(pred, ref, 3), [2 / 3, 0.75, np.nan])


def test_sparse_reference_only_scores_painted_pixels():
    pred = np.ones((2, 20, 20), np.uint8)
    ref = np.zeros((2, 20, 20), np.int16)
    ref[0, 5, 3:9] = 1
    ref[1, 10:12, 10] = 2
    d = dice_per_class(pred, ref, 2)
    assert d[0] == pytest.approx(2 * 6 / (8 + 6))  # 8 pred-1 pixels inside the strokes
    assert d[1] == 0.0
    r = evaluate_labels(pred, ref, ["fg", "bg"], dims=2)
    assert r["evaluated_voxels"] == 8
    assert r["classes"]["fg"]["pred_voxels"] == 8
    assert r["classes"]["bg"]["dice"] == 0.0
    assert math.isnan(r["classes"]["bg"]["hd95"])  # predicted nowhere inside the strokes


def test_dice_matches_monai_on_random_dense_maps():
    import torch
    from monai.metrics import compute_dice, compute_iou
    from monai.networks.utils import one_hot

    rng = np.random.default_rng(1)
    ref = rng.integers(1, 5, (3, 17, 19))
    pred = rng.integers(1, 5, (3, 17, 19)).astype(np.uint8)
    pred[pred == 4] = 3  # class 4 only in the reference -> Dice 0
    r = evaluate_labels(pred, ref, ["a", "b", "c", "d"], dims=3)
    p = one_hot(torch.from_numpy(pred.astype(np.int64))[None, None], 5)
    y = one_hot(torch.from_numpy(ref)[None, None], 5)
    want_dice = compute_dice(p, y, include_background=False)[0].numpy()
    want_iou = compute_iou(p, y, include_background=False)[0].numpy()
    got = [r["classes"][n] for n in "abcd"]
    np.testing.assert_allclose([g["dice"] for g in got], want_dice, rtol=1e-6)
    np.testing.assert_allclose([g["jaccard"] for g in got], want_iou, rtol=1e-6)
    np.testing.assert_allclose(dice_per_class(pred, ref, 4), want_dice, rtol=1e-6)
    assert got[3]["dice"] == 0.0


# ---------------------------------------------------------------- surface distances

@pytest.mark.parametrize("dims", [2, 3])
def test_single_voxel_shift_uses_physical_spacing_per_axis(dims):
    spacing = (7.0, 0.5, 3.0)  # z, y, x
    ref = np.zeros((1, 9, 9), np.uint8)
    ref[0, 4, 2] = 1
    along_x = np.zeros_like(ref)
    along_x[0, 4, 4] = 1
    along_y = np.zeros_like(ref)
    along_y[0, 6, 2] = 1
    for pred, expected in ((along_x, 6.0), (along_y, 1.0)):
        c = evaluate_labels(dense(pred), dense(ref), ["k", "bg"], spacing,
                            dims=dims)["classes"]["k"]
        assert c["hd95"] == pytest.approx(expected)
        assert c["msd"] == pytest.approx(expected)
        assert c["dice"] == 0.0


def test_shift_along_z_in_3d():
    ref = np.zeros((8, 5, 5), np.uint8)
    ref[2, 2, 2] = 1
    pred = np.zeros_like(ref)
    pred[4, 2, 2] = 1
    c = evaluate_labels(dense(pred), dense(ref), ["k", "bg"], (3.0, 1.0, 1.0),
                        dims=3)["classes"]["k"]
    assert c["hd95"] == pytest.approx(6.0) and c["msd"] == pytest.approx(6.0)


def test_offset_squares_exact_hd95_and_brute_force_msd():
    spacing = (1.0, 3.0, 0.5)
    ref = square((1, 20, 20), 2, 12, 2, 12)
    pred = square((1, 20, 20), 4, 14, 2, 12)  # shifted by 2 rows of 3.0 -> faces 6.0 apart
    c = evaluate_labels(dense(pred), dense(ref), ["k", "bg"], spacing, dims=2)["classes"]["k"]
    assert c["hd95"] == pytest.approx(6.0)
    want_hd, want_msd = brute_force(pred[0] == 1, ref[0] == 1, spacing[1:])
    assert want_hd == pytest.approx(6.0)
    assert c["msd"] == pytest.approx(want_msd)
    assert c["dice"] == pytest.approx(2 * 80 / 200)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI 1.6 warns about its own call
def test_3d_anisotropic_matches_monai_and_brute_force(monkeypatch):
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    rng = np.random.default_rng(3)
    spacing = (2.5, 0.7, 1.3)
    ref = np.ones((6, 14, 16), np.uint8)
    ref[1:5, 3:11, 2:12] = 2
    pred = ref.copy()
    pred[2:6, 4:13, 3:10] = 2
    pred[0, 0:2, 13:16] = 2  # an outlier blob far from the reference
    pred[(rng.random(pred.shape) < 0.02)] = 1
    r = evaluate_labels(pred, ref, ["bg", "obj"], spacing, dims=3)

    stack = lambda a: torch.from_numpy(np.stack([a == 1, a == 2])[None].astype(np.float32))
    hd = compute_hausdorff_distance(stack(pred), stack(ref), include_background=True,
                                    percentile=95, spacing=list(spacing))[0].numpy()
    asd = compute_average_surface_distance(stack(pred), stack(ref), include_background=True,
                                           symmetric=True, spacing=list(spacing))[0].numpy()
    for i, name in enumerate(["bg", "obj"]):
        assert r["classes"][name]["hd95"] == pytest.approx(float(hd[i]), rel=1e-5)
        assert r["classes"][name]["msd"] == pytest.approx(float(asd[i]), rel=1e-5)
    want_hd, want_msd = brute_force(pred == 2, ref == 2, spacing)
    assert r["classes"]["obj"]["hd95"] == pytest.approx(want_hd, rel=1e-9)
    assert r["classes"]["obj"]["msd"] == pytest.approx(want_msd, rel=1e-9)

    # Large boxes switch to MONAI's KD-tree; it must give the same numbers.
    monkeypatch.setattr(metrics, "_EDT_MAX_VOXELS", 0)
    r_kd = evaluate_labels(pred, ref, ["bg", "obj"], spacing, dims=3)
    for name in ("bg", "obj"):
        for m in ("hd95", "msd"):
            assert r_kd["classes"][name][m] == pytest.approx(r["classes"][name][m], rel=1e-5)


def test_2d_stack_averages_over_slices_and_counts_unmatched():
    spacing = (10.0, 3.0, 1.0)
    ref = np.zeros((3, 20, 20), np.uint8)
    pred = np.zeros_like(ref)
    ref[0, 2:12, 2:12] = 1
    pred[0, 4:14, 2:12] = 1    # hd95 6.0
    ref[1, 5:9, 5:9] = 1
    pred[1, 5:9, 5:9] = 1      # identical: 0.0
    ref[2, 5:9, 5:9] = 1       # missed entirely on slice 2
    ref, pred = dense(ref), dense(pred)
    r = evaluate_labels(pred, ref, ["obj", "bg"], spacing, dims=2)
    obj = r["classes"]["obj"]
    _, msd0 = brute_force(pred[0] == 1, ref[0] == 1, spacing[1:])
    assert obj["hd95"] == pytest.approx((6.0 + 0.0) / 2)
    assert obj["msd"] == pytest.approx((msd0 + 0.0) / 2)
    assert obj["distance_slices"] == 2 and obj["unmatched_slices"] == 1
    # The same arrays as one volume: z-spacing 10 now matters, so the result differs.
    r3 = evaluate_labels(pred, ref, ["obj", "bg"], spacing, dims=3)
    assert r3["classes"]["obj"]["hd95"] != pytest.approx(obj["hd95"])
    assert "distance_slices" not in r3["classes"]["obj"]
    assert r3["classes"]["obj"]["dice"] == obj["dice"]


def test_empty_classes_are_nan_and_excluded_from_means():
    ref = dense(square((1, 10, 10), 2, 6, 2, 6), 3)
    pred = ref.copy()
    pred[0, 8, 8] = 2  # class 2 predicted, absent from reference
    r = evaluate_labels(pred, ref, ["a", "b", "c", "d"], (1, 1, 1), dims=3)
    a, b, d = r["classes"]["a"], r["classes"]["b"], r["classes"]["d"]
    assert a["dice"] == 1.0 and a["hd95"] == 0.0 and a["msd"] == 0.0
    assert b["dice"] == 0.0 and b["jaccard"] == 0.0
    assert math.isnan(b["hd95"]) and math.isnan(b["msd"])
    assert all(math.isnan(d[m]) for m in ("dice", "jaccard", "hd95", "msd"))
    assert r["mean"]["dice"] == pytest.approx((1.0 + 0.0 + r["classes"]["c"]["dice"]) / 3)
    assert not math.isnan(r["mean"]["hd95"])


def test_all_empty_means_are_nan():
    z = np.zeros((1, 4, 4), np.uint8)
    r = evaluate_labels(z, z, ["a"], dims=2)
    assert r["evaluated_voxels"] == 0 and math.isnan(r["mean"]["dice"])


def test_input_validation():
    with pytest.raises(LabelError, match=r"\(1, 4, 4\).*\(1, 4, 5\)"):
        evaluate_labels(np.zeros((1, 4, 4), np.uint8), np.zeros((1, 4, 5), int), ["a"])
    with pytest.raises(LabelError, match="value 3"):
        evaluate_labels(np.full((1, 4, 4), 3, np.uint8), np.ones((1, 4, 4), int), ["a", "b"])
    with pytest.raises(LabelError, match="value 5"):
        dice_per_class(np.ones((4, 4), np.uint8), np.full((4, 4), 5), 2)
    with pytest.raises(LabelError, match="value -1"):
        dice_per_class(np.ones((4, 4), np.uint8), np.full((4, 4), -1), 2)
    with pytest.raises(LabelError, match="Spacing"):
        evaluate_labels(np.ones((1, 4, 4), np.uint8), np.ones((1, 4, 4), int), ["a"], (1, 0, 1))
    with pytest.raises(LabelError, match="dims"):
        evaluate_labels(np.ones((1, 4, 4), np.uint8), np.ones((1, 4, 4), int), ["a"], dims=4)
    with pytest.raises(LabelError, match="unique"):
        evaluate_labels(np.ones((1, 4, 4), np.uint8), np.ones((1, 4, 4), int), ["a", "a"])


# ---------------------------------------------------------------- fractions

def test_fractions_counts_and_physical_units():
    labels = np.zeros((2, 3, 4), np.uint8)
    labels[0, 0, :] = 1          # 4
    labels[1, :, 0:2] = 2        # 6
    labels[0, 2, 3] = 3          # 1
    spacing = (2.0, 0.5, 0.25)
    rows = class_fractions(labels, ["a", "b", "c", "d"], spacing, dims=2, image_name="img1")
    assert [r["pixels"] for r in rows] == [4, 6, 1, 0]
    assert [r["fraction"] for r in rows] == pytest.approx([4 / 11, 6 / 11, 1 / 11, 0.0])
    assert [r["area_or_volume"] for r in rows] == pytest.approx([0.5, 0.75, 0.125, 0.0])
    assert {r["unit"] for r in rows} == {"mm^2"} and {r["image"] for r in rows} == {"img1"}
    vol = class_fractions(labels, ["a", "b", "c", "d"], spacing, dims=3, image_name="img1")
    assert [r["area_or_volume"] for r in vol] == pytest.approx([1.0, 1.5, 0.25, 0.0])
    assert vol[0]["unit"] == "mm^3"


def test_fractions_unlabelled_and_bad_values():
    rows = class_fractions(np.zeros((1, 2, 2), np.uint8), ["a"], image_name="blank")
    assert rows[0]["pixels"] == 0 and math.isnan(rows[0]["fraction"])
    with pytest.raises(LabelError, match="'scan7'.*value 4"):
        class_fractions(np.full((1, 2, 2), 4, np.uint8), ["a", "b"], image_name="scan7")


def test_fractions_csv_round_trip(tmp_path):
    labels = np.zeros((1, 5, 5), np.uint8)
    labels[0, :2] = 1
    labels[0, 4, 4] = 2
    rows = class_fractions(labels, ["cell, large", 'nu"cleus'], (1.0, 0.3, 0.3), 2, "a b")
    rows += class_fractions(np.zeros((1, 2, 2), np.uint8), ["cell, large", 'nu"cleus'],
                            image_name="empty")
    path = tmp_path / "out" / "fractions.csv"
    write_fractions_csv(path, rows)
    text = path.read_text()
    assert text.splitlines()[0] == "image,class,pixels,fraction,area_or_volume,unit"
    back = read_fractions_csv(path)
    assert len(back) == 4
    for got, want in zip(back, rows):
        for key in ("image", "class", "pixels", "unit", "area_or_volume"):
            assert got[key] == want[key]
        assert got["fraction"] == want["fraction"] or (math.isnan(got["fraction"])
                                                       and math.isnan(want["fraction"]))
    assert [p.name for p in path.parent.iterdir()] == ["fractions.csv"]
