"""``riskd serve`` as a subprocess: scores, reloads on SIGHUP, drains on SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from riskd.cli import COMMANDS, build_parser, main
from riskd.config import Config
from riskd.evidence.log import DecisionLog
from riskd.sql import Database

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "tests" / "service" / "testdata" / "rules"
EXAMPLE = ROOT / "examples" / "order.json"


class Daemon:
    """``python -m riskd serve`` with its stderr collected by a thread."""

    def __init__(self, data_dir: Path, *, prelude: str = "", **env_vars: str) -> None:
        env = {
            **os.environ,
            "RISKD_RULES_DIR": str(RULES),
            "RISKD_DATA_DIR": str(data_dir),
            "RISKD_METRICS_PORT": "-1",
            "RISKD_DRAIN_NOTICE_MS": "0",
            **env_vars,
        }
        # prelude: Python run before riskd.cli.main (which is then called as `riskd` is)
        start = ["-c", f"{prelude}\nimport sys, riskd.cli\nsys.exit(riskd.cli.main())"]
        start = start if prelude else ["-m", "riskd"]
        self.proc = subprocess.Popen(
            [sys.executable, *start, "serve", "--listen", "127.0.0.1:0"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE if prelude else None,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.port = 0
        self.reader = threading.Thread(target=self._read, daemon=True)  # ends with stderr
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.match(r"riskd serving on .*:(\d+)$", line.strip())
            if m:
                self.port = int(m.group(1))
                self.ready.set()

    def score(self, path: Path, token: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "riskd",
                "score",
                str(path),
                "--target",
                f"127.0.0.1:{self.port}",
                *(["--token", token] if token else []),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    assert d.ready.wait(30), "".join(d.lines)
    yield d
    d.stop()


def test_serve_scores_then_drains_on_sigterm_and_flushes(daemon: Daemon, tmp_path: Path) -> None:
    result = daemon.score(EXAMPLE)
    assert result.returncode == 0, result.stderr
    decision = json.loads(result.stdout)
    assert decision["order_id"] == "example-0001"
    assert decision["outcome"] == "OUTCOME_ALLOW"

    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    daemon.reader.join(10)  # its last lines read
    logs = [json.loads(line) for line in daemon.lines if line.startswith("{")]
    assert any(entry["msg"] == "stopped" for entry in logs)
    text = "".join(daemon.lines)
    for pii in ("13800000000", "Li Lei", "110101199001010000", "Wensan"):
        assert pii not in text

    db = Database(f"sqlite:///{tmp_path / 'riskd.db'}")
    log = DecisionLog(db)
    try:
        record = log.get("example-0001")
    finally:
        log.close()
        db.close()
    assert record is not None


def test_sighup_reloads_the_rules(daemon: Daemon) -> None:
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any("rules reloaded" in x for x in daemon.lines):
        time.sleep(0.05)
    assert any("rules reloaded" in line for line in daemon.lines)
    assert daemon.proc.poll() is None


def test_sighup_during_start_up_is_held_until_serving(tmp_path: Path) -> None:
    # The config file is a FIFO: start-up blocks reading it until the test writes it,
    # so the SIGHUP surely comes while the daemon is starting.
    fifo = tmp_path / "riskd.toml"
    os.mkfifo(fifo)
    d = Daemon(tmp_path / "data", RISKD_CONFIG=str(fifo))
    try:
        with fifo.open("w") as config:  # returns once `riskd serve` has opened it
            d.proc.send_signal(signal.SIGHUP)
            time.sleep(0.1)
            config.write('log_level = "info"\n')
        assert d.ready.wait(30), "".join(d.lines)
        deadline = time.monotonic() + 30  # generous: a loaded machine compiles slowly
        while time.monotonic() < deadline and not any("rules reloaded" in x for x in d.lines):
            time.sleep(0.05)
        assert any("rules reloaded" in line for line in d.lines)  # held, then done once up
        # a FIFO is read once: its [auth] settings are kept, and the log says why
        assert any("not a regular file" in line for line in d.lines)
        assert d.proc.poll() is None
        args = build_parser().parse_args(["health", "--target", f"127.0.0.1:{d.port}"])
        assert args.func(args) == 0
    finally:
        d.stop()


# Stops the import of MODULE until a line comes on stdin, saying so on stderr.
PAUSE_IMPORT = """
import importlib.abc, sys
class Pause(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "MODULE":
            sys.meta_path.remove(self)
            print("importing MODULE", file=sys.stderr, flush=True)
            sys.stdin.readline()
sys.meta_path.insert(0, Pause())
"""


@pytest.mark.parametrize(
    "module",
    [
        "riskd.service.server",  # the slow part of `riskd serve`'s start, the whole service
        "riskd.cli.serve",  # grpc and protobuf, before run_serve runs: main holds SIGHUP
    ],
)
def test_sighup_while_the_command_is_still_importing_is_held(tmp_path: Path, module: str) -> None:
    # Before the config is read there is a third of a second of imports: a SIGHUP then
    # (a ConfigMap reload as the pod starts) must not end the daemon either.
    d = Daemon(tmp_path, prelude=PAUSE_IMPORT.replace("MODULE", module))
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("importing" in x for x in d.lines):
            time.sleep(0.01)
        assert any(f"importing {module}" in x for x in d.lines), "".join(d.lines)
        d.proc.send_signal(signal.SIGHUP)
        time.sleep(0.1)
        assert d.proc.poll() is None, "ended by the SIGHUP"
        assert d.proc.stdin is not None
        d.proc.stdin.write("go\n")
        d.proc.stdin.close()
        assert d.ready.wait(30), "".join(d.lines)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("rules reloaded" in x for x in d.lines):
            time.sleep(0.05)
        assert any("rules reloaded" in line for line in d.lines)
        assert d.proc.poll() is None
    finally:
        d.stop()


def test_sigterm_announces_not_serving_while_calls_are_still_served(tmp_path: Path) -> None:
    d = Daemon(tmp_path, RISKD_DRAIN_NOTICE_MS="1000")
    try:
        assert d.ready.wait(30), "".join(d.lines)
        serving = health_pb2.HealthCheckResponse.SERVING
        target = f"127.0.0.1:{d.port}"
        with grpc.insecure_channel(target) as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(), timeout=20
            )
            assert next(watch).status == serving
            d.proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            # a load balancer's last calls still get answers
            args = build_parser().parse_args(["score", str(EXAMPLE), "--target", target])
            assert args.func(args) == 0
            assert d.proc.poll() is None
        assert d.proc.wait(30) == 0
    finally:
        d.stop()


def test_score_reports_invalid_argument(
    daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    order = json.loads(EXAMPLE.read_text())
    order["amounts"]["total"] = "1"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(order))
    args = build_parser().parse_args(["score", str(path), "--target", f"127.0.0.1:{daemon.port}"])
    assert args.func(args) == 1
    assert "INVALID_ARGUMENT: order.amounts.total" in capsys.readouterr().err


def test_health_reports_serving_then_fails_when_the_daemon_is_gone(
    daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["health", "--target", f"127.0.0.1:{daemon.port}", "--timeout", "2"]
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    args = build_parser().parse_args(argv)
    assert args.func(args) == 1


@pytest.mark.parametrize("command", [["score", str(EXAMPLE)], ["health"]])
def test_the_clients_ask_the_daemon_s_default_address_and_wait_up_to_a_day(
    command: list[str],
) -> None:
    """``riskd health`` in a container's health check, and ``riskd score`` by hand, with no
    ``--target`` ask a daemon on its embedded default listen address; ``--timeout`` takes a
    day, the most (``MAX_TIMEOUT_S``)."""
    args = build_parser().parse_args(command)
    assert args.target == Config().listen
    assert args.timeout == 2.0
    assert build_parser().parse_args([*command, "--timeout", "86400"]).timeout == 86400.0


def test_score_rejects_malformed_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"order_id": ')
    args = build_parser().parse_args(["score", str(path), "--target", "127.0.0.1:1"])
    assert args.func(args) == 2


def test_score_reads_a_file_with_a_bom_and_refuses_one_not_utf8(
    daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Review: bytes that are not UTF-8 ended ``riskd score`` with a traceback and exit 1
    (the code of an RPC error); a file an editor saved with a BOM was refused."""
    path = tmp_path / "order.json"
    path.write_bytes(b"\xef\xbb\xbf" + EXAMPLE.read_bytes())
    args = build_parser().parse_args(["score", str(path), "--target", f"127.0.0.1:{daemon.port}"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["outcome"] == "OUTCOME_ALLOW"
    path.write_bytes(EXAMPLE.read_bytes().replace(b'"', b"\xff", 1))
    args = build_parser().parse_args(["score", str(path), "--target", f"127.0.0.1:{daemon.port}"])
    assert args.func(args) == 2
    assert "riskd score: cannot read order: 'utf-8' codec can't decode" in capsys.readouterr().err


MARKERS = ("13912345678", "王小明", "幸福路", "H3MARK", "11010519491231002")


@pytest.mark.parametrize(
    ("where", "value", "said"),
    [
        (("buyer", "phone"), 13912345678, "order.buyer.phone: not a valid value"),
        (("buyer", "account_age_days"), "王小明13912345678", "order.buyer.account_age_days: not a"),
        (("channel",), "幸福路7号H3MARK", "order.channel: not a valid value"),
        (("client_time",), "11010519491231002X", "order.client_time: not a valid value"),
        (("amounts", "total"), "13912345678x", "order.amounts.total: not a valid value"),
        (("buyer", "address", "13912345678"), "x", "order.buyer.address: unknown field"),
    ],
)
def test_score_names_the_field_of_an_unreadable_order_never_its_value(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    where: tuple[str, ...],
    value: object,
    said: str,
) -> None:
    """Review: protobuf's parse error quoted the value (``invalid literal for int() with
    base 10: '王小明13912345678'``, ``Invalid enum value 幸福路7号…``): personal data
    written in the wrong field came back on stderr, where terminals and CI logs keep it."""
    order = json.loads(EXAMPLE.read_text())
    at = order
    for key in where[:-1]:
        at = at[key]
    at[where[-1]] = value
    path = tmp_path / "order.json"
    path.write_text(json.dumps(order, ensure_ascii=False))
    args = build_parser().parse_args(["score", str(path), "--target", "127.0.0.1:1"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"riskd score: cannot read order: {said}")
    for marker in MARKERS:
        assert marker not in err


def test_score_says_where_an_order_file_is_not_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "order.json"
    path.write_text('{"order_id": "o-1", "buyer": {"phone": "13912345678" ')
    args = build_parser().parse_args(["score", str(path), "--target", "127.0.0.1:1"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "not valid JSON: Expecting ',' delimiter at line 1 column" in err
    path.write_text('{"order_id": "o-1", "13912345678": 1, "13912345678": 2}')
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "a key appears twice" in err and "13912345678" not in err


@pytest.mark.parametrize("command", ["score", "health"])
@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "1e300", "soon"])
def test_a_timeout_that_is_no_deadline_is_refused(
    command: str, timeout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Review: accepted, then answered at once with DEADLINE_EXCEEDED (inf, 1e300)."""
    argv = [command, *([str(EXAMPLE)] if command == "score" else []), "--timeout", timeout]
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    assert "--timeout: expected seconds above 0" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["--token", "RISKD_TOKEN"])
def test_score_refuses_a_token_over_plaintext_off_loopback(
    source: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["score", str(EXAMPLE), "--target", "192.0.2.10:50051", "--timeout", "0.5"]
    if source == "RISKD_TOKEN":
        monkeypatch.setenv("RISKD_TOKEN", "s3cret-gw-token")
    else:
        argv += ["--token", "s3cret-gw-token"]
    args = build_parser().parse_args(argv)
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "--token" in err and "loopback" in err and "s3cret-gw-token" not in err


def test_score_sends_a_token_over_plaintext_to_loopback(
    daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    # the token reaches the daemon (which, on the embedded default, knows no tokens)
    argv = ["score", str(EXAMPLE), "--target", f"localhost:{daemon.port}", "--token", "nope"]
    args = build_parser().parse_args(argv)
    assert args.func(args) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "answer"),
    [
        # the daemon (knowing no tokens on the embedded default) refuses the token
        (["score", str(EXAMPLE), "--token", "s3cret-gw-token"], "riskd score: UNAUTHENTICATED"),
        (["health"], "SERVING\n"),
    ],
)
def test_plaintext_calls_go_straight_to_the_daemon_not_through_http_proxy(
    daemon: Daemon, command: list[str], answer: str
) -> None:
    """Review: with ``http_proxy`` set, grpc sent the call, bearer token included, to the
    proxy in clear (and a loopback target then never answered)."""
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        proxy.setblocking(False)
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["http_proxy"] = f"http://127.0.0.1:{proxy.getsockname()[1]}"
        target = ["--target", f"127.0.0.1:{daemon.port}", "--timeout", "5"]
        done = subprocess.run(
            [sys.executable, "-m", "riskd", *command, *target],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (done.stdout or done.stderr).startswith(answer), done
        with pytest.raises(BlockingIOError):  # no connection ever came
            proxy.accept()


# runs `riskd` as its entry point does, then names the daemon's modules it imported
IMPORTED = """
import sys, riskd.cli
rc = riskd.cli.main()
service = ("server", "auth", "callers", "policy", "limits", "tls")
heavy = (*(f"riskd.service.{m}" for m in service), "riskd.engine", "riskd.dsl", "redis")
print(rc, sorted(m for m in sys.modules if m.partition(".")[0] in heavy or m.startswith(heavy)))
"""


@pytest.mark.parametrize(
    "command",
    [["health"], ["score", str(EXAMPLE)], ["score", str(EXAMPLE), "--token", "no-such-token"]],
)
def test_health_and_score_import_a_client_not_the_daemon(
    daemon: Daemon, command: list[str]
) -> None:
    """Review: ``riskd health``, the image's health check every 10 s, imported every
    command's modules (server, DSL, Redis...): about a CPU-second per probe; ``--token``
    over plaintext imported the service's auth module for its loopback check."""
    target = ["--target", f"127.0.0.1:{daemon.port}", "--timeout", "5"]
    done = subprocess.run(
        [sys.executable, "-c", IMPORTED, *command, *target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    rc, imported = done.stdout.splitlines()[-1].split(" ", 1)
    assert imported == "[]", done
    # an unknown token is refused by the daemon: the call went out (loopback, plaintext)
    assert rc == ("1" if "--token" in command else "0"), done


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("option", ["--help", "--no-such-option"])
def test_a_command_parses_and_helps_alone_as_among_all(
    command: str, option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``main`` builds only its command's parser: its help and errors read the same."""
    said = []
    for parser in (build_parser(command), build_parser()):
        with pytest.raises(SystemExit) as e:
            parser.parse_args([command, option])
        said.append((e.value.code, capsys.readouterr()))
    assert said[0] == said[1]


def test_serve_fails_cleanly_on_bad_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RISKD_LISTEN", "nowhere")
    monkeypatch.setenv("RISKD_DATA_DIR", str(tmp_path / "var"))
    before = signal.getsignal(signal.SIGHUP)
    args = build_parser().parse_args(["serve"])
    assert args.func(args) == 2
    assert capsys.readouterr().err == (
        "riskd serve: listen: expected HOST:PORT (e.g. 127.0.0.1:50051) (set by RISKD_LISTEN)\n"
    )
    assert not (tmp_path / "var").exists()  # refused before anything is created
    assert signal.getsignal(signal.SIGHUP) is before  # the start-up holder let go


def _malformed_grpc_call(port: int) -> None:
    """A raw HTTP/2 call whose ``grpc-encoding`` header grpcio's core refuses (and logs)."""

    def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))[1:]
            + bytes([kind, flags])
            + struct.pack(">I", stream)
            + payload
        )

    def header(name: str, value: str) -> bytes:
        return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()

    headers = b"".join(
        header(k, v)
        for k, v in (
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/riskd.v1.ScoringService/Score"),
            (":authority", "x"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-encoding", "no-such-13912345678"),
        )
    )
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + frame(4, 0, 0, b"")
            + frame(1, 4, 1, headers)
            + frame(0, 1, 1, b"\x00\x00\x00\x00\x00")
        )
        s.settimeout(1)
        with contextlib.suppress(OSError):
            while s.recv(65536):
                pass


def test_every_stderr_line_is_json_even_when_grpcio_refuses_a_call(tmp_path: Path) -> None:
    """Review: grpcio's core wrote ``E1127 ... hpack_parser.cc] Error parsing 'grpc-encoding'
    metadata`` to stderr as plain text, outside the JSON logs, for any client's malformed
    header; riskd sets ``GRPC_VERBOSITY=NONE`` unless the operator set it."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    with mock.patch.dict(os.environ, env, clear=True):
        daemon = Daemon(tmp_path)
    try:
        assert daemon.ready.wait(30), "".join(daemon.lines)
        _malformed_grpc_call(daemon.port)
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(30) == 0
    finally:
        daemon.stop()
    time.sleep(0.1)  # the reader thread's last lines
    other = [
        line
        for line in daemon.lines
        if not line.startswith("{") and not line.startswith("riskd serving on")
    ]
    assert other == []


# once the daemon serves, a line on stdin: a thread dies of an exception quoting a phone
# number, and a warning quotes it too (what a parser's ValueError on a value would do)
FAIL_IN_A_THREAD = """
import sys, threading, warnings
class Odd:
    def __del__(self):
        raise ValueError("odd phone 13912345678")
def fail():
    sys.stdin.readline()
    warnings.warn("odd phone 13912345678", RuntimeWarning)
    Odd()
    raise ValueError("invalid literal for int() with base 10: '13912345678'")
threading.Thread(target=fail, name="riskd-test-fail", daemon=True).start()
"""


def test_an_uncaught_exception_or_warning_is_a_json_line_without_its_message(
    tmp_path: Path,
) -> None:
    """Review: riskd installed no ``threading.excepthook``/``sys.excepthook``: Python's own
    printed an exception's message (a value a parser quoted), one raised in a ``__del__``
    and a warning's text to stderr as plain text, outside the JSON logs."""
    daemon = Daemon(tmp_path, prelude=FAIL_IN_A_THREAD)
    try:
        assert daemon.ready.wait(30), "".join(daemon.lines)
        assert daemon.proc.stdin is not None
        daemon.proc.stdin.write("go\n")
        daemon.proc.stdin.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("ValueError" in x for x in daemon.lines):
            time.sleep(0.05)
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(30) == 0
    finally:
        daemon.stop()
    time.sleep(0.1)  # the reader thread's last lines
    text = "".join(daemon.lines)
    assert "13912345678" not in text
    entries = [json.loads(x) for x in daemon.lines if not x.startswith("riskd serving on")]
    uncaught = [e for e in entries if e["logger"] == "riskd.uncaught"]
    assert [(e["msg"], e.get("error_type"), e.get("thread")) for e in uncaught] == [
        ("python warning", None, None),
        ("exception ignored", "ValueError", None),
        ("uncaught exception in a thread", "ValueError", "riskd-test-fail"),
    ]
    assert "in fail" in uncaught[2]["traceback"]  # where: its frames
    assert uncaught[0]["category"] == "RuntimeWarning"


def test_sighup_reads_the_tokens_again(tmp_path: Path) -> None:
    # an operator revokes a leaked token without a restart: edit the file, send SIGHUP
    config = tmp_path / "riskd.toml"
    config.write_text('[auth.tokens]\n"tok-leaked" = "gw-1:checkout"\n')
    d = Daemon(tmp_path / "data", RISKD_CONFIG=str(config))
    try:
        assert d.ready.wait(30), "".join(d.lines)
        assert d.score(EXAMPLE, "tok-leaked").returncode == 0
        config.write_text('[auth.tokens]\n"tok-fresh" = "gw-2:checkout"\n')
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("rules reloaded" in x for x in d.lines):
            time.sleep(0.05)  # the access settings are read again first
        refused = d.score(EXAMPLE, "tok-leaked")
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
        assert d.score(EXAMPLE, "tok-fresh").returncode == 0
        assert any("access settings reloaded" in line for line in d.lines)
    finally:
        d.stop()


def test_a_stop_on_a_locked_database_keeps_the_decisions_for_the_next_start(
    tmp_path: Path,
) -> None:
    """Review: SIGTERM while another process held the SQLite file's write lock lost every
    queued decision (50 of 50) and took 60 s: 30 s of flush, then 28 s of closing the
    file under the writer still waiting for the lock. Now the queue is spilled to the data
    folder, the stop ends once the writer is out, and the next start logs the decisions."""
    ids = [f"locked-{i}" for i in range(3)]
    for oid in ids:
        order = json.loads(EXAMPLE.read_text("utf-8"))
        (tmp_path / f"{oid}.json").write_text(json.dumps({**order, "order_id": oid}), "utf-8")
    # the scorer's flush on close, 30 s in the daemon: 1 s here
    shorter = "import riskd.engine.scorer as s; s.Scorer.close.__defaults__ = (1.0,)"
    data = tmp_path / "var"
    d = Daemon(data, prelude=shorter)
    try:
        assert d.ready.wait(30), "".join(d.lines)
        holder = sqlite3.connect(data / "riskd.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process mid-write, past the stop
        for oid in ids:
            assert d.score(tmp_path / f"{oid}.json").returncode == 0
        started = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(60) == 0
        assert time.monotonic() - started < 20  # ~4 s; the old closing alone took ~28 s
        holder.close()
    finally:
        d.stop()
    time.sleep(0.1)  # the reader thread's last lines
    text = "".join(d.lines)
    assert "spilled for the next start" in text and "Traceback" not in text
    for pii in ("13800000000", "Li Lei", "110101199001010000", "Wensan", "buyer-42"):
        assert pii not in text

    again = Daemon(data)
    try:
        assert again.ready.wait(30), "".join(again.lines)
        again.proc.send_signal(signal.SIGTERM)
        assert again.proc.wait(30) == 0
    finally:
        again.stop()
    db = Database(f"sqlite:///{data / 'riskd.db'}")
    log = DecisionLog(db)
    try:
        assert [oid for oid in ids if log.get(oid) is not None] == ids
        assert log.verify().ok
    finally:
        log.close()
        db.close()
    assert list(data.glob("evidence-spill-*")) == []


def test_listen_flag_wins_over_riskd_listen(tmp_path: Path) -> None:
    """``--listen`` is the last layer (README: defaults ← file ← RISKD_* ← --listen): the
    daemon listens there, not on ``RISKD_LISTEN``'s address (held here, so the daemon's
    port cannot come out the same by chance)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        d = Daemon(tmp_path, RISKD_LISTEN=f"127.0.0.1:{taken}")  # Daemon adds --listen :0
        try:
            assert d.ready.wait(30), "".join(d.lines)
            assert d.port != taken
            assert f"riskd serving on 127.0.0.1:{d.port}\n" in d.lines  # the host it bound
            args = build_parser().parse_args(["health", "--target", f"127.0.0.1:{d.port}"])
            assert args.func(args) == 0
        finally:
            d.stop()


def test_sighup_reload_does_not_ask_for_a_restart_for_listen(tmp_path: Path) -> None:
    """A SIGHUP reads the file and environment again *with* ``--listen``: otherwise the
    log would say the listen address changed and waits for a restart."""
    d = Daemon(tmp_path)
    try:
        assert d.ready.wait(30), "".join(d.lines)
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("rules reloaded" in x for x in d.lines):
            time.sleep(0.05)
        reloaded = [
            json.loads(x) for x in d.lines if x.startswith("{") and "access settings reloaded" in x
        ]
        assert len(reloaded) == 1, "".join(d.lines)
        assert reloaded[0]["restart_needed"] == []
    finally:
        d.stop()


def test_health_fails_while_the_daemon_drains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A container's health check must fail (exit 1) once the daemon answers NOT_SERVING,
    not only once it is gone."""
    d = Daemon(tmp_path, RISKD_DRAIN_NOTICE_MS="20000")
    try:
        assert d.ready.wait(30), "".join(d.lines)
        target = f"127.0.0.1:{d.port}"
        with grpc.insecure_channel(target) as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(), timeout=30
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            d.proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            args = build_parser().parse_args(["health", "--target", target])
            assert args.func(args) == 1
            assert capsys.readouterr().out == "NOT_SERVING\n"
            watch.cancel()
    finally:
        d.stop()


def test_sigint_drains_as_sigterm_does(daemon: Daemon) -> None:
    """Ctrl-C on a daemon run by hand: the same drain and flush, exit 0, no traceback."""
    assert daemon.score(EXAMPLE).returncode == 0
    daemon.proc.send_signal(signal.SIGINT)
    assert daemon.proc.wait(30) == 0
    daemon.reader.join(10)  # its last lines read
    logs = [json.loads(line) for line in daemon.lines if line.startswith("{")]
    assert any(entry["msg"] == "stopped" for entry in logs)
    assert "Traceback" not in "".join(daemon.lines)


def test_score_reads_the_order_from_stdin_and_prints_every_field(daemon: Daemon) -> None:
    """``riskd score -`` reads stdin (README); the decision prints its fields with their
    default values too (``degraded: false``, ``reasons: []``), so a script can read them."""
    done = subprocess.run(
        [sys.executable, "-m", "riskd", "score", "-", "--target", f"127.0.0.1:{daemon.port}"],
        cwd=ROOT,
        input=EXAMPLE.read_text("utf-8"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    decision = json.loads(done.stdout)
    assert decision["order_id"] == "example-0001"
    assert decision["degraded"] is False and decision["replayed"] is False
    assert decision["reasons"] == [] and decision["unavailable"] == []


def test_score_names_an_order_file_it_cannot_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing file is a usage error (exit 2, said in one line), not a traceback."""
    missing = tmp_path / "no-such-order.json"
    args = build_parser().parse_args(["score", str(missing), "--target", "127.0.0.1:1"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("riskd score: cannot read order: ") and "No such file" in err
    assert err.count("\n") == 1


# the scorer stops for a second per order, saying so on stderr, so a SIGTERM surely
# comes while a call is in flight
SLOW_SCORE = """
import sys, time
import riskd.engine.scorer as s
_score = s.Scorer.score
def slow(self, *args, **kwargs):
    print("scoring", file=sys.stderr, flush=True)
    time.sleep(1.0)
    return _score(self, *args, **kwargs)
s.Scorer.score = slow
"""


def test_sigterm_lets_a_call_in_flight_finish(tmp_path: Path) -> None:
    """The drain gives in-flight calls ``grace_s`` (10 s by default) to finish."""
    d = Daemon(tmp_path, prelude=SLOW_SCORE)
    try:
        assert d.ready.wait(30), "".join(d.lines)
        result: list[subprocess.CompletedProcess[str]] = []
        caller = threading.Thread(target=lambda: result.append(d.score(EXAMPLE)))
        caller.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(x == "scoring\n" for x in d.lines):
            time.sleep(0.01)
        assert any(x == "scoring\n" for x in d.lines), "".join(d.lines)
        d.proc.send_signal(signal.SIGTERM)
        caller.join(60)
        assert result and result[0].returncode == 0, result
        assert json.loads(result[0].stdout)["order_id"] == "example-0001"
        assert d.proc.wait(30) == 0
    finally:
        d.stop()


def test_an_operators_grpc_verbosity_is_kept(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``GRPC_VERBOSITY=NONE`` is riskd's default only: an operator who set it (to see
    grpcio's own errors while debugging a handshake) keeps it."""
    monkeypatch.setenv("GRPC_VERBOSITY", "DEBUG")
    with pytest.raises(SystemExit):
        main(["health", "--help"])
    assert os.environ["GRPC_VERBOSITY"] == "DEBUG"


def test_a_serve_usage_error_puts_the_previous_hangup_handler_back(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``main`` holds SIGHUP for ``serve`` before parsing: a usage error (exit 2) gives the
    handler it replaced back, not a holder nothing will ever read."""
    before = signal.getsignal(signal.SIGHUP)
    with pytest.raises(SystemExit) as e:
        main(["serve", "--no-such-option"])
    assert e.value.code == 2
    assert signal.getsignal(signal.SIGHUP) is before
