"""``riskd serve`` runs the daemon; ``riskd score order.json`` and ``riskd health`` ask one.

``serve`` reads defaults ← ``--config FILE`` (or ``$RISKD_CONFIG``) ← ``RISKD_*``
variables ← ``--listen``, logs JSON lines to stderr, drains on SIGTERM/SIGINT
(health NOT_SERVING for ``drain_notice_ms`` first) and on SIGHUP reads its
file again for the ``[auth]`` settings, with the environment and ``--listen`` it
started with, and reloads the rules (one that comes during start-up is held until
the server is up).
``score`` sends an order written in the protobuf JSON form (see
``examples/order.json``) and prints the decision as JSON.

Both clients connect with TLS given ``--ca``, and present a client certificate
(mutual TLS) given ``--cert`` and ``--key``. ``score`` sends ``--token`` over
plaintext only to a loopback target, and no plaintext call goes through an HTTP proxy
(``NO_PROXY``). Their ``RISKD_TOKEN`` and ``RISKD_HEALTH_*`` variables are the ones
``riskd.config.CLIENT_ENV`` lets the daemon's environment hold.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import sys
import threading
from functools import partial
from pathlib import Path

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from riskd.cli import HeldHangup, add_config_argument
from riskd.errors import RiskdError
from riskd.service.gen.riskd.v1 import order_pb2, scoring_pb2, scoring_pb2_grpc

MAX_TIMEOUT_S = 86_400.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` and ``score`` to the ``riskd`` command."""
    serve = subparsers.add_parser("serve", help="run the scoring daemon")
    serve.add_argument(
        "--listen",
        help="HOST:PORT to listen on (default $RISKD_LISTEN, else the config file's listen,"
        " else 127.0.0.1:50051)",
    )
    add_config_argument(serve)
    serve.set_defaults(func=run_serve)
    score = subparsers.add_parser("score", help="score one order (JSON file, - for stdin)")
    score.add_argument("order", help="order JSON in the riskd.v1.Order protobuf JSON form")
    score.add_argument("--target", default="127.0.0.1:50051", help="daemon HOST:PORT")
    score.add_argument("--timeout", type=_seconds, default=2.0, help="deadline in seconds")
    score.add_argument("--ca", type=Path, help="CA certificate: connect with TLS")
    score.add_argument("--cert", type=Path, help="client certificate (mutual TLS; with --key)")
    score.add_argument("--key", type=Path, help="client certificate's private key")
    score.add_argument(
        "--server-name",
        default="",
        help="name the server certificate must carry, when it is not the target host",
    )
    score.add_argument(
        "--token",
        default=os.environ.get("RISKD_TOKEN", ""),
        help="bearer token (default $RISKD_TOKEN)",
    )
    score.set_defaults(func=run_score)
    health = subparsers.add_parser("health", help="ask a daemon's gRPC health service")
    health.add_argument("--target", default="127.0.0.1:50051", help="daemon HOST:PORT")
    health.add_argument("--timeout", type=_seconds, default=2.0, help="deadline in seconds")
    health.add_argument(
        "--ca",
        type=Path,
        default=os.environ.get("RISKD_HEALTH_CA") or None,
        help="CA certificate: connect with TLS (default $RISKD_HEALTH_CA)",
    )
    health.add_argument(
        "--server-name",
        default=os.environ.get("RISKD_HEALTH_SERVER_NAME", ""),
        help="name the server certificate must carry, when it is not the target host"
        " (default $RISKD_HEALTH_SERVER_NAME)",
    )
    health.add_argument(
        "--cert",
        type=Path,
        default=os.environ.get("RISKD_HEALTH_CERT") or None,
        help="client certificate for mutual TLS, with --key (default $RISKD_HEALTH_CERT)",
    )
    health.add_argument(
        "--key",
        type=Path,
        default=os.environ.get("RISKD_HEALTH_KEY") or None,
        help="client certificate's private key (default $RISKD_HEALTH_KEY)",
    )
    health.set_defaults(func=run_health)


def run_serve(args: argparse.Namespace) -> int:
    """Start the daemon and block until it has drained after SIGTERM/SIGINT."""
    # until the server's handlers are in, a SIGHUP is remembered (riskd.cli.main holds it
    # from before this module was imported) and the rules reload once the server is up
    held = getattr(args, "held_hangup", None) or HeldHangup()
    try:
        # here, not at the top: `riskd score` and `riskd health` need none of the daemon
        from riskd.config import load_config, reload_config
        from riskd.service.logs import configure_logging, install_hooks
        from riskd.service.server import create_server

        overrides = {"listen": args.listen} if args.listen else {}
        config = load_config(args.config, **overrides)
        configure_logging(config.log_level)
        install_hooks()
        # SIGHUP reads the same file and environment again for the [auth] settings
        running = create_server(config, reread=partial(reload_config, args.config, **overrides))
    except RiskdError as e:
        held.release()
        print(f"riskd serve: {e}", file=sys.stderr)
        return 2
    running.install_signal_handlers(config.grace_s, notice_s=config.drain_notice_s)
    if held.event.is_set():
        threading.Thread(target=running.reload, name="riskd-reload").start()
    # Start-up objects (compiled rules, modules) live for the whole process: move them out
    # of the collector's generations so full collections on the request path skip them.
    gc.collect()
    gc.freeze()
    # one write of the whole line: the log handlers of other threads (a held SIGHUP's
    # reload) write to stderr too, and print() writes the text and its newline apart
    sys.stderr.write(f"riskd serving on {config.listen.rpartition(':')[0]}:{running.port}\n")
    sys.stderr.flush()
    while not running.wait(0.5):
        pass
    return 0


