"""`semsegloop serve PROJECT_DIR`: one persistent engine process that owns one project, reads
requests from stdin and writes events to stdout, one JSON object per line (see protocol.py).

torch is imported once, before ``ready``; the project (and so the trained model) stays open
between jobs. The request reader stays on the main thread and answers at once, so ``cancel``
reaches a running job; the job runs on one persistent thread (torch's per-thread caches stay
warm), project edits on another. stdout carries events only: anything else printing to it,
from Python or C, is sent to stderr with the logs.
"""

from __future__ import annotations

import importlib
import logging
import os
import queue
import sys
import threading
import traceback
from typing import IO

from semsegloop.errors import SemSegLoopError
from semsegloop.service import protocol as pr
from semsegloop.service.ops import CONTROL, JOB, OPS, Cancelled

log = logging.getLogger("semsegloop.service")

# Modules whose import registers ops (ops.register); a new op module is added here.
OP_MODULES = ["semsegloop.service.ops", "semsegloop.service.refine_ops"]
# How long EOF/shutdown waits for a running job to honour its cancel before exiting anyway.
SHUTDOWN_WAIT_S = 30.0


def load_ops() -> dict:
    for name in OP_MODULES:
        importlib.import_module(name)
    return OPS


class JobContext:
    """What a handler gets: the project, its cancel flag, and a way to report progress."""

    def __init__(self, service: "Service", request: dict):
        self.service = service
        self.request = request
        self.request_id = request["id"]
        self.cancel_event = threading.Event()

    @property
    def project(self):
        return self.service.project

    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def progress(self, **fields) -> None:
        self.service.emit(pr.PROGRESS, self.request_id, **fields)


class _Lane:
    """One persistent thread running queued (context, op) pairs in order."""

    def __init__(self, name: str, run):
        self._queue: queue.Queue = queue.Queue()
        self._run = run
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def put(self, item) -> None:
        self._queue.put(item)

    def stop(self) -> None:
        self._queue.put(None)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if callable(item):
                item()
            else:
                self._run(*item)


class Service:
    """The request loop for one open project; ``run(stdin)`` returns the exit status."""

    def __init__(self, project, events: IO[str], ops: dict | None = None, device: str | None = "cpu"):
        self.project = project
        self.device = device
        self.ops = load_ops() if ops is None else ops
        self._specs = {name: op.spec for name, op in self.ops.items()}
        self._events = events
        self._emit_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._job: JobContext | None = None     # the running or queued job
        self._shutdown = threading.Event()
        self._closed = False
        self._jobs = _Lane("SemSegLoop job", self._execute)
        self._edits = _Lane("SemSegLoop edits", self._execute)
        # MONAI's import (seconds) happens on the job thread after `ready`, while the client
        # sends its first request; that request simply starts once it is done.
        self._jobs.put(_preload)

    # ------------------------------------------------------------------ events
    def emit(self, kind: str, request_id, **fields) -> None:
        line = pr.encode(pr.event(kind, request_id, **fields))
        with self._emit_lock:
            try:
                self._events.write(line)
                self._events.flush()
            except (BrokenPipeError, ValueError, OSError):
                # The reader is gone; nothing can be reported any more. EOF will end us.
                self._shutdown.set()

    def emit_error(self, request_id, exc: BaseException, tb: str = "", **fields) -> None:
        self.emit(pr.ERROR, request_id, **pr.error_fields(exc, tb), **fields)

    # ------------------------------------------------------------------ state
    def running_job(self):
        with self._state_lock:
            return self._job.request_id if self._job is not None else None

    def cancel(self, target) -> bool:
        with self._state_lock:
            job = self._job
        if job is None or job.request_id != target:
            return False
        job.cancel_event.set()
        return True

    def request_shutdown(self) -> None:
        """Stop reading, cancel the running job and wait for it (its final event comes first)."""
        self._shutdown.set()
        self.close()

    # ------------------------------------------------------------------ requests
    def handle_line(self, line: bytes | str) -> None:
        """Decode, validate and dispatch one request line; every failure becomes an event."""
        if not line.strip():
            return
        try:
            request = pr.validate_request(pr.decode_request(line), self._specs)
        except pr.RequestError as e:
            self.emit_error(getattr(e, "request_id", None), e)
            return
        op = self.ops[request["op"]]
        ctx = JobContext(self, request)
        if op.lane == CONTROL:
            self.emit(pr.ACCEPTED, ctx.request_id, op=op.name)
            self._execute(ctx, op)
            return
        if op.lane == JOB:
            with self._state_lock:
                busy = self._job
                if busy is None:
                    self._job = ctx
            if busy is not None:
                self.emit_error(ctx.request_id, SemSegLoopError(
                    f"the service is running '{busy.request['op']}' request {busy.request_id!r}; "
                    f"cancel it or wait for its final event before sending '{op.name}'"))
                return
            self.emit(pr.ACCEPTED, ctx.request_id, op=op.name)
            self._jobs.put((ctx, op))
        else:
            self.emit(pr.ACCEPTED, ctx.request_id, op=op.name)
            self._edits.put((ctx, op))

    def _execute(self, ctx: JobContext, op) -> None:
        kind, fields = pr.DONE, {}
        try:
            if ctx.cancelled():
                raise Cancelled()
            fields = op.handler(ctx, ctx.request) or {}
        except Cancelled as c:
            kind, fields = pr.CANCELLED, c.fields
        except ImportError as e:   # torch or MONAI missing in the engine's Python
            kind, fields = pr.ERROR, pr.error_fields(SemSegLoopError(
                f"'{op.name}' needs a Python package that is not installed in the engine's Python "
                f"({sys.executable}): {e}; install SemSegLoop's requirements there"),
                traceback.format_exc())
        except Exception as e:  # the service survives any job failure and reports it
            tb = traceback.format_exc()
            if not isinstance(e, SemSegLoopError):
                log.error("'%s' request %r failed:\n%s", op.name, ctx.request_id, tb)
            kind, fields = pr.ERROR, pr.error_fields(e, tb)
        # Free before the final event is written: a client that reacts to "done" by sending
        # the next job (predict after train) must find the service idle.
        if op.lane == JOB:
            with self._state_lock:
                if self._job is ctx:
                    self._job = None
        self.emit(kind, ctx.request_id, **fields)

    def run(self, stdin: IO[bytes]) -> int:
        """Read requests until EOF or ``shutdown``; cancel and finish what runs, then return 0."""
        self.emit(pr.READY, None, protocol=pr.PROTOCOL_VERSION, version=_version(),
                  device=self.device, project=str(self.project.path), pid=os.getpid(),
                  ops=sorted(self.ops))
        while not self._shutdown.is_set():
            line = stdin.readline(pr.MAX_LINE_BYTES + 1)
            if not line:
                break   # EOF: the client is gone or done
            if len(line) > pr.MAX_LINE_BYTES and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):   # drop the rest of the long line
                    line = stdin.readline(pr.MAX_LINE_BYTES + 1)
                self.emit_error(None, pr.RequestError(
                    f"request line longer than {pr.MAX_LINE_BYTES} bytes; pass data in files"))
                continue
            self.handle_line(line)
        self.close()
        return 0

    def close(self, timeout: float = SHUTDOWN_WAIT_S) -> None:
        """Cancel the running job and wait (up to ``timeout``) for it and the edits to end."""
        if self._closed:
            return
        self._closed = True
        with self._state_lock:
            job = self._job
        if job is not None:
            job.cancel_event.set()
        for lane in (self._jobs, self._edits):
            lane.stop()
        # Without a job the job thread may only be preloading: no need to wait for that.
        for lane in ((self._jobs, self._edits) if job is not None else (self._edits,)):
            lane.thread.join(timeout)
            if lane.thread.is_alive():
                log.error("a job did not stop within %.0f s of the shutdown; exiting anyway", timeout)


