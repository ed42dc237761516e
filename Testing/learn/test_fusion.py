"""Held-out strokes and fusion weights: whole stroke components are held out, never all of a
class; the chosen blend never scores below a model that held-out strokes score higher."""

from __future__ import annotations

import numpy as np
import pytest

from semsegloop.learn import fusion


def _probs(y, K, acc, rng):
    """Probabilities whose argmax is right on about ``acc`` of the pixels."""
    p = rng.dirichlet(np.ones(K), size=len(y)).astype(np.float32) * 0.5
    right = rng.random(len(y)) < acc
    wrong = (y - 1 + rng.integers(1, K, len(y))) % K
    p[np.arange(len(y)), np.where(right, y - 1, wrong)] += 1.0
    return p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("seed", range(6))
def test_weights_never_pick_a_model_that_held_out_strokes_score_lower(seed):
    rng = np.random.default_rng(seed)
    K = 3
    y = rng.integers(1, K + 1, 400)
    good, bad = _probs(y, K, 0.9, rng), _probs(y, K, 0.5, rng)
    for p_net, p_teacher, worse in ((bad, good, "net"), (good, bad, "teacher")):
        w, table = fusion.choose_weight(p_net, p_teacher, y, K)
        chosen = table[w][0]
        d_net, d_teacher = table[1.0][0], table[0.0][0]
        assert chosen >= max(d_net, d_teacher)
        # The worse model alone is never the choice.
        assert w != (1.0 if worse == "net" else 0.0)
        if worse == "net":
            assert d_teacher > d_net and w < 0.5
        else:
            assert d_net > d_teacher and w > 0.5


def test_three_way_weights_dominate_every_single_model():
    rng = np.random.default_rng(7)
    K = 4
    y = rng.integers(1, K + 1, 600)
    comps = [_probs(y, K, a, rng) for a in (0.4, 0.7, 0.8)]
    w, table = fusion.choose_weights(comps, y, K)
    assert abs(sum(w) - 1) < 1e-6 and len(table) == 66
    singles = [table[tuple(float(i == j) for i in range(3))][0] for j in range(3)]
    assert table[w][0] >= max(singles)


def test_held_out_strokes_are_whole_components_and_every_class_keeps_some():
    lab = np.zeros((1, 64, 64), np.uint8)
    for r in range(0, 60, 8):         # 8 separate strokes of class 1, 8 of class 2
        lab[0, r + 1, 2:20] = 1
        lab[0, r + 1, 40:60] = 2
    held = fusion.holdout_masks([lab], 2, dims=2, seed=0)[0]
    for k in (1, 2):
        comp, n = fusion.stroke_components(lab, k, 2)
        taken = {int(c) for c in np.unique(comp[held & (lab == k)])}
        assert 0 < len(taken) < n
        for c in taken:  # whole components only
            assert held[comp == c].all()
        frac = (held & (lab == k)).sum() / (lab == k).sum()
        assert 0.1 < frac < 0.5
    assert not held[lab == 0].any()


def test_new_strokes_are_held_out_first():
    lab = np.zeros((1, 64, 64), np.uint8)
    for r in range(0, 60, 8):
        lab[0, r + 1, 2:20] = 1
        lab[0, r + 1, 40:60] = 2
    new = np.zeros(lab.shape, bool)
    new[0, 49:50, :] = True  # the stroke pair on row 49 is this round's correction
    held = fusion.holdout_masks([lab], 2, dims=2, seed=0, prefer=[new])[0]
    assert held[0, 49, 2:20].all() and held[0, 49, 40:60].all()


def test_a_class_with_a_single_stroke_is_cut_into_cells_for_holding_out():
    lab = np.zeros((1, 64, 64), np.uint8)
    lab[0, 10, 2:62] = 1
    lab[0, 50, 2:62] = 2
    held = fusion.holdout_masks([lab], 2, dims=2, seed=0)[0]
    for k in (1, 2):
        assert 0 < (held & (lab == k)).sum() < (lab == k).sum()


