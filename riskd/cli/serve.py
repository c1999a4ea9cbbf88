"""``riskd serve`` runs the daemon; ``riskd score order.json`` and ``riskd health`` ask one.

``serve`` reads defaults ← ``--config FILE`` (or ``$RISKD_CONFIG``) ← ``RISKD_*``
variables ← ``--listen``, logs JSON lines to stderr, drains on SIGTERM/SIGINT
and reloads the rules on SIGHUP. ``score`` sends an order written in the
protobuf JSON form (see ``examples/order.json``) and prints the decision as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from riskd.config import load_config
from riskd.errors import RiskdError
from riskd.service.gen.riskd.v1 import order_pb2, scoring_pb2, scoring_pb2_grpc
from riskd.service.logs import configure_logging
from riskd.service.server import create_server


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` and ``score`` to the ``riskd`` command."""
    serve = subparsers.add_parser("serve", help="run the scoring daemon")
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:50051)")
    serve.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("RISKD_CONFIG") or None,
        help="TOML configuration file (default $RISKD_CONFIG)",
    )
    serve.set_defaults(func=run_serve)
    score = subparsers.add_parser("score", help="score one order (JSON file, - for stdin)")
    score.add_argument("order", help="order JSON in the riskd.v1.Order protobuf JSON form")
    score.add_argument("--target", default="127.0.0.1:50051", help="daemon HOST:PORT")
    score.add_argument("--timeout", type=float, default=2.0, help="deadline in seconds")
    score.add_argument("--ca", type=Path, help="CA certificate: connect with TLS")
    score.add_argument(
        "--token",
        default=os.environ.get("RISKD_TOKEN", ""),
        help="bearer token (default $RISKD_TOKEN)",
    )
    score.set_defaults(func=run_score)
    health = subparsers.add_parser("health", help="ask a daemon's gRPC health service")
    health.add_argument("--target", default="127.0.0.1:50051", help="daemon HOST:PORT")
    health.add_argument("--timeout", type=float, default=2.0, help="deadline in seconds")
    health.add_argument(
        "--ca",
        type=Path,
        default=os.environ.get("RISKD_HEALTH_CA") or None,
        help="CA certificate: connect with TLS (default $RISKD_HEALTH_CA)",
    )
    health.add_argument(
        "--server-name",
        default=os.environ.get("RISKD_HEALTH_SERVER_NAME", ""),
        help="name the server certificate must carry, when it is not the target host",
    )
    health.set_defaults(func=run_health)


def run_serve(args: argparse.Namespace) -> int:
    """Start the daemon and block until it has drained after SIGTERM/SIGINT."""
    try:
        overrides = {"listen": args.listen} if args.listen else {}
        config = load_config(args.config, **overrides)
        configure_logging(config.log_level)
        running = create_server(config)
    except RiskdError as e:
        print(f"riskd serve: {e}", file=sys.stderr)
        return 2
    running.install_signal_handlers(config.grace_s)
    # Start-up objects (compiled rules, modules) live for the whole process: move them out
    # of the collector's generations so full collections on the request path skip them.
    gc.collect()
    gc.freeze()
    print(f"riskd serving on {config.listen.rpartition(':')[0]}:{running.port}", file=sys.stderr)
    while not running.wait(0.5):
        pass
    return 0


def run_score(args: argparse.Namespace) -> int:
    """Send one order to ``--target`` and print the decision (exit 1 on an RPC error)."""
    try:
        text = sys.stdin.read() if args.order == "-" else Path(args.order).read_text()
        order = json_format.Parse(text, order_pb2.Order())
    except (OSError, json_format.ParseError) as e:
        print(f"riskd score: cannot read order: {e}", file=sys.stderr)
        return 2
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    try:
        channel = _channel(args.target, args.ca)
    except OSError as e:
        print(f"riskd score: cannot read --ca: {e.strerror}", file=sys.stderr)
        return 2
    with channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        try:
            request = scoring_pb2.ScoreRequest(order=order)
            reply = stub.Score(request, timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as e:
            print(f"riskd score: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    decision = json_format.MessageToDict(
        reply.decision, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    print(json.dumps(decision, indent=2, ensure_ascii=False))
    return 0


def run_health(args: argparse.Namespace) -> int:
    """Exit 0 when the daemon answers SERVING, 1 otherwise (for container health checks)."""
    try:
        channel = _channel(args.target, args.ca, args.server_name)
    except OSError as e:
        print(f"riskd health: cannot read --ca: {e.strerror}", file=sys.stderr)
        return 2
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=args.timeout
            )
        except grpc.RpcError as e:
            print(f"riskd health: {e.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _channel(target: str, ca: Path | None, server_name: str = "") -> grpc.Channel:
    if ca is None:
        return grpc.insecure_channel(target)
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(ca.read_bytes()), options)
