"""Daemon configuration: embedded defaults ← a TOML file ← ``RISKD_*`` environment variables.

``riskd serve`` with no configuration listens on loopback, reads rules from
``rules/`` and models from ``models/``, and keeps its data (SQLite database,
generated keyring) under ``./var``. A TOML file overrides the defaults, and
environment variables override the file::

    listen = "0.0.0.0:50051"        # RISKD_LISTEN
    metrics_port = 9464             # RISKD_METRICS_PORT (0: any free port, -1: off)
    metrics_host = ""               # RISKD_METRICS_HOST ("" = listen's host)
    rules_dir = "rules"             # RISKD_RULES_DIR
    models_dir = "models"           # RISKD_MODELS_DIR (reserved for the models; not read yet)
    data_dir = "var"                # RISKD_DATA_DIR
    redis_url = ""                  # RISKD_REDIS_URL ("" = in-process features; several
                                    # comma-separated URLs: shards, see riskd.features)
    database_url = ""               # RISKD_DATABASE_URL ("" = sqlite file under data_dir;
                                    # else sqlite:///PATH or postgresql://...)
    deadline_ms = 200               # RISKD_DEADLINE_MS (when the caller sets none)
    keyring_file = ""               # RISKD_KEYRING_FILE ("" = data_dir/keyring.json)
                                    # RISKD_KEYRING: the keyring document itself (wins)
    tls_cert = ""                   # RISKD_TLS_CERT / RISKD_TLS_KEY / RISKD_TLS_CLIENT_CA
    plaintext = true                # RISKD_PLAINTEXT: allow a plaintext port (loopback only)
    log_level = "info"              # RISKD_LOG_LEVEL
    workers = 4                     # RISKD_WORKERS: RPC threads for scoring (scale by
                                    # processes); the server adds 2 each for streams,
                                    # ledger and evidence calls
    score_workers = 0               # RISKD_SCORE_WORKERS: scoring processes behind the gRPC one
                                    # (0: score in the gRPC process; > 0 needs redis_url)
    evidence_flush_ms = 5           # RISKD_EVIDENCE_FLUSH_MS: how long the decision log's
                                    # writer gathers a batch (1..1000; longer: fewer commits,
                                    # more decisions lost in a crash)
    max_batch = 500                 # RISKD_MAX_BATCH: orders per ScoreBatch
    max_message_bytes = 4194304     # RISKD_MAX_MESSAGE_BYTES: a larger request is refused
                                    # with INVALID_ARGUMENT naming its largest field (gRPC's
                                    # own limit, RESOURCE_EXHAUSTED, is 4x this; at most
                                    # 536870911, so that 4x fits gRPC's 32-bit limit)
    grace_s = 10.0                  # RISKD_GRACE_S: on SIGTERM, how long in-flight calls
                                    # get to finish before they are cancelled (0..3600)
    max_connection_age_s = 3600.0   # RISKD_MAX_CONNECTION_AGE_S: a client's connection
                                    # takes no new calls once this old, ±10 % (GOAWAY; calls
                                    # and streams open on it finish), so clients reconnect:
                                    # TLS files or client CAs reloaded since then apply to
                                    # them, and connections spread again over processes
                                    # sharing the port (0: never; 1..604800)
    drain_notice_ms = 1000          # RISKD_DRAIN_NOTICE_MS: on SIGTERM, health answers
                                    # NOT_SERVING this long while calls are still served, so
                                    # load balancers stop sending before the port closes
                                    # (0..60000; above the balancer's health check period)
    reload_interval_s = 2.0         # RISKD_RELOAD_INTERVAL_S: how often the rule files are
                                    # checked for changes (0.05 to 86400)
    redis_timeout_ms = 50           # RISKD_REDIS_TIMEOUT_MS: the bound of each Redis call (per
                                    # shard): connect (name resolution included), handshake, reply
    redis_prefix = "riskd:"         # RISKD_REDIS_PREFIX: prefix of every Redis key
    breaker_failures = 15           # RISKD_BREAKER_FAILURES: failed calls in a row that open
                                    # a dependency's circuit (1..1000); or
    breaker_failure_percent = 50    # RISKD_BREAKER_FAILURE_PERCENT: at least this percent
    breaker_min_calls = 100         # RISKD_BREAKER_MIN_CALLS: of at least this many calls
    breaker_window_s = 5.0          # RISKD_BREAKER_WINDOW_S: in the last this long (0.1..3600;
                                    # also how long a circuit closed again must stay closed
                                    # for its outage to be told over)
    breaker_open_s = 1.0            # RISKD_BREAKER_OPEN_S: open this long, then one call
                                    # probes (0.01..3600)
    breaker_open_max_s = 10.0       # RISKD_BREAKER_OPEN_MAX_S: each re-opening in one outage
                                    # doubles the open time, up to this (open_s..3600)

    [fallback]                      # RISKD_FALLBACK_<SCENARIO>="50000:allow,review"
    default = "50000:allow,review"  # total <= 500 CNY -> allow, else review
    live_room = "20000:allow,review"

    [auth]                          # callers, roles, rate limits (riskd.service.callers)
    [auth.tokens]
    "sha256:9f86d0..." = "checkout-gw:checkout"

The client commands' variables (``CLIENT_ENV``: ``RISKD_TOKEN`` for ``riskd
score``; ``RISKD_HEALTH_CA``, ``RISKD_HEALTH_SERVER_NAME``, ``RISKD_HEALTH_CERT``
and ``RISKD_HEALTH_KEY`` for ``riskd health``) and ``RISKD_CONFIG`` (the file)
may sit in the daemon's environment too (a container's health check reads
them there), and so may the service links Kubernetes adds for a Service named
``riskd`` (``RISKD_SERVICE_HOST``, ``RISKD_SERVICE_PORT*``, ``RISKD_PORT*``:
``SERVICE_LINK_ENV``); every other unknown ``RISKD_*`` variable is refused.

Without TLS and without an ``[auth]`` table the daemon serves plaintext on
loopback to anyone on the machine (the embedded default); with either (an empty
``[auth]`` table too), every call is authenticated and authorized.

A fallback is an ordered list of tiers ``MAX_TOTAL_FEN:OUTCOME``; a tier with
no bound matches any amount: only the last tier has none, and the bounds
before it increase (otherwise a later tier could never apply). Every bad value
raises ``riskd.errors.ConfigError`` naming its key and the file or variable that set it.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from riskd.domain.decision import Outcome
from riskd.domain.order import Channel
from riskd.errors import ConfigError
from riskd.sql import check_postgres_url

ENV_PREFIX = "RISKD_"
STREAM_THREADS = 2  # RPC threads beyond `workers` for streams that hold one (reflection)
LEDGER_THREADS = 2  # RPC threads beyond `workers` for ledger calls
EVIDENCE_THREADS = 2  # RPC threads beyond `workers` for evidence calls (PII reveals)
# What Kubernetes puts in every pod's environment for a Service named ``riskd``: the
# variable's name and the shape of its value (a name alone would let ``RISKD_PORT=50052``,
# meant as a setting, pass unread). A restart after the Service exists must not be refused
# for them. A Service with another name starting ``riskd-`` may collide with a setting
# (``riskd-metrics``: ``RISKD_METRICS_PORT=tcp://...``): README, ``enableServiceLinks``.
_K8S_URL = r"(tcp|udp|sctp)://\S+"
_K8S_ADDR = r"(\d{1,3}\.){3}\d{1,3}|[0-9a-fA-F:]*:[0-9a-fA-F:]*"  # IPv4 or IPv6
SERVICE_LINK_ENV: tuple[tuple[re.Pattern[str], re.Pattern[str]], ...] = tuple(
    (re.compile(name), re.compile(value))
    for name, value in (
        (r"RISKD_SERVICE_HOST", _K8S_ADDR),
        (r"RISKD_SERVICE_PORT(_\w+)?", r"\d+"),
        (r"RISKD_PORT", _K8S_URL),
        (r"RISKD_PORT_\d+_(TCP|UDP|SCTP)", _K8S_URL),
        (r"RISKD_PORT_\d+_(TCP|UDP|SCTP)_PROTO", r"tcp|udp|sctp"),
        (r"RISKD_PORT_\d+_(TCP|UDP|SCTP)_PORT", r"\d+"),
        (r"RISKD_PORT_\d+_(TCP|UDP|SCTP)_ADDR", _K8S_ADDR),
    )
)
# Read by the client commands (riskd score / riskd health) or by the CLI itself, not
# configuration keys: the config loader skips them (riskd.cli.serve reads them).
CLIENT_ENV = frozenset(
    {
        "RISKD_CONFIG",
        "RISKD_TOKEN",
        "RISKD_HEALTH_CA",
        "RISKD_HEALTH_SERVER_NAME",
        "RISKD_HEALTH_CERT",
        "RISKD_HEALTH_KEY",
    }
)


@dataclass(frozen=True, slots=True)
class FallbackTier:
    """Orders whose total is at most ``max_total`` fen (any total when None) get ``outcome``."""

    max_total: int | None
    outcome: Outcome


def _default_fallback() -> Mapping[str, tuple[FallbackTier, ...]]:
    return {"default": parse_tiers("50000:allow,review", "fallback.default")}


@dataclass(frozen=True, slots=True)
class Config:
    """Everything ``riskd serve`` needs; build it with ``load_config``."""

    listen: str = "127.0.0.1:50051"
    metrics_port: int = 9464
    # where /metrics listens: "" = the gRPC listen host. Plain HTTP with no credentials
    # (rule ids and hit counts): with a public listen address, 127.0.0.1 or an internal
    # interface keeps it to the scraper (review: TLS on the gRPC port left it open)
    metrics_host: str = ""
    rules_dir: Path = Path("rules")
    models_dir: Path = Path("models")
    data_dir: Path = Path("var")
    redis_url: str = ""
    database_url: str = ""
    deadline_ms: int = 200
    keyring_file: Path | None = None
    keyring: str = field(default="", repr=False)  # a secret: never in repr or logs
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    plaintext: bool = True
    auth: Mapping[str, Any] | None = None  # the [auth] table; None: there is none
    log_level: str = "info"
    reload_interval_s: float = 2.0
    redis_timeout_ms: int = 50
    redis_prefix: str = "riskd:"
    max_batch: int = 500
    max_message_bytes: int = 4 * 1024 * 1024
    grace_s: float = 10.0
    max_connection_age_s: float = 3600.0  # 0: connections are never closed for their age
    drain_notice_ms: int = 1000  # NOT_SERVING this long before the port stops on SIGTERM
    workers: int = 4  # RPC threads: CPU-bound Python scales by processes, not threads
    score_workers: int = 0  # scoring worker processes (riskd.service.workers); 0: none
    evidence_flush_ms: int = 5  # the decision log writer's batch gathering time
    # the dependencies' circuit breakers (riskd.engine.breaker.BreakerPolicy)
    breaker_failures: int = 15
    breaker_failure_percent: int = 50
    breaker_min_calls: int = 100
    breaker_window_s: float = 5.0
    breaker_open_s: float = 1.0
    breaker_open_max_s: float = 10.0
    fallback: Mapping[str, tuple[FallbackTier, ...]] = field(default_factory=_default_fallback)

    @property
    def database(self) -> str:
        """The database URL, defaulting to a SQLite file under ``data_dir``.

        The path is made absolute: ``sqlite:///var/riskd.db`` would name ``/var/riskd.db``.
        """
        return self.database_url or f"sqlite:///{(self.data_dir / 'riskd.db').absolute()}"

    @property
    def rpc_threads(self) -> int:
        """The server's RPC threads: ``workers`` for scoring (at least two per scoring
        worker: each call to a worker holds its thread while the worker scores), plus
        ``STREAM_THREADS`` that streams holding a thread (reflection) may take,
        ``LEDGER_THREADS`` that ledger calls (which wait on the writer lock) may take and
        ``EVIDENCE_THREADS`` that evidence calls (a reveal writes its audit entry) may
        take: none of them can ever take scoring's."""
        extra = STREAM_THREADS + LEDGER_THREADS + EVIDENCE_THREADS
        return max(self.workers, 2 * self.score_workers) + extra

    @property
    def redis_urls(self) -> tuple[str, ...]:
        """The Redis shards ``redis_url`` lists (comma-separated); empty when unset."""
        return tuple(u.strip() for u in self.redis_url.split(",")) if self.redis_url else ()

    @property
    def keyring_path(self) -> Path:
        """Where the keyring lives (generated on first start when it does not exist)."""
        return self.keyring_file or self.data_dir / "keyring.json"

    @property
    def deadline_s(self) -> float:
        return self.deadline_ms / 1000.0

    @property
    def drain_notice_s(self) -> float:
        return self.drain_notice_ms / 1000.0


