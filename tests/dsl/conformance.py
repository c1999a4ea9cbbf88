"""Runner for the CEL conformance cases in ``shared/cel-conformance`` (JSON form).

``test_conformance.py`` walks every case; this module decodes the tagged
values, runs one case through the compiler and judges the result per the
folder's README.
"""

from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from riskd.dsl import runtime as rt
from riskd.dsl.checker import Env
from riskd.dsl.expr import compile_expr
from riskd.dsl.types import parse_type
from riskd.dsl.values import (
    EvalError,
    TypeValue,
    UInt,
    parse_duration,
    parse_timestamp,
    type_name,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def conformance_dir() -> Path:
    override = os.environ.get("CEL_CONFORMANCE_DIR")
    if override:
        return Path(override)
    return REPO_ROOT.parent / "shared" / "cel-conformance"


@dataclass(frozen=True, slots=True)
class Case:
    file: str
    section: str
    name: str
    data: Mapping[str, object]

    @property
    def id(self) -> str:
        return f"{self.file}/{self.section}/{self.name}"


def load_cases(folder: Path) -> Iterator[Case]:
    for path in sorted(folder.glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        for section in doc["sections"]:
            for test in section["tests"]:
                yield Case(path.stem, section["name"], test["name"], test)


def decode(tagged: Mapping[str, object]) -> object:
    """Tagged JSON value → run-time value."""
    ((tag, raw),) = tagged.items()
    if tag == "int":
        return int(str(raw))
    if tag == "uint":
        return UInt(int(str(raw)))
    if tag == "double":
        return float(raw) if not isinstance(raw, str) else float(raw.replace("Infinity", "inf"))
    if tag in ("string", "bool"):
        return raw
    if tag == "bytes":
        return base64.b64decode(str(raw))
    if tag == "null":
        return None
    if tag == "list":
        assert isinstance(raw, list)
        return [decode(v) for v in raw]
    if tag == "map":
        assert isinstance(raw, list)
        return {decode(k): decode(v) for k, v in raw}
    if tag == "type":
        return TypeValue(str(raw))
    if tag == "duration":
        return parse_duration(str(raw))
    if tag == "timestamp":
        return parse_timestamp(str(raw))
    raise ValueError(f"unknown tag {tag}")


def same(actual: object, tagged: Mapping[str, object]) -> bool:
    """Tag-aware equality of a result with an expected tagged value."""
    ((tag, _),) = tagged.items()
    expected = decode(tagged)
    kind = type_name(actual)
    names = {"null": "null_type", "duration": "google.protobuf.Duration",
             "timestamp": "google.protobuf.Timestamp"}  # fmt: skip
    if kind != names.get(tag, tag):
        return False
    if tag == "double":
        assert isinstance(actual, float) and isinstance(expected, float)
        return (math.isnan(actual) and math.isnan(expected)) or actual == expected
    if tag == "list":
        assert isinstance(actual, list | tuple) and isinstance(tagged["list"], list)
        items = tagged["list"]
        if len(actual) != len(items):
            return False
        return all(same(a, e) for a, e in zip(actual, items, strict=True))
    if tag == "map":
        assert isinstance(actual, dict) and isinstance(tagged["map"], list)
        entries = tagged["map"]
        if len(actual) != len(entries):
            return False
        for k, v in entries:
            found, value = rt.lookup(actual, decode(k))
            if not found or not same(value, v):
                return False
        return True
    return actual == expected


def run(case: Case) -> tuple[bool, str]:
    """Run one case; returns (passed, what happened)."""
    data = case.data
    env_types = data.get("type_env") or {}
    assert isinstance(env_types, dict)
    bindings_raw = data.get("bindings") or {}
    assert isinstance(bindings_raw, dict)
    bindings = {k: decode(v) for k, v in bindings_raw.items()}
    env = Env({k: parse_type(str(v)) for k, v in env_types.items()})
    strict = not data.get("disable_check", False)
    compiled, diags = compile_expr(str(data["expr"]), env, strict=strict)
    expect = data["expect"]
    assert isinstance(expect, dict)
    wants_error = "error" in expect or "eval_error_any" in expect
    if compiled is None:
        return wants_error, f"compile error: {diags}"
    try:
        result = compiled.evaluate(bindings)
    except EvalError as err:
        return wants_error, f"eval error: {err}"
    if wants_error:
        return False, f"expected an error, got {result!r}"
    ok = same(result, expect["value"])
    return ok, f"got {result!r}, want {expect['value']}"
