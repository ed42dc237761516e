"""One background thread that owns all torch work (training and prediction) for the Slicer module,
fed by a job queue and reporting through an event queue that the GUI drains on its own thread.

Why one persistent thread: torch/cuDNN caches are per thread, so a new thread per job pays the
warm-up again (SlicerNNInteractive measured 1.2 s vs 0.11 s). Why queues and no Qt: MRML, VTK, Qt
and ``slicer.util`` are not thread-safe, so this thread never touches them; the widget's main-thread
``qt.QTimer`` calls :meth:`TrainingWorker.poll_events` and updates the GUI from there.

The labels a run uses are the ones in the project when the job is submitted: ``submit_train``
copies the label arrays it is given and stores them in the project on the caller's thread before
queueing, so strokes painted while training runs only count from the next Train press.
"""

from __future__ import annotations

import logging
import queue
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np

from semsegloop.errors import SemSegLoopError, TrainingError

log = logging.getLogger(__name__)

FINAL_KINDS = ("done", "error", "cancelled")


class WorkerEvent(NamedTuple):
    """kind: "progress" (payload: TrainProgress), "done" (payload: the job's result),
    "error" (payload: JobError), "cancelled" (payload: the partial result, e.g. a TrainResult with
    cancelled=True, or None if the job never started). job: "train", "predict" or "call"."""
    kind: str
    payload: Any
    job: str


@dataclass(frozen=True)
class JobError:
    """An exception raised by a job, as the GUI needs it: the message to show, the traceback for
    the details box, and whether it is the user's to fix (a SemSegLoopError) or a bug."""
    exception: BaseException
    traceback: str

    @property
    def message(self) -> str:
        return str(self.exception) or type(self.exception).__name__

    @property
    def user_error(self) -> bool:
        return isinstance(self.exception, SemSegLoopError)


@dataclass
class _Job:
    kind: str
    fn: Callable[[threading.Event], Any]
    is_cancelled: Callable[[Any], bool] = field(default=lambda result: False)


_STOP = object()


