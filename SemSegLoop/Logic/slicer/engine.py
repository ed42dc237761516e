"""The panel's engine process in plain Python: which Python runs `semsegloop serve`, one service
per open project, the one job the panel follows, and what happens when its final event is read.

Nothing here knows Qt or MRML: the module hands in a transport (its ``qt.QProcess`` adapter) and
callbacks; tests hand in the subprocess transport and run the real service.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from semsegloop.errors import SemSegLoopError, TrainingError
from semsegloop.service.client import Job, ServiceClient, ServiceError, service_command

log = logging.getLogger("semsegloop.slicer")

QUICK_TIMEOUT_S = 120.0   # an edit (add an image, rename a class) waits at most this long


def engine_python(executable: str | None = None, slicer_home: str | None = None,
                  os_name: str = os.name, which: Callable[[str], str | None] = shutil.which) -> str:
    """The Python that runs the engine: Slicer's own PythonSlicer.

    Inside Slicer ``sys.executable`` is PythonSlicer (qSlicerCoreApplication sets it from
    ``QStandardPaths::findExecutable("PythonSlicer")``, i.e. the PATH the launcher prepared);
    then PATH itself; then ``slicer.app.slicerHome``'s ``bin/`` (on macOS slicerHome is
    ``Slicer.app/Contents``, so that is ``Contents/bin``). Outside Slicer (tests, a pip
    install) a plain Python interpreter is used as it is.
    """
    executable = sys.executable if executable is None else executable
    name = "PythonSlicer.exe" if os_name == "nt" else "PythonSlicer"
    if executable and Path(executable).name.lower().startswith("pythonslicer") and Path(executable).is_file():
        return executable
    found = which("PythonSlicer")
    if found:
        return found
    if slicer_home:
        for candidate in (Path(slicer_home) / "bin" / name, Path(slicer_home) / name):
            if candidate.is_file():
                return str(candidate)
    if executable and "python" in Path(executable).name.lower() and Path(executable).is_file():
        return executable
    raise ServiceError(f"PythonSlicer was not found (not beside '{executable}', not on PATH, not in "
                       f"'{slicer_home}/bin'); reinstall Slicer")


def engine_command(project_dir, python: str, engine_dir=None, device: str = "auto") -> list[str]:
    """The service's command line. With ``engine_dir`` (the module's Logic/ folder, which is not
    importable as `semsegloop` on its own) a two-line bootstrap registers it first, the way the
    module's own loader does, without putting anything on sys.path."""
    argv = service_command(project_dir, python, device)
    if engine_dir is None:
        return argv
    bootstrap = ("import importlib.util, os, sys; d = sys.argv.pop(1); "
                 "s = importlib.util.spec_from_file_location('semsegloop', os.path.join(d, '__init__.py'), "
                 "submodule_search_locations=[d]); m = importlib.util.module_from_spec(s); "
                 "sys.modules['semsegloop'] = m; s.loader.exec_module(m); "
                 "from semsegloop.apps.cli import main; sys.exit(main(sys.argv[1:]))")
    return [argv[0], "-c", bootstrap, str(engine_dir), *argv[3:]]


# -------------------------------------------------------------------------- event -> engine types

def progress_from_event(ev: dict):
    """A ``progress`` event as the TrainProgress the panel's texts take."""
    from semsegloop.learn.training import TrainProgress

    loss = ev.get("loss")
    return TrainProgress(round=int(ev.get("round") or 0), step=int(ev.get("step") or 0),
                         total_steps=ev.get("total_steps"), elapsed_s=float(ev.get("elapsed_s") or 0.0),
                         eta_s=ev.get("eta_s"), loss=math.nan if loss is None else float(loss),
                         throughput=float(ev.get("throughput") or 0.0), val_dice=ev.get("val_dice"),
                         phase=ev.get("phase") or "train", device=str(ev.get("device") or "cpu"))


def train_result(job: Job):
    """A finished (or stopped) ``train`` job as a TrainResult; None if it never trained."""
    from semsegloop.learn.training import TrainResult

    r = job.result
    if "steps" not in r:
        return None
    return TrainResult(round=int(r.get("round") or 0), steps=int(r["steps"]),
                       seconds=float(r.get("seconds") or 0.0), final_loss=r.get("final_loss"),
                       cancelled=job.state == "cancelled", checkpoint=r.get("checkpoint"),
                       device=str(r.get("device") or ""), val_dice=r.get("val_dice"))


def read_predictions(client: ServiceClient, job: Job) -> dict:
    """{image_id: (labels (S,Y,X) uint8, uncertainty (S,Y,X) float32 or None)} from the files a
    ``predict`` job names (those finished before a Stop, too)."""
    from semsegloop.data import imageio

    out = {}
    uncertainty = job.result.get("uncertainty") or {}
    for image_id, rel in (job.result.get("outputs") or {}).items():
        labels, _ = imageio.read_labels(client.output_path(rel))
        entropy = None
        if image_id in uncertainty:
            entropy = imageio.read_image(client.output_path(uncertainty[image_id])).array[..., 0]
        out[image_id] = (labels, entropy)
    return out


# -------------------------------------------------------------------------- the session

@dataclass
class FollowedJob:
    """The job the panel follows: its kind, its main-thread follow-up, the scene it belongs to."""
    job: Job
    kind: str
    on_finished: Callable[[Job], Any] | None
    on_progress: Callable[[Any], None] | None
    generation: int
    outcome: Any = None
    over: bool = False


