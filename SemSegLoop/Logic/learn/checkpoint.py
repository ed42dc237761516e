"""Model checkpoints as a safetensors weights file plus a JSON metadata file, written atomically,
checksummed, with the previous checkpoint kept so a damaged or interrupted save never loses a model.

Layout in ``directory``: ``<name>.safetensors`` + ``<name>.json`` (current) and
``<name>.prev.safetensors`` + ``<name>.prev.json`` (the one before). The JSON holds the caller's
metadata plus ``format``, ``version``, ``sha256`` (of the weights file) and ``tensors`` (count),
so a weights file that does not belong to its JSON is detected. Weights are only ever read with
``safetensors``: loading a checkpoint cannot execute code stored in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from semsegloop.data.atomic import _fsync_dir, make_temp, write_point
from semsegloop.errors import CheckpointError

FORMAT = "semsegloop-checkpoint"
VERSION = 1
RESERVED_KEYS = ("format", "version", "sha256", "tensors")
PREVIOUS_SUFFIX = ".prev"

log = logging.getLogger(__name__)


def checkpoint_exists(directory: str | os.PathLike, name: str) -> bool:
    """True when ``<name>`` or its kept previous version has both of its files, i.e. when
    ``load_checkpoint(..., fallback=True)`` has something to try (a save interrupted between
    its renames can leave only the previous one)."""
    directory = Path(directory)
    _check_name(name)
    return any(_paths(directory, n)[0].is_file() and _paths(directory, n)[1].is_file()
               for n in (name, name + PREVIOUS_SUFFIX))


def save_checkpoint(directory: str | os.PathLike, name: str, state_dict: Mapping[str, Any],
                    meta: Mapping[str, Any]) -> Path:
    """Write ``state_dict`` and ``meta`` as checkpoint ``name``; return the weights path.

    Both new files are written completely to temporary names first, so a failure there (disk
    full) leaves the existing checkpoint untouched. A current checkpoint that verifies is then
    renamed to ``<name>.prev``; a damaged one is overwritten so it never replaces a good
    previous one. If a rename fails, the renames already made are undone.
    """
    from safetensors.torch import save as st_save

    directory = Path(directory)
    _check_name(name)
    user_meta = _jsonable_meta(meta)
    tensors = _prepare_tensors(state_dict)
    try:
        payload = st_save(tensors, metadata={"format": FORMAT})
    except Exception as exc:  # safetensors raises plain ValueError/RuntimeError subclasses
        raise CheckpointError(f"Cannot serialise the weights of checkpoint '{name}': {exc}") from exc
    record = dict(user_meta)
    record.update(format=FORMAT, version=VERSION, sha256=hashlib.sha256(payload).hexdigest(),
                  tensors=len(tensors))
    json_text = json.dumps(record, indent=2, sort_keys=True)

    weights, meta_path = _paths(directory, name)
    prev_weights, prev_meta = _paths(directory, name + PREVIOUS_SUFFIX)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"Cannot create checkpoint folder {directory}: "
                              f"{exc.strerror or exc}") from exc

    tmp_files: list[Path] = []
    done: list[tuple[Path, Path]] = []
    try:
        tmp_weights = _write_tmp(directory, name, ".safetensors", payload, tmp_files)
        tmp_meta = _write_tmp(directory, name, ".json", json_text.encode("utf-8"), tmp_files)
        moves = []
        if weights.is_file() and meta_path.is_file() and _verifies(directory, name):
            moves += [(weights, prev_weights), (meta_path, prev_meta)]
        # Weights before JSON: until the new JSON lands, the current pair fails its checksum
        # (or is missing), so a crash here falls back to .prev rather than a mismatched pair.
        moves += [(tmp_weights, weights), (tmp_meta, meta_path)]
        write_point(f"written {tmp_weights.name} and {tmp_meta.name}")
        for src, dst in moves:
            os.replace(src, dst)
            done.append((src, dst))
            write_point(f"renamed {src.name} to {dst.name}")
        _fsync_dir(directory)
    except BaseException as exc:
        for src, dst in reversed(done):
            with contextlib.suppress(OSError):
                os.replace(dst, src)
        if not isinstance(exc, OSError):
            raise
        raise CheckpointError(f"Could not save checkpoint {weights}: {exc.strerror or exc}. "
                              f"The previous checkpoint files were left in place.") from exc
    finally:
        for tmp in tmp_files:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return weights


def load_checkpoint(directory: str | os.PathLike, name: str, map_location="cpu",
                    fallback: bool = False) -> tuple[dict, dict]:
    """Return ``(state_dict, meta)`` of checkpoint ``name`` after verifying it.

    ``meta`` is the dict given to :func:`save_checkpoint` (without the reserved bookkeeping
    keys). With ``fallback=True`` a damaged or missing ``<name>`` is reported as a warning and
    ``<name>.prev`` is loaded instead; only if both fail is a CheckpointError raised.
    """
    directory = Path(directory)
    _check_name(name)
    try:
        return _load_one(directory, name, map_location)
    except CheckpointError as first:
        if not fallback:
            raise
        try:
            result = _load_one(directory, name + PREVIOUS_SUFFIX, map_location)
        except CheckpointError as second:
            raise CheckpointError(f"Neither checkpoint '{name}' nor its previous version could "
                                  f"be loaded. Current: {first} Previous: {second}") from second
        log.warning("Checkpoint %s could not be loaded (%s); using the previous checkpoint %s "
                    "instead.", _paths(directory, name)[0], first,
                    _paths(directory, name + PREVIOUS_SUFFIX)[0])
        return result


# ---------------------------------------------------------------------------------------------

def _paths(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / f"{name}.safetensors", directory / f"{name}.json"


def _check_name(name: str) -> None:
    if (not isinstance(name, str) or not name or name.startswith(".") or "/" in name
            or "\\" in name or "\0" in name):
        raise CheckpointError(f"Checkpoint name {name!r} is not a plain file name.")


def _read_record(directory: Path, name: str) -> tuple[dict, Path]:
    weights, meta_path = _paths(directory, name)
    if not meta_path.is_file():
        if weights.is_file():
            raise CheckpointError(f"Checkpoint metadata file {meta_path} is missing "
                                  f"(its weights file {weights.name} exists).")
        raise CheckpointError(f"No checkpoint '{name}' in {directory} ({meta_path.name} "
                              f"is missing).")
    try:
        record = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"Checkpoint metadata file {meta_path} is damaged or unreadable: "
                              f"{exc}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a SemSegLoop checkpoint file "
                              f"(format {record.get('format') if isinstance(record, dict) else None!r}).")
    version = record.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"Checkpoint metadata file {meta_path} has an invalid version "
                              f"{version!r}.")
    if version > VERSION:
        raise CheckpointError(f"Checkpoint {meta_path} was written by a newer SemSegLoop "
                              f"(version {version}; this one reads up to {VERSION}). "
                              f"Update SemSegLoop to use it.")
    if not isinstance(record.get("sha256"), str) or not isinstance(record.get("tensors"), int):
        raise CheckpointError(f"Checkpoint metadata file {meta_path} lacks its sha256 or "
                              f"tensor count.")
    if not weights.is_file():
        raise CheckpointError(f"Checkpoint weights file {weights} is missing.")
    return record, weights


def _verifies(directory: Path, name: str) -> bool:
    try:
        record, weights = _read_record(directory, name)
        return _sha256(weights) == record["sha256"]
    except (CheckpointError, OSError):
        return False


def _load_one(directory: Path, name: str, map_location) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    record, weights = _read_record(directory, name)
    try:
        digest = _sha256(weights)
    except OSError as exc:
        raise CheckpointError(f"Cannot read checkpoint weights file {weights}: "
                              f"{exc.strerror or exc}") from None
    if digest != record["sha256"]:
        raise CheckpointError(f"Checkpoint weights file {weights} is damaged or does not belong "
                              f"to {weights.with_suffix('.json').name} (checksum mismatch).")
    device = str(map_location) if map_location is not None else "cpu"
    try:
        state = load_file(str(weights), device=device)
    except Exception as exc:  # safetensors' errors are not a common exception type
        raise CheckpointError(f"Checkpoint weights file {weights} cannot be read: {exc}") from None
    if len(state) != record["tensors"]:
        raise CheckpointError(f"Checkpoint weights file {weights} holds {len(state)} tensors; "
                              f"its metadata says {record['tensors']}.")
    meta = {k: v for k, v in record.items() if k not in RESERVED_KEYS}
    return state, meta


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_tmp(directory: Path, name: str, suffix: str, data: bytes, created: list[Path]) -> Path:
    fd, tmp_path = make_temp(directory, f"{name}.tmp", suffix)
    created.append(tmp_path)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp_path


def _prepare_tensors(state_dict: Mapping[str, Any]) -> dict:
    import torch

    if not isinstance(state_dict, Mapping) or not state_dict:
        raise CheckpointError("A checkpoint needs a non-empty state dict of named tensors.")
    out = {}
    seen_storage: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise CheckpointError(f"Checkpoint tensor name {key!r} is not a string.")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"Checkpoint entry '{key}' is a {type(value).__name__}, "
                                  f"not a tensor.")
        t = value.detach().cpu().contiguous()
        storage = t.untyped_storage()
        # safetensors refuses tensors that share or only partly cover a storage (tied weights,
        # views); copying those gives each tensor its own buffer.
        if storage.data_ptr() in seen_storage or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen_storage.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _jsonable_meta(meta: Mapping[str, Any]) -> dict:
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"Checkpoint metadata must be a dict; got {type(meta).__name__}.")
    clash = [k for k in RESERVED_KEYS if k in meta]
    if clash:
        raise CheckpointError(f"Checkpoint metadata may not use the reserved keys {clash}.")
    return _to_json(meta, "meta")


def _to_json(value: Any, where: str) -> Any:
    """Plain JSON types; numpy scalars/arrays and tuples are converted, anything else refused."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, float):
        return float(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, np.generic):
        return _to_json(value.item(), where)
    if isinstance(value, np.ndarray):
        return _to_json(value.tolist(), where)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"Checkpoint metadata key {k!r} in {where} is not a string.")
            out[k] = _to_json(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise CheckpointError(f"Checkpoint metadata {where} is a {type(value).__name__}, which cannot "
                          f"be stored as JSON; convert it to a number, string, list or dict.")
