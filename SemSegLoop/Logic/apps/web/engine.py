"""The web app's link to the engine service (``semsegloop serve``, through
``semsegloop.service.client``): labels, classes and jobs go to the service, its events come back.

Nothing here computes: the service process trains and predicts and is the project's one writer.
The client is pumped without waiting from trame's loop (``poll``); its reader threads only move
pipe bytes. A crashed service ends the running job with an error event (shown on the page) and
the next request starts a new one.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

INBOX = "incoming"


class ServiceEngine:
    """One service process for one project, started at once so torch imports while you paint."""

    def __init__(self, project_dir: Path, device: str = "auto", client_factory=None):
        from semsegloop.service.client import ServiceClient

        self.project_dir = Path(project_dir)
        factory = client_factory or (lambda d: ServiceClient(d, device=device))
        self.client = factory(self.project_dir)
        self.client.start()
        self.job = None            # the running train/predict/export/... job shown on the panel
        self._reported_exit = None

    # ------------------------------------------------------------------ edits
    def _inbox_labels(self, image_id: str, labels: np.ndarray) -> str:
        """Write labels of an image atomically into the project's inbox; returns the path the
        request names (relative to the project)."""
        import json

        from semsegloop.data import imageio
        from semsegloop.data.imageio import Geometry
        from semsegloop.errors import ProjectError

        meta = json.loads((self.project_dir / "project.json").read_text(encoding="utf-8"))
        entry = next((im for im in meta["images"] if im["id"] == image_id), None)
        if entry is None:
            raise ProjectError(f"no image '{image_id}' in project '{self.project_dir}'")
        rel = f"{INBOX}/web-{uuid.uuid4().hex[:12]}/{image_id}.nrrd"
        imageio.write_labels(self.project_dir / rel, np.asarray(labels, np.uint8),
                             Geometry.from_json(entry["geometry"]))
        return rel

    def save_labels(self, image_id: str, labels: np.ndarray) -> None:
        """Write the labels into the project's inbox and ask the service to store them."""
        self.client.request("set_labels", labels={image_id: self._inbox_labels(image_id, labels)})

    def set_classes(self, classes: list[dict]) -> None:
        self.client.request("set_classes", classes=[{"name": c["name"], "color": list(c["color"])}
                                                    for c in classes])

    # ------------------------------------------------------------------ jobs
    def train(self, labels: dict | None = None, **fields) -> None:
        """``labels`` {image_id: (S,Y,X)}: the snapshot taken at Train, stored by the service
        before the round starts (a separate save could still be queued behind it)."""
        self.job = self.client.train(labels=labels, **fields)

    def predict(self, image_ids, uncertainty: bool = True, labels: dict | None = None) -> None:
        self.job = self.client.predict(image_ids, uncertainty=uncertainty, labels=labels)

    def export(self, out_dir: str) -> None:
        self.job = self.client.request("export", out_dir=out_dir)

    def fractions(self, csv_path: str) -> None:
        self.job = self.client.request("fractions", csv_path=csv_path)

    def refine(self, image_id: str, strokes: np.ndarray) -> None:
        """Refine the image's latest prediction with ``strokes`` (the labels on screen)."""
        rel = self._inbox_labels(image_id, strokes)
        self.job = self.client.request("refine", image_id=image_id, strokes=rel)

    def suggest(self, n: int = 3) -> None:
        self.job = self.client.request("suggest", n=int(n))

    def cancel(self) -> None:
        """Stop: a cancel now; the client kills the process if the job is not over in 2 s."""
        if self.job is not None and not self.job.finished:
            self.client.stop(self.job)

    # ------------------------------------------------------------------ events
    def poll(self) -> list[dict]:
        """Events since the last call, each with ``op`` and ``job`` ("panel" for the job the
        panel follows, "edit" for label/class saves, "service" for process-wide ones)."""
        out = []
        for job, ev in self.client.poll(0.0):
            ev = dict(ev)
            ev["op"] = job.op if job is not None else None
            ev["job"] = ("panel" if job is not None and job is self.job else
                         "edit" if job is not None else "service")
            out.append(ev)
        # A service that died while idle ends no job; say so once (the next request restarts it).
        message = self.client.exit_message
        if self.client.transport is None and message and message != self._reported_exit:
            self._reported_exit = message
            out.append({"event": "crashed", "job": "service", "op": None, "message": message})
        return out

    def close(self) -> None:
        self.client.close(timeout=5.0)