MAX_SCORE_WORKERS = 64
# upper bounds far beyond any sane setting: a huge value overflowed a socket or thread
# timer at start (redis_timeout_ms=1e13: "timestamp out of range for platform time_t")
MAX_DEADLINE_MS = 60_000
MAX_REDIS_TIMEOUT_MS = 60_000
MAX_BATCH = 10_000
MAX_WORKERS = 1024
MAX_EVIDENCE_FLUSH_MS = 1000
MAX_GRACE_S = 3600.0  # more than any drain needs (1e300 overflowed grpcio's grace timer)
MAX_RELOAD_INTERVAL_S = 86400.0  # 1e300 overflowed the rules watcher's wait
MIN_RELOAD_INTERVAL_S = 0.05  # review: 1e-300 was taken, a watcher checking without pause
MAX_DRAIN_NOTICE_MS = 60_000
MAX_CONNECTION_AGE_S = 604_800.0  # a week
MAX_BREAKER_FAILURES = 1000
MAX_BREAKER_MIN_CALLS = 100_000
MIN_BREAKER_S = {"breaker_window_s": 0.1, "breaker_open_s": 0.01, "breaker_open_max_s": 0.01}
MAX_BREAKER_S = 3600.0  # an hour: beyond any outage worth waiting out without a probe
# gRPC takes message limits as a signed 32-bit int, and the server accepts 4x
# max_message_bytes (riskd.service.interceptors.RECEIVE_LIMIT_FACTOR) to name the field.
MAX_MESSAGE_BYTES = (2**31 - 1) // 4
_LOG_LEVELS = ("debug", "info", "warning", "error")
_OUTCOMES = {o.name.lower(): o for o in Outcome}


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Config:
    """Defaults, then the TOML file at ``path``, then ``RISKD_*`` variables, then ``overrides``.

    Raises:
        ConfigError: a key is unknown or a value is malformed (the message names the key).
    """
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}  # key -> where its value in force was set
    env = os.environ if env is None else env
    for source, layer in (
        (f"config file {path}", _read_toml(path) if path is not None else {}),
        ("environment", _from_env(env)),
        (None, overrides),
    ):
        # a bad value is refused even where a later layer replaces it (review: only its
        # type was, so a file with `deadline_ms = -1` started while RISKD_DEADLINE_MS was set)
        try:
            _check_each(replace(Config(), **_coerce_layer(layer)))
        except ConfigError as e:
            raise _sourced(e, source, env) from None
        _merge(values, layer)
        for key in layer:
            origins[key] = _origin(key, source, env)
    try:
        return _build(values)
    except ConfigError as e:  # values that do not go together: where each named was set
        at = {k: m.start() for k in origins if (m := re.search(rf"\b{k}\b", str(e)))}
        named = sorted((k for k in at if origins[k]), key=at.__getitem__)
        if not named:
            raise
        where = "; ".join(f"{k} {origins[k]}" for k in named)
        raise ConfigError(f"{e} ({where})") from None


