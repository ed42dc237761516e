"""Grow from seeds (Slicer's GrowCut): a 2D image grown with the 3-slice stack's outer slices
masked out gives the labels of the unmasked stack, which is what it is grown as."""

from __future__ import annotations

import numpy as np
import pytest

from helpers_engine import square_image, square_strokes


def test_a_2d_image_grows_as_its_unmasked_three_slice_stack():
    from semsegloop.learn import seeded

    if not seeded.available():
        pytest.skip("Slicer's GrowCut (slicer-core) is not installed")
    img, ref = square_image(96, seed=3, lo=20, hi=70)
    seeds = square_strokes(96)
    got = seeded.grow_from_seeds(img[None, :, :, None], seeds[None], 2)[0]
    stack = np.repeat(img[None].astype(np.float32), 3, axis=0)
    plain = seeded.grow(stack, np.repeat(seeds[None], 3, axis=0), (1.0, 1.0, 1.0))[1]
    assert (got == plain).mean() > 0.999
    inner = (slice(1, -1), slice(1, -1))  # the filter's border pixels are never grown
    assert (got[inner] == ref[inner]).mean() > 0.95


def test_ready_waits_for_a_warm_up_under_way_only_when_asked():
    """A round without a time budget asks ``ready(wait=True)``: it must not depend on how
    fast Slicer's import ran beside it."""
    import threading
    import time

    from semsegloop.learn import seeded

    saved = dict(seeded._loading)
    done = threading.Event()
    t = threading.Thread(target=lambda: (time.sleep(0.5), done.set()), daemon=True)
    try:
        seeded._loading["thread"] = t
        t.start()
        assert seeded.ready() is False          # still loading: not waited for
        seeded.ready(wait=True)
        assert done.is_set()                    # waited until the warm-up finished
    finally:
        seeded._loading.clear()
        seeded._loading.update(saved)
