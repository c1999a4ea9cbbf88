"""Access control on a real gRPC server: TLS, mutual-TLS identity, tokens, denial, rate limits.

The PKI is made fresh per module with ``cryptography``; the server is a real
``grpc.server`` on port 0 with a small generic test service plus the standard
health service, behind ``AuthInterceptor``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from riskd.domain.clock import FakeClock
from riskd.errors import ConfigError
from riskd.service import callers, limits, policy
from riskd.service.auth import AuthInterceptor, current_identity
from riskd.service.callers import AuthConfig, Identity, RateLimit
from riskd.service.limits import TokenBuckets
from riskd.service.policy import POLICY, ROLES
from riskd.service.tls import check_insecure_listen, server_credentials
from tests.service.certs import CertificateAuthority, Pem

SERVICE = "test.v1.Probe"
TEST_POLICY = {
    **POLICY,
    f"/{SERVICE}/Checkout": frozenset({"checkout"}),
    f"/{SERVICE}/Audit": frozenset({"auditor"}),
    f"/{SERVICE}/Tail": frozenset({"checkout"}),
    f"/{SERVICE}/Follow": frozenset({"checkout"}),
}
TOKEN = "tok-checkout-1f0c9a"
AUDIT_TOKEN = "tok-auditor-77aa"


def _who(request: bytes, context: grpc.ServicerContext) -> bytes:
    identity = current_identity()
    assert identity is not None
    return f"{identity.principal}|{','.join(sorted(identity.roles))}".encode()


def _tail(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for _ in range(3):
        yield _who(request, context)


FOLLOW_DONE = threading.Event()


def _follow(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    # a stream that holds its RPC thread until the client goes away (or the test ends)
    yield b"first"
    while context.is_active() and not FOLLOW_DONE.wait(0.05):
        pass


def _probe_handler() -> grpc.GenericRpcHandler:
    unary = grpc.unary_unary_rpc_method_handler
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Checkout": unary(_who),
            "Audit": unary(_who),
            "Unlisted": unary(_who),
            "Tail": grpc.unary_stream_rpc_method_handler(_tail),
            "Follow": grpc.unary_stream_rpc_method_handler(_follow),
        },
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ca = CertificateAuthority()
    rogue = CertificateAuthority("rogue CA")
    d = tmp_path_factory.mktemp("pki")
    server = ca.issue("localhost", server=True)
    (d / "server.crt").write_bytes(server.cert)
    (d / "server.key").write_bytes(server.key)
    (d / "ca.crt").write_bytes(ca.pem)
    return {
        "dir": d,
        "ca": ca.pem,
        "checkout": ca.issue("gw-1", ("checkout",)),
        "auditor": ca.issue("audit-1", ("auditor",)),
        "plain": ca.issue("ops-1"),
        "multi": ca.issue("multi-1", ("analyst", "checkout")),
        "rogue": rogue.issue("gw-1", ("checkout",)),
        "no_cn": ca.issue("", ("checkout",)),
        # OUs that name no role; one that spells another OU, escaped in the subject string
        "odd_ous": ca.issue("ous-1", ("checkout", "ops,OU=auditor", "public")),
    }


Start = Callable[..., tuple[int, FakeClock]]


@pytest.fixture
def start() -> Iterator[Start]:
    servers: list[grpc.Server] = []

    def run(
        credentials: grpc.ServerCredentials | None,
        config: AuthConfig | None = None,
        **options: Any,
    ) -> tuple[int, FakeClock]:
        clock = FakeClock()
        config = config or AuthConfig.with_tokens(
            {
                TOKEN: Identity("token:checkout-gw", frozenset({"checkout"})),
                AUDIT_TOKEN: Identity("token:audit-job", frozenset({"auditor"})),
            },
            cert_principals={"ops-1": frozenset({"auditor"})},
        )
        interceptor = AuthInterceptor(config, policy=TEST_POLICY, clock=clock, **options)
        server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[interceptor])
        server.add_generic_rpc_handlers((_probe_handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        servers.append(server)
        return port, clock

    FOLLOW_DONE.clear()
    yield run
    FOLLOW_DONE.set()
    for s in servers:
        s.stop(None)


def mtls_credentials(pki: dict[str, Any]) -> grpc.ServerCredentials:
    d: Path = pki["dir"]
    return server_credentials(d / "server.crt", d / "server.key", d / "ca.crt")


def tls_channel(port: int, ca: bytes, client: Pem | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    return grpc.secure_channel(f"localhost:{port}", creds)


def call(channel: grpc.Channel, method: str, token: str | None = None) -> bytes:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    fn = channel.unary_unary(f"/{SERVICE}/{method}")
    out: bytes = fn(b"", metadata=metadata, timeout=5)
    return out


def code_of(channel: grpc.Channel, method: str, token: str | None = None) -> grpc.StatusCode:
    try:
        call(channel, method, token)
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def health_ok(channel: grpc.Channel) -> bool:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


# -- mutual TLS -------------------------------------------------------------------------------


def test_auth_mtls_identity_comes_from_certificate_cn_and_ou(
    pki: dict[str, Any], start: Start
) -> None:
    port, _ = start(mtls_credentials(pki))
    with tls_channel(port, pki["ca"], pki["checkout"]) as ch:
        assert call(ch, "Checkout") == b"cert:gw-1|checkout"
        assert code_of(ch, "Audit") is grpc.StatusCode.PERMISSION_DENIED
        assert code_of(ch, "Unlisted") is grpc.StatusCode.PERMISSION_DENIED
        assert health_ok(ch)
    with tls_channel(port, pki["ca"], pki["multi"]) as ch:
        assert call(ch, "Checkout") == b"cert:multi-1|analyst,checkout"


def test_auth_mtls_cert_principals_grant_roles_by_cn(pki: dict[str, Any], start: Start) -> None:
    port, _ = start(mtls_credentials(pki))
    with tls_channel(port, pki["ca"], pki["plain"]) as ch:
        assert call(ch, "Audit") == b"cert:ops-1|auditor"
        assert code_of(ch, "Checkout") is grpc.StatusCode.PERMISSION_DENIED


def test_auth_mtls_ou_roles_off_grants_roles_by_cn_only(pki: dict[str, Any], start: Start) -> None:
    # ou_roles = false: the CA is not riskd's own, so an OU=checkout grants nothing
    config = AuthConfig.from_mapping({"ou_roles": False, "cert_principals": {"ops-1": "auditor"}})
    port, _ = start(mtls_credentials(pki), config)
    with tls_channel(port, pki["ca"], pki["checkout"]) as ch:
        assert code_of(ch, "Checkout") is grpc.StatusCode.PERMISSION_DENIED
    with tls_channel(port, pki["ca"], pki["plain"]) as ch:
        assert call(ch, "Audit") == b"cert:ops-1|auditor"


def test_auth_mtls_certificate_wins_over_a_token(pki: dict[str, Any], start: Start) -> None:
    port, _ = start(mtls_credentials(pki))
    with tls_channel(port, pki["ca"], pki["auditor"]) as ch:
        assert code_of(ch, "Checkout", TOKEN) is grpc.StatusCode.PERMISSION_DENIED


def test_auth_mtls_certificate_without_cn_identifies_no_one(
    pki: dict[str, Any], start: Start
) -> None:
    # gRPC reports x509_common_name=[b""]: that is no principal (it was "cert:" with the
    # OU's roles), so the caller is anonymous: refused here, or identified by a token
    port, _ = start(mtls_credentials(pki))
    with tls_channel(port, pki["ca"], pki["no_cn"]) as ch:
        assert code_of(ch, "Checkout") is grpc.StatusCode.UNAUTHENTICATED
        assert call(ch, "Checkout", TOKEN) == b"token:checkout-gw|checkout"


def test_auth_mtls_ous_that_name_no_role_grant_nothing(pki: dict[str, Any], start: Start) -> None:
    # gRPC writes the subject as "...,OU=ops\\,OU=auditor,...": an escaped comma is part of
    # the OU, never a second OU that would grant auditor; "public" is no role either
    port, _ = start(mtls_credentials(pki))
    with tls_channel(port, pki["ca"], pki["odd_ous"]) as ch:
        assert call(ch, "Checkout") == b"cert:ous-1|checkout"
        assert code_of(ch, "Audit") is grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("client", [None, "rogue"])
def test_auth_mtls_refuses_missing_or_foreign_client_certificates(
    pki: dict[str, Any], start: Start, client: str | None
) -> None:
    port, _ = start(mtls_credentials(pki))
    with tls_channel(port, pki["ca"], pki[client] if client else None) as ch:
        assert code_of(ch, "Checkout", TOKEN) is grpc.StatusCode.UNAVAILABLE


# -- TLS with bearer tokens ------------------------------------------------------------------


def test_auth_tls_token_identity_and_denials(pki: dict[str, Any], start: Start) -> None:
    d: Path = pki["dir"]
    port, _ = start(server_credentials(d / "server.crt", d / "server.key"))
    with tls_channel(port, pki["ca"]) as ch:
        assert call(ch, "Checkout", TOKEN) == b"token:checkout-gw|checkout"
        assert call(ch, "Audit", AUDIT_TOKEN) == b"token:audit-job|auditor"
        assert code_of(ch, "Audit", TOKEN) is grpc.StatusCode.PERMISSION_DENIED
        assert code_of(ch, "Checkout", "not-a-token") is grpc.StatusCode.UNAUTHENTICATED
        assert code_of(ch, "Checkout") is grpc.StatusCode.UNAUTHENTICATED
        assert health_ok(ch)  # public: no credentials needed


def test_auth_plaintext_channel_to_tls_port_fails(pki: dict[str, Any], start: Start) -> None:
    d: Path = pki["dir"]
    port, _ = start(server_credentials(d / "server.crt", d / "server.key"))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        assert code_of(ch, "Checkout", TOKEN) is grpc.StatusCode.UNAVAILABLE


def test_auth_malformed_authorization_header_is_unauthenticated(start: Start) -> None:
    port, _ = start(None)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        fn = ch.unary_unary(f"/{SERVICE}/Checkout")
        with pytest.raises(grpc.RpcError) as info:
            fn(b"", metadata=(("authorization", TOKEN),), timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("scheme", ["bearer", "BEARER"])
def test_auth_bearer_scheme_is_case_insensitive(start: Start, scheme: str) -> None:
    port, _ = start(None)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        fn = ch.unary_unary(f"/{SERVICE}/Checkout")
        reply = fn(b"", metadata=(("authorization", f"{scheme} {TOKEN}"),), timeout=5)
        assert reply == b"token:checkout-gw|checkout"


def test_auth_bearer_token_is_read_without_blanks_around_it(start: Start) -> None:
    port, _ = start(None)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        fn = ch.unary_unary(f"/{SERVICE}/Checkout")
        reply = fn(b"", metadata=(("authorization", f"Bearer  {TOKEN} "),), timeout=5)
        assert reply == b"token:checkout-gw|checkout"


@pytest.mark.parametrize("scheme", ["BearerX", "Token", "Basic"])
def test_auth_a_valid_token_under_another_scheme_is_refused(start: Start, scheme: str) -> None:
    port, _ = start(None)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        fn = ch.unary_unary(f"/{SERVICE}/Checkout")
        with pytest.raises(grpc.RpcError) as info:
            fn(b"", metadata=(("authorization", f"{scheme} {TOKEN}"),), timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "malformed authorization header" in info.value.details()


@pytest.mark.parametrize("header", ["Basic Zm9vOmJhcg==", "garbage", "Bearer ", "Bearer    "])
def test_auth_malformed_header_is_refused_even_with_an_empty_token_configured(
    start: Start, header: str
) -> None:
    # an embedding that configures the empty token (from_mapping refuses it) must not
    # turn every malformed header into that caller
    config = AuthConfig(tokens={callers.token_digest(""): Identity("token:blank", ROLES)})
    port, _ = start(None, config)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        fn = ch.unary_unary(f"/{SERVICE}/Checkout")
        with pytest.raises(grpc.RpcError) as info:
            fn(b"", metadata=(("authorization", header),), timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "malformed authorization header" in info.value.details()


def test_auth_streaming_methods_are_guarded_and_see_identity(start: Start) -> None:
    port, _ = start(None)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        tail = ch.unary_stream(f"/{SERVICE}/Tail")
        assert (
            list(tail(b"", metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=5))
            == [b"token:checkout-gw|checkout"] * 3
        )
        with pytest.raises(grpc.RpcError) as info:
            list(tail(b"", metadata=(("authorization", f"Bearer {AUDIT_TOKEN}"),), timeout=5))
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED


def watch(channel: grpc.Channel) -> Any:
    return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)


def test_auth_health_watch_streams_do_not_hold_rpc_threads(start: Start) -> None:
    # Watch is PUBLIC and non-blocking in grpcio-health; a wrapper that hid the flag made
    # each open stream hold one of the 4 RPC threads until its client went away
    port, _ = start(None)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        streams = [watch(ch) for _ in range(6)]
        for stream in streams[:4]:
            assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        assert call(ch, "Checkout", TOKEN) == b"token:checkout-gw|checkout"
        assert time.monotonic() - started < 1.0
        for stream in streams[4:]:
            assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        for stream in streams:
            stream.cancel()


def follow(channel: grpc.Channel) -> Any:
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    return channel.unary_stream(f"/{SERVICE}/Follow")(b"", metadata=metadata, timeout=10)


def test_auth_streams_that_hold_rpc_threads_are_capped(start: Start) -> None:
    port, _ = start(None, max_holding_streams=2)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        held = [follow(ch) for _ in range(2)]
        assert [next(s) for s in held] == [b"first", b"first"]
        with pytest.raises(grpc.RpcError) as info:
            next(follow(ch))
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert call(ch, "Checkout", TOKEN) == b"token:checkout-gw|checkout"  # threads left
        held[0].cancel()
        deadline = time.monotonic() + 5
        while True:  # the slot comes back once the server sees the cancellation
            try:
                assert next(follow(ch)) == b"first"
                break
            except grpc.RpcError as e:
                assert e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline
                time.sleep(0.02)


class _Metadatum(NamedTuple):
    key: str
    value: str


class _CallDetails(NamedTuple):
    method: str
    invocation_metadata: tuple[_Metadatum, ...] = ()


class _CallbacklessContext:
    """A servicer context whose end callbacks never run, as grpcio sometimes does for a
    stream it aborts because its request bytes do not parse (review)."""

    def peer(self) -> str:
        return "ipv4:10.0.0.7:5555"

    def auth_context(self) -> dict[str, Any]:
        return {}

    def invocation_metadata(self) -> tuple[Any, ...]:
        return (_Metadatum("authorization", f"Bearer {TOKEN}"),)

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return True  # accepted, never run

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(code.name)


def _guarded(handler: Any, method: str, **limits: int) -> Any:
    """``handler`` for ``method`` behind an interceptor that lets the checkout token in."""
    interceptor = AuthInterceptor(
        AuthConfig.with_tokens({TOKEN: Identity("token:checkout-gw", frozenset({"checkout"}))}),
        policy={f"/{SERVICE}/{method}": frozenset({"checkout"})},
        **limits,
    )
    details = _CallDetails(f"/{SERVICE}/{method}")
    guarded = interceptor.intercept_service(lambda _: handler, details)  # type: ignore[arg-type]
    assert guarded is not None
    return guarded


def test_auth_streams_free_their_slot_when_no_end_callback_runs() -> None:
    def reflect(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        yield from requests

    handler = grpc.stream_stream_rpc_method_handler(reflect)
    guarded = _guarded(handler, "Reflect", max_holding_streams=2)
    assert guarded.stream_stream is not None

    def undecodable() -> Iterator[bytes]:
        raise ValueError("Exception deserializing request!")
        yield b""

    for _ in range(3):  # more than the server's slots for streams that hold a thread
        with pytest.raises(ValueError):
            list(guarded.stream_stream(undecodable(), _CallbacklessContext()))
    assert list(guarded.stream_stream(iter([b"ok"]), _CallbacklessContext())) == [b"ok"]


class _EndedContext(_CallbacklessContext):
    """The context of a call that ended before it was admitted: ``add_callback`` refuses."""

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False


def test_auth_a_stream_whose_call_already_ended_frees_its_slot() -> None:
    # a non-blocking stream's slot is freed only by the call's end callback: when grpcio
    # will run none (the call ended), admission must free it, or the peer's slots leak
    def start_watch(request: bytes, context: Any, send: Callable[[Any], None]) -> None:
        send(None)

    start_watch.experimental_non_blocking = True  # type: ignore[attr-defined]
    handler = grpc.unary_stream_rpc_method_handler(start_watch)
    guarded = _guarded(handler, "Watch", max_streams_per_peer=1)
    assert guarded.unary_stream is not None
    sent: list[Any] = []
    for _ in range(3):  # more than the peer's one slot
        guarded.unary_stream(b"", _EndedContext(), sent.append)  # type: ignore[call-arg]
    assert sent == [None] * 3


@pytest.mark.parametrize("configured", [3, None])  # None: the README's bound, 32
def test_auth_open_streams_per_peer_are_capped(start: Start, configured: int | None) -> None:
    limits = {} if configured is None else {"max_streams_per_peer": configured}
    port, _ = start(None, **limits)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        streams = [watch(ch) for _ in range(configured or 32)]
        assert all(next(s).status == health_pb2.HealthCheckResponse.SERVING for s in streams)
        with pytest.raises(grpc.RpcError) as info:
            next(watch(ch))
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        for stream in streams:
            stream.cancel()


def test_auth_denials_log_method_and_code_but_never_the_token(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    port, _ = start(None)
    with caplog.at_level(logging.DEBUG), grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        code_of(ch, "Checkout", "secret-wrong-token-123")
        code_of(ch, "Audit", TOKEN)
    refused = [r for r in caplog.records if r.name == "riskd.service.auth"]
    assert len(refused) == 2
    text = "\n".join(r.getMessage() + repr(getattr(r, "fields", "")) for r in caplog.records)
    assert "secret-wrong-token-123" not in text and TOKEN not in text
    assert "UNAUTHENTICATED" in text and "PERMISSION_DENIED" in text
    principals = [getattr(r, "fields", {}).get("principal") for r in refused]
    assert principals == ["peer:ipv4:127.0.0.1", "token:checkout-gw"]


def test_auth_refusals_throttled_by_the_refusal_bucket_are_counted_not_logged(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    config = AuthConfig(rate_limits={**callers.DEFAULT_RATE_LIMITS, "public": RateLimit(1.0, 2)})
    rejected: list[grpc.StatusCode] = []
    port, clock = start(None, config, on_reject=lambda method, code: rejected.append(code))
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    with caplog.at_level(logging.DEBUG), grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        guesses = [code_of(ch, "Checkout", f"guess-{i}") for i in range(7)]
        assert guesses == [grpc.StatusCode.UNAUTHENTICATED] * 2 + [exhausted] * 5
        clock.advance(1.0)
        assert code_of(ch, "Checkout", "guess-7") is grpc.StatusCode.UNAUTHENTICATED
    assert rejected == [*guesses, grpc.StatusCode.UNAUTHENTICATED]  # metrics see every one
    fields = [getattr(r, "fields", {}) for r in caplog.records if r.name == "riskd.service.auth"]
    assert [f["code"] for f in fields] == ["UNAUTHENTICATED"] * 3
    assert [f.get("unlogged_refusals") for f in fields] == [None, None, 5]


@pytest.mark.parametrize(
    ("peers", "logged", "taken"),
    [
        # a third peer makes room: the oldest's count is logged and dropped
        (("a", "a", "b", "c"), [{"principal": "a", "unlogged_refusals": 2}], [0, 1, 1, 0]),
        # a full table logs a count only to make room: a peer it holds needs none
        (("a", "b", "b", "a"), [], [2, 2, 0, 0]),
    ],
)
def test_unlogged_refusals_keep_a_bounded_number_of_peers(
    caplog: pytest.LogCaptureFixture,
    peers: tuple[str, ...],
    logged: list[dict[str, object]],
    taken: list[int],
) -> None:
    unlogged = limits.UnloggedRefusals(max_peers=2)
    with caplog.at_level(logging.DEBUG):
        for peer in peers:
            unlogged.count_one(peer)
    assert [getattr(r, "fields", {}) for r in caplog.records] == logged
    assert [unlogged.take(p) for p in ("a", "b", "c", "c")] == taken


def test_auth_refusals_over_a_callers_own_quota_log_a_line_a_second_per_caller(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    # review: each over-quota call was a log line (20,000 a second from one checkout)
    config = AuthConfig.with_tokens(
        {
            TOKEN: Identity("token:checkout-gw", frozenset({"checkout"})),
            "tok-2": Identity("token:other-gw", frozenset({"checkout"})),
        },
        rate_limits={"checkout": RateLimit(1.0, 1), "public": RateLimit(1.0, 1)},
    )
    rejected: list[grpc.StatusCode] = []
    port, clock = start(None, config, on_reject=lambda method, code: rejected.append(code))
    ok, exhausted = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
    with caplog.at_level(logging.DEBUG), grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        assert [code_of(ch, "Checkout", TOKEN) for _ in range(50)] == [ok] + [exhausted] * 49
        assert [code_of(ch, "Checkout", "tok-2") for _ in range(3)] == [ok] + [exhausted] * 2
        clock.advance(0.5)  # still within the second: counted
        assert code_of(ch, "Checkout", TOKEN) is exhausted
        clock.advance(0.5)
        assert [code_of(ch, "Checkout", TOKEN) for _ in range(2)] == [ok, exhausted]
    assert rejected == [exhausted] * (49 + 2 + 1 + 1)  # metrics see every one
    fields = [getattr(r, "fields", {}) for r in caplog.records if r.name == "riskd.service.auth"]
    assert [(f["principal"], f["code"], f.get("unlogged_refusals")) for f in fields] == [
        ("token:checkout-gw", "RESOURCE_EXHAUSTED", None),
        ("token:other-gw", "RESOURCE_EXHAUSTED", None),
        ("token:checkout-gw", "RESOURCE_EXHAUSTED", 49),
    ]


def test_exhausted_refusals_keep_a_bounded_number_of_callers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    exhausted = limits.ExhaustedRefusals(clock, max_callers=2)
    with caplog.at_level(logging.DEBUG):
        assert [exhausted.due_one(c) for c in ("a", "a", "a", "b", "b")] == [0, None, None, 0, None]
        assert exhausted.due_one("c") == 0  # "a" forgotten: its count on a line of its own
        assert exhausted.due_one("a") == 0
        clock.advance(1.0)
        assert [exhausted.due_one(c) for c in ("c", "c", "a")] == [0, None, 0]
    assert [getattr(r, "fields", {}) for r in caplog.records] == [
        {"principal": "a", "unlogged_refusals": 2},
        {"principal": "b", "unlogged_refusals": 1},
    ]


def test_exhausted_refusals_forget_the_caller_logged_longest_ago(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not the one first seen; and a forgotten caller with nothing unlogged gets no line."""
    clock = FakeClock()
    exhausted = limits.ExhaustedRefusals(clock, max_callers=2)
    with caplog.at_level(logging.DEBUG):
        assert exhausted.due_one("a") == 0
        clock.advance(1.0)
        assert [exhausted.due_one(c) for c in ("b", "a", "b")] == [0, 0, None]
        assert exhausted.due_one("c") == 0  # "b" forgotten (a's line is later): its 1 logged
        assert exhausted.due_one("b") == 0  # "a" forgotten, nothing unlogged: no line
    assert [getattr(r, "fields", {}) for r in caplog.records] == [
        {"principal": "b", "unlogged_refusals": 1}
    ]