def _origin(key: str, source: str | None, env: Mapping[str, str]) -> str:
    """How a message says where ``key`` was set: ``set by RISKD_X``, ``set in config file
    P``; empty for the caller's own (``riskd serve --listen``), which it knows.

    >>> _origin("redis_url", "environment", {"RISKD_REDIS_URL": "redis://h"})
    'set by RISKD_REDIS_URL'
    """
    if source is None:
        return ""
    if source == "environment":
        name = ENV_PREFIX + key.replace(".", "_").upper()
        return f"set by {name if name in env else 'the environment'}"
    return f"set in {source}"


def _sourced(error: ConfigError, source: str | None, env: Mapping[str, str]) -> ConfigError:
    """``error`` with where its value was set: the file, or the variable (a value that a
    later layer replaces is refused too, so the key alone pointed at the wrong one).

    >>> str(_sourced(ConfigError("deadline_ms: must be positive"), "environment",
    ...              {"RISKD_DEADLINE_MS": "-1"}))
    'deadline_ms: must be positive (set by RISKD_DEADLINE_MS)'
    """
    where = _origin(str(error).partition(":")[0], source, env)
    return ConfigError(f"{error} ({where})") if where else error


def reload_config(path: Path | None = None, **overrides: Any) -> Config:
    """``load_config`` again while serving (SIGHUP), from the same ``path``, environment
    and ``overrides``; ``path`` must be a regular file (or a link to one).

    Raises:
        ConfigError: as ``load_config``; or ``path`` is a pipe or FIFO (``--config
            <(...)``), which reads empty or blocks a second time: its settings were
            read once, and a restart changes them.
    """
    if path is not None:
        try:
            regular = stat.S_ISREG(path.stat().st_mode)
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror}") from None
        if not regular:
            raise ConfigError(
                f"config file {path}: not a regular file (a pipe is read once); "
                "restart to change its settings"
            )
    return load_config(path, **overrides)


