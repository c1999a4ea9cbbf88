"""Prometheus metrics of one server process, in its own registry, served over HTTP.

Labels never carry PII: outcomes, rule ids, method names, status codes and the
names of unavailable dependencies only.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import CounterMetricFamily

from riskd.domain.decision import Outcome
from riskd.engine.catchup import MAX_TRIES
from riskd.engine.scorer import DEPENDENCIES, INFLIGHT


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


class LogLike(EvidenceLike, Protocol):
    """The process's own decision log (``riskd.evidence.log.DecisionLog``)."""

    @property
    def superseded(self) -> int: ...
    @property
    def restarts(self) -> int: ...
    @property
    def hook_failures(self) -> int: ...


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
            "riskd_decisions",
            "Decisions made, by outcome (a retry's replayed answer is not counted again, nor "
            "its inflight answer).",
            ["outcome"],
            registry=r,
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
            "Degraded answers, by what was unavailable (an answer missing two counts under "
            "each): features, shops, rules, deadline (the rules had no time to run): the "
            "higher of the rules that ran and the fallback policy; evidence (the decision log "
            "could not be read) and evidence_queue (its full queue did not take the answer: "
            "never logged): the rules' own answer; inflight: a retry's fallback answer while "
            "its order's first call still decides it, not a decision.",
            ["unavailable"],
            registry=r,
        )
        self.latency = Histogram(
            "riskd_rpc_latency_seconds",
            "Server-side latency of unary RPCs by method (streams, and calls refused by "
            "authentication or rate limits, are not timed).",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rpc_errors = Counter(
            "riskd_rpc_errors",
            "RPCs that ended with an error status, by method and code: unary calls, calls "
            "refused by authentication, authorization or rate limits, and streams' requests "
            "that do not parse.",
            ["method", "code"],
            registry=r,
        )
        self.reload_failures = Counter(
            "riskd_rule_reload_failures", "Rule reloads rejected (old rules kept).", registry=r
        )
        self.reloads = Counter(
            "riskd_rule_reloads", "Rule reloads that swapped in new rules.", registry=r
        )
        self.access_reload_failures = Counter(
            "riskd_access_reload_failures",
            "SIGHUP reloads of the [auth] settings or the TLS files rejected (old ones kept).",
            registry=r,
        )
        self.worker_fallbacks = Counter(
            "riskd_score_worker_fallbacks",
            "Orders the gRPC process answered itself instead of its scoring worker, by "
            "reason: down (exited or broken), busy (held by other calls or owing a late "
            "answer), late (no answer by the deadline: the fallback policy).",
            ["reason"],
            registry=r,
        )
        self.worker_reroutes = Counter(
            "riskd_score_worker_reroutes",
            "Orders sent to another scoring worker because theirs was down or busy.",
            registry=r,
        )

        # what the scoring workers reported of their logs' counters (absorb_worker)
        self._workers_totals = dict.fromkeys(_LOG_TOTALS, 0.0)
        self._workers_dropped: dict[str, float] = {}  # their catch-ups' dropped orders, too
        # the rule ids of the program in force since the last swap (forget_rules); None
        # before one: every rule id the decisions carry is counted
        self._rule_ids: frozenset[str] | None = None
        # labelled children, looked up once per label value instead of once per decision
        self._by_outcome: dict[Outcome, Any] = {}
        self._by_rule: dict[str, Any] = {}
        self._by_error: dict[str, Any] = {}
        self._by_missing: dict[str, Any] = {}

    def observe_decisions(self, decisions: Iterable[DecisionLike]) -> None:
        """Count decisions by outcome, their rule hits, rule errors and degraded answers.

        A replayed decision (a retry's recorded answer) was counted when it was made. An
        ``inflight`` answer (a retry's fallback while the order's first call still decides
        it, not recorded) is not a decision either: it counts only in
        ``riskd_degraded_decisions_total{unavailable="inflight"}``.
        Rule errors come from a domain ``Decision``'s ``rule_errors``; a worker's answer
        (protobuf) does not carry them: the worker counts them in its own ``Metrics``
        and the server process adds them up with ``absorb_worker``.
        """
        for d in decisions:
            if d.replayed:
                continue
            if INFLIGHT in d.degraded:  # the first call's decision is the one counted
                _child(self._by_missing, self.degraded, INFLIGHT).inc()
                continue
            child = self._by_outcome.get(d.outcome)
            if child is None:
                child = self._by_outcome[d.outcome] = self.decisions.labels(d.outcome.name.lower())
            child.inc()
            ids = self._rule_ids
            for reason in d.reasons:
                if reason.rule_id.startswith("@"):  # the scorer's own (`@fallback`), no rule:
                    continue  # the degraded answers count it (a rule id never starts so)
                if ids is None or reason.rule_id in ids:
                    _child(self._by_rule, self.rule_hits, reason.rule_id).inc()
            for what in d.degraded:
                _child(self._by_missing, self.degraded, what).inc()
            for rule_id in getattr(d, "rule_errors", ()):
                if ids is None or rule_id in ids:
                    _child(self._by_error, self.rule_errors, rule_id).inc()

    def forget_rules(self, rule_ids: Collection[str]) -> None:
        """Drop the hit and error series of rule ids other than ``rule_ids`` (the program
        just swapped in): each id a rule edit retired kept two series for good (review:
        +2 per reload that renamed a rule, 15,000 ids a 3.5 MB scrape). Hits and errors of
        other rule ids counted after this (a decision of the old program answered late, a
        scoring worker's still on it, or its snapshot) are not counted: they brought the
        series back, in worker mode after every reload (review)."""
        keep = frozenset(rule_ids)
        self._rule_ids = keep
        for metric, cache in ((self.rule_hits, self._by_rule), (self.rule_errors, self._by_error)):
            for label in set(_by_label(metric, "rule_id")) - keep:
                cache.pop(label, None)
                with contextlib.suppress(KeyError):  # removed by a reload at the same time
                    metric.remove(label)

    def watch_evidence(self, log: LogLike, *more: EvidenceLike) -> None:
        """Export the decision log's writer state, read at each scrape (the sum over
        ``log`` and ``more``: the scoring workers' logs, as they last reported them).

        ``riskd_evidence_backlog``: appended, not yet committed (what a crash now would
        lose; it grows while the database is down). ``riskd_evidence_rejected``: items
        the database refused and the writer set aside (never stored; alert on > 0).
        ``riskd_evidence_unsealed``: decisions stored with masked PII only, no ciphertexts
        (no usable data key, e.g. one wrapped under a retired master key; alert on > 0).
        ``riskd_evidence_superseded_total``, a counter: decisions not stored because their
        order had a recorded decision already (another process decided it too), each an
        answer the log does not keep: ``log``'s and, added up by ``absorb_worker``, the
        scoring workers' (so it never goes down when a worker is replaced).
        ``riskd_evidence_writer_restarts_total``, a counter summed the same way: exceptions
        that escaped the log's writer thread (a bug; it went on with the batch it held,
        each run of them logged once; alert on an increase).
        ``riskd_evidence_commit_hook_failures_total``, a counter summed the same way:
        exceptions from the log's commit hooks (a bug; each commit stood, none is written
        again; each kind logged once).
        """
        r = self.registry
        logs = (log, *more)
        Gauge(
            "riskd_evidence_backlog",
            "Decisions and outcome reports appended to the decision log, not yet committed.",
            registry=r,
        ).set_function(lambda: sum(x.backlog for x in logs))
        Gauge(
            "riskd_evidence_rejected",
            "Decision-log items the database refused since start, set aside by the writer "
            "(not stored).",
            registry=r,
        ).set_function(lambda: sum(x.rejected for x in logs))
        Gauge(
            "riskd_evidence_unsealed",
            "Decisions logged since start with masked PII only: no usable data key to encrypt it.",
            registry=r,
        ).set_function(lambda: sum(x.unsealed for x in logs))
        for key, (name, text) in _LOG_TOTALS.items():
            r.register(_LogTotal(name, text, partial(getattr, log, key), self._workers_totals, key))

    def watch_catch_up(
        self, queued: Callable[[], int], dropped: Callable[[], Mapping[str, int]]
    ) -> None:
        """Export ``riskd_features_catch_up_queued``, read at each scrape: orders answered
        without their features, waiting to be counted in their windows
        (``riskd.engine.catchup``; with scoring workers, theirs as last reported too). It
        grows while the feature store is away and drains once it answers again. And
        ``riskd_features_catch_up_dropped_total{reason}``: such orders dropped uncounted
        (``dropped``: this process's; the scoring workers' are added by ``absorb_worker``)."""
        Gauge(
            "riskd_features_catch_up_queued",
            "Orders answered without their features, waiting to be counted in their windows.",
            registry=self.registry,
        ).set_function(queued)
        self.registry.register(_Dropped(dropped, self._workers_dropped))

    def watch_dependencies(self, unavailable: Callable[[], Collection[str]]) -> None:
        """Export ``riskd_dependency_unavailable{dependency}``, read at each scrape: 1 while
        the log tells an outage of that dependency (``Scorer.unavailable``; with scoring
        workers, any worker's as last reported too), from its warning, or from ``redis does
        not answer at start``, to ``dependency answers again``; else 0."""
        gauge = Gauge(
            "riskd_dependency_unavailable",
            "1 from the log's 'dependency unavailable' warning (or 'redis does not answer at "
            "start') to its 'dependency answers again', else 0: features (the feature store), "
            "evidence (the decision log's lookups), evidence_queue (the decision log's queue "
            "full: answers go out unlogged). An outage whose circuit opened ends once it has "
            "stayed closed breaker_window_s: 1 that long after the dependency answers. With "
            "scoring workers, any worker's as last reported.",
            ["dependency"],
            registry=self.registry,
        )
        for name in DEPENDENCIES:
            gauge.labels(name).set_function(partial(_is_in, name, unavailable))

    def snapshot(
        self,
        log: LogLike | None,
        catch_up: int,
        unavailable: Collection[str] = (),
        catch_up_dropped: Mapping[str, int] | None = None,
    ) -> dict[str, Any]:
        """What a scoring worker reports of its own metrics to the server process
        (plain data: it crosses the process boundary as JSON; ``catch_up``: its scorer's
        orders waiting to be counted; ``unavailable``: its dependencies in an outage)."""
        return {
            "catch_up": catch_up,
            "catch_up_dropped": dict(catch_up_dropped or {}),
            "unavailable": sorted(unavailable),
            "rule_errors": _by_label(self.rule_errors, "rule_id"),
            "backlog": 0 if log is None else log.backlog,
            "rejected": 0 if log is None else log.rejected,
            "unsealed": 0 if log is None else log.unsealed,
            "superseded": 0 if log is None else log.superseded,
            "restarts": 0 if log is None else log.restarts,
            "hook_failures": 0 if log is None else log.hook_failures,
        }

    def absorb_worker(self, before: dict[str, Any] | None, now: dict[str, Any]) -> None:
        """Add the rule errors a worker counted since its last ``snapshot`` (``before``;
        None for a new worker) to this process's counter. A worker that was replaced
        starts from zero again; what it counted after its last report is not counted.
        (Reloads are not added: workers run the programs the server process reloads.)"""
        old_errors = {} if before is None else before["rule_errors"]
        ids = self._rule_ids
        for rule_id, count in now["rule_errors"].items():
            grown = _grown(old_errors.get(rule_id, 0.0), count)
            if grown and (ids is None or rule_id in ids):  # a retired rule's: forget_rules
                _child(self._by_error, self.rule_errors, rule_id).inc(grown)
        for key in _LOG_TOTALS:
            old = 0.0 if before is None else float(before.get(key, 0))
            self._workers_totals[key] += _grown(old, float(now.get(key, 0)))
        was = {} if before is None else before.get("catch_up_dropped", {})
        for reason, count in now.get("catch_up_dropped", {}).items():
            grown = _grown(float(was.get(reason, 0)), float(count))
            self._workers_dropped[reason] = self._workers_dropped.get(reason, 0.0) + grown

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


def _by_label(metric: Counter, label: str) -> dict[str, float]:
    """A labelled counter's totals by label value."""
    return {
        sample.labels[label]: sample.value
        for family in metric.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }


# the decision log's counters (``LogLike``): attribute -> the metric's name and help
_LOG_TOTALS = {
    "superseded": (
        "riskd_evidence_superseded",
        "Decisions not logged because their order had a recorded decision already.",
    ),
    "restarts": (
        "riskd_evidence_writer_restarts",
        "Exceptions that escaped the decision log's writer thread (a bug): each time it "
        "went on with the batch it held, after a pause.",
    ),
    "hook_failures": (
        "riskd_evidence_commit_hook_failures",
        "Exceptions raised by the decision log's commit hooks (a bug): each commit stood "
        "and was not written again; the writer went on at once.",
    ),
}


class _LogTotal:
    """A decision log's counter, read at each scrape (``watch_evidence``): the server
    process's own plus what its scoring workers reported."""

    def __init__(
        self, name: str, text: str, own: Callable[[], int], workers: Mapping[str, float], key: str
    ) -> None:
        self._name = name
        self._help = text
        self._own = own
        self._workers = workers
        self._key = key

    def describe(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self._name, self._help)]

    def collect(self) -> list[CounterMetricFamily]:
        value = self._own() + self._workers[self._key]
        return [CounterMetricFamily(self._name, self._help, value=value)]