# -- rate limits -----------------------------------------------------------------------------


def test_auth_rate_limit_per_caller_answers_resource_exhausted(start: Start) -> None:
    config = AuthConfig.with_tokens(
        {
            TOKEN: Identity("token:checkout-gw", frozenset({"checkout"})),
            "tok-2": Identity("token:other-gw", frozenset({"checkout"})),
        },
        rate_limits={"checkout": RateLimit(1.0, 3), "public": RateLimit(1.0, 1)},
    )
    port, clock = start(None, config)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        assert [code_of(ch, "Checkout", TOKEN) for _ in range(4)] == [grpc.StatusCode.OK] * 3 + [
            grpc.StatusCode.RESOURCE_EXHAUSTED
        ]
        assert code_of(ch, "Checkout", "tok-2") is grpc.StatusCode.OK  # its own bucket
        clock.advance(1.0)
        assert code_of(ch, "Checkout", TOKEN) is grpc.StatusCode.OK
        assert code_of(ch, "Checkout", TOKEN) is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_auth_anonymous_callers_are_held_to_the_public_limit_whatever_their_roles(
    start: Start,
) -> None:
    config = AuthConfig.with_tokens(
        {TOKEN: Identity("token:checkout-gw", frozenset({"checkout"}))},
        anonymous_roles=frozenset({"checkout"}),
        rate_limits={"checkout": RateLimit(100.0, 100), "public": RateLimit(1.0, 2)},
    )
    port, clock = start(None, config)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        assert [code_of(ch, "Checkout") for _ in range(3)] == [grpc.StatusCode.OK] * 2 + [
            grpc.StatusCode.RESOURCE_EXHAUSTED
        ]
        assert [code_of(ch, "Checkout", TOKEN) for _ in range(3)] == [grpc.StatusCode.OK] * 3
        clock.advance(1.0)  # a second refills the public rate's one token, not the burst
        assert [code_of(ch, "Checkout") for _ in range(2)] == [
            grpc.StatusCode.OK,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ]


