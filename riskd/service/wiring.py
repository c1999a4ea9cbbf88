"""Builds the daemon's components from ``Config``: the one place that knows them all.

``Config`` → keyring (generated under the data dir on first start) →
``BlindIndexer`` → SQL ``Database`` → ``DecisionLog``; feature store
(in-process, or Redis when ``redis_url`` is set); ``ProgramHolder`` over the
rules directory; ``FallbackPolicy``; then the ``Scorer`` over all of them;
the ledger's and the evidence (audited PII reveal) services beside it.
Rule hot reload lives here too: a watcher compares the rule files'
fingerprint and reloads through the holder when it changes.

A data directory or database that cannot be used stops the start with a
``ConfigError`` naming ``data_dir`` (or ``database_url``), not a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from riskd.config import EVIDENCE_THREADS, LEDGER_THREADS, Config
from riskd.domain.clock import Clock
from riskd.dsl.holder import ProgramHolder, RulesState
from riskd.engine.breaker import BreakerPolicy
from riskd.engine.fallback import FallbackPolicy
from riskd.engine.scorer import Scorer
from riskd.errors import ConfigError, UnavailableError
from riskd.evidence.access import PiiAccess
from riskd.evidence.log import DecisionLog
from riskd.evidence.schema import create_schema
from riskd.features import FeatureStore, InProcessFeatureStore, RedisFeatureStore
from riskd.ledger import Book, LedgerShopDirectory, PenaltySchedule, load_schedule
from riskd.pii.blind import BlindIndexer
from riskd.pii.keyring import Keyring, locked
from riskd.pii.keystore import SqlKeyStore
from riskd.pii.vault import Vault, bind_keyring
from riskd.service.evidence import add_evidence_service
from riskd.service.gen.riskd.v1 import evidence_pb2, ledger_pb2
from riskd.service.ledger import add_ledger_service
from riskd.service.metrics import Metrics
from riskd.sql import Database, driver_errors, refusal

log = logging.getLogger("riskd.service.wiring")


@dataclass
class Components:
    """Everything one server process runs on, and how to close it in order."""

    clock: Clock
    scorer: Scorer
    rules: ProgramHolder
    closers: list[Callable[[], None]] = field(default_factory=list)
    decision_log: DecisionLog | None = None  # for the metrics (backlog, set-aside items)
    extra: list[Callable[[grpc.Server], list[str]]] = field(default_factory=list)
    # closed beside the closers, each on a thread of its own, joined before ``close``
    # returns: what needs none of this process's stores (the scoring workers)
    concurrent_closers: list[Callable[[], None]] = field(default_factory=list)
    _watch_stop: threading.Event = field(default_factory=threading.Event)
    _watcher: threading.Thread | None = None
    _reload_lock: threading.Lock = field(default_factory=threading.Lock)

    def register_extra(self, server: grpc.Server) -> list[str]:
        """Register the optional services (the ledger) and return their names."""
        names: list[str] = []
        for hook in self.extra:
            names.extend(hook(server))
        return names

    def reload_rules(self, metrics: Metrics) -> bool:
        """Recompile through the holder; count the outcome; the old rules stay on error.

        ``riskd_rule_reloads_total`` counts swaps only: the holder keeps its program
        when the recompiled one has the same version (nothing changed).
        """
        with self._reload_lock:  # the watcher and SIGHUP: each swap seen (and counted) once
            before = self.rules.current
            try:
                diagnostics = self.rules.reload()
            except Exception:  # a bug, not a rule error: still a failure, old rules kept
                metrics.reload_failures.inc()
                log.error("rules reload crashed; keeping the old rules", exc_info=True)
                return False
            after = self.rules.current
            swapped = after is not before
            if swapped:  # under the lock: two reloads' ids never land out of order (review)
                metrics.reloads.inc()
                metrics.forget_rules([r.id for r in after.rules])
        if diagnostics.ok:
            fields = {"version": after.version, "changed": swapped}
            log.info("rules reloaded", extra={"fields": fields})
            return True
        metrics.reload_failures.inc()
        log.error(
            "rules reload failed; keeping the old rules",
            extra={"fields": {"diagnostics": str(diagnostics)}},
        )
        return False

    def start_watching(
        self, metrics: Metrics, interval_s: float, on_swap: Callable[[], None] | None = None
    ) -> None:
        """Reload whenever the rule files change (checked every ``interval_s``), once
        they have stayed the same for ``riskd.dsl.holder.SETTLE_S``; ``on_swap`` is
        called after each new program this watcher swapped in (the server process then
        sends it to its scoring workers).

        Our own poll loop rather than the holder's watcher, so that every
        reload outcome reaches the metrics.
        """

        def loop() -> None:
            while not self._watch_stop.wait(interval_s):
                try:
                    changed = self.rules.settled_change(self._watch_stop)
                except Exception:  # a dead watcher would freeze the rules silently
                    log.error("rules watch failed; asking again next round", exc_info=True)
                    continue
                if not changed:
                    continue
                before = self.rules.current
                self.reload_rules(metrics)  # counts and logs its own failures
                if on_swap is not None and self.rules.current is not before:
                    try:
                        on_swap()
                    except Exception:  # the watcher goes on (the workers' monitor resends)
                        log.error("rules swapped in; telling the workers failed", exc_info=True)

        self._watcher = threading.Thread(target=loop, name="riskd-rules-watch", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        """Stop watching; start the ``concurrent_closers`` (the scoring workers' stop: each
        worker flushes its own decision log and catch-up); close the scorer (flushes this
        process's evidence log), then the stores; then wait for the concurrent ones.

        The workers are processes with stores of their own: on a database hung or
        locked, their stop (up to ``pool.STOP_TIMEOUT_S``) and this process's scorer's
        close (up to ``CLOSE_MAX_S``, then its log's spill) wait out their time together,
        not one after the other (review: up to ~100 s in all). A closer that raises is
        logged; the others still run.
        """
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        beside: list[threading.Thread] = []
        for closer in self.concurrent_closers:
            thread = threading.Thread(
                target=_close_one, args=(closer,), name="riskd-close", daemon=True
            )
            try:
                thread.start()
            except RuntimeError:  # no thread to be had: closed here first, as before
                _close_one(closer)
                continue
            beside.append(thread)
        try:
            for closer in reversed(self.closers):
                _close_one(closer)
        finally:
            for thread in beside:
                thread.join()  # each bounds its own time (the pool: STOP_TIMEOUT_S)
        self.closers.clear()
        self.concurrent_closers.clear()


def _close_one(closer: Callable[[], None]) -> None:
    """Run one of ``Components``' closers; what it raises is logged, not raised."""
    try:
        closer()
    except UnavailableError as e:  # the database is away: named, not a traceback
        fields = {"closing": getattr(closer, "__qualname__", "?"), "error": str(e)}
        log.error("close failed", extra={"fields": fields})
    except Exception:
        log.error("close failed", exc_info=True)


def build_components(
    config: Config, clock: Clock, *, record_late: bool = True, rules: RulesState | None = None
) -> Components:
    """Open every store and build the scorer; on failure, close what was opened.

    ``record_late``: ``Scorer``'s (False in a scoring worker); ``rules``: start on this
    program (``ProgramHolder.state``: a scoring worker on its server process's rules).
    """
    closers: list[Callable[[], None]] = []
    try:
        return _build(config, clock, closers, record_late, rules)
    except BaseException:
        for closer in reversed(closers):
            closer()
        raise


def _build(
    config: Config,
    clock: Clock,
    closers: list[Callable[[], None]],
    record_late: bool,
    state: RulesState | None,
) -> Components:
    if not config.rules_dir.is_dir():
        raise ConfigError(f"rules_dir: {config.rules_dir} is not a directory")
    # what the files under rules_dir say is checked before anything is created
    rules = ProgramHolder(config.rules_dir, state)  # RuleCompileError: no start without rules
    schedule = _schedule(config)
    configured = configured_keyring(config)  # a bad one is refused before anything exists
    # a URL redis-py refuses creates nothing
    features, features_down = open_feature_store(config, clock)
    closers.append(features.close)
    if config.data_dir.exists() and not config.data_dir.is_dir():
        raise ConfigError(f"data_dir: {config.data_dir} is not a directory")
    created = not config.data_dir.exists()
    try:
        config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # owner only
    except OSError as e:
        raise ConfigError(f"data_dir: cannot create {config.data_dir}: {e.strerror}") from None
    try:  # before a keyring is generated: a database that cannot open, or whose tables
        # this role cannot create (no privilege, a read-only database), changes nothing
        # (review: a psycopg traceback after "generated a new keyring")
        db = Database(config.database)
        closers.append(db.close)
        db.query("SELECT 1")
        create_schema(db)  # the decision log's tables, once: the log is told they are there
        book = open_book(config, clock, schedule)
        closers.append(book.close)
    except _refusals(ConfigError) as e:
        if created:  # left as found (rmdir removes only an empty folder)
            with contextlib.suppress(OSError):
                config.data_dir.rmdir()
        raise _database_error(config, e) from None
    keyring = load_keyring(config, db, configured)
    indexer = BlindIndexer(keyring)
    try:
        # PII in the decision log: masked + blind index in the record, and encrypted under
        # the buyer's data key (so `riskd pii forget` shreds it) beside the record.
        # a key file is re-read when a data key is wrapped under a version added since
        # (`riskd pii keygen`, then a replica or worker started); RISKD_KEYRING cannot be
        path = config.keyring_path
        reload = None if config.keyring else lambda: Keyring.load(path)
        vault = Vault(keyring, SqlKeyStore(db), clock=clock, reload=reload)
        decision_log = DecisionLog(
            db,
            vault=vault,
            indexer=indexer,
            flush_interval_s=config.evidence_flush_ms / 1000.0,
            create_tables=False,
            spill_dir=config.data_dir,
        )
    except _refusals() as e:  # the key store's tables
        raise _database_error(config, e) from None
    closers.append(decision_log.close)
    # what an earlier stop could not commit (its database down or hung), before serving
    decision_log.replay_spilled(config.data_dir)
    shops = LedgerShopDirectory(book, clock)
    closers.append(shops.close)
    scorer = Scorer(
        rules,
        features,
        decision_log,
        indexer,
        shops=shops,
        clock=clock,
        fallback=FallbackPolicy.from_config(config.fallback),
        # each Redis call is bounded by its socket timeout (one per shard: their replies
        # are read one after another); the scorer runs it inline when that fits
        feature_timeout_s=(
            len(config.redis_urls) * config.redis_timeout_ms / 1000.0 if config.redis_url else None
        ),
        record_late=record_late,
        breaker=breaker_policy(config),
        # what the catch-up's stop cannot keep in the database: a spill file, named by
        # process (scoring workers build theirs here too), taken back by the next start
        spill_dir=config.data_dir,
    )
    closers.append(scorer.close)
    if features_down is not None:  # an outage from the start: it ends as any outage
        scorer.features_down(features_down)
    components = Components(clock, scorer, rules, closers, decision_log)
    # ledger calls wait on the database's writer lock: threads of their own (Config.rpc_threads)
    components.extra.append(
        ledger_service(book, max_in_flight=LEDGER_THREADS, max_reply_bytes=config.max_message_bytes)
    )
    access = PiiAccess(decision_log, vault, clock=clock)
    components.extra.append(evidence_service(access, max_in_flight=EVIDENCE_THREADS))
    return components


def breaker_policy(config: Config) -> BreakerPolicy:
    """The dependencies' circuit breakers as configured (``breaker_*``)."""
    return BreakerPolicy(
        failures=config.breaker_failures,
        failure_rate=config.breaker_failure_percent / 100,
        min_calls=config.breaker_min_calls,
        window_s=config.breaker_window_s,
        open_s=config.breaker_open_s,
        open_max_s=config.breaker_open_max_s,
    )


def _refusals(*more: type[Exception]) -> tuple[type[Exception], ...]:
    """What opening the database raises when it cannot be used (``_database_error``)."""
    return (OSError, UnavailableError, *driver_errors(), *more)


def _database_error(config: Config, e: Exception) -> ConfigError:
    """What names the database that cannot be opened: never the URL (it may hold a password)."""
    if isinstance(e, ConfigError):  # a value of the URL's (``riskd.sql``: named, not quoted)
        return ConfigError(f"database_url: {e}")
    if isinstance(e, UnavailableError):  # PostgreSQL not there: its driver's error by kind
        cause = e.__cause__
        reason = f"{e} ({type(cause).__name__})" if cause is not None else str(e)
    elif isinstance(e, OSError):
        reason = e.strerror or type(e).__name__
    else:  # the database refused a statement
        reason = refusal(e)
    if config.database_url:
        return ConfigError(f"database_url: cannot open the database: {reason}")
    return ConfigError(f"data_dir: cannot open {config.data_dir / 'riskd.db'}: {reason}")


def open_book(config: Config, clock: Clock, schedule: PenaltySchedule | None) -> Book:
    """The merchant-money ledger in the daemon's database (``schedule``: ``_schedule``'s)."""
    return Book.open(config.database, schedule=schedule, clock=clock)


def _schedule(config: Config) -> PenaltySchedule | None:
    """The penalty schedule beside the rules (``penalties.toml``), if there is one."""
    path = config.rules_dir / "penalties.toml"
    return load_schedule(path) if path.exists() else None


def ledger_service(
    book: Book, *, max_in_flight: int, max_reply_bytes: int
) -> Callable[[grpc.Server], list[str]]:
    """A hook that registers ``LedgerService`` on the server (``max_in_flight`` calls,
    list replies within ``max_reply_bytes``)."""

    def register(server: grpc.Server) -> list[str]:
        add_ledger_service(
            server, book, max_in_flight=max_in_flight, max_reply_bytes=max_reply_bytes
        )
        return [s.full_name for s in ledger_pb2.DESCRIPTOR.services_by_name.values()]

    return register


def evidence_service(
    access: PiiAccess, *, max_in_flight: int
) -> Callable[[grpc.Server], list[str]]:
    """A hook that registers ``EvidenceService`` (analysts' audited PII reveals) on the
    server (``max_in_flight`` calls)."""

    def register(server: grpc.Server) -> list[str]:
        add_evidence_service(server, access, max_in_flight=max_in_flight)
        return [s.full_name for s in evidence_pb2.DESCRIPTOR.services_by_name.values()]

    return register


def load_keyring(
    config: Config, db: Database | None = None, configured: Keyring | None = None
) -> Keyring:
    """The configured keyring (``configured``, when already read); on first start with none
    configured, generate one (mode 0600). With ``db``, it must be the keyring the
    database's data was written with (recorded there on first use).

    ``RISKD_KEYRING`` (the document) wins over a key file. A keyring is generated only
    for a database that holds no data keys or blind indexes yet: one made under another
    keyring (a lost file, another working directory, a replica with its own data_dir)
    would seal nothing readable and count every identity under other digests. A
    configured keyring other than the database's is refused for the same reasons.
    """
    keyring = configured or configured_keyring(config)
    if keyring is None:
        keyring = _generated_keyring(config, db)
    if db is not None:
        _check_keyring(config, keyring, db)
    return keyring


def _generated_keyring(config: Config, db: Database | None) -> Keyring:
    """A new keyring in the key file (none there at start), under the key file's lock.

    Review: generated without the lock, two daemons starting at once on one data folder
    (or a start beside `riskd pii keygen`) each saved a keyring of its own, the later
    rename replacing the earlier, so one of them sealed under a keyring no file kept (and
    a keygen, clearing stale part files under the lock, could take the start's). Under
    the lock, a key file made meanwhile is read instead.
    """
    path = config.keyring_path
    if db is not None and _holds_keyed_data(db):
        if path.exists():  # another first start saved it, then recorded it in the database,
            return _key_file(path)  # since this one looked (review: refused, the file there)
        raise ConfigError(
            f"keyring_file: {path} does not exist, but the database holds data keys and blind"
            " indexes made with a keyring: restore that file, or point keyring_file or"
            " RISKD_KEYRING at the keyring the other processes use"
        )
    try:
        with locked(path):  # as `riskd pii keygen` does: one keyring, whoever comes first
            if path.exists():  # made meanwhile: another daemon's first start, or a keygen
                return _key_file(path)
            keyring = Keyring.generate()
            keyring.save(path)
    except OSError as e:  # the message names the file, never the keys
        raise ConfigError(f"data_dir: cannot write the keyring {path}: {e.strerror}") from None
    log.info("generated a new keyring", extra={"fields": {"path": str(path)}})
    return keyring


def _check_keyring(config: Config, keyring: Keyring, db: Database) -> None:
    """Refuse a keyring other than the one the database's data was written with."""
    try:
        same = bind_keyring(keyring, SqlKeyStore(db))
    except _refusals() as e:  # the key store's tables
        raise _database_error(config, e) from None
    if not same:
        source = "RISKD_KEYRING" if config.keyring else f"keyring_file: {config.keyring_path}"
        raise ConfigError(
            f"{source} is not the keyring this database's data keys and blind indexes were"
            " made with: point keyring_file or RISKD_KEYRING at that keyring (a new keyring"
            " needs a new database)"
        )


def configured_keyring(config: Config) -> Keyring | None:
    """The keyring ``RISKD_KEYRING`` or the key file holds; None when there is neither
    and one may be generated (``load_keyring``).

    Raises:
        ConfigError: the document or file cannot be read or is not a keyring, or a
            configured ``keyring_file`` does not exist.
    """
    if config.keyring:
        return Keyring.from_json(config.keyring)
    path = config.keyring_path
    if path.exists():
        return _key_file(path)
    if config.keyring_file is not None:
        raise ConfigError(
            f"keyring_file: {path} does not exist (a configured key file is not generated"
            " at start: create it once with `riskd pii keygen`)"
        )
    return None


def _key_file(path: Path) -> Keyring:
    """The keyring in the key file ``path``, an error named as the setting that points at it.

    A file other users may read or write is served, with a warning (a mounted secret is
    often 0644; refusing it would stop a deployment that is otherwise sound).
    """
    try:
        keyring = Keyring.load(path)
    except ConfigError as e:
        detail = str(e).removeprefix("keyring: ")
        raise ConfigError(f"keyring_file: {path}: {detail}") from None
    with contextlib.suppress(OSError):  # read a moment ago; gone now: nothing to warn of
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            fields = {"setting": "keyring_file", "path": str(path), "mode": f"{mode:04o}"}
            log.warning(
                "the key file is open to other users: chmod 600 it", extra={"fields": fields}
            )
    return keyring


def _holds_keyed_data(db: Database) -> bool:
    """Whether ``db`` has data keys or blind indexes (tables not created yet: no)."""
    for table in ("pii_data_keys", "decision_blind_index", "pii_keyring"):
        try:
            if db.query(f"SELECT 1 FROM {table} LIMIT 1"):
                return True
        except Exception:  # no such table: a database riskd has not written yet
            continue
    return False


def open_feature_store(
    config: Config, clock: Clock
) -> tuple[FeatureStore, Callable[[], bool] | None]:
    """Redis when ``redis_url`` is set (shared by replicas), else in-process; and, when a
    shard did not answer at start (logged here), whether every shard answers now, for the
    scorer to ask until it does (``Scorer.features_down``: the outage ends as any other).
    """
    if not config.redis_url:
        return InProcessFeatureStore(clock), None
    store = RedisFeatureStore(
        config.redis_urls,
        clock,
        prefix=config.redis_prefix,
        timeout_s=config.redis_timeout_ms / 1000.0,
    )
    down = store.unreachable()
    for shard, error in down:
        # not a refusal to start: riskd serves degraded and recovers once Redis answers
        # (logged as "dependency answers again"); but a wrong URL or password must not
        # look like an outage
        fields = {"setting": "redis_url", "shard": shard, "error": error}
        log.warning("redis does not answer at start: features degraded", extra={"fields": fields})
    return store, (lambda: not store.unreachable()) if down else None