class EngineSession:
    """One engine service per open project, shared by the widget and console logic.

    ``run`` starts the panel's one long job (train, predict, export, ...) and refuses a second;
    the job is over only once its final event has been read (then ``busy_job`` is None and
    ``on_finished`` runs, on the thread that feeds the client). ``listeners`` get
    ``(job, outcome)`` after that. Closing the scene stops the job and drops its follow-up.
    """

    def __init__(self, transport_factory=None, python: str | None = None, engine_dir=None,
                 device: str = "auto", env: dict | None = None, stop_grace_s: float = 2.0):
        self._factory = transport_factory
        self.python = python
        self.engine_dir = engine_dir
        self.device = device
        self.env = env
        self.stop_grace_s = stop_grace_s
        self.client: ServiceClient | None = None
        self.followed: FollowedJob | None = None
        self.generation = 0
        self.listeners: list[Callable[[Job, Any], None]] = []

    # ------------------------------------------------------------------ process
    def open(self, project_dir) -> ServiceClient:
        """The client of ``project_dir`` (a new one, closing the previous, if the folder differs)."""
        project_dir = Path(project_dir).resolve()
        if self.client is not None and self.client.project_dir == project_dir:
            return self.client
        self.close()
        client = ServiceClient(project_dir, python=self.python or engine_python(),
                               device=self.device, on_event=self._on_event,
                               stop_grace_s=self.stop_grace_s, env=self.env,
                               transport_factory=self._factory)
        client.argv = engine_command(project_dir, client.argv[0], self.engine_dir, self.device)
        self.client = client
        return client

    def start(self) -> None:
        """Start the service now (torch imports while the person paints)."""
        self._require().start()

    def restart(self) -> None:
        """A fresh service (after packages were installed into the engine's Python)."""
        client = self._require()
        client.close(timeout=5)
        client.start()

    def close(self) -> None:
        if self.client is not None:
            self.client.close(timeout=5)
            self.client = None
        self.followed = None

    def _require(self) -> ServiceClient:
        if self.client is None:
            raise SemSegLoopError("open or create a project first (Input section)")
        return self.client

    # ------------------------------------------------------------------ jobs
    def busy_job(self) -> str | None:
        f = self.followed
        return f.kind if f is not None and not f.over else None

    def run(self, kind: str, send: Callable[[ServiceClient], Job],
            on_finished: Callable[[Job], Any] | None = None,
            on_progress: Callable[[Any], None] | None = None) -> FollowedJob:
        """Send the panel's long job; raises TrainingError while another one runs."""
        busy = self.busy_job()
        if busy is not None:
            raise TrainingError(f"SemSegLoop is already running a {busy} job; press Stop or wait "
                                f"for it to finish before starting another")
        job = send(self._require())
        self.followed = FollowedJob(job, kind, on_finished, on_progress, self.generation)
        if job.finished:   # e.g. the service could not start: its error is already there
            self._finish(self.followed)
        return self.followed

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the followed job is over; returns its follow-up's outcome, or raises the
        job's error (the engine's own class for bad input)."""
        f = self.followed
        if f is None:
            return None
        self._require().wait(f.job, timeout=timeout)
        if not f.over:
            return None
        if f.job.state == "error":
            raise f.job.error()
        return f.outcome

    def quick(self, op: str, send: Callable[[ServiceClient], Job] | None = None,
              timeout: float = QUICK_TIMEOUT_S, **fields) -> dict:
        """A short request (add an image, change classes) waited for here; returns its result."""
        client = self._require()
        job = send(client) if send is not None else client.request(op, **fields)
        client.wait(job, timeout=timeout)
        if job.state == "error":
            raise job.error()
        if not job.finished:
            raise ServiceError(f"the engine did not answer '{op}' within {timeout:.0f} s")
        return job.result

    def stop(self) -> None:
        """Stop: cancel the followed job; 2 s later ``tick`` kills the engine if it still runs."""
        f = self.followed
        if f is not None and not f.over and self.client is not None:
            self.client.stop(f.job)

    def tick(self) -> None:
        if self.client is not None:
            self.client.tick()

    def scene_closed(self) -> None:
        """The scene the job's results were for is gone: stop it; its follow-up will not run."""
        self.generation += 1
        self.stop()

    # ------------------------------------------------------------------ events
    def _on_event(self, job: Job | None, ev: dict) -> None:
        f = self.followed
        if f is None or job is not f.job or f.over:
            return
        if ev.get("event") == "progress" and f.on_progress is not None:
            f.on_progress(progress_from_event(ev))
        elif job.finished:
            self._finish(f)

    def _finish(self, f: FollowedJob) -> None:
        # Over before the follow-up runs: it may start the next job (predict after train).
        f.over = True
        if f.on_finished is not None and f.generation == self.generation and f.job.state != "error":
            try:
                f.outcome = f.on_finished(f.job)
            except Exception as e:  # shown like any job error
                log.exception("follow-up of the %s job failed", f.kind)
                f.job.state = "error"
                f.job.final = {"event": "error", "id": f.job.id, "message": str(e),
                               "user_error": isinstance(e, SemSegLoopError), "type": type(e).__name__}
        for listener in list(self.listeners):
            listener(f.job, f.outcome)