def test_auth_anonymous_caller_without_the_role_is_asked_for_credentials(start: Start) -> None:
    # a client that fetches credentials on UNAUTHENTICATED must be told to (review); an
    # identified caller lacking the role is still PERMISSION_DENIED
    config = AuthConfig.with_tokens(
        {TOKEN: Identity("token:checkout-gw", frozenset({"checkout"}))},
        anonymous_roles=frozenset({"checkout"}),
    )
    port, _ = start(None, config)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        assert call(ch, "Checkout") == b"peer:ipv4:127.0.0.1|checkout"
        assert code_of(ch, "Audit") is grpc.StatusCode.UNAUTHENTICATED
        assert code_of(ch, "Audit", TOKEN) is grpc.StatusCode.PERMISSION_DENIED


def test_auth_refused_calls_spend_the_peers_bucket(start: Start) -> None:
    config = AuthConfig.with_tokens(
        {
            TOKEN: Identity("token:checkout-gw", frozenset({"checkout"})),
            AUDIT_TOKEN: Identity("token:audit-job", frozenset({"auditor"})),
        },
        rate_limits={**callers.DEFAULT_RATE_LIMITS, "public": RateLimit(1.0, 2)},
    )
    port, clock = start(None, config)
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        guesses = [code_of(ch, "Checkout", f"guess-{i}") for i in range(3)]
        assert guesses == [grpc.StatusCode.UNAUTHENTICATED] * 2 + [exhausted]
        # a valid caller behind the same address is not held up by the failures
        assert call(ch, "Checkout", TOKEN) == b"token:checkout-gw|checkout"
        assert code_of(ch, "Checkout", "guess-4") is exhausted
        clock.advance(2.0)
        wrong_role = [code_of(ch, "Checkout", AUDIT_TOKEN) for _ in range(3)]
        assert wrong_role == [grpc.StatusCode.PERMISSION_DENIED] * 2 + [exhausted]


