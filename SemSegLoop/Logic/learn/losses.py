"""Losses for sparse labels: masked cross-entropy on painted pixels plus an intensity-gated
pairwise (CRF-style) term on all pixels that spreads the strokes' classes along image edges.

Why the pairwise term: with strokes covering ~1% of the pixels, masked CE alone leaves the
network free to place boundaries anywhere between strokes; the relaxed Potts energy
sum_pq w_pq (1 - <s_p, s_q>), with w_pq large for similar neighbouring intensities, asks
neighbours that look alike to share a class, so boundaries settle on image edges
(Tang et al., "On Regularized Losses for Weakly-supervised CNN Segmentation", ECCV 2018;
Obukhov et al., "Gated CRF Loss", 2019). It needs no extra labels and costs a few shifted
products per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                         class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """CE over painted pixels only.

    logits (B, K, *spatial); labels (B, *spatial) int64 with 0 = unlabeled, k = class k.
    Returns 0 (with a graph) when nothing in the batch is painted.
    """
    target = labels.long() - 1
    target[labels == 0] = IGNORE
    if not bool((target != IGNORE).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target, weight=class_weights, ignore_index=IGNORE)


def _shifts(dims: int, radii: tuple[int, ...], in_plane_only: bool) -> list[tuple[int, ...]]:
    """Half of the neighbourhood offsets (the other half is symmetric) at several radii."""
    base2 = [(0, 1), (1, 0), (1, 1), (1, -1)]
    out = []
    for r in radii:
        if dims == 2:
            out += [(a * r, b * r) for a, b in base2]
        else:
            out += [(0, a * r, b * r) for a, b in base2]
            if not in_plane_only:
                out.append((r, 0, 0))
    return out


def pairwise_potts_loss(probs: torch.Tensor, image: torch.Tensor, sigma: float = 0.15,
                        radii: tuple[int, ...] = (1, 2, 4),
                        in_plane_only: bool = False) -> torch.Tensor:
    """Relaxed Potts energy with intensity-gated weights, averaged over pixel pairs.

    probs (B, K, *spatial) softmax outputs; image (B, C, *spatial) normalised input.
    Weights w = exp(-|I_p - I_q|^2 / (2 sigma^2)) with intensities scaled per patch to unit
    spread, so sigma means the same on CT, EM and RGB. ``in_plane_only`` skips the thick axis
    of anisotropic volumes, where neighbours across slices are far apart.
    """
    dims = probs.dim() - 2
    img = image.float()
    # Per-sample robust scale, so sigma is independent of the normalisation method.
    flat = img.flatten(1)
    scale = flat.std(dim=1).clamp_min(1e-3).view(-1, *([1] * (img.dim() - 1)))
    img = img / scale
    total = probs.new_zeros(())
    count = 0
    for shift in _shifts(dims, radii, in_plane_only):
        p_a, p_b = _overlap(probs, shift)
        with torch.no_grad():  # the gate depends on the image only
            i_a, i_b = _overlap(img, shift)
            w = torch.exp(((i_a - i_b) ** 2).sum(dim=1) * (-0.5 / sigma ** 2))
        agree = (p_a * p_b).sum(dim=1)
        total = total + (w * (1.0 - agree)).mean()
        count += 1
    return total / max(count, 1)


def _overlap(t: torch.Tensor, shift: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views of ``t`` whose pixels are ``shift`` apart (no wrap-around)."""
    sl_a, sl_b = [slice(None), slice(None)], [slice(None), slice(None)]
    for s in shift:
        if s > 0:
            sl_a.append(slice(s, None))
            sl_b.append(slice(None, -s))
        elif s < 0:
            sl_a.append(slice(None, s))
            sl_b.append(slice(-s, None))
        else:
            sl_a.append(slice(None))
            sl_b.append(slice(None))
    return t[tuple(sl_a)], t[tuple(sl_b)]


def entropy_loss(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean prediction entropy on unpainted pixels (pushes decisions away from 50/50)."""
    ent = -(probs * torch.log(probs.clamp_min(1e-6))).sum(dim=1)
    mask = labels == 0
    if not bool(mask.any()):
        return ent.sum() * 0.0
    return ent[mask].mean()


class SparseLabelLoss:
    """Masked CE on strokes + lambda_pseudo * masked CE on the teacher's pseudo-labels
    + lambda_pair * gated Potts + lambda_ent * entropy.

    The unsupervised terms ramp up over ``warmup_steps`` so the first steps learn the strokes
    before the regulariser has anything meaningful to propagate.
    """

    def __init__(self, pairwise_weight: float = 1.0, entropy_weight: float = 0.0,
                 sigma: float = 0.15, warmup_steps: int = 30, in_plane_only: bool = False,
                 class_weights: torch.Tensor | None = None, image_channels: int | None = None,
                 pseudo_weight: float = 1.0):
        self.pseudo_weight = pseudo_weight
        self.image_channels = image_channels  # the gate looks at the image, not derived features
        self.pairwise_weight = pairwise_weight
        self.entropy_weight = entropy_weight
        self.sigma = sigma
        self.warmup_steps = max(1, warmup_steps)
        self.in_plane_only = in_plane_only
        self.class_weights = class_weights

    def __call__(self, logits, labels, image, step: int) -> tuple[torch.Tensor, dict]:
        """``labels`` (B, *spatial) strokes, or (B, 2, *spatial) strokes and pseudo-labels."""
        pseudo = None
        if labels.dim() == logits.dim():
            labels, pseudo = labels[:, 0], labels[:, 1]
        ce = masked_cross_entropy(logits, labels, self.class_weights)
        parts = {"ce": float(ce.detach())}
        loss = ce
        if pseudo is not None and self.pseudo_weight > 0:
            # The person's strokes win where both exist.
            pl = masked_cross_entropy(logits, torch.where(labels > 0, 0, pseudo), self.class_weights)
            loss = loss + self.pseudo_weight * pl
            parts["pseudo"] = float(pl.detach())
        ramp = min(1.0, step / self.warmup_steps)
        if self.pairwise_weight > 0 or self.entropy_weight > 0:
            probs = torch.softmax(logits.float(), dim=1)
            if self.pairwise_weight > 0:
                img = image[:, :self.image_channels] if self.image_channels else image
                pw = pairwise_potts_loss(probs, img, self.sigma, in_plane_only=self.in_plane_only)
                loss = loss + ramp * self.pairwise_weight * pw
                parts["pairwise"] = float(pw.detach())
            if self.entropy_weight > 0:
                en = entropy_loss(probs, labels)
                loss = loss + ramp * self.entropy_weight * en
                parts["entropy"] = float(en.detach())
        return loss, parts