def _coerce_layer(layer: Mapping[str, Any]) -> dict[str, Any]:
    """One layer's values of known keys, type-checked (``_build`` refuses unknown keys)."""
    known = {f.name for f in fields(Config)}
    coerced = {}
    for key, raw in layer.items():
        if key in known:
            coerce: Callable[[Any, str], Any] = _COERCE.get(key, _coerce_str)
            coerced[key] = coerce(raw, key)
    return coerced


def _merge(values: dict[str, Any], layer: Mapping[str, Any]) -> None:
    """Later layers win key by key; fallback tables merge scenario by scenario."""
    for key, value in layer.items():
        old = values.get(key)
        if key == "fallback" and isinstance(old, Mapping) and isinstance(value, Mapping):
            values[key] = {**old, **value}
        else:
            values[key] = value


def parse_tiers(text: str, key: str) -> tuple[FallbackTier, ...]:
    """``"50000:allow,review"`` → tiers; the last one must be unbounded.

    >>> [(t.max_total, t.outcome.name) for t in parse_tiers("50000:allow,review", "k")]
    [(50000, 'ALLOW'), (None, 'REVIEW')]
    """
    tiers: list[FallbackTier] = []
    for part in (p.strip() for p in text.split(",")):
        bound, _, outcome = part.rpartition(":")
        tiers.append(FallbackTier(_tier_bound(bound, key), _outcome(outcome, key)))
    if not tiers or tiers[-1].max_total is not None:
        raise ConfigError(f"{key}: the last fallback tier must have no bound (e.g. 'review')")
    bounds = [t.max_total for t in tiers[:-1] if t.max_total is not None]
    if len(bounds) != len(tiers) - 1:  # the tiers after an unbounded one never apply
        raise ConfigError(f"{key}: only the last fallback tier may have no bound")
    if any(a >= b for a, b in pairwise(bounds)):  # a tier under an equal bound never applies
        raise ConfigError(f"{key}: fallback tier bounds must increase")
    return tuple(tiers)