def _volume_strokes(planes=(4, 10, 16, 22, 28)):
    """A (32, 40, 40) volume painted on a few axial planes, a brush blob of two classes on
    each (blobs span more rows and columns than there are painted planes)."""
    lab = np.zeros((32, 40, 40), np.uint8)
    for z in planes:
        lab[z, 3:11, 3:30] = 1
        lab[z, 26:34, 3:30] = 2
    return lab


def test_a_painted_volume_holds_out_whole_planes_and_keeps_every_class_in_training():
    lab = _volume_strokes()
    held = fusion.holdout_masks([lab], 2, dims=3, seed=0)[0]
    planes = np.flatnonzero(held.any(axis=(1, 2)))
    assert 0 < len(planes) < 5
    for z in planes:  # every stroke of a held-out plane, of every class
        assert held[z][lab[z] > 0].all()
    rest = (lab > 0) & ~held
    assert {1, 2} <= set(np.unique(lab[rest]).tolist())
    assert not held[lab == 0].any()


def test_planes_are_found_along_the_axis_the_person_painted_on():
    lab = np.moveaxis(_volume_strokes(), 0, 2)  # painted on sagittal planes instead
    units = fusion.painting_units([lab], dims=3)
    assert len(units) == 5
    for _, idx in units:
        assert idx[0] == slice(None) and idx[1] == slice(None) and idx[2].stop - idx[2].start == 1


def test_a_collection_holds_out_whole_images_and_new_ones_first():
    labs = []
    for n in range(4):
        lab = np.zeros((1, 32, 32), np.uint8)
        lab[0, 4, 2:30] = 1
        lab[0, 20, 2:30] = 2
        labs.append(lab)
    new = [None, None, labs[2] > 0, None]  # image 2 was painted this round
    held = fusion.holdout_masks(labs, 2, dims=2, seed=3, prefer=new)
    assert held[2][labs[2] > 0].all()
    for h, lab in zip(held, labs):
        assert not h.any() or h[lab > 0].all()  # whole images
    assert sum(h.any() for h in held) < 4


def test_a_unit_that_holds_the_only_strokes_of_a_class_stays_in_training():
    lab = _volume_strokes()
    lab[4][lab[4] == 2] = 0
    lab[4, 14:22, 3:30] = 3  # class 3 only on plane 4
    for seed in range(8):
        held = fusion.holdout_masks([lab], 3, dims=3, seed=seed)[0]
        assert not held[4].any()


def test_held_out_pixels_weighted_by_the_image_class_shares_rank_models_as_the_image_does():
    # Balanced strokes (100 px each) of a mostly-background image (95 %). Model A calls 20 %
    # of background foreground, model B misses 30 % of the foreground: on the strokes A looks
    # better, on the image (19 % of it false foreground) B is far better.
    y = np.repeat([1, 2], 100)
    a = np.zeros((200, 2), np.float32)
    b = np.zeros((200, 2), np.float32)
    a[np.arange(200), y - 1] = 1
    b[np.arange(200), y - 1] = 1
    a[:20] = [0.2, 0.8]
    b[100:130] = [0.8, 0.2]
    w_plain, _ = fusion.choose_weights([a, b], y, 2, step=1.0)
    weights = fusion.prior_weights(y, np.array([0.95, 0.05]))
    w_image, table = fusion.choose_weights([a, b], y, 2, step=1.0, weights=weights)
    assert w_plain == (1.0, 0.0) and w_image == (0.0, 1.0)
    # The weights give each class its image share and keep the number of pixels.
    assert abs(weights.sum() - 200) < 1e-6
    assert abs(weights[y == 1].sum() / weights.sum() - 0.95) < 1e-6
    assert fusion.prior_weights(y, None) is None