class _PeerContext(_CallbacklessContext):
    def __init__(self, peer: str, token: str) -> None:
        self._peer, self._token = peer, token

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple[Any, ...]:
        return (_Metadatum("authorization", f"Bearer {self._token}"),)


def test_auth_refusal_buckets_are_per_peer_host() -> None:
    # one address guessing tokens must not throttle (and unlog) another's refusals
    interceptor = AuthInterceptor(
        AuthConfig(rate_limits={**callers.DEFAULT_RATE_LIMITS, "public": RateLimit(1.0, 2)}),
        policy=TEST_POLICY,
        clock=FakeClock(),
    )
    handler = grpc.unary_unary_rpc_method_handler(_who)
    details = _CallDetails(f"/{SERVICE}/Checkout")
    guarded = interceptor.intercept_service(lambda _: handler, details)  # type: ignore[arg-type]
    assert guarded is not None and guarded.unary_unary is not None

    def refused(peer: str) -> str:
        with pytest.raises(RuntimeError) as info:
            guarded.unary_unary(b"", _PeerContext(peer, "guess"))
        return str(info.value)

    assert [refused("ipv4:10.0.0.7:5555") for _ in range(3)] == ["UNAUTHENTICATED"] * 2 + [
        "RESOURCE_EXHAUSTED"
    ]
    assert refused("ipv4:10.0.0.7:6666") == "RESOURCE_EXHAUSTED"  # the host, not the port
    assert refused("ipv4:10.0.0.8:5555") == "UNAUTHENTICATED"


