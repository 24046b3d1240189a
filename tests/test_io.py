"""File helpers: strict JSON, JSON lines that name the file and line of what is wrong."""

from __future__ import annotations

import json
import math

import pytest

from baize_exp.io import JsonlError, read_jsonl, write_json


def _strict_loads(text: str):
    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_write_json_is_strict_json_with_null_for_nan_and_infinities(tmp_path) -> None:
    p = tmp_path / "metrics.json"
    write_json(p, {"eval": {"v1/judge_mean": math.nan, "ci": [math.inf, -math.inf, 1.5]}, "n": 3})
    assert _strict_loads(p.read_text()) == {"eval": {"v1/judge_mean": None, "ci": [None, None, 1.5]}, "n": 3}


def test_read_jsonl_repairs_only_a_torn_tail_and_names_other_lines(tmp_path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": ')
    with pytest.raises(JsonlError, match=r"d.jsonl:3: not valid JSON .*ends mid-line"):
        read_jsonl(p)
    assert read_jsonl(p, repair_tail=True) == [{"a": 1}, {"a": 2}]
    assert p.read_bytes() == b'{"a": 1}\n{"a": 2}\n'  # the torn line is cut off the file
    p.write_bytes(b'{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(JsonlError, match=r"d.jsonl:2: not valid JSON"):
        read_jsonl(p, repair_tail=True)  # a bad line in the middle is no crash's tail: never cut
    p.write_bytes(b'{"a": 1}\n[1, 2]\n')
    with pytest.raises(JsonlError, match=r"d.jsonl:2: expected a JSON object, found list"):
        read_jsonl(p)
