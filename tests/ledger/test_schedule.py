"""The reviewed penalty schedule (shipped ``penalties.toml``) and its validation."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

import pytest

import riskd
from riskd.errors import ConfigError, InvalidArgumentError
from riskd.ledger.schedule import DEFAULT_PATH, load_schedule


def test_the_shipped_schedule_is_package_data_so_an_installed_riskd_has_it() -> None:
    """Review: it was read from the checkout's rules/ folder, which an installed riskd
    (the Docker image's ``pip install .``) lacks: a rules folder of rule files alone
    stopped the daemon at start."""
    package = Path(riskd.__file__).parent
    assert DEFAULT_PATH.is_relative_to(package)
    where = DEFAULT_PATH.parent.relative_to(package.parent)
    pyproject = tomllib.loads((package.parent / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"].get(".".join(where.parts), [])
    assert any(fnmatch.fnmatch(DEFAULT_PATH.name, p) for p in patterns)


def test_the_shipped_schedule_has_the_platform_plans_violations() -> None:
    s = load_schedule()
    assert DEFAULT_PATH.name == "penalties.toml"
    assert s.violation("content_violation_serious").freeze_days == 30
    assert s.late_shipment_coupon_fen == 500
    for name in ("counterfeit_goods", "order_brushing", "not_as_described", "substandard_goods"):
        assert s.violation(name).penalty(0) > 0


def test_penalty_is_the_larger_of_fixed_and_share_in_integer_fen() -> None:
    v = load_schedule().violation("order_brushing")  # 5,000 CNY or 20%
    assert v.penalty(1_000_000) == 500_000
    assert v.penalty(10_000_001) == 2_000_000  # floor, never a float


def test_unknown_violation_names_the_field() -> None:
    with pytest.raises(InvalidArgumentError, match="violation: unknown"):
        load_schedule().violation("nope")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("version = 'x'\n", "violations"),
        ("version = 'x'\n[violations]\n", "violations: at least one"),
        ("version = ''\n[violations.a]\nfixed_fen = 1\n", "version: must be a non-empty"),
        ("[violations.a]\nfixed_fen = -1\n", "violations.a.fixed_fen"),
        ("[violations.a]\nfixed_fen = 1.5\n", "violations.a.fixed_fen"),
        ("[violations.a]\ndeposit_share_bps = 10001\n", "deposit_share_bps"),
        ("[violations.a]\nfreeze_days = 1\n", "needs fixed_fen"),
        ("[violations.a]\nfixed_fen = 1\nfine = 2\n", "unknown keys"),
        # review: a "permanent" freeze took the deposit, then every retry and statement of
        # the shop was INTERNAL (its end past what a protobuf Timestamp holds)
        ("[violations.a]\nfixed_fen = 1\nfreeze_days = 3000000\n", "freeze_days: at most"),
        ("[violations.a]\nfixed_fen = 1\n", "coupons.late_shipment.amount_fen"),
        # review: a non-integer coupon was named "coupons.amount_fen"
        (
            "[violations.a]\nfixed_fen = 1\n[coupons.late_shipment]\namount_fen = 'x'\n",
            r"coupons\.late_shipment\.amount_fen: must be a non-negative integer",
        ),
        # review: amounts the book posts as they stand stay within one request's maximum
        ("[violations.a]\nfixed_fen = 1000000000001\n", r"violations\.a\.fixed_fen: at most"),
        (
            "[violations.a]\nfixed_fen = 1\n[coupons.late_shipment]\namount_fen = 1000000000001\n",
            r"coupons\.late_shipment\.amount_fen: at most 1000000000000 fen",
        ),
        ("[violations.a\n", "cannot read"),
    ],
)
def test_bad_schedules_name_the_field(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=error):
        load_schedule(path)
