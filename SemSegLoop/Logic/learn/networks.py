"""Network presets (JSON files in models/) and the UNet built from them.

A preset says what the person chooses (width, patch, batch); the plan derived from the image
spacing says what the data dictates (which axes may be downsampled, kernel shapes)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from semsegloop.errors import TrainingError

PRESET_KEYS = {"name", "description", "dims", "network", "filters", "patch_size", "batch_size",
               "learning_rate", "norm"}
DEFAULT_PRESET = {2: "unet2d_fast", 3: "unet3d"}
# Smallest rows/columns an image may have: the plan halves a side at least twice, and a
# deepest level of one pixel leaves instance normalisation nothing to normalise.
MIN_IMAGE_SIDE = 4


def preset_dirs() -> list[Path]:
    """Where presets are looked up, first match wins.

    $SEMSEGLOOP_MODELS_DIR, the repository's models/ (source checkout, editable install) and the
    module's Resources/Models (where the Slicer extension build copies them).
    """
    logic = Path(__file__).resolve().parent.parent  # SemSegLoop/Logic
    dirs = []
    if os.environ.get("SEMSEGLOOP_MODELS_DIR"):
        dirs.append(Path(os.environ["SEMSEGLOOP_MODELS_DIR"]))
    dirs += [logic.parent.parent / "models", logic.parent / "Resources" / "Models"]
    return [d for d in dirs if d.is_dir()]


def list_presets() -> dict[str, dict]:
    presets = {}
    for d in reversed(preset_dirs()):
        for f in sorted(d.glob("*.json")):
            presets[f.stem] = _read_preset(f)
    return presets


def load_preset(name: str) -> dict:
    for d in preset_dirs():
        f = d / f"{name}.json"
        if f.is_file():
            return _read_preset(f)
    known = ", ".join(sorted(list_presets())) or "none found"
    raise TrainingError(f"network preset '{name}' not found (known presets: {known})")


def _read_preset(path: Path) -> dict:
    try:
        preset = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TrainingError(f"cannot read network preset '{path}': {e}") from e
    missing = {"dims", "filters", "patch_size", "batch_size"} - set(preset)
    if missing:
        raise TrainingError(f"network preset '{path}' lacks {sorted(missing)}")
    unknown = set(preset) - PRESET_KEYS
    if unknown:
        raise TrainingError(f"network preset '{path}' has unknown keys {sorted(unknown)}")
    if preset["dims"] not in (2, 3) or len(preset["patch_size"]) != preset["dims"]:
        raise TrainingError(f"network preset '{path}': dims must be 2 or 3 and patch_size must "
                            f"have that many entries")
    preset.setdefault("name", path.stem)
    preset.setdefault("network", "DynUNet")
    preset.setdefault("learning_rate", 0.003)
    preset.setdefault("norm", "instance")
    return preset


@dataclass
class NetworkPlan:
    """Everything needed to rebuild the network; stored in each checkpoint's JSON."""
    dims: int
    in_channels: int
    out_channels: int
    filters: list[int]
    kernel_size: list[list[int]]
    strides: list[list[int]]
    patch_size: list[int]
    norm: str = "instance"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "NetworkPlan":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def divisor(self) -> list[int]:
        """Per-axis factor every input size must be a multiple of."""
        div = [1] * self.dims
        for s in self.strides:
            div = [a * b for a, b in zip(div, s)]
        return div


def plan_network(preset: dict, in_channels: int, out_channels: int,
                 spacing: tuple[float, ...] | None = None,
                 image_shape: tuple[int, ...] | None = None) -> NetworkPlan:
    """Choose per-level strides and kernels from the voxel spacing (nnU-Net's rule).

    An axis is downsampled only while its spacing is at most twice the finest one, and it gets
    in-plane-only kernels (size 1) while it is that coarse, so a 0.8x0.8x6.5 mm volume keeps its
    few thick slices instead of pooling them away. The patch never exceeds the image by more
    than one divisor step, so small images train on (nearly) their whole extent.
    """
    dims = preset["dims"]
    levels = len(preset["filters"]) - 1
    sp = list(spacing[-dims:]) if spacing is not None else [1.0] * dims
    sp = [float(s) if s and s > 0 else 1.0 for s in sp]
    patch = list(preset["patch_size"])
    if image_shape is not None:
        shape = list(image_shape[-dims:])
    else:
        shape = patch
    strides, kernels = [[1] * dims], []
    cur = sp[:]
    size = [max(8, min(p, _ceil_to(s, 8))) for p, s in zip(patch, shape)]
    room = size[:]
    for _ in range(levels + 1):
        finest = min(cur)
        kernels.append([3 if c <= 2 * finest else 1 for c in cur])
    # Strides, level by level, with the spacing doubling on each downsampled axis.
    for level in range(levels):
        finest = min(cur)
        st = [2 if (c <= 2 * finest and r >= 8) else 1 for c, r in zip(cur, room)]
        strides.append(st)
        cur = [c * s for c, s in zip(cur, st)]
        room = [r // s for r, s in zip(room, st)]
        kernels[level + 1] = [3 if c <= 2 * min(cur) else 1 for c in cur]
    div = [1] * dims
    for s in strides:
        div = [a * b for a, b in zip(div, s)]
    size = [_ceil_to(p, d) for p, d in zip(size, div)]
    return NetworkPlan(dims=dims, in_channels=int(in_channels), out_channels=int(out_channels),
                       filters=list(preset["filters"]), kernel_size=kernels, strides=strides,
                       patch_size=size, norm=preset.get("norm", "instance"))


def build_network(plan: NetworkPlan):
    """The MONAI DynUNet for a plan: (B, C_in, *spatial) -> logits (B, K, *spatial)."""
    from monai.networks.nets import DynUNet

    return DynUNet(spatial_dims=plan.dims, in_channels=plan.in_channels,
                   out_channels=plan.out_channels, kernel_size=plan.kernel_size,
                   strides=plan.strides, upsample_kernel_size=plan.strides[1:],
                   filters=plan.filters, norm_name=plan.norm, deep_supervision=False,
                   res_block=False)


def _ceil_to(x: int, m: int) -> int:
    return int(-(-int(x) // m) * m)