def test_auth_health_watches_spend_a_bucket_of_their_own(start: Start) -> None:
    config = AuthConfig.with_tokens(
        {TOKEN: Identity("token:checkout-gw", frozenset({"checkout"}))},
        rate_limits={"checkout": RateLimit(1.0, 2), "public": RateLimit(1.0, 3)},
    )
    port, _ = start(None, config)
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(3):
            stream = stub.Watch(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=5)
            assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
            stream.cancel()
        with pytest.raises(grpc.RpcError) as info:  # the public limit, per caller
            next(stub.Watch(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=5))
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert [code_of(ch, "Checkout", TOKEN) for _ in range(2)] == [grpc.StatusCode.OK] * 2


def test_auth_health_checks_are_never_rate_limited(start: Start) -> None:
    # every client behind an L7 proxy has the proxy's address, as do the proxy's own health
    # checks: a neighbour's flood of checks must not get this backend ejected (review)
    config = AuthConfig(rate_limits={**callers.DEFAULT_RATE_LIMITS, "public": RateLimit(1.0, 3)})
    port, _ = start(None, config)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        assert all(health_ok(ch) for _ in range(10))
        with pytest.raises(grpc.RpcError) as info:  # a bad credential is still refused
            health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(),
                metadata=(("authorization", "Bearer wrong"),),
                timeout=5,
            )
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_token_buckets_take_a_cost() -> None:
    buckets = TokenBuckets(FakeClock())
    limit = RateLimit(1.0, 5)
    assert buckets.take("a", limit, 4) and not buckets.take("a", limit, 2)
    assert buckets.take("a", limit) and not buckets.take("a", limit)