def _tier_bound(text: str, key: str) -> int | None:
    if not text:
        return None
    try:
        bound = int(text)
    except ValueError:
        raise ConfigError(f"{key}: tier bound must be an integer number of fen") from None
    if bound < 0:
        raise ConfigError(f"{key}: tier bound must not be negative")
    return bound


def _outcome(text: str, key: str) -> Outcome:
    try:
        return _OUTCOMES[text.strip().lower()]
    except KeyError:
        raise ConfigError(f"{key}: outcome must be one of {', '.join(_OUTCOMES)}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:  # tomllib decodes before it parses (a GBK comment)
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    fallback: dict[str, str] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in CLIENT_ENV:
            continue
        if _service_link(name, value):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key.startswith("fallback_"):
            fallback[key[len("fallback_") :]] = value
        elif key not in _FIELDS:
            raise ConfigError(f"{key}: unknown configuration key (environment variable {name})")
        else:
            values[key] = value
    if fallback:
        values["fallback"] = fallback
    return values


def _service_link(name: str, value: str) -> bool:
    """Is ``name=value`` one of Kubernetes' service links (``SERVICE_LINK_ENV``)?"""
    return any(n.fullmatch(name) and v.fullmatch(value) for n, v in SERVICE_LINK_ENV)


_FIELDS = frozenset(f.name for f in fields(Config))
_SETTING_NAME = re.compile(r"[a-z][a-z_-]{0,39}")


def unknown_key(table: str, key: str, what: str = "configuration key") -> ConfigError:
    """The error for ``key``, unknown in ``table`` (``"auth."``; ``""``: the top level).

    The key is quoted only when it reads like a setting's name (lowercase letters, ``_`` and
    ``-``; no digits, upper case or other signs, which a random token holds): a token or a
    password written on the wrong line (a token under ``[auth]``, its ``[auth.tokens]``
    header forgotten) was repeated in the log by the error (review).

    >>> str(unknown_key("auth.", "tokenz"))
    'auth.tokenz: unknown configuration key'
    >>> str(unknown_key("auth.", "tok-1f0c9a")).removeprefix("auth: an unknown configuration key, ")
    "not quoted (not a setting's name: a token on the wrong line?)"
    """
    if _SETTING_NAME.fullmatch(key):
        return ConfigError(f"{table}{key}: unknown {what}")
    where = table.removesuffix(".") or "config file"
    return ConfigError(
        f"{where}: an unknown {what}, not quoted (not a setting's name: a token on the wrong line?)"
    )


def _build(values: Mapping[str, Any]) -> Config:
    known = {f.name: f for f in fields(Config)}
    changes: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in known:
            raise unknown_key("", key)
        coerce: Callable[[Any, str], Any] = _COERCE.get(key, _coerce_str)
        changes[key] = coerce(raw, key)
    config = replace(Config(), **changes)
    _check(config)
    return config


def _coerce_str(raw: Any, key: str) -> str:
    """Text sent to a server or a library (URLs, the Redis prefix, the listen address):
    an environment variable's bytes that are not UTF-8 are refused (review: a
    redis_prefix with one started, then every Score failed INTERNAL). File names take
    any bytes (``_coerce_path``)."""
    text = _any_text(raw, key)
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ConfigError(f"{key}: not UTF-8 text") from None
    return text


def _any_text(raw: Any, key: str) -> str:
    if not isinstance(raw, str):
        raise ConfigError(f"{key}: expected a string")
    return raw


def _coerce_int(raw: Any, key: str) -> int:
    if isinstance(raw, bool):
        raise ConfigError(f"{key}: expected an integer")
    if isinstance(raw, int):
        return raw
    if not isinstance(raw, str):  # 4.0 in TOML: not "expected a string"
        raise ConfigError(f"{key}: expected an integer")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{key}: expected an integer") from None


def _coerce_float(raw: Any, key: str) -> float:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        value = float(raw)
    else:
        try:
            if not isinstance(raw, str):  # true in TOML: not "expected a string"
                raise ValueError
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{key}: expected a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number")
    return value


def _coerce_bool(raw: Any, key: str) -> bool:
    if isinstance(raw, bool):
        return raw
    if not isinstance(raw, str):  # 1 in TOML: not "expected a string"
        raise ConfigError(f"{key}: expected true or false")
    text = raw.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}: expected true or false")


