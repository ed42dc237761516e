"""The client side of the engine service, in plain Python: request ids, each job's states
(idle -> running -> done / cancelled / error), event parsing, crash detection, Stop with a kill.

The client never runs the engine: it starts ``semsegloop serve`` through a *transport* (here a
``subprocess``; in Slicer a ``qt.QProcess`` adapter) that hands it the process's output with
:meth:`ServiceClient.feed` / :meth:`feed_stderr` / :meth:`process_exited`. It only reads the
project and writes into its inbox (``incoming/``): label snapshots and images go there as files
(atomically), the service stores them; predictions are files the service writes.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from semsegloop import errors
from semsegloop.errors import SemSegLoopError
from semsegloop.service import protocol as pr

log = logging.getLogger("semsegloop.client")

IDLE, RUNNING = "idle", "running"
STOP_GRACE_S = 2.0          # Stop: after a cancel, how long the job may take to end
INBOX = "incoming"


class ServiceError(SemSegLoopError):
    """The engine process stopped or could not start; the message says why and what to do."""


@dataclass
class Job:
    """One request and what the service reported about it, in order."""
    id: str
    op: str
    request: dict
    state: str = IDLE
    accepted: bool = False
    progress: dict | None = None          # the latest progress event
    final: dict | None = None             # the done / cancelled / error event
    events: list = field(default_factory=list)
    stop_deadline: float | None = None    # monotonic time after which Stop kills the service

    @property
    def finished(self) -> bool:
        return self.state in pr.FINAL_EVENTS

    @property
    def result(self) -> dict:
        """The final event's fields (without ``event`` and ``id``); {} while running."""
        return {k: v for k, v in (self.final or {}).items() if k not in ("event", "id")}

    def error(self) -> SemSegLoopError | None:
        """The exception an ``error`` final event stands for (the engine's own class for bad
        input, e.g. LabelError, so callers can catch it as if the engine ran in-process)."""
        if self.state != pr.ERROR:
            return None
        r = self.result
        message = r.get("message") or "the engine reported an error"
        cls = getattr(errors, str(r.get("type")), None)
        if r.get("user_error") and isinstance(cls, type) and issubclass(cls, SemSegLoopError):
            return cls(message)
        if r.get("user_error"):
            return SemSegLoopError(message)
        return ServiceError(message)


