"""The web app's engine link against the real engine service process: edits and jobs are told
apart, Stop ends a round within 2 s keeping its model, a killed service is reported once and the
next request starts a new one."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from helpers_engine import square_image, square_strokes, tiny_models  # noqa: F401

from semsegloop.apps.web.engine import ServiceEngine
from semsegloop.project import Project


def _until(engine, predicate, timeout):
    seen = []
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        for ev in engine.poll():
            seen.append(ev)
            if predicate(ev):
                return ev, seen
        time.sleep(0.02)
    raise AssertionError(f"no such event within {timeout} s; saw {[(e.get('op'), e.get('event')) for e in seen]}")


@pytest.mark.slow
def test_stop_crash_and_restart(tmp_path, tiny_models):
    img, _ = square_image(64)
    with Project.create(tmp_path / "p", ["square", "background"], dims=2, preset="tiny2d") as p:
        p.add_image(img, name="tile")
    engine = ServiceEngine(tmp_path / "p", device="cpu")
    try:
        engine.save_labels("tile", square_strokes(64)[None])
        ev, _ = _until(engine, lambda e: e["job"] == "edit" and e["event"] in ("done", "error"), 300)
        assert ev["event"] == "done" and ev["op"] == "set_labels"
        assert Project.open(tmp_path / "p", read_only=True).labels("tile").any()

        engine.train(labels={"tile": square_strokes(64)[None]}, time_budget_s=300)
        _until(engine, lambda e: e["job"] == "panel" and e["event"] == "progress"
               and e.get("phase") == "train" and e.get("step", 0) >= 2, 300)
        t0 = time.perf_counter()
        engine.cancel()
        ev, _ = _until(engine, lambda e: e["job"] == "panel" and e["event"] in ("done", "cancelled", "error"), 10)
        stop_s = time.perf_counter() - t0
        print(f"\nStop to final event: {stop_s:.2f} s ({ev['event']})")
        assert ev["event"] == "cancelled" and stop_s <= 2.5
        assert Project.open(tmp_path / "p", read_only=True).round == 1, "Stop lost the round's model"

        engine.client.start()     # no-op unless the Stop had to end the process
        os.kill(engine.client.transport.pid, signal.SIGKILL)
        ev, _ = _until(engine, lambda e: e["job"] == "service" and e["event"] == "crashed", 30)
        assert "SIGKILL" in ev["message"] or "stopped" in ev["message"] or "ended" in ev["message"]
        assert not [e for e in engine.poll() if e["event"] == "crashed"], "a crash is reported once"

        engine.predict(["tile"], uncertainty=True)        # starts a new service
        ev, _ = _until(engine, lambda e: e["job"] == "panel" and e["event"] in ("done", "error"), 300)
        assert ev["event"] == "done", ev.get("message")
        assert (tmp_path / "p" / ev["outputs"]["tile"]).exists()
        assert engine.client.starts >= 2
    finally:
        engine.close()
