"""The penalty schedule: ``penalties.toml``, a reviewed file (the shipped one beside
this module, or an operator's in the rules folder).

Each violation type maps to a fixed amount in fen and/or a share of the
deposit in basis points, and a freeze length in days; the late-shipment
coupon amount lives in the same file. Loading validates every field and
raises ``ConfigError`` naming the first bad one.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from riskd.errors import ConfigError, InvalidArgumentError
from riskd.ledger.validate import MAX_FEN as MAX_REQUEST_FEN

MAX_FEN = 2**63 - 1
# a freeze's end must stay a time the API can answer (review: 3,000,000 days took the
# deposit, then every retry and statement of the shop was INTERNAL past the year 9999)
MAX_FREEZE_DAYS = 36_500
# package data, so that an installed riskd has it whatever its rules folder holds (review:
# a ConfigMap of rule files alone stopped the daemon at start naming the database)
DEFAULT_PATH = Path(__file__).resolve().with_name("penalties.toml")


@dataclass(frozen=True, slots=True)
class Violation:
    """One violation type and what it costs.

    >>> Violation("order_brushing", "", fixed_fen=500, deposit_share_bps=2000).penalty(10_000)
    2000
    """

    name: str
    description: str
    fixed_fen: int = 0
    deposit_share_bps: int = 0
    freeze_days: int = 0

    def penalty(self, deposit: int) -> int:
        """The penalty in fen for a shop holding ``deposit`` fen (integer arithmetic)."""
        return max(self.fixed_fen, deposit * self.deposit_share_bps // 10_000)


@dataclass(frozen=True, slots=True)
class PenaltySchedule:
    """Violation types, the late-shipment coupon, and the file's version."""

    version: str
    violations: Mapping[str, Violation]
    late_shipment_coupon_fen: int

    def violation(self, name: str) -> Violation:
        """The violation type called ``name``; ``InvalidArgumentError`` for unknown ones."""
        v = self.violations.get(name)
        if v is None:
            known = ", ".join(sorted(self.violations))
            raise InvalidArgumentError("violation", f"unknown violation type (known: {known})")
        return v


def load_schedule(path: Path = DEFAULT_PATH) -> PenaltySchedule:
    """Read and validate a penalty schedule file."""
    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot read penalty schedule: {e}") from e
    return parse_schedule(data, default_version=hashlib.sha256(raw).hexdigest()[:12], source=path)


def parse_schedule(
    data: Mapping[str, Any], *, default_version: str = "", source: object = "<schedule>"
) -> PenaltySchedule:
    """Build a schedule from parsed TOML data."""
    version = data.get("version", default_version)
    if not isinstance(version, str) or not version:
        raise ConfigError(f"{source}: version: must be a non-empty string")
    table = data.get("violations")
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"{source}: violations: at least one violation type is required")
    violations = {name: _violation(name, spec, source) for name, spec in table.items()}
    where = "coupons.late_shipment"
    coupon = _fen(data.get("coupons", {}).get("late_shipment", {}), "amount_fen", source, where)
    if coupon <= 0:
        raise ConfigError(f"{source}: {where}.amount_fen: must be positive")
    return PenaltySchedule(version, violations, coupon)


def _violation(name: str, spec: Any, source: object) -> Violation:
    where = f"violations.{name}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: {where}: must be a table")
    unknown = set(spec) - {"description", "fixed_fen", "deposit_share_bps", "freeze_days"}
    if unknown:
        raise ConfigError(f"{source}: {where}: unknown keys {sorted(unknown)}")
    v = Violation(
        name=name,
        description=str(spec.get("description", "")),
        fixed_fen=_fen(spec, "fixed_fen", source, where),
        deposit_share_bps=_int(spec, "deposit_share_bps", source, where),
        freeze_days=_int(spec, "freeze_days", source, where),
    )
    if v.freeze_days > MAX_FREEZE_DAYS:
        raise ConfigError(f"{source}: {where}.freeze_days: at most {MAX_FREEZE_DAYS} (100 years)")
    if v.deposit_share_bps > 10_000:
        raise ConfigError(f"{source}: {where}.deposit_share_bps: at most 10000 (the whole deposit)")
    if v.fixed_fen == 0 and v.deposit_share_bps == 0:
        raise ConfigError(f"{source}: {where}: needs fixed_fen or deposit_share_bps")
    return v


def _fen(spec: Any, key: str, source: object, where: str) -> int:
    """An amount the book posts as it stands: within what one request may move (review: a
    fixed_fen of 2^63 - 1 was charged once, then every later penalty of every shop was
    refused, the penalty income account's counter at its 64-bit end)."""
    value = _int(spec, key, source, where)
    if value > MAX_REQUEST_FEN:
        raise ConfigError(
            f"{source}: {where}.{key}: at most {MAX_REQUEST_FEN} fen"
            " (the most one request may move)"
        )
    return value


def _int(spec: Any, key: str, source: object, where: str) -> int:
    value = spec.get(key, 0) if isinstance(spec, dict) else 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_FEN:
        raise ConfigError(f"{source}: {where}.{key}: must be a non-negative integer")
    return value
