"""Tests for semsegloop.learn.checkpoint: safetensors + JSON checkpoints, rotation to .prev, and
detection of and recovery from damaged files and failed saves."""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from semsegloop import CheckpointError
from semsegloop.learn import checkpoint as ckpt
from semsegloop.learn.checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint


def make_model(seed: int) -> torch.nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    # norm="batch" adds running stats and an int64 num_batches_tracked, so dtypes are exercised.
    return UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(8, 16), strides=(2,),
                norm="batch")


META = {"preset": "unet2d_fast", "classes": [{"name": "cell", "color": [255, 0, 0]}],
        "channels": 1, "normalization": {"mean": [0.25], "std": [1.5]}, "round": 1, "dims": 2,
        "spatial": {"patch": [64, 64], "spacing": [1.0, 0.5, 0.5]}, "note": None}


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def files_in(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_round_trip_identical_tensors_meta_and_outputs(tmp_path):
    model = make_model(0)
    model.train()
    model(torch.rand(2, 1, 32, 32))  # updates BatchNorm running stats away from their defaults
    state = model.state_dict()
    path = save_checkpoint(tmp_path, "model", state, META)
    assert path == tmp_path / "model.safetensors"
    assert files_in(tmp_path) == ["model.json", "model.safetensors"]

    loaded, meta = load_checkpoint(tmp_path, "model")
    assert_same_state(state, loaded)
    assert meta == META
    assert any(t.dtype == torch.int64 for t in loaded.values())

    record = json.loads((tmp_path / "model.json").read_text())
    assert record["format"] == "semsegloop-checkpoint" and record["version"] == 1
    assert record["tensors"] == len(state)

    fresh = make_model(1)
    fresh.load_state_dict(loaded)
    model.eval(), fresh.eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_second_save_keeps_previous(tmp_path):
    first = make_model(0).state_dict()
    second = make_model(1).state_dict()
    third = make_model(2).state_dict()
    save_checkpoint(tmp_path, "model", first, {"round": 1})
    save_checkpoint(tmp_path, "model", second, {"round": 2})
    assert files_in(tmp_path) == ["model.json", "model.prev.json", "model.prev.safetensors",
                                  "model.safetensors"]
    state, meta = load_checkpoint(tmp_path, "model")
    assert meta == {"round": 2}
    assert_same_state(second, state)
    state, meta = load_checkpoint(tmp_path, "model.prev")
    assert meta == {"round": 1}
    assert_same_state(first, state)

    save_checkpoint(tmp_path, "model", third, {"round": 3})
    assert load_checkpoint(tmp_path, "model")[1] == {"round": 3}
    assert load_checkpoint(tmp_path, "model.prev")[1] == {"round": 2}


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_damaged_weights_detected_and_fallback_uses_previous(tmp_path, caplog, damage):
    first = make_model(0).state_dict()
    save_checkpoint(tmp_path, "model", first, {"round": 1})
    save_checkpoint(tmp_path, "model", make_model(1).state_dict(), {"round": 2})
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(np.random.default_rng(0).bytes(len(data)))
    else:
        weights.unlink()

    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path, "model")

    with caplog.at_level(logging.WARNING, logger="semsegloop.learn.checkpoint"):
        state, meta = load_checkpoint(tmp_path, "model", fallback=True)
    assert meta == {"round": 1}
    assert_same_state(first, state)
    assert any("model.safetensors" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)


def test_unreadable_weights_with_matching_checksum(tmp_path):
    # A file whose checksum matches its JSON but is not safetensors must still fail cleanly
    # in the reader rather than crash or be trusted.
    save_checkpoint(tmp_path, "model", make_model(0).state_dict(), {"round": 1})
    weights = tmp_path / "model.safetensors"
    junk = b"\xff" * 64
    weights.write_bytes(junk)
    record = json.loads((tmp_path / "model.json").read_text())
    import hashlib
    record["sha256"] = hashlib.sha256(junk).hexdigest()
    (tmp_path / "model.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="model.safetensors.*cannot be read"):
        load_checkpoint(tmp_path, "model")


def test_corrupt_json_named_and_fallback(tmp_path):
    save_checkpoint(tmp_path, "model", make_model(0).state_dict(), {"round": 1})
    save_checkpoint(tmp_path, "model", make_model(1).state_dict(), {"round": 2})
    (tmp_path / "model.json").write_text('{"format": "semsegloop-checkpoint", "vers')
    with pytest.raises(CheckpointError, match=r"model\.json.*damaged"):
        load_checkpoint(tmp_path, "model")
    assert load_checkpoint(tmp_path, "model", fallback=True)[1] == {"round": 1}


def test_both_damaged_names_both(tmp_path):
    save_checkpoint(tmp_path, "model", make_model(0).state_dict(), {"round": 1})
    save_checkpoint(tmp_path, "model", make_model(1).state_dict(), {"round": 2})
    (tmp_path / "model.json").write_text("not json")
    (tmp_path / "model.prev.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, "model", fallback=True)
    assert "model.json" in str(info.value) and "model.prev.safetensors" in str(info.value)


def test_newer_version_refused(tmp_path):
    save_checkpoint(tmp_path, "model", make_model(0).state_dict(), {"round": 1})
    path = tmp_path / "model.json"
    record = json.loads(path.read_text())
    record["version"] = 7
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"newer SemSegLoop \(version 7"):
        load_checkpoint(tmp_path, "model")


def test_missing_checkpoint(tmp_path):
    assert not checkpoint_exists(tmp_path, "model")
    with pytest.raises(CheckpointError, match="No checkpoint 'model'"):
        load_checkpoint(tmp_path, "model", fallback=True)
    save_checkpoint(tmp_path, "model", make_model(0).state_dict(), {})
    assert checkpoint_exists(tmp_path, "model")
    assert not checkpoint_exists(tmp_path, "other")


def test_disk_full_while_writing_keeps_original(tmp_path):
    # A real failing write: the OS refuses to grow any file past RLIMIT_FSIZE (EFBIG), exactly
    # like a disk filling up half-way through the weights file.
    if not hasattr(signal, "SIGXFSZ"):
        pytest.skip("needs POSIX file size limits")
    original = make_model(0).state_dict()
    save_checkpoint(tmp_path, "model", original, {"round": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))
    try:
        with pytest.raises(CheckpointError, match="Could not save checkpoint"):
            save_checkpoint(tmp_path, "model", make_model(1).state_dict(), {"round": 2})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)

    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    state, meta = load_checkpoint(tmp_path, "model")
    assert meta == {"round": 1}
    assert_same_state(original, state)


