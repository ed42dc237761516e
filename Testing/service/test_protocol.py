"""The line protocol on its own: what a request must hold, and how events are written so any
JSON reader (a browser, another language) can read them."""

from __future__ import annotations

import json
import math

import pytest

from semsegloop.errors import SemSegLoopError
from semsegloop.service import protocol as pr
from semsegloop.service.ops import OPS


def _error(line):
    with pytest.raises(pr.RequestError) as e:
        pr.validate_request(pr.decode_request(line), {n: o.spec for n, o in OPS.items()})
    return e.value


def test_a_well_formed_request_passes_and_keeps_unknown_fields():
    req = pr.validate_request(pr.decode_request(b'{"id": "a", "op": "train", "steps": 3, "x": 1}\n'),
                              {n: o.spec for n, o in OPS.items()})
    assert req == {"id": "a", "op": "train", "steps": 3, "x": 1}


def test_malformed_lines_and_missing_fields_are_named_and_keep_the_id():
    e = _error("{not json")
    assert "not JSON" in str(e) and e.request_id is None
    e = _error("[1, 2]")
    assert "JSON object" in str(e)
    e = _error('{"op": "ping"}')
    assert "no 'id'" in str(e)
    e = _error('{"id": 7}')
    assert "no 'op'" in str(e) and e.request_id == 7
    e = _error('{"id": 8, "op": "fly"}')
    assert "unknown op 'fly'" in str(e) and "train" in str(e) and e.request_id == 8
    e = _error('{"id": 9, "op": "cancel"}')
    assert "lacks the field 'target'" in str(e) and e.request_id == 9
    e = _error('{"id": 10, "op": "train", "steps": "many"}')
    assert "'steps' must be an integer or null" in str(e)
    e = _error('{"id": 11, "op": "predict", "uncertainty": 1}')
    assert "'uncertainty' must be true/false" in str(e)
    assert isinstance(e, SemSegLoopError)   # bad input: user_error true in the event


def test_numbers_accept_integers_but_not_booleans():
    specs = {n: o.spec for n, o in OPS.items()}
    assert pr.validate_request({"id": 1, "op": "train", "time_budget_s": 5}, specs)
    with pytest.raises(pr.RequestError, match="time_budget_s"):
        pr.validate_request({"id": 1, "op": "train", "time_budget_s": True}, specs)


def test_events_are_one_strict_json_line_with_nan_as_null():
    line = pr.encode(pr.event("progress", "j1", loss=float("nan"), val_dice={"a": math.inf}, step=3))
    assert line.endswith("\n") and line.count("\n") == 1
    obj = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert obj == {"event": "progress", "id": "j1", "loss": None, "val_dice": {"a": None}, "step": 3}
    assert pr.decode_event(line) == obj
    with pytest.raises(pr.RequestError, match="not an event"):
        pr.decode_event('{"id": 1}')


def test_error_fields_tell_bad_input_from_a_bug():
    user = pr.error_fields(pr.RequestError("field 'x' is wrong"))
    bug = pr.error_fields(KeyError("oops"))
    assert user["user_error"] is True and user["message"] == "field 'x' is wrong"
    assert bug["user_error"] is False and bug["message"].startswith("KeyError")