class _Dropped:
    """``riskd_features_catch_up_dropped_total{reason}``, read at each scrape
    (``Metrics.watch_catch_up``)."""

    _NAME = "riskd_features_catch_up_dropped"
    _HELP = (
        "Orders answered without their features and dropped uncounted, by reason: full (no"
        " room in the catch-up queue; each try: a retry queues its order again or counts"
        f" again), failing (given up after {MAX_TRIES} failed calls, each one the store"
        " answered a read of the order's keys after: never while the store is away), error"
        " (an unexpected exception, a bug, indexing or recording it), lost_at_close (left"
        " queued at a stop and neither kept in the database nor written to a spill file in"
        " the data folder)."
    )

    def __init__(self, own: Callable[[], Mapping[str, int]], workers: Mapping[str, float]):
        self._own = own
        self._workers = workers

    def describe(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self._NAME, self._HELP, labels=["reason"])]

    def collect(self) -> list[CounterMetricFamily]:
        family = CounterMetricFamily(self._NAME, self._HELP, labels=["reason"])
        own = self._own()
        for reason in sorted({*own, *self._workers}):
            family.add_metric([reason], own.get(reason, 0) + self._workers.get(reason, 0.0))
        return [family]


def _is_in(name: str, names: Callable[[], Collection[str]]) -> float:
    return float(name in names())


def _grown(before: float, now: float) -> float:
    """How much a counter grew; a counter below its last value was reset (a new process)."""
    return now - before if now >= before else now


class MetricsEndpoint:
    """The ``/metrics`` HTTP endpoint; ``port=0`` takes any free port (``.port`` tells which).

    prometheus_client serves each connection on a thread of its own that waits for the
    request with no time limit, so idle connections held threads for good (review: 300
    half-sent requests, 300 threads, still there later); a connection that has not sent
    its request within ``read_timeout_s`` is closed.
    """

    def __init__(
        self, metrics: Metrics, host: str, port: int, *, read_timeout_s: float = 10.0
    ) -> None:
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
        # a subclass, set before any connection is likely: the library's class stays as is
        handler: type = server.RequestHandlerClass  # type: ignore[assignment]
        server.RequestHandlerClass = type("TimedHandler", (handler,), {"timeout": read_timeout_s})
        self._server: Any = server
        self._thread: threading.Thread = thread
        self.port: int = int(server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
