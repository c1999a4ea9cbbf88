"""Prometheus metrics of one server process, in its own registry, served over HTTP.

Labels never carry PII: outcomes, rule ids, method names, status codes and the
names of unavailable dependencies only.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import start_http_server

from riskd.domain.decision import Outcome


class _Hit(Protocol):
    @property
    def rule_id(self) -> str: ...


class EvidenceLike(Protocol):
    """What the gauges read of ``riskd.evidence.log.DecisionLog``."""

    @property
    def backlog(self) -> int: ...
    @property
    def rejected(self) -> int: ...
    @property
    def unsealed(self) -> int: ...


class DecisionLike(Protocol):
    """What the counters read of a decision (a domain ``Decision`` or a worker's summary)."""

    @property
    def outcome(self) -> Outcome: ...
    @property
    def reasons(self) -> Iterable[_Hit]: ...
    @property
    def degraded(self) -> Iterable[str]: ...
    @property
    def replayed(self) -> bool: ...


_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Metrics:
    """The daemon's counters and histograms, registered in ``registry``."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.decisions = Counter(
            "riskd_decisions", "Decisions by outcome.", ["outcome"], registry=r
        )
        self.rule_hits = Counter(
            "riskd_rule_hits", "Enforced rule hits by rule id.", ["rule_id"], registry=r
        )
        self.rule_errors = Counter(
            "riskd_rule_errors",
            "Rule results that were an error (the rule neither hit nor missed), by rule id.",
            ["rule_id"],
            registry=r,
        )
        self.degraded = Counter(
            "riskd_degraded_decisions",
            "Decisions made by the fallback policy, by unavailable dependency.",
            ["unavailable"],
            registry=r,
        )
        self.latency = Histogram(
            "riskd_rpc_latency_seconds",
            "Server-side RPC latency by method.",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rpc_errors = Counter(
            "riskd_rpc_errors",
            "RPCs that ended with an error, by method and code.",
            ["method", "code"],
            registry=r,
        )
        self.reload_failures = Counter(
            "riskd_rule_reload_failures", "Rule reloads rejected (old rules kept).", registry=r
        )
        self.reloads = Counter(
            "riskd_rule_reloads", "Rule reloads that swapped in new rules.", registry=r
        )

        # labelled children, looked up once per label value instead of once per decision
        self._by_outcome: dict[Outcome, Any] = {}
        self._by_rule: dict[str, Any] = {}
        self._by_error: dict[str, Any] = {}
        self._by_missing: dict[str, Any] = {}

    def observe_decisions(self, decisions: Iterable[DecisionLike]) -> None:
        """Count decisions by outcome, their rule hits, rule errors and degraded answers.

        A replayed decision (a retry's recorded answer) was counted when it was made.
        Rule errors come from a domain ``Decision``'s ``rule_errors``; a worker's answer
        (protobuf) does not carry them, so with scoring workers they go uncounted here
        (the worker's scorer still logs them).
        """
        for d in decisions:
            if d.replayed:
                continue
            child = self._by_outcome.get(d.outcome)
            if child is None:
                child = self._by_outcome[d.outcome] = self.decisions.labels(d.outcome.name.lower())
            child.inc()
            for reason in d.reasons:
                _child(self._by_rule, self.rule_hits, reason.rule_id).inc()
            for what in d.degraded:
                _child(self._by_missing, self.degraded, what).inc()
            for rule_id in getattr(d, "rule_errors", ()):
                _child(self._by_error, self.rule_errors, rule_id).inc()

    def watch_evidence(self, log: EvidenceLike) -> None:
        """Export the decision log's writer state, read at each scrape.

        ``riskd_evidence_backlog``: appended, not yet committed (what a crash now would
        lose; it grows while the database is down). ``riskd_evidence_rejected``: items
        the database refused and the writer set aside (never stored; alert on > 0).
        ``riskd_evidence_unsealed``: decisions stored with masked PII only, no ciphertexts
        (no usable data key, e.g. one wrapped under a retired master key; alert on > 0).
        """
        r = self.registry
        Gauge(
            "riskd_evidence_backlog",
            "Decisions and outcome reports appended to the decision log, not yet committed.",
            registry=r,
        ).set_function(lambda: log.backlog)
        Gauge(
            "riskd_evidence_rejected",
            "Decision-log items the database refused, set aside by the writer (not stored).",
            registry=r,
        ).set_function(lambda: log.rejected)
        Gauge(
            "riskd_evidence_unsealed",
            "Decisions logged with masked PII only: no usable data key to encrypt it.",
            registry=r,
        ).set_function(lambda: log.unsealed)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 when absent), e.g. ``riskd_decisions_total``."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else float(v)

    def text(self) -> bytes:
        return bytes(generate_latest(self.registry))


_MAX_CHILDREN = 10_000  # rule ids come from the rule files: bounded, but never trust that


def _child(cache: dict[str, Any], metric: Counter, label: str) -> Any:
    child = cache.get(label)
    if child is None:
        child = metric.labels(label)
        if len(cache) < _MAX_CHILDREN:
            cache[label] = child
    return child


class MetricsEndpoint:
    """The ``/metrics`` HTTP endpoint; ``port=0`` takes any free port (``.port`` tells which)."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
        self._server: Any = server
        self._thread: threading.Thread = thread
        self.port: int = int(server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