def test_token_buckets_refill_and_stay_bounded() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(clock, max_callers=4)
    limit = RateLimit(2.0, 2)
    assert [buckets.take("a", limit) for _ in range(3)] == [True, True, False]
    clock.advance(0.5)
    assert buckets.take("a", limit) and not buckets.take("a", limit)
    for i in range(10):
        buckets.take(f"c{i}", limit)
    assert len(buckets._buckets) <= 4
    one = TokenBuckets(clock, max_callers=1)  # the bound holds at its smallest too
    for i in range(3):
        one.take(f"c{i}", limit)
    assert len(one._buckets) <= 1


def test_token_buckets_hold_without_spending_and_refill_no_further_than_the_burst() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(clock)
    limit = RateLimit(1.0, 2)
    assert buckets.holds("a", limit, 2) and buckets.holds("a", limit, 2)  # nothing spent
    assert buckets.take("a", limit, 2) and not buckets.holds("a", limit)
    clock.advance(60.0)  # idle a minute: a full bucket, not 60 tokens
    assert [buckets.take("a", limit) for _ in range(3)] == [True, True, False]


def test_token_buckets_forget_the_callers_seen_longest_ago() -> None:
    """Forgetting a caller refills its bucket: the one spending it now is remembered."""
    clock = FakeClock()
    buckets = TokenBuckets(clock, max_callers=4)
    limit = RateLimit(0.001, 1)
    for caller in ("c0", "c1", "c2", "hot"):
        assert buckets.take(caller, limit)
        clock.advance(1.0)
    assert buckets.take("new", limit)  # one caller too many: the least recently seen go
    assert not buckets.take("hot", limit)


