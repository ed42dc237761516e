"""The built-in demo: synthetic histology-like tiles made on the fly (no download), simulated
strokes, two rounds of train -> predict -> correct, with Dice, overlays and class fractions."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

CLASSES = ["collagen", "cell", "background"]
COLORS = [(230, 120, 170), (90, 60, 200), (235, 235, 235)]


def synthetic_tile(size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 (Y, X, 3) tile and its reference labels (1 collagen, 2 cell, 3 background).

    Collagen is a band of oriented fibres, cells are purple ellipses with dark nuclei, the rest
    is pale background; all three carry texture and noise, so intensity alone does not separate
    them and the network has to learn shape and context.
    """
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ref = np.full((size, size), 3, dtype=np.uint8)
    # Collagen: a meandering band of oriented fibres.
    angle = rng.uniform(0, np.pi)
    ux, uy = np.cos(angle), np.sin(angle)
    along = xx * ux + yy * uy
    across = -xx * uy + yy * ux
    centre = across.mean() + rng.uniform(-size / 6, size / 6)
    wiggle = 12 * np.sin(along / rng.uniform(20, 40))
    band = np.abs(across - centre - wiggle) < rng.uniform(size / 8, size / 5)
    ref[band] = 1
    fibres = 0.5 + 0.5 * np.sin(across / 2.5 + ndi.gaussian_filter(rng.normal(size=(size, size)), 4) * 6)
    # Cells: ellipses outside the band.
    cells = np.zeros((size, size), bool)
    nuclei = np.zeros((size, size), bool)
    for _ in range(int(size * size / 2500)):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(7, 14, 2)
        e = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        cell = (e < 1) & ~band
        cells |= cell
        nuclei |= (e < 0.3) & ~band
    ref[cells] = 2
    img = np.empty((size, size, 3), np.float32)
    base = {1: (225, 130, 170), 2: (150, 110, 200), 3: (238, 232, 238)}
    for k, col in base.items():
        img[ref == k] = col
    img[band] -= (fibres[band, None] * np.array([40, 50, 30], np.float32))
    img[nuclei] = (70, 40, 120)
    img += ndi.gaussian_filter(rng.normal(0, 25, (size, size, 3)), (1.2, 1.2, 0))
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), ref


def overlay_png(path: Path, image: np.ndarray, labels: np.ndarray, colors, alpha: float = 0.45) -> None:
    """Save an RGB overlay of ``labels`` (Y, X) on ``image`` (Y, X[, C]) as PNG."""
    from PIL import Image

    from semsegloop.data.atomic import atomic_path

    img = image.astype(np.float32)
    if img.ndim == 2 or img.shape[-1] == 1:
        img = np.repeat(img.reshape(img.shape[0], img.shape[1], 1), 3, axis=2)
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / max(hi - lo, 1e-6) * 255
    lut = np.zeros((256, 3), np.float32)
    for k, c in enumerate(colors, start=1):
        lut[k] = c
    col = lut[labels]
    m = (labels > 0)[..., None]
    out = np.where(m, (1 - alpha) * img + alpha * col, img)
    with atomic_path(path) as tmp:
        Image.fromarray(out.clip(0, 255).astype(np.uint8)).save(tmp, format="PNG")


def run_demo(out_dir, n_images: int = 6, n_painted: int = 2, size: int = 256,
             seconds: float = 20.0, seed: int = 0, device: str = "auto",
             progress_factory: Callable | None = None, echo: Callable[[str], None] = print) -> dict:
    """Round 0: strokes on ``n_painted`` tiles, train, predict all. Round 1: add corrections on
    the painted tiles where round 0 was wrong, train again (warm start), predict all.
    Returns {"dice": [round0, round1], "fractions_csv", "overlays", "project"}."""
    from semsegloop.project import Project
    from semsegloop.measure.metrics import dice_per_class
    from semsegloop.measure.simulate import simulate_correction, simulate_strokes

    out_dir = Path(out_dir)
    proj_dir = out_dir / "project"
    if (proj_dir / "project.json").exists():
        raise FileExistsError(f"'{proj_dir}' already holds a demo project; choose another --out")
    proj = Project.create(proj_dir, CLASSES, dims=2, colors=COLORS)
    tiles = [synthetic_tile(size, seed + i) for i in range(n_images)]
    ids = [proj.add_image(img, name=f"tile_{i + 1:02d}") for i, (img, _) in enumerate(tiles)]
    refs = {i: ref for i, (_, ref) in zip(ids, tiles)}  # (Y, X), as predict returns them
    painted = ids[:n_painted]
    for n, i in enumerate(painted):
        proj.set_labels(i, simulate_strokes(refs[i], len(CLASSES), seed=seed + n, dims=2))
    echo(f"SemSegLoop demo: {n_images} synthetic tiles {size}x{size}, strokes on {n_painted}, "
         f"{seconds:g} s of training per round -> {out_dir}")
    dice_rounds = []
    for rnd in range(2):
        if rnd == 1:
            for n, i in enumerate(painted):
                pred = proj.saved_prediction(i)
                proj.set_labels(i, simulate_correction(proj.labels(i), pred, refs[i], dims=2,
                                                       seed=seed + n))
        bar = progress_factory(f"round {rnd} train", seconds) if progress_factory else None
        t0 = time.perf_counter()
        res = proj.train(time_budget_s=seconds, device=device, seed=seed,
                         progress=(lambda p: bar(p)) if bar else None)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = []
        for i in ids:
            pred = proj.predict(i, device=device)
            if i not in painted:
                scores.append(dice_per_class(pred, refs[i], len(CLASSES)))
        pred_s = time.perf_counter() - t0
        mean = np.nanmean(np.stack(scores), axis=0)
        dice_rounds.append({c: float(v) for c, v in zip(CLASSES, mean)})
        echo(f"round {rnd}: {res.steps} steps in {train_s:.1f} s, predicted {len(ids)} tiles in "
             f"{pred_s:.1f} s; Dice on unseen tiles: " +
             ", ".join(f"{c} {v:.3f}" for c, v in dice_rounds[-1].items()))
    overlays = []
    for i, (img, _) in zip(ids, tiles):
        p = out_dir / "overlays" / f"{i}.png"
        overlay_png(p, img, proj.saved_prediction(i), COLORS)
        overlays.append(p)
    csv = out_dir / "class_fractions.csv"
    proj.class_fractions(csv_path=csv)
    echo(f"wrote {len(overlays)} overlays to {out_dir / 'overlays'} and {csv}")
    return {"dice": dice_rounds, "fractions_csv": csv, "overlays": overlays, "project": proj_dir}