@pytest.mark.parametrize("failing_call", [1, 2, 3, 4])
def test_rename_failure_rolls_back(tmp_path, monkeypatch, failing_call):
    # Simulates the OS failing one of the four renames of a save (ENOSPC on the directory);
    # whichever fails, the original checkpoint must still load and no temporary files remain.
    original = make_model(0).state_dict()
    save_checkpoint(tmp_path, "model", original, {"round": 1})
    real_replace = os.replace
    calls = {"n": 0}

    def failing_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(tmp_path, "model", make_model(1).state_dict(), {"round": 2})
    monkeypatch.setattr(ckpt.os, "replace", real_replace)

    assert calls["n"] >= failing_call
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    state, meta = load_checkpoint(tmp_path, "model")
    assert meta == {"round": 1}
    assert_same_state(original, state)


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "replace", no_space)
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path, "model", make_model(0).state_dict(), {})
    assert files_in(tmp_path) == []


def test_damaged_current_is_not_rotated_over_good_previous(tmp_path):
    first = make_model(0).state_dict()
    save_checkpoint(tmp_path, "model", first, {"round": 1})
    save_checkpoint(tmp_path, "model", make_model(1).state_dict(), {"round": 2})
    (tmp_path / "model.safetensors").write_bytes(b"torn")
    save_checkpoint(tmp_path, "model", make_model(2).state_dict(), {"round": 3})
    assert load_checkpoint(tmp_path, "model")[1] == {"round": 3}
    state, meta = load_checkpoint(tmp_path, "model.prev")
    assert meta == {"round": 1}
    assert_same_state(first, state)


def test_tensor_preparation_shared_noncontiguous_and_grad(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    weight = torch.nn.Parameter(torch.rand(4, 3))
    state = {"a": base, "tied": base, "view": base[1], "t": base.t(), "param": weight}
    save_checkpoint(tmp_path, "odd", state, {})
    loaded, _ = load_checkpoint(tmp_path, "odd")
    for k, v in state.items():
        assert torch.equal(loaded[k], v.detach()), k
        assert not loaded[k].requires_grad


def test_meta_conversion_and_refusal(tmp_path):
    state = make_model(0).state_dict()
    meta = {"lr": np.float32(0.5), "round": np.int64(3), "shape": (64, 64),
            "mean": np.array([0.25, 0.5]), "ok": np.bool_(True), "best": float("nan")}
    save_checkpoint(tmp_path, "model", state, meta)
    got = load_checkpoint(tmp_path, "model")[1]
    assert got["lr"] == 0.5 and type(got["lr"]) is float
    assert got["round"] == 3 and type(got["round"]) is int
    assert got["shape"] == [64, 64] and got["mean"] == [0.25, 0.5] and got["ok"] is True
    assert np.isnan(got["best"])

    with pytest.raises(CheckpointError, match=r"meta\.spatial\.device"):
        save_checkpoint(tmp_path, "bad", state, {"spatial": {"device": torch.device("cpu")}})
    with pytest.raises(CheckpointError, match="reserved"):
        save_checkpoint(tmp_path, "bad", state, {"sha256": "x"})
    with pytest.raises(CheckpointError, match="not a tensor"):
        save_checkpoint(tmp_path, "bad", {"w": [1, 2]}, {})
    with pytest.raises(CheckpointError, match="plain file name"):
        save_checkpoint(tmp_path, "../escape", state, {})
    assert not checkpoint_exists(tmp_path, "bad")


def test_source_never_uses_unsafe_loading():
    source = Path(ckpt.__file__).read_text(encoding="utf-8")
    assert "torch.load" not in source
    assert "pickle" not in source.lower()
    assert "safetensors.torch import load_file" in source
