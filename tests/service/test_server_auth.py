"""create_server binding and access control: tokens, plaintext only on loopback, shared ports."""

from __future__ import annotations

import logging
import socket
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from riskd.config import Config, load_config
from riskd.errors import ConfigError, RuleCompileError
from riskd.service import convert, interceptors, policy
from riskd.service import server as server_module
from riskd.service.callers import DEFAULT_RATE_LIMITS
from riskd.service.gen.riskd.v1 import (
    ledger_pb2,
    ledger_pb2_grpc,
    order_pb2,
    scoring_pb2,
    scoring_pb2_grpc,
)
from riskd.service.healthcheck import HealthServicer
from riskd.service.metrics import Metrics, MetricsEndpoint
from riskd.service.server import access_settings, create_server
from tests.service.conftest import RULES, make_config
from tests.service.test_lifecycle import eventually
from tests.service.test_scoring import fresh


def test_auth_table_turns_on_authentication(tmp_path: Path) -> None:
    config = make_config(tmp_path, auth={"tokens": {"s3cret-token": "checkout-gw:checkout"}})
    running = create_server(config)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = scoring_pb2_grpc.ScoringServiceStub(ch)
            request = scoring_pb2.ScoreRequest(order=convert.order_to_proto(fresh()))
            with pytest.raises(grpc.RpcError) as e:
                stub.Score(request, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = stub.Score(
                request, timeout=5, metadata=(("authorization", "Bearer s3cret-token"),)
            )
            assert reply.decision.order_id == request.order.order_id
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # public
        assert (
            running.metrics.value(
                "riskd_rpc_errors_total",
                {"method": "/riskd.v1.ScoringService/Score", "code": "UNAUTHENTICATED"},
            )
            == 1
        )
    finally:
        running.stop(1)


def test_embedded_default_lets_anonymous_loopback_callers_score_and_nothing_else(
    tmp_path: Path,
) -> None:
    running = create_server(make_config(tmp_path))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            request = scoring_pb2.ScoreRequest(order=convert.order_to_proto(fresh()))
            reply = scoring_pb2_grpc.ScoringServiceStub(ch).Score(request, timeout=5)
            assert reply.decision.order_id == request.order.order_id
            ledger = ledger_pb2_grpc.LedgerServiceStub(ch)
            top_up = ledger_pb2.TopUpFundRequest(
                idempotency_key="k-1", amount_fen=100, reason="test"
            )
            with pytest.raises(grpc.RpcError) as e:
                ledger.TopUpFund(top_up, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            statement = ledger_pb2.ListAccountsRequest()
            with pytest.raises(grpc.RpcError) as e:
                ledger.ListAccounts(statement, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED  # a token would do
    finally:
        running.stop(1)


def test_embedded_default_scores_under_checkouts_limit_not_the_public_one(tmp_path: Path) -> None:
    # its anonymous caller is the local checkout: the public limit (50/s) would throttle it
    settings = access_settings(make_config(tmp_path), tls=False)
    limit = settings.limit_for(settings.anonymous_roles, anonymous=True)
    assert limit == DEFAULT_RATE_LIMITS[policy.CHECKOUT]


def test_plaintext_is_refused_off_loopback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^listen: "):
        create_server(make_config(tmp_path, listen="0.0.0.0:0"))


def test_bad_auth_table_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^auth\.colour: "):
        create_server(make_config(tmp_path, auth={"colour": "blue"}))


def test_port_owned_by_another_program_names_listen(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        senders = _health_senders()
        with pytest.raises(ConfigError, match=r"^listen: cannot bind .*: Address already in"):
            create_server(make_config(tmp_path / "data", listen=f"127.0.0.1:{port}"))
        assert _health_senders() == senders  # a failed start leaves no thread behind
    assert not (tmp_path / "data").exists()  # nor a database or a keyring


def _health_senders() -> int:
    return sum(t.name == "riskd-health" for t in threading.enumerate())


def test_two_servers_share_one_port(tmp_path: Path) -> None:
    # SO_REUSEPORT: several riskd processes (here two servers) listen on one port.
    first = create_server(make_config(tmp_path / "a"))
    try:
        second = create_server(make_config(tmp_path / "b", listen=f"127.0.0.1:{first.port}"))
        assert second.port == first.port
        second.stop(0)
    finally:
        first.stop(0)


def test_ledger_service_is_registered_and_reflected(tmp_path: Path) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    running = create_server(make_config(tmp_path))
    try:
        assert "riskd.v1.LedgerService" in running.services
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="riskd.v1.LedgerService"), timeout=5
            )
        assert "riskd.v1.LedgerService" in services
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(0)


def test_keyring_is_generated_once_and_reused(tmp_path: Path) -> None:
    create_server(make_config(tmp_path)).stop(0)
    first = (tmp_path / "keyring.json").read_text()
    assert (tmp_path / "keyring.json").stat().st_mode & 0o077 == 0
    create_server(make_config(tmp_path)).stop(0)
    assert (tmp_path / "keyring.json").read_text() == first


def test_missing_configured_keyring_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^keyring_file: "):
        create_server(make_config(tmp_path, keyring_file=str(tmp_path / "nope.json")))


def test_metrics_port_in_use_names_the_key(tmp_path: Path) -> None:
    first = create_server(make_config(tmp_path / "a"))
    try:
        with pytest.raises(ConfigError, match=r"^metrics_port: cannot bind"):
            create_server(make_config(tmp_path / "b", metrics_port=first.metrics_port))
    finally:
        first.stop(0)
    assert not (tmp_path / "b").exists()  # the port is tried before anything is created


def _metrics_at(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2) as conn:
            conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            return b"riskd_decisions_total" in conn.makefile("rb").read()
    except OSError:
        return False


def test_metrics_listen_on_metrics_host_apart_from_the_grpc_address(tmp_path: Path) -> None:
    """/metrics is plain HTTP without credentials: an operator keeps it off the address
    callers reach (review: TLS on the gRPC port left it open on the same address)."""
    running = create_server(make_config(tmp_path, listen="127.0.0.1:0", metrics_host="127.0.0.2"))
    try:
        assert _metrics_at("127.0.0.2", running.metrics_port)
        assert not _metrics_at("127.0.0.1", running.metrics_port)
    finally:
        running.stop(0)
    running = create_server(make_config(tmp_path, listen="127.0.0.1:0"))
    try:  # by default, the gRPC listen host
        assert _metrics_at("127.0.0.1", running.metrics_port)
    finally:
        running.stop(0)


def test_an_idle_metrics_connection_is_closed_and_holds_no_thread() -> None:
    """Review: each connection that never sent its request held a server thread for good
    (300 half-sent requests, 300 threads)."""
    endpoint = MetricsEndpoint(Metrics(), "127.0.0.1", 0, read_timeout_s=0.3)
    before = threading.active_count()
    try:
        idle = [socket.create_connection(("127.0.0.1", endpoint.port)) for _ in range(20)]
        for conn in idle:
            conn.sendall(b"GET /metr")  # half a request, then nothing
        for conn in idle:
            conn.settimeout(10)
            assert conn.recv(1024) == b""  # the server hung up
            conn.close()
        assert eventually(lambda: threading.active_count() <= before)
        assert _metrics_at("127.0.0.1", endpoint.port)  # a whole request is still served
    finally:
        endpoint.close()


@pytest.mark.parametrize("host", ["127.0.0.1:9464", "a b", "[]", "http://x"])
def test_a_metrics_host_with_a_port_or_blanks_is_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError, match=r"^metrics_host: expected a host name or address"):
        create_server(make_config(tmp_path, metrics_host=host))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_start_that_fails_later_frees_the_metrics_port(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "a.rules").write_text("rule r { when = order.nope }\n")
    config = make_config(tmp_path / "data", metrics_port=port, rules_dir=str(rules))
    with pytest.raises(RuleCompileError):
        create_server(config)
    running = create_server(make_config(tmp_path / "data", metrics_port=port))
    try:
        assert running.metrics_port == port
    finally:
        running.stop(0)


def test_a_start_that_fails_after_its_components_are_built_closes_them(tmp_path: Path) -> None:
    """A hook that raises: the components already built (the decision log's writer, the
    catch-up thread, their database) are closed, not left running in the process."""

    def broken(server: grpc.Server) -> list[str]:
        raise RuntimeError("a servicer hook that fails")

    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="hook that fails"):
        create_server(make_config(tmp_path), extra_servicers=[broken])
    assert eventually(lambda: not [t for t in threading.enumerate() if t not in before])


