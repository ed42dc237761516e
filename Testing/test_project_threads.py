"""Threads of one process: storing and reading labels, adding images and predicting with the last
saved model do not wait for a running training round, which trains on the snapshot it took when
it started; a second round waits for the first without counting the wait in its budget."""

from __future__ import annotations

import threading
import time

import numpy as np

from helpers_engine import make_square_project, square_image, square_strokes, tiny_models  # noqa: F401


def test_labels_images_and_prediction_do_not_wait_for_a_running_round(tmp_path, tiny_models):
    proj, image_id, _ = make_square_project(tmp_path / "p")
    proj.train(steps=2, device="cpu", pseudo_labels=False)
    old_counts = proj.image_info(image_id)["labeled_pixels"]

    stepping, stop, results = threading.Event(), threading.Event(), {}

    def on_progress(p):
        if p.phase == "train":
            stepping.set()

    def train():
        results["round"] = proj.train(time_budget_s=120, device="cpu", cancel=stop,
                                      progress=on_progress, pseudo_labels=False)
    th = threading.Thread(target=train)
    th.start()
    try:
        assert stepping.wait(120), "the round never started stepping"
        took = {}
        t = time.perf_counter()
        more = square_strokes(64)
        more[30:34, 2:60] = 2
        proj.set_labels(image_id, more)
        took["set_labels"] = time.perf_counter() - t
        t = time.perf_counter()
        np.testing.assert_array_equal(proj.labels(image_id).reshape(more.shape), more)
        took["labels"] = time.perf_counter() - t
        t = time.perf_counter()
        new_id = proj.add_image(square_image(64, seed=3)[0], name="later")
        took["add_image"] = time.perf_counter() - t
        t = time.perf_counter()
        during = proj.predict(image_id, save=False, keep_strokes=False)
        took["predict"] = time.perf_counter() - t
        assert th.is_alive(), "the round ended before the checks: they prove nothing"
    finally:
        stop.set()
        th.join(60)
    assert all(v < 5.0 for v in took.values()), took
    # The prediction came from the last saved model (round 1), not the one being trained.
    np.testing.assert_array_equal(during, proj.predict(image_id, round=1, save=False,
                                                       keep_strokes=False))
    # The round trained on the labels it read when it started; the next one gets the new ones.
    entry = proj.rounds[-1]
    assert entry["round"] == 2 == results["round"].round
    assert entry["labeled_pixels"] == old_counts
    assert new_id in proj.image_ids
    proj.train(steps=1, device="cpu", pseudo_labels=False)
    assert proj.rounds[-1]["labeled_pixels"] == proj.image_info(image_id)["labeled_pixels"] \
        != old_counts


def test_a_second_round_waits_without_counting_the_wait_in_its_budget(tmp_path, tiny_models):
    proj, _, _ = make_square_project(tmp_path / "p")
    stepping, stop, out = threading.Event(), threading.Event(), {}

    def first():
        out["first"] = proj.train(time_budget_s=120, device="cpu", cancel=stop,
                                  progress=lambda p: stepping.set(), pseudo_labels=False)

    def second():
        t = time.perf_counter()
        out["second"] = proj.train(steps=2, device="cpu", pseudo_labels=False)
        out["second_wall"] = time.perf_counter() - t
    a = threading.Thread(target=first)
    a.start()
    assert stepping.wait(120)
    b = threading.Thread(target=second)
    b.start()
    time.sleep(3.0)                       # the second round is waiting all this time
    assert b.is_alive() and "second" not in out
    stop.set()
    a.join(60)
    b.join(120)
    assert out["first"].round == 1 and out["second"].round == 2
    assert out["second_wall"] > 3.0 > out["second"].seconds, out
