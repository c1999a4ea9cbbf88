"""Observation checks its fields and names the bad one, never echoing a key's value."""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys

import pytest

from riskd.domain.features import Agg, FeatureQuery
from riskd.errors import InvalidArgumentError
from riskd.features import Observation
from riskd.features.store import MAX_VALUE_LEN


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"order_id": ""}, "order_id"),
        ({"order_id": "x" * 129}, "order_id"),
        ({"order_id": "o1\n2"}, "order_id"),
        ({"at": math.nan}, "at"),
        ({"at": -1.0}, "at"),
        ({"at": True}, "at"),
        ({"amount": -1}, "amount"),
        ({"amount": 1.5}, "amount"),
        ({"amount": False}, "amount"),
        ({"keys": {"email": "secret-value"}}, "keys"),
        ({"keys": {"phone": 13812345678}}, "keys.phone"),
        ({"keys": {"phone": "s" * (MAX_VALUE_LEN + 1)}}, "keys.phone"),
        ({"keys": {"device": "secret-value\n"}}, "keys.device"),
        ({"content": "AAAAAA"}, "content"),  # one character short
        ({"content": "AAAAAA+"}, "content"),  # not URL-safe
    ],
)
def test_bad_field_is_named(kwargs: dict[str, object], field: str) -> None:
    fields: dict[str, object] = {"order_id": "o1", "at": 1.0, "amount": 100, "keys": {}}
    fields.update(kwargs)
    with pytest.raises(InvalidArgumentError) as info:
        Observation(**fields)  # type: ignore[arg-type]
    assert info.value.field == field
    assert "secret-value" not in str(info.value)
    assert "13812345678" not in str(info.value)


def test_empty_values_are_dropped_and_keys_frozen() -> None:
    obs = Observation("o1", 1.0, 0, {"buyer": "b", "device": ""})
    assert dict(obs.keys) == {"buyer": "b"}
    with pytest.raises(TypeError):
        obs.keys["ip"] = "x"  # type: ignore[index]


def test_time_is_kept_to_the_millisecond() -> None:
    assert Observation("o1", 1700000000.1234, 0).at_ms == 1700000000123
    assert Observation("o1", 1.001, 0).at_ms == 1001  # 1000.9999999999999 ms as a float


def test_a_value_of_the_longest_length_is_kept() -> None:
    obs = Observation("o1", 1.0, 0, {"device": "d" * MAX_VALUE_LEN}, "AAAAAA_")
    assert obs.keys["device"] == "d" * MAX_VALUE_LEN


@pytest.mark.parametrize(
    ("args", "of", "error"),
    [
        ((Agg.DISTINCT, "device", "1h"), "", "`of` is required for distinct counts"),
        ((Agg.COUNT, "device", "1h"), "buyer", "`of` is required for distinct counts"),
        ((Agg.SUM, "shoe_size", "1h"), "", "unknown feature key 'shoe_size'"),
        ((Agg.COUNT, "device", "2h"), "", "unknown window '2h'"),
        ((Agg.DISTINCT, "device", "1h"), "colour", "unknown feature key 'colour'"),
    ],
)
def test_a_feature_query_is_checked_when_made(
    args: tuple[Agg, str, str], of: str, error: str
) -> None:
    """A query the stores cannot answer is refused where a rule or a config makes it."""
    with pytest.raises(ValueError, match=error):
        FeatureQuery(*args, of=of)
    assert FeatureQuery(Agg.DISTINCT, "device", "1h", of="buyer").of == "buyer"


def test_a_feature_query_from_another_process_finds_its_entry() -> None:
    """The scoring workers' channel pickles what it carries: a query pickled by a process
    with another string-hash seed must hash as this process's own (it is a dict key on
    every velocity lookup), not keep the other process's hash."""
    script = (
        "import pickle, sys\n"
        "from riskd.domain.features import Agg, FeatureQuery\n"
        "q = FeatureQuery(Agg.DISTINCT, 'device', '1h', of='buyer')\n"
        "sys.stdout.buffer.write(pickle.dumps(q))\n"
    )
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # not this process's
    env = {**os.environ, "PYTHONHASHSEED": seed}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, check=True, timeout=60
    )
    theirs = pickle.loads(done.stdout)
    ours = FeatureQuery(Agg.DISTINCT, "device", "1h", of="buyer")
    assert theirs == ours and hash(theirs) == hash(ours)
    assert {ours: 3}[theirs] == 3