def test_a_port_grpc_cannot_bind_after_the_probe_names_listen() -> None:
    """The probe passed, then another program took the port (or grpcio refused it):
    ``listen`` is named, rather than a server reported on port 0."""
    server = grpc.server(futures.ThreadPoolExecutor(1))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ConfigError, match=f"listen: cannot bind {listen}"):
            server_module._bind(server, listen, None)


def test_open_health_watches_do_not_stall_scoring(tmp_path: Path) -> None:
    # Watch is public and non-blocking: more anonymous Watch streams than RPC threads
    # (workers = 4) are all served and hold no thread, and scoring answers at once
    config = make_config(tmp_path, workers=4, auth={"tokens": {"gw-token": "gw:checkout"}})
    running = create_server(config)
    channels = [grpc.insecure_channel(f"127.0.0.1:{running.port}") for _ in range(12)]
    try:
        streams = [
            health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=20)
            for ch in channels
        ]
        assert [next(s).status for s in streams] == [health_pb2.HealthCheckResponse.SERVING] * 12
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            request = scoring_pb2.ScoreRequest(order=convert.order_to_proto(fresh()))
            started = time.monotonic()
            reply = scoring_pb2_grpc.ScoringServiceStub(ch).Score(
                request, timeout=2, metadata=(("authorization", "Bearer gw-token"),)
            )
            assert reply.decision.order_id == request.order.order_id
            assert time.monotonic() - started < 1.0
        running.set_serving(False)  # every watcher hears of it
        assert [next(s).status for s in streams] == [
            health_pb2.HealthCheckResponse.NOT_SERVING
        ] * 12
    finally:
        for ch in channels:
            ch.close()
        running.stop(0)