def test_stream_slots_free_a_slot_once_however_often_it_is_closed() -> None:
    """A blocking stream's slot is closed by its end callback and by its wrapper: both run."""
    slots = limits.StreamSlots(holding=1, per_peer=2)
    close = slots.open("p", holds_thread=True)
    assert close is not None and slots.open("q", holds_thread=True) is None
    close()
    close()
    assert slots.open("q", holds_thread=True) is not None
    assert slots.open("p", holds_thread=True) is None  # still one at most


def test_stream_slots_for_streams_holding_no_thread_count_only_per_peer() -> None:
    """A health Watch holds no RPC thread: the thread-holding cap neither refuses it nor
    counts it, and a closed peer leaves nothing behind (one entry per peer host ever seen)."""
    slots = limits.StreamSlots(holding=1, per_peer=3)
    watches = [slots.open("p", holds_thread=False) for _ in range(2)]
    blocking = slots.open("q", holds_thread=True)
    assert blocking is not None and None not in watches
    assert slots.open("r", holds_thread=False) is not None  # the thread cap is full
    assert slots.open("p", holds_thread=False) is not None
    assert slots.open("p", holds_thread=False) is None  # the per-peer cap still holds
    for close in [*watches, blocking]:
        assert close is not None
        close()
    assert "q" not in slots._peers


# -- configuration and transport checks ------------------------------------------------------


def test_auth_config_from_mapping_parses_tokens_roles_and_limits() -> None:
    config = AuthConfig.from_mapping(
        {
            "tokens": {
                TOKEN: "checkout-gw:checkout",
                callers.token_digest("t2"): "job:auditor,analyst",
            },
            "cert_principals": {"ops-1": "operator"},
            "rate_limits": {"analyst": "5/s:7", "public": "3/s:4"},
            "anonymous_roles": ["checkout"],
        }
    )
    assert config.anonymous_roles == {"checkout"}
    assert config.ou_roles is True
    assert config.tokens[callers.token_digest(TOKEN)] == Identity(
        "token:checkout-gw", frozenset({"checkout"})
    )
    assert config.tokens[callers.token_digest("t2")].roles == {"auditor", "analyst"}
    assert config.cert_principals["ops-1"] == {"operator"}
    assert config.rate_limits["analyst"] == RateLimit(5.0, 7)
    assert config.public == RateLimit(3.0, 4)
    assert config.limit_for(frozenset({"analyst", "checkout"})) == config.rate_limits["checkout"]


def test_auth_config_default_rate_limits_are_the_documented_ones() -> None:
    # README: checkout 20000/s:40000, analyst 50/s:100, auditor 20/s:50, operator 10/s:20,
    # public 50/s:100
    assert AuthConfig.from_mapping({}).rate_limits == {
        "checkout": RateLimit(20_000.0, 40_000),
        "analyst": RateLimit(50.0, 100),
        "auditor": RateLimit(20.0, 50),
        "operator": RateLimit(10.0, 20),
        "public": RateLimit(50.0, 100),
    }


def test_auth_config_roles_may_have_blanks_around_them() -> None:
    config = AuthConfig.from_mapping(
        {"tokens": {TOKEN: "gw: checkout , analyst"}, "cert_principals": {"ops-1": " auditor"}}
    )
    assert config.tokens[callers.token_digest(TOKEN)].roles == {"checkout", "analyst"}
    assert config.cert_principals["ops-1"] == {"auditor"}


@pytest.mark.parametrize(
    ("cn", "reason"),
    [
        ("gw\u202e1", "must not contain NUL or control characters"),
        ("gw\n1", "must not contain NUL or control characters"),
        ("x" * 124, "longer than 128 characters"),
        (" ", "must not be blank"),
        ("gw-1 ", "must not start or end with whitespace"),
    ],
)
def test_auth_config_refuses_a_cert_principal_no_certificate_could_be(cn: str, reason: str) -> None:
    # such a certificate is refused every call: its entry could never grant anything
    with pytest.raises(ConfigError) as info:
        AuthConfig.from_mapping({"cert_principals": {"ok-1": "analyst", cn: "analyst"}})
    assert str(info.value) == f"auth.cert_principals[1]: the CN {reason}"  # never the CN


def test_auth_config_digest_is_the_sha256_hex_of_the_token() -> None:
    # what `printf %s test | sha256sum` prints: operators store digests made so
    digest = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    assert callers.token_digest("test") == digest
    config = AuthConfig.from_mapping({"tokens": {digest: "gw:checkout"}})
    assert config.tokens[callers.token_digest("test")].principal == "token:gw"


def test_auth_limit_for_is_the_most_generous_of_the_roles() -> None:
    config = AuthConfig()
    limits = callers.DEFAULT_RATE_LIMITS
    for a in sorted(ROLES):
        for b in sorted(ROLES):
            best = max(limits[a], limits[b], key=lambda lim: (lim.rate, lim.burst))
            assert config.limit_for(frozenset({a, b})) == best, (a, b)


