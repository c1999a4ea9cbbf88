"""create_server binding and access control: tokens, plaintext only on loopback, shared ports."""

from __future__ import annotations

import socket
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from riskd.errors import ConfigError
from riskd.service import convert
from riskd.service.gen.riskd.v1 import (
    ledger_pb2,
    ledger_pb2_grpc,
    scoring_pb2,
    scoring_pb2_grpc,
)
from riskd.service.server import create_server
from tests.service.conftest import make_config
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
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            statement = ledger_pb2.ListAccountsRequest()
            with pytest.raises(grpc.RpcError) as e:
                ledger.ListAccounts(statement, timeout=5)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        running.stop(1)


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
        with pytest.raises(ConfigError, match=r"^listen: cannot bind"):
            create_server(make_config(tmp_path, listen=f"127.0.0.1:{port}"))


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
