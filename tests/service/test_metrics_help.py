"""What each metric's HELP and its README row say is what the code counts: every label
value a family can carry is named in both, and the README lists no family riskd lacks.

Review: ``riskd_degraded_decisions_total`` was "answers by the fallback policy", but its
``evidence`` and ``evidence_queue`` answers are the rules' own (1,808 answers of a full
decision log queue, none by the fallback); ``riskd_dependency_unavailable`` named no
dependency and ended "at its return", yet stays 1 for ``breaker_window_s`` after it
(5.1 s and 49 whole answers); ``riskd_features_catch_up_dropped_total{reason="failing"}``
was "given up after every call failed", yet with Redis down 30 s (every call failing) it
gave up none; ``riskd_rpc_latency_seconds`` did not say that refused calls and streams
are not timed (3 refused Score calls: 3 errors, no latency sample)."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from riskd.engine.catchup import ERROR, FAILING, FULL, LOST_AT_CLOSE, MAX_TRIES
from riskd.engine.scorer import _INPUTS, DEPENDENCIES, EVIDENCE, EVIDENCE_QUEUE, INFLIGHT
from riskd.service import convert
from riskd.service.gen.riskd.v1 import scoring_pb2, scoring_pb2_grpc
from riskd.service.router import _Missing
from riskd.service.server import RunningServer, create_server
from tests.service.conftest import make_config
from tests.service.test_scoring import fresh

TOKEN = "s3cret-token"
README = Path(__file__).parents[2] / "README.md"

LABEL_VALUES = {
    "riskd_degraded_decisions_total": [*sorted(_INPUTS), EVIDENCE, EVIDENCE_QUEUE, INFLIGHT],
    "riskd_dependency_unavailable": list(DEPENDENCIES),
    "riskd_features_catch_up_dropped_total": [FULL, FAILING, ERROR, LOST_AT_CLOSE],
    "riskd_score_worker_fallbacks_total": [m.value for m in _Missing],
}
"""Families whose label takes a closed set of values, and where the code gets them."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data = tmp_path_factory.mktemp("riskd")
    running = create_server(make_config(data, auth={"tokens": {TOKEN: "checkout-gw:checkout"}}))
    yield running
    running.stop(1)


def exported(server: RunningServer) -> dict[str, str]:
    """Each family /metrics exports (counters with ``_total``) and its HELP text."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        f"{f.name}_total" if f.type == "counter" else f.name: f.documentation
        for f in text_string_to_metric_families(text)
    }


def readme_rows() -> dict[str, str]:
    """The README's Metrics table: each family it names in its first column, and the row."""
    readme = README.read_text(encoding="utf-8")
    table = readme[readme.index("## Metrics") :].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        if line.startswith("| `riskd_"):
            first = line.split("|")[1]
            rows.update((name, line) for name in re.findall(r"`(riskd_\w+)`", first))
    return rows


@pytest.mark.parametrize(("family", "values"), LABEL_VALUES.items())
def test_help_and_readme_name_every_label_value_of_a_family(
    server: RunningServer, family: str, values: list[str]
) -> None:
    help_text, row = exported(server)[family], readme_rows()[family]
    assert [v for v in values if not re.search(rf"\b{v}\b", help_text)] == []
    assert [v for v in values if f"`{v}`" not in row] == []


def test_the_readme_lists_only_families_riskd_exports(server: RunningServer) -> None:
    assert sorted(set(readme_rows()) - set(exported(server))) == []


def test_the_catch_up_gives_an_order_up_as_help_and_readme_say(server: RunningServer) -> None:
    """Only after ``MAX_TRIES`` failed calls that the store answered around (the order is
    the trouble), never while the store is away (``tests/engine/test_catchup.py``)."""
    family = "riskd_features_catch_up_dropped_total"
    for text in (exported(server)[family], readme_rows()[family]):
        assert f"after {MAX_TRIES} failed calls" in text
        assert "away" in text


def test_refused_calls_count_as_errors_and_are_not_timed_as_help_says(
    server: RunningServer,
) -> None:
    score = {"method": "/riskd.v1.ScoringService/Score"}
    refused = {**score, "code": "UNAUTHENTICATED"}
    errors = server.metrics.value("riskd_rpc_errors_total", refused)
    timed = server.metrics.value("riskd_rpc_latency_seconds_count", score)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        request = scoring_pb2.ScoreRequest(order=convert.order_to_proto(fresh()))
        for _ in range(3):
            with pytest.raises(grpc.RpcError):
                stub.Score(request, timeout=5)
        stub.Score(request, timeout=5, metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert server.metrics.value("riskd_rpc_errors_total", refused) == errors + 3
    assert server.metrics.value("riskd_rpc_latency_seconds_count", score) == timed + 1
    helps = exported(server)
    assert "refused by authentication" in helps["riskd_rpc_latency_seconds"]
    assert "not timed" in helps["riskd_rpc_latency_seconds"]
    assert "refused by authentication" in helps["riskd_rpc_errors_total"]


def exported_labels(server: RunningServer) -> dict[str, set[str]]:
    """Each family /metrics exports and the label names of its series, after real calls;
    a family with no series yet (no rule error, no scoring worker) by its declared labels."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        request = scoring_pb2.ScoreRequest(order=convert.order_to_proto(fresh()))
        stub.Score(request, timeout=5, metadata=(("authorization", f"Bearer {TOKEN}"),))
        with pytest.raises(grpc.RpcError):  # refused: an error series, by method and code
            stub.Score(request, timeout=5)
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    declared = {}  # prometheus_client keeps labels of a family without series privately
    for collector in list(server.metrics.registry._collector_to_names):  # type: ignore[attr-defined]
        for family in collector.describe():
            names = getattr(collector, "_labelnames", getattr(family, "_labelnames", ()))
            declared[family.name] = set(names)
    labels = {}
    for f in text_string_to_metric_families(text):
        if f.name.endswith("_created"):  # the client library's creation timestamps
            continue
        seen = {n for s in f.samples for n in s.labels if not (f.type == "histogram" and n == "le")}
        labels[f"{f.name}_total" if f.type == "counter" else f.name] = seen or declared[f.name]
    return labels


def test_the_readme_names_the_labels_each_family_exports(server: RunningServer) -> None:
    """Dashboards and alerts are written from the README's labels column: a label it names
    that the series lack matches nothing, and one it omits splits series unseen."""
    columns = {n: set(re.findall(r"`(\w+)`", r.split("|")[2])) for n, r in readme_rows().items()}
    labels = exported_labels(server)
    assert {n: (columns[n], labels[n]) for n in labels if columns.get(n) != labels[n]} == {}
