"""The engine service's line protocol, version 1: JSON objects one per line, requests on stdin,
events on stdout. What a request must hold, how lines are encoded and decoded, the event kinds.

Requests: ``{"id": ..., "op": OP, ...}``. Events, each with the request's ``id``: ``accepted``,
``progress`` (any number), then exactly one final event: ``done``, ``cancelled`` or ``error``.
The service's first line is ``ready``. The README's "Engine service" section documents every op.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from semsegloop.errors import SemSegLoopError

PROTOCOL_VERSION = 1

READY, ACCEPTED, PROGRESS, DONE, CANCELLED, ERROR = (
    "ready", "accepted", "progress", "done", "cancelled", "error")
EVENTS = (READY, ACCEPTED, PROGRESS, DONE, CANCELLED, ERROR)
FINAL_EVENTS = (DONE, CANCELLED, ERROR)

# The service reads at most this many bytes per line; larger requests carry data in files.
MAX_LINE_BYTES = 1 << 20


class RequestError(SemSegLoopError):
    """A request line is malformed, names an unknown op, or lacks / mistypes a field."""

    request_id = None   # the request's id when the line had one, so the reply can name it


@dataclass(frozen=True)
class Field:
    """One request field: the JSON types it may have (None in ``types`` allows null)."""
    types: tuple
    required: bool = False
    doc: str = ""

    def check(self, op: str, name: str, value: Any) -> None:
        if value is None:
            if None in self.types:
                return
            raise RequestError(f"'{op}' request field '{name}' must not be null")
        allowed = tuple(t for t in self.types if t is not None)
        # JSON has one number type: an int is a valid float, but a bool is not a number.
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            names = " or ".join(_type_name(t) for t in self.types)
            raise RequestError(f"'{op}' request field '{name}' must be {names}, "
                               f"got {_type_name(type(value))} {value!r:.60}")


def _type_name(t) -> str:
    return {None: "null", str: "a string", int: "an integer", float: "a number", bool: "true/false",
            list: "a list", dict: "an object", type(None): "null"}.get(t, getattr(t, "__name__", str(t)))


@dataclass(frozen=True)
class OpSpec:
    """The fields of one op's request (besides ``id`` and ``op``)."""
    fields: dict[str, Field] = field(default_factory=dict)
    doc: str = ""


def decode_request(line: str | bytes) -> dict:
    """Parse one request line into a dict holding at least ``id`` and ``op`` (a string).

    Raises RequestError naming what is wrong; the error carries ``request_id`` when the line
    was a JSON object with an id, so the reply can be matched to it.
    """
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"request line is not UTF-8: {e}") from None
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise RequestError(f"request line is not JSON ({e}): {line.strip()[:80]!r}") from None
    if not isinstance(obj, dict):
        raise RequestError(f"a request must be a JSON object, got {type(obj).__name__}: "
                           f"{line.strip()[:80]!r}")
    request_id = obj.get("id")
    if "id" not in obj or not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
        raise _with_id(RequestError("request has no 'id' (a string or integer): "
                                    f"{line.strip()[:80]!r}"), None)
    op = obj.get("op")
    if not isinstance(op, str) or not op:
        raise _with_id(RequestError(f"request {request_id!r} has no 'op' (a string)"), request_id)
    return obj


def validate_request(request: dict, specs: dict[str, OpSpec]) -> dict:
    """Check a decoded request against its op's fields; returns it. Unknown fields are kept
    (forward compatibility), unknown ops and missing or mistyped fields raise RequestError."""
    op, request_id = request["op"], request["id"]
    spec = specs.get(op)
    if spec is None:
        raise _with_id(RequestError(f"unknown op '{op}' (known: {', '.join(sorted(specs))})"),
                       request_id)
    for name, f in spec.fields.items():
        if name not in request:
            if f.required:
                raise _with_id(RequestError(f"'{op}' request {request_id!r} lacks the field "
                                            f"'{name}'" + (f" ({f.doc})" if f.doc else "")),
                               request_id)
            continue
        try:
            f.check(op, name, request[name])
        except RequestError as e:
            raise _with_id(e, request_id) from None
    return request


def _with_id(error: RequestError, request_id) -> RequestError:
    error.request_id = request_id
    return error


def encode(obj: dict) -> str:
    """One JSON line (with the newline). NaN/inf become null so any JSON reader accepts it."""
    return json.dumps(_finite(obj), allow_nan=False, separators=(",", ":"), default=_default) + "\n"


def _finite(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if hasattr(v, "item") and callable(v.item) and getattr(v, "shape", None) == ():  # numpy scalar
        return _finite(v.item())
    return v


def _default(v):
    if hasattr(v, "tolist"):
        return _finite(v.tolist())
    if hasattr(v, "__fspath__"):
        return str(v)
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


def event(kind: str, request_id, **fields) -> dict:
    """An event object: ``{"event": kind, "id": request_id, ...fields}``."""
    return {"event": kind, "id": request_id, **fields}


def decode_event(line: str | bytes) -> dict:
    """Parse one event line from the service; raises RequestError if it is not an event."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise RequestError(f"service wrote a line that is not JSON ({e}): {line.strip()[:120]!r}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
        raise RequestError(f"service wrote a line that is not an event: {line.strip()[:120]!r}")
    return obj


def error_fields(exc: BaseException, traceback_text: str = "") -> dict:
    """The fields of an ``error`` event for an exception: the message, whether the user can fix
    it (a SemSegLoopError: bad input) or it is a bug, the exception type and the traceback."""
    user = isinstance(exc, SemSegLoopError)
    message = str(exc) or type(exc).__name__
    if not user:
        message = f"{type(exc).__name__}: {message}"
    return {"message": message, "user_error": user, "type": type(exc).__name__,
            "traceback": traceback_text}