def test_status_changes_never_hang_on_watchers_going_away(tmp_path: Path) -> None:
    """grpcio-health sent to watchers under its lock, which a watcher's cancellation needs
    on grpc's poller thread: a status change could hang for good. Changes race
    cancellations here, bounded in time."""
    running = create_server(make_config(tmp_path, workers=4))
    try:
        for _ in range(10):  # 80 watches: within the public rate limit's burst (100)
            channels = [grpc.insecure_channel(f"127.0.0.1:{running.port}") for _ in range(8)]
            streams = [
                health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=20)
                for ch in channels
            ]
            for stream in streams:
                next(stream)
            flips = threading.Thread(
                target=lambda: [running.set_serving(i % 2 == 0) for i in range(50)]
            )
            flips.start()
            for stream in streams:
                stream.cancel()
            flips.join(10)
            assert not flips.is_alive(), "a status change hung on a cancelled watcher"
            for ch in channels:
                ch.close()
    finally:
        running.stop(0)


def test_health_watches_that_ended_leave_nothing_behind(tmp_path: Path) -> None:
    # review: every service name ever watched (Watch is public) kept an entry for good
    running = create_server(make_config(tmp_path))
    health = running.health
    assert isinstance(health, HealthServicer)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            kept = stub.Watch(health_pb2.HealthCheckRequest(), timeout=20)
            assert next(kept).status == health_pb2.HealthCheckResponse.SERVING
            for i in range(30):
                stream = stub.Watch(health_pb2.HealthCheckRequest(service=f"svc-{i}"), timeout=20)
                assert next(stream).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                stream.cancel()
            assert eventually(lambda: set(health._send_response_callbacks) == {""})
            kept.cancel()
            assert eventually(lambda: not health._send_response_callbacks)
    finally:
        running.stop(0)


def test_a_watch_whose_call_ended_before_it_was_served_leaves_nothing_behind() -> None:
    # review: grpc refuses add_callback for a call already over (cancelled at once), so
    # no close callback came and its service name stayed in the table for good
    class Ended:
        def add_callback(self, callback: object) -> bool:
            return False

    health = HealthServicer()
    sent: list[object] = []
    try:
        request = health_pb2.HealthCheckRequest(service="gone")
        assert health.Watch(request, Ended(), sent.append) is None
        assert not health._send_response_callbacks
        health.set("gone", health_pb2.HealthCheckResponse.SERVING)
    finally:
        health.close()
    assert sent == []  # nothing queued for the ended call