class TrainingWorker:
    """Runs one job at a time on a single daemon thread; see the module docstring.

    Typical GUI use: ``submit_train(...)`` on Train, ``cancel()`` on Stop, ``poll_events()`` from a
    QTimer. Console/tests: ``submit_train(...)`` then ``wait()``.
    """

    def __init__(self, name: str = "SemSegLoop worker") -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._events: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._busy = False
        self._current: str | None = None
        self._unconsumed_finals = 0   # submitted jobs whose final event nobody has read yet
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ submitting

    def submit_train(self, project, labels: dict[str, np.ndarray] | None = None,
                     **train_kwargs) -> None:
        """Train ``project`` in the background: ``project.train(progress=..., cancel=...,
        **train_kwargs)``.

        labels: optional {image_id: (S,Y,X) uint8} snapshot. Each array is copied and stored with
        ``project.set_labels`` here, on the caller's thread, so a LabelError reaches the caller at
        once and later painting cannot change this run.
        Raises TrainingError if a job is already running.
        """
        for key in ("progress", "cancel"):
            if key in train_kwargs:
                raise TypeError(f"submit_train sets '{key}' itself; do not pass it")
        self._reserve("train")
        try:
            for image_id, array in (labels or {}).items():
                project.set_labels(image_id, np.array(array, dtype=np.uint8, copy=True))
        except BaseException:
            self._release_reservation()
            raise

        def run(cancel: threading.Event):
            return project.train(progress=self._post_progress, cancel=cancel, **train_kwargs)

        self._jobs.put(_Job("train", run, is_cancelled=lambda r: bool(getattr(r, "cancelled", False))))

    def submit_predict(self, project, image_ids: list[str] | None = None, full: bool = True,
                       **predict_kwargs) -> None:
        """Predict ``image_ids`` (all project images if None) in the background.

        The "done" payload is {image_id: result}, where result is ``project.predict_full(id)``
        (labels, probabilities, entropy) if ``full`` else ``project.predict(id, **kwargs)``
        (labels only). Cancel stops the running image's sliding window and skips the rest; the
        "cancelled" payload then holds the images already predicted.
        """
        self._reserve("predict")
        ids = list(project.image_ids if image_ids is None else image_ids)
        state = {"complete": False}

        def run(cancel: threading.Event):
            results = {}
            for image_id in ids:
                if cancel.is_set():
                    return results
                try:
                    if full:
                        results[image_id] = project.predict_full(image_id, cancel=cancel,
                                                                 **predict_kwargs)
                    else:
                        results[image_id] = project.predict(image_id, cancel=cancel,
                                                            **predict_kwargs)
                except SemSegLoopError:
                    if cancel.is_set():   # the engine reports a cancelled prediction as an error
                        return results
                    raise
            state["complete"] = True
            return results

        self._jobs.put(_Job("predict", run, is_cancelled=lambda r: not state["complete"]))

    def submit_call(self, fn: Callable[[threading.Event], Any], kind: str = "call") -> None:
        """Run ``fn(cancel_event)`` on the worker thread (any torch work that must share its
        caches). Its return value is the "done" payload."""
        self._reserve(kind)
        self._jobs.put(_Job(kind, fn))

    # ------------------------------------------------------------------ control and state

    def cancel(self) -> None:
        """Ask the running job to stop; training checks this every step (within 2 s)."""
        self._cancel.set()

    def is_busy(self) -> bool:
        """True from submit until the job's final event has been queued."""
        with self._lock:
            return self._busy

    @property
    def current_job(self) -> str | None:
        with self._lock:
            return self._current if self._busy else None

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def poll_events(self) -> list[WorkerEvent]:
        """All events queued so far, oldest first, without blocking (for the GUI's QTimer)."""
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            events.append(event)
        self._consumed(events)
        return events

    def wait(self, timeout: float | None = None,
             on_event: Callable[[WorkerEvent], None] | None = None) -> WorkerEvent | None:
        """Block until the submitted job ends; return its final event ("done", "error" or
        "cancelled"), or None if nothing is pending or ``timeout`` seconds passed first.

        Events read here (progress included, passed to ``on_event`` on the calling thread) are
        not returned again by :meth:`poll_events`.
        """
        import time
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self._unconsumed_finals == 0 and self._events.empty():
                    return None
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            try:
                # A bounded get so a dead thread cannot hang the caller forever.
                event = self._events.get(timeout=0.5 if remaining is None else min(0.5, remaining))
            except queue.Empty:
                if not self._thread.is_alive():
                    return None
                continue
            self._consumed([event])
            if on_event is not None:
                on_event(event)
            if event.kind in FINAL_KINDS:
                return event

    def shutdown(self, timeout: float | None = 5.0) -> bool:
        """Cancel the running job, stop the thread and wait up to ``timeout`` seconds for it.
        Returns True if the thread has ended. Further submits raise TrainingError."""
        with self._lock:
            self._closed = True
        self._cancel.set()
        self._jobs.put(_STOP)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ internals

    def _reserve(self, kind: str) -> None:
        with self._lock:
            if self._closed:
                raise TrainingError("the SemSegLoop worker has been shut down; reload the module")
            if self._busy:
                raise TrainingError(
                    f"SemSegLoop is already running a {self._current} job; press Stop or wait "
                    f"for it to finish before starting another.")
            self._busy = True
            self._current = kind
            self._unconsumed_finals += 1
            # Cleared here, not in the thread: a cancel() that arrives before the job starts
            # must still stop it.
            self._cancel.clear()

    def _release_reservation(self) -> None:
        with self._lock:
            self._busy = False
            self._unconsumed_finals -= 1

    def _consumed(self, events: list[WorkerEvent]) -> None:
        finals = sum(1 for e in events if e.kind in FINAL_KINDS)
        if finals:
            with self._lock:
                self._unconsumed_finals = max(0, self._unconsumed_finals - finals)

    def _post_progress(self, progress) -> None:
        self._events.put(WorkerEvent("progress", progress, "train"))

    def _finish(self, event: WorkerEvent) -> None:
        # Not busy before the event is visible: a GUI that reacts to "done" by submitting the
        # next job (predict after train) must not be refused.
        with self._lock:
            self._busy = False
        self._events.put(event)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            if self._cancel.is_set():
                self._finish(WorkerEvent("cancelled", None, job.kind))
                continue
            try:
                result = job.fn(self._cancel)
            except Exception as exc:  # the thread must survive any job failure
                tb = traceback.format_exc()
                if not isinstance(exc, SemSegLoopError):
                    log.error("SemSegLoop %s job failed:\n%s", job.kind, tb)
                self._finish(WorkerEvent("error", JobError(exc, tb), job.kind))
                continue
            kind = "cancelled" if job.is_cancelled(result) else "done"
            self._finish(WorkerEvent(kind, result, job.kind))