def _seconds(text: str) -> float:
    """A deadline in seconds for argparse: finite, above 0 and at most a day (grpcio
    answers a far larger one at once with DEADLINE_EXCEEDED)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_TIMEOUT_S:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected seconds above 0, at most {MAX_TIMEOUT_S:g}")
    return value


def run_score(args: argparse.Namespace) -> int:
    """Send one order to ``--target`` and print the decision (exit 1 on an RPC error)."""
    try:
        data = sys.stdin.buffer.read() if args.order == "-" else Path(args.order).read_bytes()
        order = json_format.Parse(data.decode("utf-8-sig"), order_pb2.Order())
    except (OSError, UnicodeDecodeError) as e:
        print(f"riskd score: cannot read order: {e}", file=sys.stderr)
        return 2
    except json_format.ParseError as e:
        print(f"riskd score: cannot read order: {unreadable(e)}", file=sys.stderr)
        return 2
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    try:
        if args.token and args.ca is None:
            _check_plaintext_token(args.target)
        channel = _channel(args.target, args.ca, args.server_name, cert=args.cert, key=args.key)
    except _ChannelError as e:
        print(f"riskd score: {e}", file=sys.stderr)
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


def unreadable(error: json_format.ParseError) -> str:
    """What is wrong with an order file: the field's path and the kind of problem, never
    the value (protobuf's own text quotes it, review: a phone number written as a number,
    an address in the ``channel`` field, came back on stderr as typed)."""
    cause = error.__cause__
    if isinstance(cause, json.JSONDecodeError):
        return f"not valid JSON: {cause.msg} at line {cause.lineno} column {cause.colno}"
    text = str(error)
    if text.startswith("Failed to load JSON:"):  # a key written twice: protobuf names it
        return "not valid JSON: a key appears twice in one object (key not shown)"
    path = ["order"]
    while (field := _FAILED_FIELD.match(text)) is not None:
        path.append(field[1])
        text = text[field.end() :]
    if "has no field named" in text:
        return f"{'.'.join(path)}: unknown field (name not shown)"
    return f"{'.'.join(path)}: not a valid value for this field (value not shown)"


_FAILED_FIELD = re.compile(r"Failed to parse ([A-Za-z_][A-Za-z0-9_]*) field: ", re.ASCII)
"""One level of protobuf's ``Failed to parse buyer field: Failed to parse phone field: …``."""


def run_health(args: argparse.Namespace) -> int:
    """Exit 0 when the daemon answers SERVING, 1 otherwise (for container health checks)."""
    try:
        channel = _channel(args.target, args.ca, args.server_name, cert=args.cert, key=args.key)
    except _ChannelError as e:
        print(f"riskd health: {e}", file=sys.stderr)
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


NO_PROXY = [("grpc.enable_http_proxy", 0)]
"""Channel options for plaintext: without them grpc sends a call through ``$http_proxy``
(``$grpc_proxy``), bearer token included, in clear; a loopback target, the only one a token
goes to in plaintext, is never behind a proxy. TLS keeps the proxy: through its ``CONNECT``
tunnel the call stays encrypted end to end, and a daemon reachable only that way stays so."""


class _ChannelError(Exception):
    """A client option that cannot be used (the message names the option)."""


def _channel(
    target: str,
    ca: Path | None,
    server_name: str = "",
    *,
    cert: Path | None = None,
    key: Path | None = None,
) -> grpc.Channel:
    """Plaintext without ``ca``; TLS with it; mutual TLS with ``cert`` and ``key`` too."""
    if (cert is None) != (key is None):
        raise _ChannelError("--cert and --key must be given together")
    if ca is None:
        if cert is not None:
            raise _ChannelError("--cert needs --ca (a client certificate needs TLS)")
        return grpc.insecure_channel(target, options=NO_PROXY)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "--ca"),
        private_key=None if key is None else _read(key, "--key"),
        certificate_chain=None if cert is None else _read(cert, "--cert"),
    )
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(target, credentials, options)


def _check_plaintext_token(target: str) -> None:
    """A bearer token goes over plaintext only to loopback (as the daemon listens in
    plaintext only there: ``riskd.service.tls.check_insecure_listen``)."""
    from riskd.config import is_loopback

    if not is_loopback(target.rpartition(":")[0]):
        raise _ChannelError(
            "--token: a bearer token is sent over plaintext only to a loopback --target "
            "(127.0.0.1, ::1, localhost); give --ca to connect with TLS"
        )


def _read(path: Path, option: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise _ChannelError(f"cannot read {option}: {e.strerror}") from None