def _blend_case(seed, gain_flips):
    """Held-out pixels where the teacher is right on about 80 %, and a network that is the
    teacher except on ``gain_flips`` of its errors, which a share of 0.3-0.4 of the network
    fixes, and on twice as many pixels the teacher is sure of, which the network alone gets
    wrong: worse alone, better blended in."""
    rng = np.random.default_rng(seed)
    K, n = 3, 3000
    y = rng.integers(1, K + 1, n)
    teacher = _probs(y, K, 0.8, rng)
    net = teacher.copy()
    wrong = np.flatnonzero(np.argmax(teacher, axis=1) + 1 != y)
    right = np.flatnonzero(np.argmax(teacher, axis=1) + 1 == y)
    fix = rng.choice(wrong, gain_flips, replace=False)
    harm = rng.choice(right, 2 * gain_flips, replace=False)
    for idx, p_true, p_other in ((fix, 0.3, 0.6), (harm, 0.95, 0.025)):
        teacher[idx] = (1 - p_true - p_other)
        teacher[idx, y[idx] - 1] = p_true
        teacher[idx, y[idx] % K] = p_other
    net[fix] = 0.0
    net[fix, y[fix] - 1] = 1.0
    net[harm] = 0.0
    net[harm, y[harm] % K] = 1.0
    return net, teacher, y, K


def test_a_network_share_must_gain_more_than_its_unit_standard_errors():
    """One held-out image: a blend a few hundredths better there is no evidence when one
    image's score moves more than that between images (each unit of network weight costs one
    standard error); where the unit noise is small the same gain keeps the blend."""
    net, teacher, y, K = _blend_case(0, 120)
    w0, table = fusion.choose_weights([net, teacher], y, K)
    gain = table[w0][0] - table[(0.0, 1.0)][0]
    assert 0.3 <= w0[0] <= 0.4 and 0.02 < gain < 0.06     # without the unit noise
    assert table[(1.0, 0.0)][0] < table[(0.0, 1.0)][0]     # the network alone is worse
    w, table = fusion.choose_weights([net, teacher], y, K, unit_se=0.2)
    assert w == (0.0, 1.0)
    # The raw scores stay in the table (the self-estimate reports them).
    assert table[w0][0] == pytest.approx(table[(0.0, 1.0)][0] + gain)
    w, _ = fusion.choose_weights([net, teacher], y, K, unit_se=0.02)
    assert w[0] >= 0.3
    # The cost is on the network's share only: the teacher and another classical part
    # (here the teacher again) still blend freely.
    w3, _ = fusion.choose_weights([net, teacher, teacher], y, K, unit_se=0.2)
    assert w3[0] == 0.0 and w3[1] > 0 and w3[2] > 0


def test_a_network_far_better_than_one_unit_standard_error_keeps_its_weight():
    rng = np.random.default_rng(3)
    K = 2
    y = rng.integers(1, K + 1, 2000)
    good, bad = _probs(y, K, 0.95, rng), _probs(y, K, 0.7, rng)
    w, table = fusion.choose_weights([good, bad], y, K, unit_se=0.05)
    assert w[0] >= 0.5
    assert table[w][0] >= table[(0.0, 1.0)][0] + 0.1


def test_unit_standard_error_is_the_spread_of_unit_scores_over_root_units():
    scores = np.array([0.47, 0.62, 0.70])
    se = fusion.unit_standard_error(scores, 1)
    assert se == pytest.approx(np.std(scores, ddof=1))
    assert fusion.unit_standard_error(scores, 4) == pytest.approx(se / 2)
    assert fusion.unit_standard_error(scores[:2], 1) == 0.0   # two units: no spread to go by


def test_unit_scores_leave_out_units_of_one_class():
    K = 2
    y = np.array([1, 1, 2, 2, 1, 1, 1, 2, 2, 2])
    unit = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    p = np.zeros((len(y), K), np.float32)
    p[np.arange(len(y)), y - 1] = 1.0
    p[2] = [1.0, 0.0]                              # one error on unit 0
    sc = fusion.unit_scores(p, y, unit, K)
    assert len(sc) == 1                             # units 1 and 2 hold one class each
    assert sc[0] == pytest.approx(np.mean([2 * 2 / (2 + 3), 2 * 1 / (1 + 2)]))
    ids = fusion.unit_ids([np.pad(np.ones((1, 2, 2), np.uint8), ((0, 2), (0, 0), (0, 0))),
                           np.ones((1, 2, 2), np.uint8)], dims=2)
    assert ids[0][0].max() == 0 and (ids[0][1:] == -1).all() and (ids[1] == 1).all()
