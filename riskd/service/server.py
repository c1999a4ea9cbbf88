"""The gRPC server: ``create_server(config)`` builds, binds and starts one riskd process.

Lifecycle::

    create_server ── health NOT_SERVING ── bind ── start ── SERVING
         ... SIGHUP → the [auth] settings and TLS files re-read (old ones kept on error),
                     then the rules
         ... SIGHUP / rule file change → ProgramHolder.reload (old rules kept on error)
    stop(grace) ── NOT_SERVING ── (notice: drain_notice_ms on SIGTERM; calls still served)
                 ── refuse new calls, drain in-flight
                 ─┬─ scorer.close() (flushes the evidence log) ── close stores ─┬─ stopped
                  └─ scoring workers stop (each flushes its own log) ───────────┘

The listening socket has ``SO_REUSEPORT``, so several processes can share one
port; the kernel balances connections (not calls) between them.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass, field, fields
from functools import partial
from types import FrameType
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from riskd.config import STREAM_THREADS, Config
from riskd.domain.clock import Clock, SystemClock
from riskd.engine.catchup import CatchUp
from riskd.engine.scorer import Scorer
from riskd.errors import ConfigError
from riskd.service import validate, wire
from riskd.service.auth import AuthInterceptor
from riskd.service.callers import AuthConfig
from riskd.service.gen.riskd.v1 import order_pb2, scoring_pb2, scoring_pb2_grpc
from riskd.service.healthcheck import HealthServicer
from riskd.service.interceptors import RECEIVE_LIMIT_FACTOR, ErrorInterceptor
from riskd.service.metrics import Metrics, MetricsEndpoint
from riskd.service.policy import CHECKOUT
from riskd.service.pool import WorkerPool
from riskd.service.router import PooledScoringServicer
from riskd.service.scoring import ScorerLike, ScoringServicer
from riskd.service.tls import ServerTls, check_insecure_listen
from riskd.service.wiring import Components, build_components

log = logging.getLogger("riskd.service.server")

SCORING_SERVICE = scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"].full_name
STOP_MARGIN_S = 5.0  # how long past its grace a stop waits for grpcio to report it stopped

if TYPE_CHECKING:  # generic only in the type stubs
    Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    Interceptor = grpc.ServerInterceptor

# A hook that registers one more servicer and returns the full names of what it added.
ExtraServicer = Callable[[grpc.Server], Iterable[str]]


@dataclass
class RunningServer:
    """A started riskd server: its port, health, metrics and components."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    services: tuple[str, ...]
    metrics: Metrics
    components: Components
    endpoint: MetricsEndpoint | None = None
    workers: WorkerPool | None = None
    access: AuthInterceptor | None = None
    tls: ServerTls | None = None
    reread: Callable[[], Config] | None = None  # the configuration as it reads now
    config: Config | None = None  # as it was read at start
    _access_lock: threading.Lock = field(default_factory=threading.Lock)
    _stopped: threading.Event = field(default_factory=threading.Event)
    _stop_lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: bool = False
    _hup: threading.Event = field(default_factory=threading.Event)  # SIGHUPs not reloaded yet

    @property
    def metrics_port(self) -> int | None:
        return None if self.endpoint is None else self.endpoint.port

    @property
    def scorer(self) -> ScorerLike:
        return self.components.scorer

    def set_serving(self, serving: bool) -> None:
        """Announce SERVING or NOT_SERVING for the server and every service."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.services):
            self.health.set(name, status)

    def reload(self) -> bool:
        """What SIGHUP does: re-read the access settings (``reload_access``), then
        recompile the rules (``reload_rules``); False when either kept its old version."""
        access = self.reload_access()
        return self.reload_rules() and access

    def reload_access(self) -> bool:
        """Read the configuration again (``reread``: the file the server started from,
        with its environment, which is the process's own and never changes: a ``RISKD_*``
        variable still wins over the file), check it whole as at start, and admit new
        calls under its ``[auth]`` settings (tokens, certificate principals, rate limits,
        anonymous roles), new connections with its TLS files (``_renewal``).

        False when the file does not load (the error is logged naming the setting and the
        old settings stay in force, all of them), or when its TLS files cannot be put in
        force (logged too; the files in force stay, while its ``[auth]`` settings are put
        in force: a token is revoked even while a certificate is half written or has
        expired). Other changed settings are logged as waiting for a restart. Without
        ``reread`` there is nothing to read again."""
        if self.reread is None or self.access is None or self.config is None:
            return True
        tls_error: Exception | None = None
        with self._access_lock:  # two reloads never swap in their files out of order
            try:
                config = self.reread()
                _check_auth_kept(self.config, config)
                settings = access_settings(config, tls=self.config.tls_cert is not None)
            except Exception as e:  # a ConfigError names the setting; a bug is no reason to stop
                self._reload_failed("access settings reload failed; keeping the old ones", e)
                return False
            try:
                renew = _renewal(self.tls, config)
            except Exception as e:  # review: the revocation waited on the certificate files
                tls_error, renew = e, None
            self.access.reconfigure(settings)
            if renew is not None:
                renew()
        logged = {
            "tokens": len(settings.tokens),
            "cert_principals": len(settings.cert_principals),
            "tls_renewed": renew is not None,
            "restart_needed": _changed(
                self.config, config, tls=renew is not None or tls_error is not None
            ),
        }
        log.info("access settings reloaded", extra={"fields": logged})
        if tls_error is not None:
            self._reload_failed("TLS files reload failed; keeping the ones in force", tls_error)
            return False
        return True

    def _reload_failed(self, message: str, error: Exception) -> None:
        self.metrics.access_reload_failures.inc()
        text = str(error) if isinstance(error, ConfigError) else type(error).__name__
        log.error(
            message, extra={"fields": {"error": text}}, exc_info=not isinstance(error, ConfigError)
        )

    def reload_rules(self) -> bool:
        """Recompile the rules now (SIGHUP); False (old rules kept) when they do not compile.

        Scoring workers are then sent the program in force (``WorkerPool.reload``).
        """
        ok = self.components.reload_rules(self.metrics)
        if self.workers is not None:
            self.workers.reload()
        return ok

    def stop(self, grace: float | None = None, *, notice_s: float = 0.0) -> None:
        """Drain and shut down; safe to call twice and from a signal handler's thread.

        Health turns NOT_SERVING, then after ``notice_s`` (time for load balancers
        to notice) new calls are refused while in-flight ones get up to ``grace``
        seconds to finish; then the evidence log is flushed and stores closed, while
        the scoring workers (if any) stop beside them (``Components.close``).
        """
        with self._stop_lock:
            if self._stopping:
                self._stopped.wait()
                return
            self._stopping = True
        log.info("draining", extra={"fields": {"grace_s": grace}})
        self.set_serving(False)
        if notice_s > 0:
            threading.Event().wait(notice_s)
        stopped = self.server.stop(grace)  # refuses new calls from here on
        if isinstance(self.health, HealthServicer):
            self.health.end_watches()  # they saw NOT_SERVING; left open, the grace waits on them
        # grpcio sometimes never sets the event (review: a reflection stream fed bytes that
        # do not parse, 1-2 stops in 10 hung for good): the grace and a margin, then on
        if not stopped.wait(None if grace is None else grace + STOP_MARGIN_S):
            log.warning("grpc server did not report stopped; closing anyway")
        if isinstance(self.health, HealthServicer):
            self.health.close()
        self.components.close()
        if self.endpoint is not None:
            self.endpoint.close()
        log.info("stopped")
        self._stopped.set()
        self._hup.set()  # its reload thread ends

    def wait(self, timeout: float | None = None) -> bool:
        """Block until ``stop`` has finished; False on timeout."""
        return self._stopped.wait(timeout)

    def _reload_on_hup(self) -> None:
        """Reload once per ``SIGHUP``, one reload at a time: signals that come while one
        runs make one more (review: a thread and a compile per signal, 100 SIGHUPs in a
        second 92 compiles on 98 threads, p99 of live calls 24 → 79 ms)."""
        while True:
            self._hup.wait()
            self._hup.clear()
            if self._stopping:
                return
            try:  # the thread outlives any one reload (review: one that raised ended it)
                self.reload()
            except Exception:
                # the rules may be swapped in here and not yet in every worker: the
                # monitor sends them again to a worker that missed them
                log.error("SIGHUP reload failed", exc_info=True)

    def install_signal_handlers(self, grace: float, *, notice_s: float = 0.0) -> None:
        """SIGTERM/SIGINT drain and stop (in a thread); SIGHUP reloads the access settings
        and the rules (``reload``).

        The drain announces NOT_SERVING ``notice_s`` before it refuses new calls
        (``drain_notice_ms``). Call from the main thread (Python delivers signals there).
        """

        def on_term(signum: int, frame: FrameType | None) -> None:
            threading.Thread(
                target=self.stop, args=(grace,), kwargs={"notice_s": notice_s}, name="riskd-drain"
            ).start()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self._hup.set()

        threading.Thread(target=self._reload_on_hup, name="riskd-reload", daemon=True).start()
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGHUP, on_hup)


def create_server(
    config: Config,
    *,
    clock: Clock | None = None,
    extra_servicers: Sequence[ExtraServicer] = (),
    interceptors: Sequence[Interceptor] = (),
    ready: bool = True,
    reread: Callable[[], Config] | None = None,
) -> RunningServer:
    """Build the components from ``config``, bind ``config.listen`` and start serving.

    Args:
        config: the daemon's configuration (``listen`` may use port 0 in tests).
        clock: where time comes from (``SystemClock`` by default).
        extra_servicers: hooks that register more services (each returns their names).
        interceptors: more server interceptors, run after authentication and before
            riskd's error interceptor. A request over ``EAGER_PARSE_BYTES`` reaches them
            unparsed (``riskd.service.interceptors.Deferred``; ``parsed(request)`` there
            is the message).
        ready: announce SERVING once started; with False the caller calls
            ``set_serving(True)`` (health stays NOT_SERVING meanwhile).
        reread: reads the configuration again, as ``config`` was read (``riskd serve``:
            the same file, environment and ``--listen``), for ``RunningServer.reload``
            (SIGHUP) to take its ``[auth]`` settings from; None: they are fixed.

    Raises:
        ConfigError: the address cannot be bound or a file cannot be read.
        RuleCompileError: the rules do not compile.
    """
    metrics = Metrics()
    # what can be checked about the ports, TLS files and [auth] before the data dir,
    # database or keyring are created: a start that fails on them leaves nothing behind
    clock = clock or SystemClock()
    credentials = _credentials(config, clock)
    access = _auth(config, metrics)
    _probe_listen(config.listen)
    endpoint = _metrics_endpoint(config, metrics)
    components = None
    try:
        components = build_components(config, clock)
        pool = None
        if config.score_workers:
            pool = WorkerPool(config, config.score_workers, metrics, components.rules.state)
            pool.start()
            # stopped beside this process's own scorer and stores (the workers flush their
            # own logs): on a hung or locked database both wait at once, not in turn
            components.concurrent_closers.append(pool.close)
        running = _start(
            config, metrics, components, extra_servicers, [access, *interceptors],
            ready, pool, credentials, endpoint,
        )  # fmt: skip
        running.workers = pool
        running.access, running.reread, running.config = access, reread, config
        running.tls = credentials
        return running
    except BaseException:
        if endpoint is not None:
            endpoint.close()
        if components is not None:
            components.close()
        raise


def element_limits(max_batch: int) -> wire.ElementLimits:
    """The scoring requests' element limits, read on the wire of a large request before
    its parse: what the servicer checks first once it is parsed, with the same errors."""
    orders = scoring_pb2.ScoreBatchRequest.DESCRIPTOR.fields_by_name["orders"]
    items = order_pb2.Order.DESCRIPTOR.fields_by_name["items"]

    def batch(count: int, path: str) -> None:
        validate.validate_batch_size(count, max_batch, path)

    limits = {
        orders.full_name: (max_batch, batch),
        items.full_name: (validate.MAX_ITEMS, validate.validate_item_count),
    }
    requests = (scoring_pb2.ScoreRequest.DESCRIPTOR, scoring_pb2.ScoreBatchRequest.DESCRIPTOR)
    return wire.ElementLimits(limits, requests)


def _start(
    config: Config,
    metrics: Metrics,
    components: Components,
    extra_servicers: Sequence[ExtraServicer],
    interceptors: Sequence[Interceptor],
    ready: bool,
    pool: WorkerPool | None,
    credentials: ServerTls | None,
    endpoint: MetricsEndpoint | None,
) -> RunningServer:
    threads = futures.ThreadPoolExecutor(config.rpc_threads, thread_name_prefix="riskd-rpc")
    server = grpc.server(
        threads,
        interceptors=[
            *interceptors,
            ErrorInterceptor(
                metrics,
                max_message_bytes=config.max_message_bytes,
                limits=element_limits(config.max_batch),
            ),
        ],
        options=_options(config),
    )
    servicer = (
        ScoringServicer(
            components.scorer,
            metrics,
            components.clock,
            default_deadline_s=config.deadline_s,
            max_batch=config.max_batch,
        )
        if pool is None
        else PooledScoringServicer(
            pool,
            components.scorer,
            components.decision_log,
            metrics,
            components.clock,
            default_deadline_s=config.deadline_s,
            max_batch=config.max_batch,
        )
    )
    scoring_pb2_grpc.add_ScoringServiceServicer_to_server(servicer, server)
    services = [SCORING_SERVICE, *components.register_extra(server)]
    for hook in extra_servicers:
        services.extend(hook(server))
    health_servicer = HealthServicer()  # non-blocking Watch; sends from its own thread
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    running = RunningServer(server, 0, health_servicer, tuple(services), metrics, components)
    running.endpoint = endpoint
    running.set_serving(False)
    try:
        running.port = _bind(
            server, config.listen, None if credentials is None else credentials.credentials
        )
    except BaseException:  # nothing started: let the health sender thread go too
        health_servicer.close()
        raise
    server.start()
    components.start_watching(
        metrics, config.reload_interval_s, None if pool is None else pool.reload
    )
    if components.decision_log is not None:
        more = () if pool is None else (pool.evidence,)
        metrics.watch_evidence(components.decision_log, *more)
    metrics.watch_catch_up(
        partial(_catch_up_queued, components.scorer.catch_up, pool),
        components.scorer.catch_up.dropped,
    )
    metrics.watch_dependencies(partial(_unavailable, components.scorer, pool))
    if ready:
        running.set_serving(True)
    fields = {"port": running.port, "metrics_port": running.metrics_port, "services": services}
    log.info("serving", extra={"fields": fields})
    return running


def _metrics_endpoint(config: Config, metrics: Metrics) -> MetricsEndpoint | None:
    """The /metrics HTTP endpoint (each process sharing a gRPC port needs its own port)."""
    if config.metrics_port < 0:
        return None
    try:
        host = config.metrics_host.strip("[]") or _host(config.listen)
        return MetricsEndpoint(metrics, host, config.metrics_port)
    except OSError as e:
        key = "metrics_host/metrics_port" if config.metrics_host else "metrics_port"
        raise ConfigError(
            f"{key}: cannot bind {config.metrics_port}: {e.strerror or type(e).__name__}"
        ) from None


def _options(config: Config) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.so_reuseport", 1),
        # larger requests arrive to be refused by name (see riskd.service.interceptors)
        ("grpc.max_receive_message_length", RECEIVE_LIMIT_FACTOR * config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]
    if config.max_connection_age_s:
        # a connection this old is sent GOAWAY: new calls go to a new connection (TLS
        # files and client CAs as now). No grace: calls in flight and open streams finish
        # on it however long they take (review: a 60 s grace cut a long VerifyLedger);
        # none of them can start another call there.
        options.append(("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)))
    return options


def _host(listen: str) -> str:
    host = listen.rpartition(":")[0]
    return host.strip("[]")


def _auth(config: Config, metrics: Metrics) -> AuthInterceptor:
    """Authentication, deny-by-default authorization and rate limits, on every server,
    under ``access_settings``. Streams that hold an RPC thread get at most
    ``STREAM_THREADS``, threads the server has beyond ``workers``."""

    def on_reject(method: str, code: grpc.StatusCode) -> None:
        metrics.rpc_errors.labels(method, code.name).inc()

    settings = access_settings(config, tls=config.tls_cert is not None)
    return AuthInterceptor(settings, on_reject=on_reject, max_holding_streams=STREAM_THREADS)


def access_settings(config: Config, *, tls: bool) -> AuthConfig:
    """Who may call, from ``config``'s ``[auth]`` table, on a port with TLS or not
    (``tls``: the transport in force, which a reload does not change).

    With neither TLS nor an ``[auth]`` table (the embedded default, plaintext on
    loopback only: checked at bind) callers without credentials hold the
    ``checkout`` role, under checkout's rate limit (there is no ``public`` one to set):
    scoring works out of the box; the ledger and admin methods stay closed until
    tokens or certificates are configured. An
    ``[auth]`` table, even an empty one, gives them ``anonymous_roles`` only
    (none by default).

    Raises:
        ConfigError: naming the bad ``auth.*`` key (never a token).
    """
    if not tls and config.auth is None:
        return AuthConfig(anonymous_roles=frozenset({CHECKOUT}), anonymous_within_public=False)
    return AuthConfig.from_mapping(config.auth or {})


def _check_auth_kept(started: Config, now: Config) -> None:
    """Refuse a reload of a file without the ``[auth]`` table the server started with.

    A file read while it is being written in place (an editor, ``cat new > riskd.toml``,
    which empties it first) is often empty or cut short: on a plaintext port it read as
    the embedded default, and every caller on the machine could score without a token
    while the configured tokens were refused (review). An empty ``[auth]`` table revokes
    every token; dropping the table takes a restart.

    Raises:
        ConfigError: naming ``auth``.
    """
    if started.auth is not None and now.auth is None:
        raise ConfigError(
            "auth: the file has no [auth] table (read while half-written?); an empty "
            "[auth] table revokes every token, removing the table takes a restart"
        )


def _changed(started: Config, now: Config, *, tls: bool) -> list[str]:
    """The settings that differ and take effect at a restart: all but ``auth``, and the
    TLS files when they were renewed (``tls``)."""
    reloaded = {"auth", *(("tls_cert", "tls_key", "tls_client_ca") if tls else ())}
    return [
        f.name
        for f in fields(Config)
        if f.name not in reloaded and getattr(started, f.name) != getattr(now, f.name)
    ]


def _credentials(config: Config, clock: Clock) -> ServerTls | None:
    """TLS credentials when configured (the files read now), else None: plaintext, which
    binds to loopback only.

    Raises:
        ConfigError: a TLS file cannot be read, or plaintext is not allowed on ``listen``.
    """
    if config.tls_cert is not None and config.tls_key is not None:
        return ServerTls(config.tls_cert, config.tls_key, config.tls_client_ca, clock=clock)
    check_insecure_listen(config.listen, allowed=config.plaintext)
    return None


def _renewal(tls: ServerTls | None, config: Config) -> Callable[[], None] | None:
    """What puts ``config``'s TLS files in force (read and checked now), or None when
    they cannot be: the server has no TLS, or ``config`` has none or adds or removes
    ``tls_client_ca`` (a restart does that; until then the files in force stay).

    Raises:
        ConfigError: a TLS file cannot be read or is not what its key needs.
    """
    if tls is None or config.tls_cert is None or config.tls_key is None:
        return None
    if (config.tls_client_ca is not None) != tls.mutual:
        return None
    return tls.read(config.tls_cert, config.tls_key, config.tls_client_ca)


def _probe_listen(listen: str) -> None:
    """Fail early when ``listen`` cannot be bound (taken by another program, not an address
    of this host, a privileged port): bind a socket as grpcio does (SO_REUSEPORT, so the
    processes of one deployment sharing the port pass) and close it, without listening.
    Fine when any of the host's addresses binds, as for grpcio.

    Raises:
        ConfigError: naming ``listen`` and the reason.
    """
    host, _, port = listen.rpartition(":")
    try:
        infos = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, ValueError) as e:
        raise ConfigError(f"listen: cannot bind {listen}: {_reason(e)}") from None
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                probe.bind(address)
                return
        except OSError as e:
            error = e
    raise ConfigError(f"listen: cannot bind {listen}: {_reason(error)}")


def _reason(error: BaseException | None) -> str:
    strerror = getattr(error, "strerror", None)
    return strerror or "no address to bind"


def _catch_up_queued(own: CatchUp, pool: WorkerPool | None) -> int:
    """Orders waiting to be counted: this process's and its workers' as last reported."""
    return own.queued() + (0 if pool is None else pool.evidence.catch_up)


def _unavailable(own: Scorer, pool: WorkerPool | None) -> set[str]:
    """Dependencies in an outage: this process's and its workers' as last reported."""
    return {*own.unavailable(), *(() if pool is None else pool.evidence.unavailable)}


def _bind(server: grpc.Server, listen: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind ``listen`` with TLS given ``credentials``, else plaintext (checked loopback)."""
    if credentials is not None:
        port = _add_port(lambda: server.add_secure_port(listen, credentials))
    else:
        port = _add_port(lambda: server.add_insecure_port(listen))
    if port == 0:
        raise ConfigError(f"listen: cannot bind {listen}")
    return port


def _add_port(add: Callable[[], int]) -> int:
    try:
        return int(add())
    except RuntimeError:  # grpcio raises when the address is malformed or taken
        return 0