def _coerce_table(raw: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{key}: expected a table")
    return dict(raw)


def _coerce_path(raw: Any, key: str) -> Path:
    text = _any_text(raw, key)  # a GBK-named folder is a folder (review)
    if not text:
        raise ConfigError(f"{key}: must not be empty")
    return Path(text)


def _coerce_optional_path(raw: Any, key: str) -> Path | None:
    text = _any_text(raw, key)
    return Path(text) if text else None


def _coerce_fallback(raw: Any, key: str) -> Mapping[str, tuple[FallbackTier, ...]]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f'{key}: expected a table of scenario = "MAX:outcome,..."')
    tiers = dict(_default_fallback())
    for scenario, text in raw.items():
        name = f"{key}.{scenario}"
        if scenario not in _SCENARIOS:  # a misspelt one would silently never apply
            known = ", ".join(sorted(_SCENARIOS))
            raise unknown_key(f"{key}.", scenario, f"scenario (one of {known})")
        tiers[str(scenario)] = parse_tiers(_coerce_str(text, name), name)
    return tiers


# A fallback scenario is an order's channel in lower case, or "default" (riskd.engine.fallback).
_SCENARIOS = frozenset({"default", *(c.name.lower() for c in Channel)})


_COERCE: dict[str, Callable[[Any, str], Any]] = {
    "metrics_port": _coerce_int,
    "deadline_ms": _coerce_int,
    "redis_timeout_ms": _coerce_int,
    "max_batch": _coerce_int,
    "max_message_bytes": _coerce_int,
    "workers": _coerce_int,
    "score_workers": _coerce_int,
    "evidence_flush_ms": _coerce_int,
    "drain_notice_ms": _coerce_int,
    "breaker_failures": _coerce_int,
    "breaker_failure_percent": _coerce_int,
    "breaker_min_calls": _coerce_int,
    "breaker_window_s": _coerce_float,
    "breaker_open_s": _coerce_float,
    "breaker_open_max_s": _coerce_float,
    "reload_interval_s": _coerce_float,
    "grace_s": _coerce_float,
    "max_connection_age_s": _coerce_float,
    "rules_dir": _coerce_path,
    "models_dir": _coerce_path,
    "data_dir": _coerce_path,
    "keyring_file": _coerce_optional_path,
    "tls_cert": _coerce_optional_path,
    "tls_key": _coerce_optional_path,
    "tls_client_ca": _coerce_optional_path,
    "fallback": _coerce_fallback,
    "plaintext": _coerce_bool,
    "auth": _coerce_table,
}