def kill_process_tree(pid: int) -> None:
    """SIGKILL a service started with ``--new-process-group`` and whatever it started."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True)
        return
    try:
        if os.getpgid(pid) == pid:   # it leads its own group: take the whole group
            os.killpg(pid, signal.SIGKILL)
            return
    except OSError:
        pass
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def describe_exit(code: int | None) -> str:
    if code is None:
        return "it crashed or was killed"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def service_command(project_dir, python: str | None = None, device: str = "auto") -> list[str]:
    """The command line that starts the service with ``python`` (default: this interpreter)."""
    return [python or sys.executable, "-m", "semsegloop", "serve", str(project_dir),
            "--device", device, "--new-process-group"]


class SubprocessTransport:
    """Runs the service with ``subprocess``; two reader threads (in this, the client's process)
    only move the pipes' bytes into a queue, which :meth:`pump` delivers on the caller's thread."""

    def __init__(self, argv: list[str], env: dict | None = None, cwd=None):
        self.argv, self.env, self.cwd = list(argv), env, cwd
        self._proc: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._sink = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, sink: "ServiceClient") -> None:
        self._sink = sink
        self._proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, env=self.env, cwd=self.cwd,
                                      bufsize=0)
        out = threading.Thread(target=self._read, args=(self._proc.stdout, "out", True),
                               name="semsegloop-client-stdout", daemon=True)
        err = threading.Thread(target=self._read, args=(self._proc.stderr, "err", False),
                               name="semsegloop-client-stderr", daemon=True)
        out.start()
        err.start()

    def _read(self, pipe, kind: str, report_exit: bool) -> None:
        while True:
            chunk = pipe.read1(65536) if hasattr(pipe, "read1") else pipe.read(65536)
            if not chunk:
                break
            self._queue.put((kind, chunk))
        if report_exit:
            self._queue.put(("exit", self._proc.wait()))

    def write(self, data: bytes) -> None:
        try:
            self._proc.stdin.write(data)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass   # the process is gone; its exit arrives through pump()

    def close_input(self) -> None:
        try:
            self._proc.stdin.close()
        except OSError:
            pass

    def pump(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for output or the exit, then deliver all that is queued."""
        try:
            item = self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "out":
                self._sink.feed(payload)
            elif kind == "err":
                self._sink.feed_stderr(payload)
            else:
                self._sink.process_exited(payload)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return

    def kill(self) -> None:
        """Kill the service's process tree and wait (bounded) until it has exited."""
        if self._proc is None or self._proc.poll() is not None:
            return
        kill_process_tree(self._proc.pid)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.error("engine process %d did not exit after SIGKILL", self._proc.pid)


class ServiceClient:
    """Follows one service process for one project (see the module docstring).

    ``transport_factory(argv)`` makes a transport (``start(client)``, ``write(bytes)``,
    ``pump(timeout)``, ``kill()``, ``close_input()``, ``pid``). ``on_event(job, event)`` is
    called for every event, on whichever thread feeds the client; the client is not
    thread-safe, so one thread (Slicer's main thread) must do all of it. A transport delivers
    only while it is the client's current one (``client.transport is self``), so a killed
    process's late output never reaches its successor's jobs.
    """

    def __init__(self, project_dir, transport_factory: Callable[[list[str]], Any] | None = None,
                 python: str | None = None, device: str = "auto",
                 on_event: Callable[[Job | None, dict], None] | None = None,
                 stop_grace_s: float = STOP_GRACE_S, env: dict | None = None):
        self.project_dir = Path(project_dir)
        self.argv = service_command(self.project_dir, python, device)
        self._factory = transport_factory or (lambda argv: SubprocessTransport(argv, env=env))
        self.on_event = on_event
        self.stop_grace_s = stop_grace_s
        self.transport = None
        self.ready: dict | None = None
        self.jobs: dict[str, Job] = {}
        self.exit_message: str | None = None     # why the last service ended, if it crashed
        self.starts = 0
        self._buffer = b""
        self._stderr_tail: list[str] = []
        self._stderr_buffer = b""
        self._fatal: dict | None = None
        self._expected_exit = False
        self._prefix = uuid.uuid4().hex[:6]
        self._count = 0
        self._unread: list[tuple[Job | None, dict]] = []

    # ------------------------------------------------------------------ process lifecycle
    @property
    def running(self) -> bool:
        return self.transport is not None

    def start(self) -> None:
        """Start the service unless one runs (a new one after a crash or a Stop's kill)."""
        if self.transport is not None:
            return
        self._buffer, self._stderr_buffer, self._stderr_tail = b"", b"", []
        self.ready, self._fatal, self._expected_exit = None, None, False
        transport = self._factory(list(self.argv))
        self.transport = transport
        self.starts += 1
        transport.start(self)

    def wait_ready(self, timeout: float = 120.0) -> dict:
        """Start if needed and block until ``ready``; raises ServiceError if it fails to start."""
        self.start()
        deadline = time.monotonic() + timeout
        while self.ready is None:
            if self.transport is None:
                raise ServiceError(self.exit_message or "the engine process ended before it was ready")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServiceError(f"the engine process sent no 'ready' within {timeout:.0f} s")
            self.transport.pump(min(left, 0.2))
        return self.ready

    def close(self, timeout: float = 10.0) -> None:
        """Ask the service to finish (EOF), wait up to ``timeout`` s, then kill it."""
        if self.transport is None:
            return
        self._expected_exit = True
        for job in self.running_jobs():
            self._send(self._new_job("cancel", {"target": job.id}))
        self.transport.close_input()
        deadline = time.monotonic() + timeout
        while self.transport is not None and time.monotonic() < deadline:
            self.transport.pump(0.1)
        if self.transport is not None:
            transport = self.transport
            transport.kill()
            if self.transport is transport:
                self._lost(None)

    # ------------------------------------------------------------------ requests
    def _new_job(self, op: str, fields: dict) -> Job:
        self._count += 1
        job_id = f"{self._prefix}-{self._count}"
        job = Job(job_id, op, {"id": job_id, "op": op, **fields})
        self.jobs[job_id] = job
        return job

    def _send(self, job: Job) -> Job:
        self.start()
        job.state = RUNNING
        self.transport.write(pr.encode(job.request).encode("utf-8"))
        return job

    def request(self, op: str, **fields) -> Job:
        """Send ``op`` with ``fields`` (starting the service if needed); returns its Job."""
        return self._send(self._new_job(op, fields))

    def running_jobs(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.state == RUNNING and j.op != "cancel"]

    def inbox(self, job_id: str) -> Path:
        return self.project_dir / INBOX / job_id

    def _labels_files(self, job_id: str, labels: dict, geometries: dict) -> dict:
        from semsegloop.data import imageio

        files = {}
        for image_id, array in labels.items():
            rel = f"{INBOX}/{job_id}/{image_id}.nrrd"
            imageio.write_labels(self.project_dir / rel, array, geometries[image_id])
            files[image_id] = rel
        return files

    def train(self, labels: dict | None = None, geometries: dict | None = None, **fields) -> Job:
        """Write the label snapshot {image_id: (S,Y,X) uint8} as files named by this request,
        then send ``train`` (``time_budget_s``, ``steps``, ``device``, ``preset``, ...).
        ``geometries`` {image_id: Geometry} default to the project's."""
        job = self._new_job("train", {})
        if labels:
            geometries = geometries or self._geometries(labels)
            fields["labels"] = self._labels_files(job.id, labels, geometries)
        job.request.update(fields)
        return self._send(job)

    def predict(self, image_ids: list | None = None, uncertainty: bool = False,
                labels: dict | None = None, **fields) -> Job:
        job = self._new_job("predict", {"image_ids": image_ids, "uncertainty": uncertainty})
        if labels:
            fields["labels"] = self._labels_files(job.id, labels, self._geometries(labels))
        job.request.update(fields)
        return self._send(job)

    def add_image(self, image, name: str | None = None) -> Job:
        """Write ``image`` (an ImageData) into the inbox and ask the service to add it."""
        from semsegloop.data import imageio

        job = self._new_job("add_image", {})
        rel = f"{INBOX}/{job.id}/image.nrrd"
        imageio.write_image(self.project_dir / rel, image)
        job.request.update({"file": rel, "name": name or image.name})
        return self._send(job)

    def evaluate(self, references: dict) -> Job:
        """``references``: {image_id: (S,Y,X) reference labels}, written as files."""
        job = self._new_job("evaluate", {})
        job.request["references"] = self._labels_files(job.id, references,
                                                       self._geometries(references))
        return self._send(job)

    def refine(self, image_id: str, strokes, geometry=None) -> Job:
        """Write ``strokes`` ((S,Y,X) uint8, new ones or the whole labels) into the inbox and
        ask for the refined prediction; ``done`` names its file in ``output``."""
        job = self._new_job("refine", {"image_id": image_id})
        geometries = {image_id: geometry} if geometry is not None else self._geometries({image_id: strokes})
        job.request["strokes"] = self._labels_files(job.id, {image_id: strokes}, geometries)[image_id]
        return self._send(job)

    def _geometries(self, labels: dict) -> dict:
        from semsegloop.data.imageio import Geometry
        import json

        meta = json.loads((self.project_dir / "project.json").read_text(encoding="utf-8"))
        known = {im["id"]: im for im in meta.get("images", [])}
        out = {}
        for image_id in labels:
            if image_id not in known:
                raise errors.ProjectError(f"no image '{image_id}' in project '{self.project_dir}'")
            out[image_id] = Geometry.from_json(known[image_id]["geometry"])
        return out

    def output_path(self, rel: str) -> Path:
        """A file an event names (relative to the project) as a path on this machine."""
        p = Path(rel)
        return p if p.is_absolute() else self.project_dir / p

    # ------------------------------------------------------------------ Stop
    def stop(self, job: Job) -> None:
        """Send ``cancel``; if the job has not ended ``stop_grace_s`` later, :meth:`tick`
        kills the service (the next request starts a new one)."""
        if job.finished or job.state != RUNNING or self.transport is None:
            return
        if job.stop_deadline is None:
            job.stop_deadline = time.monotonic() + self.stop_grace_s
            self._send(self._new_job("cancel", {"target": job.id}))

    def tick(self, now: float | None = None) -> None:
        """Enforce Stop deadlines (call it from a timer; :meth:`wait` does it itself)."""
        now = time.monotonic() if now is None else now
        late = [j for j in self.running_jobs() if j.stop_deadline is not None and now >= j.stop_deadline]
        if not late or self.transport is None:
            return
        log.warning("the engine did not stop within %.1f s; ending its process", self.stop_grace_s)
        self._expected_exit = True
        transport = self.transport
        # The jobs end first: a transport that reports the exit while killing (Qt does) must
        # find them over, not crashed.
        for job in late:
            self._finish(job, pr.event(pr.CANCELLED, job.id, killed=True, message=(
                f"the engine did not stop within {self.stop_grace_s:.0f} s and was ended; the last "
                f"saved model and every stroke are kept, the next request starts a new engine")))
        transport.kill()
        if self.transport is transport:
            self._lost(None)

    def next_stop_deadline(self) -> float | None:
        deadlines = [j.stop_deadline for j in self.running_jobs() if j.stop_deadline is not None]
        return min(deadlines) if deadlines else None

    # ------------------------------------------------------------------ waiting
    def wait(self, job: Job, timeout: float | None = None) -> Job:
        """Block until ``job`` has its final event (or ``timeout`` s); returns it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not job.finished:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if self.transport is None:    # cannot happen for a sent job, kept as a guard
                break
            step = 0.2
            if deadline is not None:
                step = min(step, deadline - now)
            stop = self.next_stop_deadline()
            if stop is not None:
                step = min(step, max(0.0, stop - now) + 0.01)
            self.transport.pump(step)
            self.tick()
        return job

    def poll(self, timeout: float = 0.0) -> list[tuple[Job | None, dict]]:
        """Deliver what the transport has (waiting up to ``timeout``) and return the events
        received since the last call."""
        if self.transport is not None:
            self.transport.pump(timeout)
        self.tick()
        out, self._unread = self._unread, []
        return out

    # ------------------------------------------------------------------ transport callbacks
    def feed(self, data: bytes) -> None:
        """Bytes from the service's stdout (any chunking); complete lines become events."""
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self._handle_line(line)

    def feed_stderr(self, data: bytes) -> None:
        """Bytes from the service's stderr: its log, forwarded, and kept for crash messages."""
        self._stderr_buffer += data
        *lines, self._stderr_buffer = self._stderr_buffer.split(b"\n")
        for raw in lines:
            text = raw.decode("utf-8", errors="replace").rstrip()
            if text:
                log.info("engine: %s", text)
                self._stderr_tail = (self._stderr_tail + [text])[-20:]

    def process_exited(self, code: int | None) -> None:
        """The service process ended: running jobs end with an error saying so."""
        if self._buffer.strip():
            self._handle_line(self._buffer)
        self._buffer = b""
        if self.transport is None:
            return
        self._lost(code)

    def _lost(self, code: int | None) -> None:
        self.transport = None
        if self._fatal is not None:
            message, user = self._fatal.get("message", "the engine could not start"), bool(
                self._fatal.get("user_error"))
        elif self._expected_exit:
            message, user = "the engine was stopped", False
        else:
            last = next((line for line in reversed(self._stderr_tail)
                         if "Error" in line or "error" in line), None)
            message = (f"the SemSegLoop engine process ended unexpectedly ({describe_exit(code)})"
                       + (f": {last}" if last else "") +
                       "; your labels and the project are intact, the next request starts a "
                       "new engine")
            user = False
            log.error("%s", message)
        if not self._expected_exit or self._fatal is not None:
            self.exit_message = message
        for job in [j for j in self.jobs.values() if j.state == RUNNING]:
            self._finish(job, pr.event(pr.ERROR, job.id, message=message, user_error=user,
                                       type=(self._fatal or {}).get("type", "ServiceError"),
                                       traceback="", crashed=self._fatal is None))

    def _handle_line(self, line: bytes) -> None:
        try:
            ev = pr.decode_event(line)
        except pr.RequestError as e:
            log.warning("%s", e)
            return
        kind, job_id = ev.get("event"), ev.get("id")
        if kind == pr.READY:
            if ev.get("protocol") != pr.PROTOCOL_VERSION:
                self._fatal = {"message": f"the engine speaks protocol {ev.get('protocol')!r}, "
                                          f"this client {pr.PROTOCOL_VERSION}; update SemSegLoop"}
                self.transport.kill()
                return
            self.ready = ev
            self._deliver(None, ev)
            return
        job = self.jobs.get(job_id) if job_id is not None else None
        if job is None:
            if kind == pr.ERROR and ev.get("fatal"):
                self._fatal = ev
            elif kind == pr.ERROR:
                log.warning("engine error without a known request: %s", ev.get("message"))
            self._deliver(None, ev)
            return
        if job.finished:
            log.debug("event after the final one of %s ignored: %s", job.id, kind)
            return
        if kind == pr.ACCEPTED:
            job.accepted = True
        elif kind == pr.PROGRESS:
            job.progress = ev
        job.events.append(ev)
        if kind in pr.FINAL_EVENTS:
            self._finish(job, ev, append=False)
        else:
            self._deliver(job, ev)

    def _finish(self, job: Job, ev: dict, append: bool = True) -> None:
        if job.finished:
            return
        if append:
            job.events.append(ev)
        job.final = ev
        job.state = ev["event"]
        self._deliver(job, ev)

    def _deliver(self, job: Job | None, ev: dict) -> None:
        if self.on_event is None:   # poll() reads them; with a callback nobody would
            self._unread.append((job, ev))
            return
        if self.on_event is not None:
            try:
                self.on_event(job, ev)
            except Exception:  # a display callback must not break event handling
                log.exception("event callback failed for %s", ev.get("event"))