def test_a_watch_whose_send_fails_stops_no_other_watchs_updates(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One sender thread serves every watch: a send that raises is logged, and the
    others' updates (a drain's NOT_SERVING) still go out."""

    class Open:
        def add_callback(self, callback: object) -> bool:
            return True

    def broken(response: object) -> None:
        raise RuntimeError("stream gone")

    health = HealthServicer()
    sent: list[health_pb2.HealthCheckResponse] = []
    request = health_pb2.HealthCheckRequest(service="s")
    try:
        with caplog.at_level(logging.WARNING, logger="riskd.service.healthcheck"):
            health.Watch(request, Open(), broken)
            health.Watch(request, Open(), sent.append)
            health.set("s", health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        health.close()  # once what is queued is sent
    assert [r.status for r in sent] == [
        health_pb2.HealthCheckResponse.SERVICE_UNKNOWN,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    ]
    assert [r.getMessage() for r in caplog.records] == ["health watch update failed"] * 2


def test_score_batch_spends_one_token_per_order_up_to_the_burst(tmp_path: Path) -> None:
    auth = {
        "tokens": {"tok-a": "a:checkout", "tok-b": "b:checkout"},
        "rate_limits": {"checkout": "0.001/s:10"},
    }
    running = create_server(make_config(tmp_path, auth=auth))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = scoring_pb2_grpc.ScoringServiceStub(ch)

            def batch(token: str, n: int) -> grpc.StatusCode:
                orders = [convert.order_to_proto(fresh()) for _ in range(n)]
                try:
                    stub.ScoreBatch(
                        scoring_pb2.ScoreBatchRequest(orders=orders),
                        timeout=10,
                        metadata=(("authorization", f"Bearer {token}"),),
                    )
                except grpc.RpcError as e:
                    return e.code()  # type: ignore[no-any-return]
                return grpc.StatusCode.OK

            ok, exhausted = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
            assert [batch("tok-a", 4) for _ in range(3)] == [ok, ok, exhausted]
            # a batch larger than the burst costs the whole burst, never more
            assert batch("tok-b", 25) is ok
            assert batch("tok-b", 1) is exhausted
    finally:
        running.stop(0)


def test_a_large_batch_is_parsed_only_once_its_caller_is_admitted_and_pays_per_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """grpcio builds a request before any interceptor runs: 16 MiB of empty orders (16 KB
    gzipped) cost seconds of CPU from anyone (review). A request over EAGER_PARSE_BYTES is
    parsed after admission, and still costs a token per order."""
    parses: list[int] = []
    real = interceptors.Deferred.parsed
    monkeypatch.setattr(
        interceptors.Deferred, "parsed", lambda self: parses.append(1) or real(self)
    )
    auth = {"tokens": {"tok-a": "a:checkout"}, "rate_limits": {"checkout": "0.001/s:10"}}
    running = create_server(make_config(tmp_path, auth=auth))
    orders = [convert.order_to_proto(fresh()) for _ in range(9)]
    for order in orders:  # 9 orders of 200 items: ~90 KB
        del order.items[:]
        for j in range(200):
            order.items.add(sku=f"sku-{j:04}-" + "0" * 30, category="c", unit_price=1, quantity=1)
        order.amounts.Clear()
        order.amounts.items = order.amounts.total = 200
    big = scoring_pb2.ScoreBatchRequest(orders=orders)
    assert big.ByteSize() > interceptors.EAGER_PARSE_BYTES
    small = scoring_pb2.ScoreBatchRequest(orders=[convert.order_to_proto(fresh())] * 2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = scoring_pb2_grpc.ScoringServiceStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.ScoreBatch(big, timeout=10)  # no credentials
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert parses == []
            token = (("authorization", "Bearer tok-a"),)
            assert len(stub.ScoreBatch(big, timeout=10, metadata=token).decisions) == 9
            assert parses  # for the cost, then for the servicer (parsed once: below)
            with pytest.raises(grpc.RpcError) as e:
                stub.ScoreBatch(small, timeout=10, metadata=token)  # 9 + 2 > the burst
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            del small.orders[1:]
            stub.ScoreBatch(small, timeout=10, metadata=token)  # the last token
            before = len(parses)
            with pytest.raises(grpc.RpcError) as e:
                stub.ScoreBatch(big, timeout=10, metadata=token)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(parses) == before  # an empty bucket refuses before the parse (review)
    finally:
        running.stop(0)


def test_a_batch_refused_unparsed_costs_a_token_per_kib(tmp_path: Path) -> None:
    """100,000 empty orders (200 KB) are refused before their parse (``orders: more than
    500``) and cost what 195 orders of a KB would: a refusal that cheap cannot be repeated
    at a token a time, nor drain a checkout's whole burst as their parse did. Bytes that
    do not parse cost as much (review)."""
    auth = {"tokens": {"tok-a": "a:checkout"}, "rate_limits": {"checkout": "0.001/s:300"}}
    running = create_server(make_config(tmp_path, auth=auth))
    refused = scoring_pb2.ScoreBatchRequest(orders=[order_pb2.Order()] * 100_000)
    assert refused.ByteSize() // policy.REFUSED_BYTES_PER_TOKEN == 195
    token = (("authorization", "Bearer tok-a"),)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = scoring_pb2_grpc.ScoringServiceStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.ScoreBatch(refused, timeout=10, metadata=token)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details() == "orders: more than 500 orders in one batch"
            orders = [convert.order_to_proto(fresh()) for _ in range(106)]
            with pytest.raises(grpc.RpcError) as e:  # 105 tokens are left
                stub.ScoreBatch(
                    scoring_pb2.ScoreBatchRequest(orders=orders), timeout=10, metadata=token
                )
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            del orders[105:]
            batch = scoring_pb2.ScoreBatchRequest(orders=orders)
            assert len(stub.ScoreBatch(batch, timeout=30, metadata=token).decisions) == 105
            call = ch.unary_unary("/riskd.v1.ScoringService/ScoreBatch")
            with pytest.raises(grpc.RpcError) as e:  # bytes that do not parse: 1 KiB
                call(b"\x0a\x00" * 512 + b"\x0f", timeout=10, metadata=token)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        running.stop(0)


def test_an_empty_or_unparsable_batch_still_costs_its_tokens(tmp_path: Path) -> None:
    """A batch of no orders costs a token, as any call does (else it could be sent without
    limit); bytes that do not parse cost a token per KiB, however few tokens are left."""
    auth = {"tokens": {"tok-a": "a:checkout"}, "rate_limits": {"checkout": "0.001/s:3"}}
    running = create_server(make_config(tmp_path, auth=auth))
    token = (("authorization", "Bearer tok-a"),)
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            call = ch.unary_unary("/riskd.v1.ScoringService/ScoreBatch")

            def code(request: bytes) -> grpc.StatusCode:
                try:
                    call(request, timeout=10, metadata=token)
                except grpc.RpcError as e:
                    return e.code()  # type: ignore[no-any-return]
                return grpc.StatusCode.OK

            assert code(b"\x0a\x00" * 1024 + b"\x0f") is not exhausted  # 2 KiB: 2 tokens
            assert code(b"") is not exhausted  # no orders: the last token
            assert code(b"") is exhausted
    finally:
        running.stop(0)


def test_a_deferred_request_is_parsed_once() -> None:
    seen: list[bytes] = []

    def parse(data: bytes) -> str:
        seen.append(data)
        return "message"

    request = interceptors.Deferred(b"bytes", parse)
    assert interceptors.parsed(request) == request.parsed() == "message"
    assert seen == [b"bytes"]


def test_an_empty_auth_table_closes_the_open_default(tmp_path: Path) -> None:
    path = tmp_path / "riskd.toml"
    path.write_text("[auth]\n")
    config = load_config(
        path,
        env={},
        listen="127.0.0.1:0",
        metrics_port=-1,
        rules_dir=str(RULES),
        data_dir=str(tmp_path / "data"),
    )
    assert config.auth == {}
    running = create_server(config)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            request = scoring_pb2.ScoreRequest(order=convert.order_to_proto(fresh()))
            with pytest.raises(grpc.RpcError) as e:
                scoring_pb2_grpc.ScoringServiceStub(ch).Score(request, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        running.stop(0)
    assert load_config(env={}).auth is None  # no table: the open loopback default


def test_health_list_answers_unimplemented_not_internal(tmp_path: Path) -> None:
    config = make_config(tmp_path, auth={"tokens": {"ops-token": "ops:operator"}})
    running = create_server(config)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            with pytest.raises(grpc.RpcError) as e:
                health_pb2_grpc.HealthStub(ch).List(
                    health_pb2.HealthListRequest(),
                    timeout=5,
                    metadata=(("authorization", "Bearer ops-token"),),
                )
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        running.stop(0)


def test_a_reload_revokes_and_adds_tokens_and_a_bad_file_keeps_the_old_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # review: tokens were read at start only: revoking a leaked one needed a restart
    path = tmp_path / "riskd.toml"
    path.write_text('[auth.tokens]\n"tok-old" = "gw-old:checkout"\n')

    def reread() -> Config:
        overrides = {"listen": "127.0.0.1:0", "metrics_port": -1, "rules_dir": str(RULES)}
        return load_config(path, env={}, data_dir=str(tmp_path / "data"), **overrides)

    running = create_server(reread(), reread=reread)
    ok, unauthenticated = grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:

            def score(token: str) -> grpc.StatusCode:
                request = scoring_pb2.ScoreRequest(order=convert.order_to_proto(fresh()))
                metadata = (("authorization", f"Bearer {token}"),)
                try:
                    scoring_pb2_grpc.ScoringServiceStub(ch).Score(
                        request, timeout=5, metadata=metadata
                    )
                except grpc.RpcError as e:
                    return e.code()  # type: ignore[no-any-return]
                return ok

            assert score("tok-old") is ok
            path.write_text('redis_timeout_ms = 60\n[auth.tokens]\n"tok-new" = "gw-new:checkout"\n')
            with caplog.at_level(logging.INFO):
                assert running.reload() is True  # what SIGHUP runs
            assert [score("tok-old"), score("tok-new")] == [unauthenticated, ok]
            reloaded = [r for r in caplog.records if r.getMessage() == "access settings reloaded"]
            assert reloaded[0].fields == {  # type: ignore[attr-defined]
                "tokens": 1,
                "cert_principals": 0,
                "tls_renewed": False,
                "restart_needed": ["redis_timeout_ms"],
            }
            bad = {
                "[auth.tokens\n": "config file ",  # not TOML
                '[auth.tokens]\n"tok-x" = "gw-x:root"\n': "auth.tokens[0]: roles must be",
                # the whole file is checked as at start: a bad setting elsewhere refuses it
                'deadline_ms = -1\n[auth.tokens]\n"tok-x" = "gw-x:checkout"\n': "deadline_ms",
            }
            for n, (text, error) in enumerate(bad.items(), 1):
                path.write_text(text)
                caplog.clear()
                with caplog.at_level(logging.INFO):
                    assert running.reload_access() is False
                failed = [r for r in caplog.records if r.levelno == logging.ERROR]
                assert [r.getMessage() for r in failed] == [
                    "access settings reload failed; keeping the old ones"
                ]
                assert failed[0].fields["error"].startswith(error)  # type: ignore[attr-defined]
                assert "tok-x" not in caplog.text
                assert [score("tok-old"), score("tok-new"), score("tok-x")] == [
                    unauthenticated,
                    ok,
                    unauthenticated,
                ]
                assert running.metrics.value("riskd_access_reload_failures_total") == n
    finally:
        running.stop(0)


@pytest.mark.parametrize("text", ["", 'log_level = "info"\n'])
def test_a_reload_of_a_file_without_its_auth_table_keeps_the_tokens_and_never_opens_scoring(
    tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    # review: a file read while written in place (`cat new > riskd.toml` empties it first)
    # reloaded as the embedded default on a plaintext port: anyone on the machine could
    # score without a token, and the configured token was refused
    path = tmp_path / "riskd.toml"
    path.write_text('[auth.tokens]\n"tok-gw" = "gw:checkout"\n')

    def reread() -> Config:
        overrides = {"listen": "127.0.0.1:0", "metrics_port": -1, "rules_dir": str(RULES)}
        return load_config(path, env={}, data_dir=str(tmp_path / "data"), **overrides)

    running = create_server(reread(), reread=reread)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:

            def score(*metadata: tuple[str, str]) -> grpc.StatusCode:
                request = scoring_pb2.ScoreRequest(order=convert.order_to_proto(fresh()))
                try:
                    scoring_pb2_grpc.ScoringServiceStub(ch).Score(
                        request, timeout=5, metadata=metadata
                    )
                except grpc.RpcError as e:
                    return e.code()  # type: ignore[no-any-return]
                return grpc.StatusCode.OK

            token = ("authorization", "Bearer tok-gw")
            path.write_text(text)  # cut short, before [auth]
            with caplog.at_level(logging.INFO):
                assert running.reload_access() is False
            error = next(r for r in caplog.records if r.levelno == logging.ERROR)
            assert error.fields["error"].startswith("auth: ")  # type: ignore[attr-defined]
            assert [score(), score(token)] == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OK]
            assert running.metrics.value("riskd_access_reload_failures_total") == 1
            path.write_text("[auth]\n")  # an empty table: every token revoked, on purpose
            assert running.reload_access() is True
            assert score(token) is grpc.StatusCode.UNAUTHENTICATED
    finally:
        running.stop(0)
