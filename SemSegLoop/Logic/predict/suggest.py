"""Where to paint next: rank unpainted images of a collection, or unpainted slices of a volume,
by the model's uncertainty (mean normalised entropy), best first, spread out along a volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Suggestion:
    image_id: str
    slice: int | None     # None: the whole image; else the index along the first axis
    score: float          # mean uncertainty, 0 = sure .. 1 = undecided

    def to_json(self) -> dict:
        return {"image_id": self.image_id, "slice": self.slice, "score": round(self.score, 6)}


def image_scores(entropy: dict[str, np.ndarray]) -> list[Suggestion]:
    """One score per image: its mean entropy."""
    return [Suggestion(i, None, float(np.mean(e, dtype=np.float64))) for i, e in entropy.items()]


def slice_scores(image_id: str, entropy: np.ndarray, labels: np.ndarray) -> list[Suggestion]:
    """One score per unpainted slice (first axis) of an (S, Y, X) entropy map."""
    painted = labels.reshape(labels.shape[0], -1).any(axis=1)
    means = entropy.reshape(entropy.shape[0], -1).astype(np.float64).mean(axis=1)
    return [Suggestion(image_id, int(s), float(means[s])) for s in np.flatnonzero(~painted)]


def top(candidates: list[Suggestion], n: int, min_gap: int = 0,
        painted: dict[str, set[int]] | None = None) -> list[Suggestion]:
    """The ``n`` most uncertain candidates; slices of one image at least ``min_gap`` apart (from
    each other and from painted slices), since neighbouring slices look alike and teach the
    same thing twice."""
    chosen: list[Suggestion] = []
    taken = {k: set(v) for k, v in (painted or {}).items()}
    for c in sorted(candidates, key=lambda c: (-c.score, c.image_id, c.slice or 0)):
        if len(chosen) >= n:
            break
        if c.slice is not None and min_gap > 0:
            near = taken.get(c.image_id, set())
            if any(abs(c.slice - s) < min_gap for s in near):
                continue
            taken.setdefault(c.image_id, set()).add(c.slice)
        chosen.append(c)
    return chosen
