"""riskd.sql: a PostgreSQL peer that vanishes mid-call is found in seconds, and the decision
log's writer goes on on a new connection.

A real partition drops packets, which a test cannot do on loopback without changing the
host's network. What it can do is what a failover looks like from the client: its request
was delivered (the proxy's kernel acknowledged it, as the old primary's did) and then the
peer is gone without a word. The proxy holds what it receives, then closes its sockets
in TCP repair mode (``TCP_REPAIR``: no FIN, no RST; needs CAP_NET_ADMIN), so the client
learns nothing until it sends something: without keepalives, never. Its first keepalive
probe is answered with a reset (no such connection any more, as from the address's new
owner after a failover); in a partition no answer comes and the probes run out, later.

A proxy that stops forwarding but keeps its sockets open is not such a peer: its kernel
acknowledges the probes, and no TCP setting tells it from a slow server.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from riskd import sql
from riskd.errors import UnavailableError
from riskd.evidence.log import DecisionLog
from riskd.sql import Database
from tests.evidence.conftest import make_record

PG = ("127.0.0.1", 5432)
TCP_REPAIR = 19  # linux/tcp.h; not in Python's socket module


class VanishingProxy:
    """A TCP proxy to PostgreSQL. ``hold()``: forward nothing more (what comes in is
    acknowledged and kept); ``vanish()``: the held connections' client sides disappear
    silently, and new connections are forwarded again (the database is back)."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._held = False
        self._generation = 0  # connections accepted before a vanish() are gone
        self.request_held = threading.Event()  # a request came in while holding
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        with self._lock:
            self._held = True

    def vanish(self) -> None:
        with self._lock:
            self._held = False
            self._generation += 1

    def close(self) -> None:
        self._stop = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(PG)
            with self._lock:
                generation = self._generation
            threading.Thread(
                target=self._pump, args=(client, upstream, generation), daemon=True
            ).start()

    def _pump(self, client: socket.socket, upstream: socket.socket, generation: int) -> None:
        try:
            while not self._stop:
                ready, _, _ = select.select([client, upstream], [], [], 0.02)
                with self._lock:
                    gone, held = self._generation != generation, self._held
                if gone:  # the peer's host is gone: no FIN, no RST, nothing
                    client.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
                    return
                if held:  # the kernel acknowledges and buffers; nothing moves on
                    if client in ready:
                        self.request_held.set()
                    continue
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (upstream if s is client else client).sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                s.close()


def tcp_repair_allowed() -> bool:
    a = socket.socket()
    try:
        a.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    except PermissionError:
        return False
    finally:
        a.close()
    return True


@pytest.fixture
def proxy() -> Iterator[VanishingProxy]:
    if not tcp_repair_allowed():
        pytest.skip("TCP_REPAIR needs CAP_NET_ADMIN: no silent peer to test against")
    p = VanishingProxy()
    yield p
    p.close()


@pytest.fixture
def fast_keepalives(monkeypatch: pytest.MonkeyPatch) -> None:
    """Probes after 1 s idle (``raising=False``: also on a riskd.sql without them)."""
    monkeypatch.setattr(sql, "KEEPALIVE_IDLE_S", 1, raising=False)
    monkeypatch.setattr(sql, "KEEPALIVE_INTERVAL_S", 1, raising=False)
    monkeypatch.setattr(sql, "KEEPALIVE_COUNT", 2, raising=False)
    monkeypatch.setattr(sql, "TCP_USER_TIMEOUT_MS", 2000, raising=False)


@pytest.mark.postgres
@pytest.mark.usefixtures("fast_keepalives")
def test_the_writer_goes_on_after_its_peer_vanished_mid_call(proxy: VanishingProxy) -> None:
    schema = f"sql_vanish_{uuid.uuid4().hex[:12]}"
    db = Database(f"postgresql://postgres@127.0.0.1:{proxy.port}/test?schema={schema}")
    log = DecisionLog(db)
    try:
        log.append(make_record("o-before"))
        log.flush(5)  # the writer's connection is open
        proxy.hold()
        log.append(make_record("o-during"))
        assert proxy.request_held.wait(2)  # its BEGIN went out...
        time.sleep(0.5)  # ...and was acknowledged (a delayed ACK waits 200 ms at most)
        proxy.vanish()  # and the database is reachable again, on new connections
        started = time.monotonic()
        log.append(make_record("o-after"))
        log.flush(8)  # without keepalives the writer waits for BEGIN's answer for ever
        took = time.monotonic() - started
        assert took < 6, took
        rows = db.query("SELECT order_id FROM decision_log ORDER BY seq")
        assert rows == [("o-before",), ("o-during",), ("o-after",)]
        assert log.verify().ok
    finally:
        proxy.close()
        with contextlib.suppress(UnavailableError):  # a writer still stuck (without the fix)
            log.close(2)
        db.close()
        direct = Database(f"postgresql://postgres@{PG[0]}:{PG[1]}/test?schema={schema}")
        direct.drop_schema()
        direct.close()


@pytest.mark.postgres
def test_connections_carry_the_keepalive_and_user_timeout_settings() -> None:
    db = Database(f"postgresql://postgres@{PG[0]}:{PG[1]}/test")
    try:
        db.query("SELECT 1")
        # white-box: the client's socket options are not visible from SQL
        fd = db._connect().pgconn.socket
        with socket.socket(fileno=os.dup(fd)) as s:
            got = (
                s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            )
        assert got == (
            1,
            sql.KEEPALIVE_IDLE_S,
            sql.KEEPALIVE_INTERVAL_S,
            sql.KEEPALIVE_COUNT,
            sql.TCP_USER_TIMEOUT_MS,
        )
    finally:
        db.close()


@pytest.mark.postgres
def test_a_urls_own_tcp_settings_win_over_riskds() -> None:
    """An operator's ``keepalives_idle`` or ``tcp_user_timeout`` in the URL is kept; riskd's
    defaults fill in only what the URL leaves out."""
    db = Database(
        f"postgresql://postgres@{PG[0]}:{PG[1]}/test?keepalives_idle=7&tcp_user_timeout=3000"
    )
    try:
        db.query("SELECT 1")
        fd = db._connect().pgconn.socket  # white-box, as above
        with socket.socket(fileno=os.dup(fd)) as s:
            got = (
                s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            )
        assert got == (7, sql.KEEPALIVE_INTERVAL_S, 3000)
    finally:
        db.close()