def _check(config: Config) -> None:
    _check_each(config)
    if config.score_workers and not config.redis_url:
        raise ConfigError(
            "score_workers: needs redis_url (worker processes must share velocity counters)"
        )
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ConfigError("tls_cert: tls_cert and tls_key must be given together")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise ConfigError("tls_client_ca: needs tls_cert and tls_key")
    if config.breaker_open_max_s < config.breaker_open_s:
        raise ConfigError("breaker_open_max_s: must be at least breaker_open_s")


def _check_each(config: Config) -> None:
    """The limits of each value on its own (the defaults meet them)."""
    _check_listen(config.listen)
    _positive(config, "deadline_ms", "redis_timeout_ms", "max_batch", "max_message_bytes")
    _positive(config, "workers", "reload_interval_s")
    for key, most in (
        ("deadline_ms", MAX_DEADLINE_MS),
        ("redis_timeout_ms", MAX_REDIS_TIMEOUT_MS),
        ("max_batch", MAX_BATCH),
        ("workers", MAX_WORKERS),
    ):
        if getattr(config, key) > most:
            raise ConfigError(f"{key}: must be at most {most}")
    _check_metrics_host(config.metrics_host)
    if not -1 <= config.metrics_port <= 65535:
        raise ConfigError("metrics_port: must be -1 (off), 0 (any free port) or a port number")
    if not 0 <= config.grace_s <= MAX_GRACE_S:
        raise ConfigError(f"grace_s: must be between 0 and {MAX_GRACE_S:g}")
    # a thread's wait overflows beyond the most; below the least the watcher spins
    if not MIN_RELOAD_INTERVAL_S <= config.reload_interval_s <= MAX_RELOAD_INTERVAL_S:
        raise ConfigError(
            f"reload_interval_s: must be between {MIN_RELOAD_INTERVAL_S:g}"
            f" and {MAX_RELOAD_INTERVAL_S:g}"
        )
    age = config.max_connection_age_s
    if age != 0 and not 1 <= age <= MAX_CONNECTION_AGE_S:
        raise ConfigError(
            f"max_connection_age_s: must be 0 (never) or between 1 and {MAX_CONNECTION_AGE_S:g}"
        )
    if not 0 <= config.drain_notice_ms <= MAX_DRAIN_NOTICE_MS:
        raise ConfigError(f"drain_notice_ms: must be between 0 and {MAX_DRAIN_NOTICE_MS}")
    if config.max_message_bytes > MAX_MESSAGE_BYTES:
        raise ConfigError(f"max_message_bytes: must be at most {MAX_MESSAGE_BYTES}")
    if config.log_level not in _LOG_LEVELS:
        raise ConfigError(f"log_level: must be one of {', '.join(_LOG_LEVELS)}")
    urls = config.redis_urls
    if config.redis_url and not all(
        u.startswith(("redis://", "rediss://", "unix://")) for u in urls
    ):
        raise ConfigError("redis_url: each URL must start with redis://, rediss:// or unix://")
    if len(set(urls)) != len(urls):
        raise ConfigError("redis_url: a shard is listed twice")
    for i, url in enumerate(urls):
        _check_redis_url(url, f"redis_url: shard {i + 1}")
    _check_database_url(config.database_url)
    if not 0 <= config.score_workers <= MAX_SCORE_WORKERS:
        raise ConfigError(f"score_workers: must be between 0 and {MAX_SCORE_WORKERS}")
    if not 1 <= config.evidence_flush_ms <= MAX_EVIDENCE_FLUSH_MS:
        raise ConfigError(f"evidence_flush_ms: must be between 1 and {MAX_EVIDENCE_FLUSH_MS}")
    _check_breaker(config)


