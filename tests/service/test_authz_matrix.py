"""The authorization matrix: every caller kind × every method the full server registers.

The server is ``create_server`` with TLS and an ``[auth]`` table; callers are
bearer tokens, one per role, plus a caller with no credentials. Methods are
enumerated from the generated service descriptors of every service the server
announces (so a new RPC is walked without editing this file) and cross-checked
against the server's own handler tables. A call "succeeds" when it gets past
access control (any status but PERMISSION_DENIED / UNAUTHENTICATED): a request
with an empty body is enough to tell.

Who may call what is ``EXPECTED`` below, written out rather than read from ``POLICY``:
a walk that took ``POLICY`` as its answer passed whatever ``POLICY`` said (checkout
depositing money, anyone listing the services). A change of access is a change here too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor

# Importing the generated modules puts their descriptors in the default pool.
from grpc_health.v1 import health_pb2  # noqa: F401
from grpc_reflection.v1alpha import reflection_pb2  # noqa: F401

from riskd.config import load_config
from riskd.service.policy import POLICY, PUBLIC, ROLES
from riskd.service.server import RunningServer, create_server
from tests.service.certs import CertificateAuthority

RULES = Path(__file__).parent / "testdata" / "rules"
TOKENS = {role: f"matrix-{role}-token" for role in sorted(ROLES)}
CALLERS = [None, *sorted(ROLES)]

_S, _L, _E = "/riskd.v1.ScoringService/", "/riskd.v1.LedgerService/", "/riskd.v1.EvidenceService/"
_ANY = frozenset(ROLES)
EXPECTED: dict[str, frozenset[str]] = {
    **{_S + m: frozenset({"checkout"}) for m in ("Score", "ScoreBatch", "ReportOutcome")},
    **{
        _L + m: frozenset({"operator"})
        for m in (
            "RegisterShop",
            "Deposit",
            "Withdraw",
            "TopUpFund",
            "CollectClaim",
            "WriteOffClaim",
            "UnfreezeShop",
        )
    },
    **{_L + m: frozenset({"analyst"}) for m in ("PenalizeShop", "OpenDispute", "CompensateBuyer")},
    _L + "PayLateShipmentCoupon": frozenset({"analyst", "operator"}),
    **{
        _L + m: frozenset({"analyst", "auditor", "operator"})
        for m in ("GetAccountStatement", "GetShopStatement", "GetDisputeStatement", "ListAccounts")
    },
    _L + "VerifyLedger": frozenset({"auditor", "operator"}),
    _E + "RevealOrderPii": frozenset({"analyst"}),
    _E + "ListPiiAccess": frozenset({"analyst", "auditor"}),
    "/grpc.health.v1.Health/Check": frozenset({PUBLIC}),
    "/grpc.health.v1.Health/Watch": frozenset({PUBLIC}),
    "/grpc.health.v1.Health/List": _ANY,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _ANY,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": _ANY,
}
"""Full method name → the roles that may call it: least privilege, written out."""
DENIED = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, bytes]]:
    ca = CertificateAuthority()
    d = tmp_path_factory.mktemp("matrix")
    server_pem = ca.issue("localhost", server=True)
    (d / "server.crt").write_bytes(server_pem.cert)
    (d / "server.key").write_bytes(server_pem.key)
    config = load_config(
        env={},
        listen="127.0.0.1:0",
        metrics_port=-1,
        rules_dir=str(RULES),
        data_dir=str(d / "data"),
        tls_cert=str(d / "server.crt"),
        tls_key=str(d / "server.key"),
        plaintext=False,
        auth={
            "tokens": {token: f"matrix-{role}:{role}" for role, token in TOKENS.items()},
            # The walk is about roles, not rate limits: keep every bucket out of the way.
            "rate_limits": {role: "1000/s:1000" for role in [*ROLES, PUBLIC]},
        },
    )
    running = create_server(config)
    yield running, ca.pem
    running.stop(None)


def announced_methods(running: RunningServer) -> dict[str, MethodDescriptor]:
    """Full method name → descriptor, for every service the server says it serves."""
    pool = descriptor_pool.Default()
    names = {*running.services, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    methods: dict[str, MethodDescriptor] = {}
    for name in names:
        service = pool.FindServiceByName(name)
        for method in service.methods:
            methods[f"/{service.full_name}/{method.name}"] = method
    return methods


def registered_methods(running: RunningServer) -> set[str]:
    """What the grpc server itself would dispatch (its registered and generic handler tables)."""
    state: Any = running.server._state  # grpc internals: the cross-check of the descriptors
    names = set(state.registered_method_handlers)
    for handler in state.generic_handlers:
        names.update(getattr(handler, "_method_handlers", {}))
    return names


def attempt(channel: grpc.Channel, name: str, method: MethodDescriptor, role: str | None) -> Any:
    metadata = (("authorization", f"Bearer {TOKENS[role]}"),) if role else None
    try:
        if method.client_streaming:
            call = channel.stream_stream(name) if method.server_streaming else None
            assert call is not None, f"{name}: client-streaming unary is not walked yet"
            responses = call(iter([b""]), metadata=metadata, timeout=5)
            next(iter(responses), None)
            responses.cancel()
        elif method.server_streaming:
            responses = channel.unary_stream(name)(b"", metadata=metadata, timeout=5)
            next(iter(responses), None)
            responses.cancel()
        else:
            channel.unary_unary(name)(b"", metadata=metadata, timeout=5)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_authz_every_registered_method_has_a_policy_entry(
    tls_server: tuple[RunningServer, bytes],
) -> None:
    running, _ = tls_server
    methods = announced_methods(running)
    assert set(methods) == registered_methods(running)
    missing = sorted(set(methods) - set(POLICY))
    assert not missing, f"methods without a POLICY entry (denied to everyone): {missing}"


def test_authz_policy_grants_each_role_only_its_methods() -> None:
    widened = {m: sorted(POLICY[m] - EXPECTED.get(m, frozenset())) for m in POLICY}
    assert {m: r for m, r in widened.items() if r} == {}, "POLICY grants more than EXPECTED"
    assert POLICY == EXPECTED


def test_authz_matrix_has_no_unauthorized_success(tls_server: tuple[RunningServer, bytes]) -> None:
    running, ca = tls_server
    methods = announced_methods(running)
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    unauthorized: list[str] = []
    wrongly_denied: list[str] = []
    with grpc.secure_channel(f"localhost:{running.port}", creds) as channel:
        for name, method in sorted(methods.items()):
            allowed = EXPECTED.get(name, frozenset())
            for role in CALLERS:
                code = attempt(channel, name, method, role)
                permitted = PUBLIC in allowed or (role is not None and role in allowed)
                if not permitted and code not in DENIED:
                    unauthorized.append(f"{role or 'anonymous'} → {name}: {code.name}")
                if permitted and code in DENIED:
                    wrongly_denied.append(f"{role or 'anonymous'} → {name}: {code.name}")
    assert unauthorized == []
    assert wrongly_denied == []
    assert len(methods) * len(CALLERS) >= 5 * 6  # the walk really covered the server
