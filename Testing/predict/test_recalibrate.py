"""Refine's global step: corrections on some of the objects a network missed fix the others, far
from any click; a single correction, which no refit without it confirms, relabels nothing far
from it; the step keeps to 2D slices with two painted classes."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from semsegloop.predict.recalibrate import recalibrated_unary, slice_features
from semsegloop.predict.refine import RefineSettings, refine_labels

BRIGHT = [(50, 50), (50, 200), (200, 60)]          # found by the "network"
DIM = [(130, 130), (210, 200), (120, 40), (40, 125)]  # missed: dimmer objects of the same class
R = 14


def missed_objects_case():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :256]
    ref = np.ones((1, 256, 256), np.uint8)
    level = np.zeros((256, 256), np.float32)
    disks = {}
    for (cy, cx), v in [(c, 1.0) for c in BRIGHT] + [(c, 0.5) for c in DIM]:
        d = (yy - cy) ** 2 + (xx - cx) ** 2 <= R * R
        ref[0][d] = 2
        level[d] = v
        disks[(cy, cx)] = d
    img = ndi.gaussian_filter(level + rng.normal(0, 0.1, level.shape), 1)[None, ..., None]
    bright = np.any([disks[c] for c in BRIGHT], axis=0)
    dim = np.any([disks[c] for c in DIM], axis=0)
    # The network is sure of the bright objects and the background, unsure of the dim ones.
    p = np.where(bright, 0.9, np.where(dim, 0.35, 0.1)).astype(np.float32)[None]
    probs = np.stack([1 - p, p]).astype(np.float16)
    strokes = np.zeros(ref.shape, np.uint8)
    strokes[0, 100:104, 60:200] = 1                  # old strokes: background ...
    strokes[0, 240:244, 10:240] = 1
    strokes[0, 48:53, 40:60] = 2                     # ... and inside a bright object
    return img.astype(np.float32), probs, ref, strokes, disks


def click(strokes, centre, k=2, r=3):
    out = strokes.copy()
    cy, cx = centre
    out[0, cy - r:cy + r + 1, cx - r:cx + r + 1] = k
    return out


def test_corrections_on_some_missed_objects_fix_the_others_far_from_the_clicks():
    img, probs, ref, strokes, disks = missed_objects_case()
    current = (np.argmax(probs, axis=0) + 1).astype(np.uint8)
    for cy, cx in DIM[:3]:  # a stroke across each of three missed objects
        strokes[0, cy - 3:cy + 4, cx - 12:cx + 13] = 2
    unclicked = disks[DIM[3]][None]
    out = refine_labels(img, probs, current, strokes, (1.0, 1.0, 1.0), 2)
    # The fourth, 80+ px from every stroke, is fixed too (measured: 0.80 of its pixels; the
    # prediction's own labels elsewhere weigh as much as the strokes, so not all of it).
    assert (out[unclicked] == 2).mean() > 0.7
    local = refine_labels(img, probs, current, strokes, (1.0, 1.0, 1.0), 2,
                          RefineSettings(recalibrate=False))
    assert (local[unclicked] == 2).mean() < 0.05       # the local step alone leaves it
    objects = ndi.binary_dilation(ref == 2, iterations=2)
    assert ((out != current) & ~objects).mean() < 0.002  # background stays background
    assert (out[(ref == 2) & (current == 2)] == 2).all()  # found objects stay found
    assert (out[strokes > 0] == strokes[strokes > 0]).all()


def test_a_single_correction_relabels_nothing_far_from_it():
    img, probs, ref, strokes, disks = missed_objects_case()
    current = (np.argmax(probs, axis=0) + 1).astype(np.uint8)
    strokes = click(strokes, DIM[0])
    out = refine_labels(img, probs, current, strokes, (1.0, 1.0, 1.0), 2)
    near = ndi.binary_dilation(disks[DIM[0]], iterations=3)[None]
    assert not ((out != current) & ~near).any()
    # The clicked object is fixed locally (measured 0.90: the old background strokes 13 px
    # above it hold its top edge).
    assert (out[disks[DIM[0]][None]] == 2).mean() > 0.85


def test_the_step_needs_two_painted_classes_and_a_correction():
    img, probs, ref, strokes, _ = missed_objects_case()
    feats = slice_features(img[0], (1.0, 1.0, 1.0), (1.0, 2.0))
    p = probs[:, 0].astype(np.float32)
    predicted = np.argmax(p, axis=0) + 1
    st = RefineSettings()
    one_class = np.where(strokes[0] == 2, 2, 0).astype(np.uint8)
    assert recalibrated_unary(feats, p, one_class, one_class != predicted, st) is None
    agreeing = strokes[0]
    assert recalibrated_unary(feats, p, agreeing, (agreeing > 0) & (agreeing != predicted),
                              st) is None
    clicked = click(strokes, DIM[0])[0]
    unary = recalibrated_unary(feats, p, clicked, (clicked > 0) & (clicked != predicted), st)
    assert unary.shape == p.shape
    # The refit without the lone correction agrees with the prediction, so no pixel changes
    # class: the correction is left to the local step.
    assert ((np.argmax(unary, axis=0) + 1) == predicted).all()


def test_a_slice_too_large_for_the_filter_bank_is_refined_locally_only(monkeypatch):
    import semsegloop.predict.recalibrate as rc

    img, probs, ref, strokes, disks = missed_objects_case()
    current = (np.argmax(probs, axis=0) + 1).astype(np.uint8)
    for cy, cx in DIM[:3]:
        strokes[0, cy - 3:cy + 4, cx - 12:cx + 13] = 2
    # 256^2 pixels x 13 features x 4 bytes = 3.4 MB: a 1 MB bound leaves the global step out.
    monkeypatch.setattr(rc, "MAX_FEATURE_BYTES", 2 ** 20)
    out = refine_labels(img, probs, current, strokes, (1.0, 1.0, 1.0), 2)
    local = refine_labels(img, probs, current, strokes, (1.0, 1.0, 1.0), 2,
                          RefineSettings(recalibrate=False))
    np.testing.assert_array_equal(out, local)