def test_auth_limit_for_ranks_limits_by_rate_before_burst() -> None:
    config = AuthConfig.from_mapping({"rate_limits": {"analyst": "1000/s:10"}})
    assert config.limit_for(frozenset({"analyst", "auditor"})) == RateLimit(1000.0, 10)


def test_auth_config_digest_in_upper_case_matches() -> None:
    upper = "sha256:" + callers.token_digest(TOKEN)[7:].upper()
    config = AuthConfig.from_mapping({"tokens": {upper: "gw:checkout"}})
    assert set(config.tokens) == {callers.token_digest(TOKEN)}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"tokens": {TOKEN: "no-roles"}}, r"auth.tokens\[0\]"),
        ({"tokens": {TOKEN: "gw:root"}}, r"auth.tokens\[0\]: roles must be"),
        ({"tokens": {TOKEN: "gw: , "}}, r"auth.tokens\[0\]: roles must be"),
        ({"cert_principals": {"x": ""}}, r"auth.cert_principals\[0\]: roles must be"),
        ({"cert_principals": {"x": "admin"}}, r"auth.cert_principals\[0\]: roles must be"),
        # a token on the wrong line: under [auth] (its [auth.tokens] header forgotten), under
        # another table (review: the error quoted it, and a reload logged it)
        ({TOKEN: "gw:checkout"}, "auth: an unknown configuration key, not quoted"),
        ({"rate_limits": {TOKEN: "gw:checkout"}}, "auth.rate_limits: an unknown role, not"),
        ({"cert_principals": {TOKEN: "gw:checkout"}}, r"auth.cert_principals\[0\]: roles"),
        ({"rate_limits": {"analyst": "fast"}}, "auth.rate_limits.analyst"),
        ({"rate_limits": {"analyst": "0/s:5"}}, "auth.rate_limits.analyst: expected"),
        ({"rate_limits": {"analyst": "5/s:0"}}, "auth.rate_limits.analyst: expected"),
        ({"rate_limits": {"analyst": "-5/s:10"}}, "auth.rate_limits.analyst: expected"),
        ({"rate_limits": {"analyst": "5/s:10 each"}}, "auth.rate_limits.analyst: expected"),
        ({"tokens": {TOKEN: " :checkout"}}, r'auth.tokens\[0\]: expected "name:role,role"'),
        ({"rate_limits": {"root": "1/s:1"}}, "auth.rate_limits.root: unknown role"),
        ({"ou_roles": "yes"}, "auth.ou_roles"),
        ({"tokenz": {}}, "auth.tokenz: unknown"),
        ({"tokens": {"": "blank:operator"}}, r"auth.tokens\[0\]: a token must not be empty"),
        ({"tokens": {"  ": "blank:operator"}}, r"auth.tokens\[0\]: a token must not be empty"),
        (
            {"tokens": {callers.token_digest(""): "blank:operator"}},
            r"auth.tokens\[0\]: a token must",
        ),
        ({"tokens": {f" {TOKEN}": "gw:checkout"}}, r"auth.tokens\[0\]: .*whitespace"),
        ({"tokens": {"sha256:9f86d0": "gw:checkout"}}, r"auth.tokens\[0\]: .*64 hex"),
        ({"tokens": {"sha256:" + "g" * 64: "gw:checkout"}}, r"auth.tokens\[0\]: .*64 hex"),
        (
            {"tokens": {TOKEN: "gw:checkout", callers.token_digest(TOKEN): "root:operator"}},
            r"auth.tokens\[1\]: the same token as another entry",
        ),
        (
            {"tokens": {TOKEN: "svc:checkout", "tok-2": " svc :analyst"}},
            r"auth.tokens\[1\]: the name of another entry",
        ),
        ({"tokens": {TOKEN: "x" * 123 + ":operator"}}, r"auth.tokens\[0\]: .*ledger actor"),
        ({"tokens": {TOKEN: "ops\tteam:operator"}}, r"auth.tokens\[0\]: .*ledger actor"),
    ],
)
def test_auth_config_errors_name_the_key_never_the_token(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        AuthConfig.from_mapping(raw)
    assert TOKEN not in str(info.value)


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "[::1]:50051", "localhost:1", "127.9.9.9:5"])
def test_check_insecure_listen_allows_loopback_when_configured(listen: str) -> None:
    check_insecure_listen(listen, allowed=True)


@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "[::]:1", "10.0.0.5:1", "riskd.internal:1"])
def test_check_insecure_listen_refuses_other_hosts(listen: str) -> None:
    with pytest.raises(ConfigError, match="listen: a plaintext port may only bind to loopback"):
        check_insecure_listen(listen, allowed=True)


def test_check_insecure_listen_refuses_when_not_configured() -> None:
    with pytest.raises(ConfigError, match="TLS is required"):
        check_insecure_listen("127.0.0.1:1", allowed=False)


def test_server_credentials_missing_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tls_cert: cannot read"):
        server_credentials(tmp_path / "no.crt", tmp_path / "no.key")


def test_policy_names_only_known_roles() -> None:
    for method, roles in POLICY.items():
        assert method.startswith("/") and method.count("/") == 2
        assert roles and roles <= policy.ROLES | {policy.PUBLIC}, method