def _check_breaker(config: Config) -> None:
    for key, most in (
        ("breaker_failures", MAX_BREAKER_FAILURES),
        ("breaker_failure_percent", 100),
        ("breaker_min_calls", MAX_BREAKER_MIN_CALLS),
    ):
        if not 1 <= getattr(config, key) <= most:
            raise ConfigError(f"{key}: must be between 1 and {most}")
    for key, least in MIN_BREAKER_S.items():
        if not least <= getattr(config, key) <= MAX_BREAKER_S:
            raise ConfigError(f"{key}: must be between {least:g} and {MAX_BREAKER_S:g}")


def _positive(config: Config, *keys: str) -> None:
    for key in keys:
        if getattr(config, key) <= 0:
            raise ConfigError(f"{key}: must be positive")


def _check_listen(listen: str) -> None:
    host, sep, port = listen.rpartition(":")
    # ASCII digits only: str.isdigit takes other scripts' (review: Arabic-Indic ones passed)
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ConfigError("listen: expected HOST:PORT (e.g. 127.0.0.1:50051)")


def _check_metrics_host(host: str) -> None:
    bare = host.removeprefix("[").removesuffix("]")
    if host and (not bare or host.count(":") == 1 or any(c.isspace() or c in "[]/" for c in bare)):
        raise ConfigError(
            "metrics_host: expected a host name or address without a port (e.g. 127.0.0.1;"
            " the port is metrics_port)"
        )


def _check_redis_url(url: str, where: str) -> None:
    """Host, port and db as redis-py will parse them (messages never echo the URL: a password)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"{where}: unix:// needs a socket path")
    else:
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port == 0:
            raise ConfigError(f"{where}: the port must be a number from 1 to 65535")
    db = parse_qs(parts.query).get("db", [""])[-1]
    if parts.scheme != "unix" and not db:
        db = unquote(parts.path).replace("/", "")
    if db and not (db.isascii() and db.isdigit()):
        raise ConfigError(f"{where}: the database must be a number (e.g. redis://host:6379/0)")


def _check_database_url(url: str) -> None:
    """ "" (SQLite under data_dir), ``sqlite:///PATH`` or a PostgreSQL URL; nothing else.

    riskd.sql takes any other text for a SQLite file name: a misspelt scheme would
    quietly become a file.
    """
    if not url:
        return
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return
    if url.startswith(("postgresql://", "postgres://")):
        check_postgres_url(url, "database_url")  # what libpq would refuse at connect
        return
    raise ConfigError(
        "database_url: expected sqlite:///PATH or postgresql://... ('' = SQLite under data_dir)"
    )


_LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """True for ``127.0.0.0/8``, ``::1`` and ``localhost`` (a plaintext port binds, and the
    CLI sends a bearer token in plaintext, only there; here so that the CLI need not import
    the service to ask)."""
    host = host.strip("[]")
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
