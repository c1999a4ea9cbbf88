"""The error interceptor through a real server: RiskdError → status + message, bugs → INTERNAL."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from riskd.errors import InvalidArgumentError, NotFoundError, RiskdError, UnavailableError
from riskd.service.gen.riskd.v1 import order_pb2, scoring_pb2
from riskd.service.interceptors import ErrorInterceptor
from riskd.service.logs import configure_logging
from riskd.service.metrics import Metrics
from riskd.service.server import RunningServer, create_server
from tests.service.conftest import make_config

Behaviour = Callable[[bytes], bytes]


def _raise(error: Exception) -> Behaviour:
    def handler(request: bytes) -> bytes:
        raise error

    return handler


def _slow(request: bytes) -> bytes:
    time.sleep(0.05)
    return request


class _OddError(RiskdError):
    status = "NO_SUCH_CODE"  # a class naming no gRPC code: INTERNAL, its message kept


BEHAVIOURS: dict[str, Behaviour] = {
    "Echo": lambda request: request,
    "Slow": lambda request: _slow(request),
    "Invalid": _raise(InvalidArgumentError("order.amounts.total", "must equal items")),
    "Missing": _raise(NotFoundError("no such order")),
    "Down": _raise(UnavailableError("features unavailable")),
    "Root": _raise(RiskdError("plain riskd error")),
    "Bug": _raise(KeyError("13812345678")),
    "Odd": _raise(_OddError("odd riskd error")),
}


@pytest.fixture(scope="module")
def channel_and_metrics() -> Iterator[tuple[grpc.Channel, Metrics]]:
    metrics = Metrics()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), interceptors=[ErrorInterceptor(metrics)]
    )
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            lambda req, ctx, b=b: b(req),
            request_deserializer=None,
            response_serializer=None,
        )
        for name, b in BEHAVIOURS.items()
    }
    handlers["Unimplemented"] = grpc.unary_unary_rpc_method_handler(_unimplemented)
    handlers["Unknown"] = grpc.unary_unary_rpc_method_handler(_not_found)
    handlers["Aborted"] = grpc.unary_unary_rpc_method_handler(_aborted)
    handlers["Pooled"] = grpc.unary_unary_rpc_method_handler(_thread_name)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, metrics
    server.stop(None)
    OWN_POOL.shutdown(wait=False)


def _unimplemented(request: bytes, context: grpc.ServicerContext) -> bytes:
    # what grpc's generated base servicers do (grpcio-health's Health.List)
    context.set_code(grpc.StatusCode.UNIMPLEMENTED)
    context.set_details("Method not implemented!")
    raise NotImplementedError("Method not implemented!")


def _not_found(request: bytes, context: grpc.ServicerContext) -> bytes:
    # what grpcio-health's Check does for a service it does not know: set, then return
    context.set_code(grpc.StatusCode.NOT_FOUND)
    return b""


def _aborted(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not in this state")


OWN_POOL = futures.ThreadPoolExecutor(1, thread_name_prefix="own-pool")


def _thread_name(request: bytes, context: grpc.ServicerContext) -> bytes:
    return threading.current_thread().name.encode()


_thread_name.experimental_thread_pool = OWN_POOL  # type: ignore[attr-defined]


def call(channel: grpc.Channel, name: str, request: bytes = b"ping") -> bytes:
    return channel.unary_unary(f"/t.T/{name}")(request, timeout=5)  # type: ignore[no-any-return]


def logged_failure(
    channel: grpc.Channel, name: str, request: bytes = b"ping"
) -> tuple[grpc.RpcError, str]:
    """Call ``name``, which fails: its error and the JSON log lines written meanwhile."""
    stream = io.StringIO()
    configure_logging("info", stream)
    try:
        with pytest.raises(grpc.RpcError) as e:
            call(channel, name, request)
    finally:
        logging.getLogger("riskd").handlers.clear()
    return e.value, stream.getvalue()


def lines_of(logged: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in logged.splitlines()]


def test_success_passes_through(channel_and_metrics: tuple[grpc.Channel, Metrics]) -> None:
    channel, metrics = channel_and_metrics
    assert call(channel, "Echo") == b"ping"
    assert metrics.value("riskd_rpc_latency_seconds_count", {"method": "/t.T/Echo"}) >= 1
    assert metrics.value("riskd_rpc_errors_total", {"method": "/t.T/Echo", "code": "OK"}) == 0


def test_the_access_log_gives_each_calls_time_in_milliseconds(
    channel_and_metrics: tuple[grpc.Channel, Metrics],
) -> None:
    # operators read slow calls off the "ms" of the access log
    channel, _ = channel_and_metrics
    stream = io.StringIO()
    configure_logging("info", stream)
    try:
        assert call(channel, "Slow") == b"ping"
    finally:
        logging.getLogger("riskd").handlers.clear()
    (line,) = lines_of(stream.getvalue())
    assert (line["method"], line["code"]) == ("/t.T/Slow", "OK")
    assert 50 <= line["ms"] < 5000


@pytest.mark.parametrize(
    ("name", "code", "message"),
    [
        ("Invalid", grpc.StatusCode.INVALID_ARGUMENT, "order.amounts.total: must equal items"),
        ("Missing", grpc.StatusCode.NOT_FOUND, "no such order"),
        ("Down", grpc.StatusCode.UNAVAILABLE, "features unavailable"),
        ("Root", grpc.StatusCode.INTERNAL, "plain riskd error"),
        ("Bug", grpc.StatusCode.INTERNAL, "internal error"),
        ("Odd", grpc.StatusCode.INTERNAL, "odd riskd error"),
    ],
)
def test_errors_map_to_status_codes(
    channel_and_metrics: tuple[grpc.Channel, Metrics],
    name: str,
    code: grpc.StatusCode,
    message: str,
) -> None:
    channel, metrics = channel_and_metrics
    with pytest.raises(grpc.RpcError) as e:
        call(channel, name)
    assert e.value.code() == code
    assert e.value.details() == message
    assert metrics.value("riskd_rpc_errors_total", {"method": f"/t.T/{name}", "code": code.name})
    # a failed call is timed too: the histogram is of every unary call, not only the OK ones
    assert metrics.value("riskd_rpc_latency_seconds_count", {"method": f"/t.T/{name}"}) >= 1


@pytest.mark.parametrize(
    ("limit", "served"),
    [
        (64, 62),  # under EAGER_PARSE_BYTES grpcio parses it: its size is checked after
        (70_000, 69_996),  # over it, its bytes are counted before any parse
    ],
)
def test_a_request_over_max_message_bytes_is_invalid_argument_naming_the_field(
    limit: int, served: int
) -> None:
    # a request of exactly the limit is served on either path; one byte more is refused
    with sized_call(limit, health_pb2.HealthCheckRequest) as sized:
        exact = health_pb2.HealthCheckRequest(service="x" * served)
        assert exact.ByteSize() == limit
        sized(exact, timeout=5)
        with pytest.raises(grpc.RpcError) as e:
            sized(health_pb2.HealthCheckRequest(service="x" * (served + 1)), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    expected = f"service: the request is {limit + 1} bytes, more than the limit of {limit}"
    assert e.value.details() == expected


def test_a_parsed_request_over_the_limit_names_the_nested_field_that_holds_most_of_it() -> None:
    # a limit under EAGER_PARSE_BYTES: the caller still learns which order and field to fix
    orders = [order_pb2.Order(order_id=f"o-{i}") for i in range(3)]
    orders[1].buyer.address.detail = "x" * 5000
    with (
        sized_call(4096, scoring_pb2.ScoreBatchRequest) as sized,
        pytest.raises(grpc.RpcError) as e,
    ):
        sized(scoring_pb2.ScoreBatchRequest(orders=orders), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("orders[1].buyer.address.detail: the request is ")


@contextmanager
def sized_call(limit: int, message: type[Message]) -> Iterator[grpc.UnaryUnaryMultiCallable]:
    """A call to a server whose error interceptor refuses requests over ``limit`` bytes
    (of ``message``; it answers an empty health response)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        interceptors=[ErrorInterceptor(Metrics(), max_message_bytes=limit)],
    )
    handler = grpc.unary_unary_rpc_method_handler(
        lambda request, context: health_pb2.HealthCheckResponse(),
        request_deserializer=message.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("t.S", {"Sized": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel.unary_unary(
                "/t.S/Sized",
                request_serializer=message.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
    finally:
        server.stop(None)


def test_a_calls_latency_is_observed_in_seconds_in_its_bucket(
    channel_and_metrics: tuple[grpc.Channel, Metrics],
) -> None:
    """Dashboards read ``riskd_rpc_latency_seconds`` with histogram_quantile: a call of
    50 ms and more lands above the 0.05 bucket and well within 2.5 s, its sum in seconds."""
    channel, metrics = channel_and_metrics
    method = {"method": "/t.T/Slow"}

    def sample(name: str, **labels: str) -> float:
        return metrics.value(f"riskd_rpc_latency_seconds_{name}", {**method, **labels})

    before = [sample("bucket", le="0.05"), sample("bucket", le="2.5"), sample("sum")]
    assert call(channel, "Slow") == b"ping"
    after = [sample("bucket", le="0.05"), sample("bucket", le="2.5"), sample("sum")]
    assert after[0] - before[0] == 0
    assert after[1] - before[1] == 1
    assert 0.05 <= after[2] - before[2] < 2.5


def test_unexpected_error_log_has_type_not_message(
    channel_and_metrics: tuple[grpc.Channel, Metrics],
) -> None:
    channel, _ = channel_and_metrics
    _, logged = logged_failure(channel, "Bug", b"buyer phone 13912345678")
    lines = lines_of(logged)
    # an error-level line (what alerts watch) that says which method has the bug
    expected = {"level": "error", "msg": "unhandled error", "error_type": "KeyError"}
    assert {**expected, "method": "/t.T/Bug"}.items() <= lines[0].items()
    assert lines[-1]["code"] == "INTERNAL" and lines[-1]["method"] == "/t.T/Bug"
    assert "13812345678" not in logged
    assert "13912345678" not in logged  # nor the request's


def test_a_status_the_handler_set_is_kept_without_a_traceback(
    channel_and_metrics: tuple[grpc.Channel, Metrics],
) -> None:
    channel, _ = channel_and_metrics
    error, logged = logged_failure(channel, "Unimplemented")
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert error.details() == "Method not implemented!"
    lines = lines_of(logged)
    assert [line["msg"] for line in lines] == ["rpc"]
    assert lines[0]["code"] == "UNIMPLEMENTED"


def test_wrapped_handlers_keep_grpcs_flags(
    channel_and_metrics: tuple[grpc.Channel, Metrics],
) -> None:
    # grpcio runs a behaviour with experimental_thread_pool in that pool: the wrapper
    # must carry the flag (as the auth interceptor's must carry experimental_non_blocking)
    channel, _ = channel_and_metrics
    assert call(channel, "Pooled").startswith(b"own-pool")


def test_a_status_set_without_raising_is_logged_and_counted(
    channel_and_metrics: tuple[grpc.Channel, Metrics],
) -> None:
    """Review: a health check for an unknown service (NOT_FOUND, set and returned) was
    logged as OK and not counted: a probe with a misspelt service name looked healthy."""
    channel, metrics = channel_and_metrics
    error, logged = logged_failure(channel, "Unknown")
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert [(line["msg"], line["code"]) for line in lines_of(logged)] == [("rpc", "NOT_FOUND")]
    labels = {"method": "/t.T/Unknown", "code": "NOT_FOUND"}
    assert metrics.value("riskd_rpc_errors_total", labels) == 1


def test_a_call_the_handler_aborted_is_logged_and_counted_with_its_code(
    channel_and_metrics: tuple[grpc.Channel, Metrics],
) -> None:
    channel, metrics = channel_and_metrics
    error, logged = logged_failure(channel, "Aborted")
    assert (error.code(), error.details()) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "not in this state",
    )
    assert [(line["msg"], line["code"]) for line in lines_of(logged)] == [
        ("rpc", "FAILED_PRECONDITION")
    ]
    labels = {"method": "/t.T/Aborted", "code": "FAILED_PRECONDITION"}
    assert metrics.value("riskd_rpc_errors_total", labels) == 1


def test_a_method_whose_handler_changes_is_wrapped_again() -> None:
    """The wrapped handler is built once per method, and again for another handler
    (a generic handler may return a new one): never the old handler's wrapper."""
    interceptor = ErrorInterceptor(Metrics())

    class Details:
        method = "/t.T/Echo"

    first = grpc.unary_unary_rpc_method_handler(lambda request, context: b"first")
    second = grpc.unary_unary_rpc_method_handler(lambda request, context: b"second")
    wrapped = interceptor.intercept_service(lambda _: first, Details())  # type: ignore[arg-type]
    assert interceptor.intercept_service(lambda _: first, Details()) is wrapped  # type: ignore[arg-type]
    rewrapped = interceptor.intercept_service(lambda _: second, Details())  # type: ignore[arg-type]
    assert rewrapped is not None and rewrapped is not wrapped


@pytest.fixture(scope="module")
def riskd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = create_server(make_config(tmp_path_factory.mktemp("riskd")))
    yield running
    running.stop(1)


WATCH = "/grpc.health.v1.Health/Watch"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


@pytest.mark.parametrize(
    ("method", "data", "details"),
    [
        (WATCH, b"\x0a\xff", "request: is not a valid protobuf message"),
        (WATCH, b"\x0a\x02\xc3\x28", "service: is not valid UTF-8"),
        (REFLECTION, b"\xff\xff\xff", "request: is not a valid protobuf message"),
        (REFLECTION, b"\x3a\x02\xc3\x28", "list_services: is not valid UTF-8"),
    ],
)
def test_streamed_bytes_that_do_not_parse_are_invalid_argument_without_a_traceback(
    riskd_server: RunningServer,
    caplog: pytest.LogCaptureFixture,
    method: str,
    data: bytes,
    details: str,
) -> None:
    """Review: health Watch and reflection answered such bytes INTERNAL, grpcio logging a
    traceback at error level for each (any caller could flood the error log)."""
    labels = {"method": method, "code": "INVALID_ARGUMENT"}
    errors = riskd_server.metrics.value("riskd_rpc_errors_total", labels)
    with (
        grpc.insecure_channel(f"127.0.0.1:{riskd_server.port}") as channel,
        caplog.at_level(logging.WARNING),
        pytest.raises(grpc.RpcError) as e,
    ):
        if method == WATCH:
            list(channel.unary_stream(method)(data, timeout=5))
        else:
            list(channel.stream_stream(method)(iter([data]), timeout=5))
    assert (e.value.code(), e.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, details)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert riskd_server.metrics.value("riskd_rpc_errors_total", labels) == errors + 1


def test_a_refused_stream_is_in_the_access_log(riskd_server: RunningServer) -> None:
    # a stream refused for its bytes leaves the same trace as a refused unary call
    stream = io.StringIO()
    configure_logging("info", stream)
    try:
        with (
            grpc.insecure_channel(f"127.0.0.1:{riskd_server.port}") as channel,
            pytest.raises(grpc.RpcError),
        ):
            list(channel.unary_stream(WATCH)(b"\x0a\xff", timeout=5))
    finally:
        logging.getLogger("riskd").handlers.clear()
    refusals = [(line["msg"], line["method"], line["code"]) for line in lines_of(stream.getvalue())]
    assert ("rpc", WATCH, "INVALID_ARGUMENT") in refusals