def _version() -> str:
    from semsegloop import __version__
    return __version__


def _events_stream() -> IO[str]:
    """The real stdout, for events only; fd 1 (Python prints, C libraries) goes to stderr."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "w", encoding="utf-8", newline="\n")


def serve(project_dir, device: str = "auto", new_process_group: bool = False,
          stdin: IO[bytes] | None = None) -> int:
    """Run the service on ``project_dir`` until EOF or ``shutdown``; returns the exit status.

    A project that cannot be opened is reported as one ``error`` event (``fatal``: true) and
    exit status 2, before torch is imported.
    """
    if new_process_group and hasattr(os, "setpgrp"):
        # The client then kills the whole tree (any helper processes torch starts) at once.
        os.setpgrp()
    events = _events_stream()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s semsegloop-service %(levelname)s %(message)s")
    stdin = stdin if stdin is not None else sys.stdin.buffer
    from semsegloop.project import Project

    try:
        project = Project.open(project_dir)
        device_name = _warm_up(device)
    except SemSegLoopError as e:
        events.write(pr.encode(pr.event(pr.ERROR, None, **pr.error_fields(e), fatal=True)))
        events.flush()
        print(f"semsegloop serve: error: {e}", file=sys.stderr)
        return 2
    log.info("serving project '%s' on %s (pid %d)", project.path, device_name, os.getpid())
    service = Service(project, events, device=device_name)
    try:
        return service.run(stdin)
    finally:
        log.info("service for '%s' ends", project.path)


def _warm_up(device: str) -> str | None:
    """Import torch and the training code before `ready` and choose the device it reports.

    Without torch the service still starts (device null), so a project can be opened and edited
    before the packages are installed; jobs that need torch then fail with a message saying so.
    """
    from semsegloop.learn import training

    try:
        import torch  # noqa: F401
    except ImportError as e:
        log.warning("torch cannot be imported (%s): training and prediction are unavailable", e)
        return None
    return str(training.select_device(device))


def _preload() -> None:
    """Import what the first round needs, so it starts at once: MONAI's networks, the
    teacher's scikit-learn, and torch's optimiser machinery (its first AdamW imports
    torch._dynamo, seconds on a laptop)."""
    try:
        import torch

        from semsegloop.learn import round as _round, teacher  # noqa: F401

        importlib.import_module("monai.networks.nets")
        teacher.available()   # imports scikit-learn's forest when it is installed
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    except Exception:   # the job that needs it will report the failure properly
        log.warning("preloading the training code failed", exc_info=True)
