"""build_components: a data directory or database that cannot be used stops the start by name."""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from riskd import spillfile
from riskd.config import Config
from riskd.domain.clock import SystemClock
from riskd.engine import catchup
from riskd.errors import ConfigError, DeadlineExceededError, RiskdError, UnavailableError
from riskd.evidence.log import encrypted_fields
from riskd.pii.keyring import Keyring, fingerprint, locked
from riskd.service import wiring
from riskd.service.metrics import Metrics
from riskd.service.server import create_server
from riskd.service.wiring import build_components, load_keyring
from riskd.sql import Database
from tests.features.features_support import delete_prefix
from tests.service.conftest import SHARED_REDIS, copy_rules, make_config
from tests.service.sample import full_order
from tests.service.test_lifecycle import eventually


def test_data_dir_that_is_a_file_or_under_one_is_refused_by_name(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("")
    for data_dir in (file, file / "var"):
        with pytest.raises(ConfigError, match=r"^data_dir: .*(not a directory|Not a directory)"):
            create_server(make_config(data_dir))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_data_dir_is_refused_by_name(tmp_path: Path) -> None:
    data_dir = tmp_path / "ro"
    data_dir.mkdir()
    data_dir.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match=r"^data_dir: "):
            create_server(make_config(data_dir))
    finally:
        data_dir.chmod(0o700)


@pytest.mark.parametrize("kind", ["directory", "not a database"])
def test_database_that_cannot_open_is_refused_and_no_keyring_is_made(
    tmp_path: Path, kind: str
) -> None:
    db = tmp_path / "riskd.db"
    if kind == "directory":
        db.mkdir()
    else:
        db.write_bytes(b"not sqlite, 13800000000" * 100)
    with pytest.raises(ConfigError, match=r"^data_dir: cannot open .*riskd\.db: ") as e:
        create_server(make_config(tmp_path))
    assert "13800000000" not in str(e.value)
    assert not (tmp_path / "keyring.json").exists()  # nothing changed


@pytest.mark.parametrize("broken", ["checkout.rules", "penalties.toml"])
def test_a_start_refused_for_the_rules_dir_creates_nothing(tmp_path: Path, broken: str) -> None:
    """Review: a broken rule file or penalty schedule was found only after the database
    and a new keyring had been created under the data dir."""
    rules = copy_rules(tmp_path / "rules")
    (rules / broken).write_text("rule ((( not a rule\n")
    data = tmp_path / "data"
    with pytest.raises(RiskdError):
        create_server(make_config(data, rules_dir=str(rules)))
    assert not data.exists()


def test_database_url_error_never_shows_the_url(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()
    url = f"sqlite:///{tmp_path / 'db'}"  # a directory: SQLite cannot open it
    with pytest.raises(ConfigError, match=r"^database_url: cannot open the database: ") as e:
        create_server(make_config(tmp_path / "data", database_url=url))
    assert str(tmp_path) not in str(e.value)


def test_an_unreachable_postgresql_is_refused_naming_database_url(tmp_path: Path) -> None:
    """Review: ``riskd serve: database unavailable``, the setting not named."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://riskd:s3cret@127.0.0.1:{port}/riskd"
    with pytest.raises(ConfigError, match=r"^database_url: cannot open the database: ") as e:
        create_server(make_config(tmp_path / "data", database_url=url))
    assert "s3cret" not in str(e.value) and str(port) not in str(e.value)


@pytest.mark.parametrize(
    ("parameter", "value"),
    [
        ("connect_timeout", "abc"),  # psycopg's own check: was a traceback
        ("sslmode", "bogus"),  # libpq's: was "database unavailable"
        ("keepalives_idle", "abc"),
        ("ssl_max_protocol_version", "TLSv9"),  # libpq quotes this name
        ("hostaddr", "abc"),
        ("port", None),
    ],
)
def test_a_bad_value_in_the_postgresql_url_is_named_not_quoted(
    tmp_path: Path, parameter: str, value: str | None
) -> None:
    """Review: ``?connect_timeout=abc`` ended ``riskd serve`` with a traceback, and
    ``?sslmode=bogus`` or port 99999 read "database unavailable": the parameter named."""
    base = "postgresql://riskd:s3cret@127.0.0.1:5432/test"
    url = base.replace("5432", "99999") if value is None else f"{base}?{parameter}={value}"
    data = tmp_path / "data"
    with pytest.raises(ConfigError) as e:
        create_server(make_config(data, database_url=url))
    assert str(e.value) == (
        f"database_url: {parameter} (in the URL or a PG* environment variable)"
        " has a value PostgreSQL refuses"
    )
    assert not data.exists()


def test_a_redis_that_does_not_answer_at_start_is_logged_and_served_degraded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Review: a wrong ``redis_url`` (or password) started silently and looked like an
    outage; it still starts (and recovers once Redis answers), and says so, URL-free."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://:s3cret@127.0.0.1:{port}/0"
    with caplog.at_level(logging.WARNING, logger="riskd.service.wiring"):
        running = create_server(make_config(tmp_path, redis_url=url))
    running.stop(0)
    [record] = [r for r in caplog.records if r.name == "riskd.service.wiring"]
    assert record.getMessage() == "redis does not answer at start: features degraded"
    fields = record.fields  # type: ignore[attr-defined]
    assert fields == {"setting": "redis_url", "shard": 0, "error": "ConnectionError"}


def test_the_features_are_kept_under_the_configured_redis_prefix(tmp_path: Path) -> None:
    """``redis_prefix``: the replicas of one deployment share their counts under it, and
    another deployment on the same Redis keeps its own."""
    prefix = f"riskd-test-wiring-{uuid.uuid4().hex}:"
    config = make_config(tmp_path, redis_url=SHARED_REDIS, redis_prefix=prefix)
    client = redis.Redis.from_url(SHARED_REDIS)
    try:
        components = build_components(config, SystemClock())
        try:
            components.scorer.score(full_order("o-1"), timeout_s=5.0)
        finally:
            components.close()
        assert client.keys(f"{prefix}*") != []
    finally:
        delete_prefix(client, prefix)
        client.close()


def test_the_data_dir_and_database_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        running = create_server(make_config(tmp_path / "var"))
        running.stop(0)
    finally:
        os.umask(old)
    assert (tmp_path / "var").stat().st_mode & 0o777 == 0o700
    for name in ("riskd.db", "keyring.json"):
        assert (tmp_path / "var" / name).stat().st_mode & 0o777 == 0o600, name


def test_a_key_file_other_users_may_read_is_served_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A key file left 0644 (a mounted secret's default) lets any user on the host
    unwrap every buyer's data key: riskd says so at each start, naming file and mode."""
    create_server(make_config(tmp_path)).stop(0)  # the first start writes it 0600
    key_file = tmp_path / "keyring.json"
    for mode, warned in ((0o600, False), (0o644, True), (0o620, True), (0o400, False)):
        key_file.chmod(mode)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="riskd.service.wiring"):
            create_server(make_config(tmp_path)).stop(0)
        records = [r for r in caplog.records if r.name == "riskd.service.wiring"]
        assert [r.getMessage() for r in records] == (
            ["the key file is open to other users: chmod 600 it"] if warned else []
        ), oct(mode)
        if warned:
            fields = records[0].fields  # type: ignore[attr-defined]
            assert fields == {
                "setting": "keyring_file",
                "path": str(key_file),
                "mode": f"{mode:04o}",
            }
        assert key_file.stat().st_mode & 0o777 == mode  # never changed behind the owner's back
    key_file.chmod(0o644)  # a keyring passed in the environment: no file to judge
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="riskd.service.wiring"):
        keyring = key_file.read_text(encoding="utf-8")
        create_server(make_config(tmp_path, keyring=keyring)).stop(0)
    assert [r for r in caplog.records if r.name == "riskd.service.wiring"] == []


def test_a_lost_keyring_is_not_replaced_over_data_sealed_with_it(tmp_path: Path) -> None:
    """A new keyring would seal nothing readable and count every identity under other
    digests: riskd refuses to generate one over a database that used another."""
    running = create_server(make_config(tmp_path))
    running.components.scorer.score(full_order("o-1"), timeout_s=5.0)
    running.stop(0)
    (tmp_path / "keyring.json").unlink()
    with pytest.raises(ConfigError, match=r"^keyring_file: .* does not exist, but the database"):
        create_server(make_config(tmp_path))
    assert not (tmp_path / "keyring.json").exists()


def test_a_first_start_beside_a_keygen_takes_the_key_file_made_meanwhile(
    tmp_path: Path,
) -> None:
    """Review: a first start generated its keyring without the key file's lock, so a
    `riskd pii keygen` (or another daemon's first start) on the same data folder at that
    moment saved a keyring of its own over it, or under it: one of them went on sealing
    under a keyring no file kept. Now the start waits for the lock and reads the file
    made meanwhile."""
    config = make_config(tmp_path)
    key_file = tmp_path / "keyring.json"
    made = Keyring.generate()
    got: list[Keyring] = []
    with locked(key_file):  # a keygen holding the lock, its save not yet done
        start = threading.Thread(target=lambda: got.append(load_keyring(config)))
        start.start()
        time.sleep(0.3)
        made.save(key_file)
    start.join(5)
    assert not start.is_alive()
    assert fingerprint(got[0]) == fingerprint(made)
    assert fingerprint(Keyring.load(key_file)) == fingerprint(made)
    assert [p.name for p in tmp_path.iterdir() if "keyring-" in p.name] == []


def test_a_first_start_takes_the_keyring_another_start_saved_and_recorded_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: a first start looked for the database's data keys before taking the key
    file's lock. Another daemon's first start on the same data folder that saved its
    keyring and recorded it in the database in between (after this start found no key
    file) made this one refuse to start, saying the key file "does not exist", the file
    there. Under the lock a key file made meanwhile is read before the database is asked."""
    config = make_config(tmp_path)
    first, second = Database(config.database), Database(config.database)
    made: list[Keyring] = []
    other_started = threading.Event()
    real = wiring.configured_keyring

    def looked(config: Config) -> Keyring | None:
        found = real(config)
        if found is None and not other_started.is_set():  # the other start, right after
            other_started.set()  # this one looked: it generates, saves and records its own
            made.append(load_keyring(config, first))
        return found

    monkeypatch.setattr(wiring, "configured_keyring", looked)
    try:
        got = load_keyring(config, second)
    finally:
        first.close()
        second.close()
    assert fingerprint(got) == fingerprint(made[0])
    assert fingerprint(Keyring.load(tmp_path / "keyring.json")) == fingerprint(made[0])


def test_a_daemon_started_before_keygen_seals_for_buyers_keyed_after_it(tmp_path: Path) -> None:
    """`riskd pii keygen`, then a replica starts and keys a buyer under the new version:
    the daemon started before re-reads its key file and still seals that buyer's orders
    (not masked-only, counted as unsealed)."""
    first = create_server(make_config(tmp_path))
    key_file = tmp_path / "keyring.json"
    Keyring.load(key_file).add_version().save(key_file)
    second = create_server(make_config(tmp_path))
    try:
        second.components.scorer.score(full_order("o-1"), timeout_s=5.0)
        log_2 = second.components.decision_log
        assert log_2 is not None
        log_2.flush(5.0)
        first.components.scorer.score(full_order("o-2"), timeout_s=5.0)
        log_1 = first.components.decision_log
        assert log_1 is not None
        log_1.flush(5.0)
        assert log_1.unsealed == 0
        db = Database(f"sqlite:///{tmp_path / 'riskd.db'}")
        try:
            assert len(encrypted_fields(db, "o-1")) == len(encrypted_fields(db, "o-2")) > 0
        finally:
            db.close()
    finally:
        second.stop(0)
        first.stop(0)


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"auth": {"tokens": {"sha256:abc": "gw:checkout"}}}, r"^auth\.tokens\[0\]: "),
        ({"auth": {"rate_limits": {"analyst": "fast"}}}, r"^auth\.rate_limits\.analyst: "),
        ({"keyring": "{not json"}, r"^keyring: "),
        ({"keyring_file": "/nonexistent/keyring.json"}, r"^keyring_file: .* does not exist"),
        # review: named "keyring:", pointing at RISKD_KEYRING instead of the file
        ({"keyring_file": "{tmp}/bad.json"}, r"^keyring_file: .*bad\.json: not valid JSON"),
        # review: redis-py refused these options with a traceback after the keyring and
        # the database were created; the password never shows
        (
            {"redis_url": "redis://:s3cret@127.0.0.1:6379/0?socket_timeout=abc"},
            r"^redis_url: shard 1: Invalid value for 'socket_timeout'[^3]*$",
        ),
        (
            {"redis_url": "redis://127.0.0.1:6379/0,rediss://127.0.0.1:6379/0?ssl_cert_reqs=no"},
            r"^redis_url: shard 2: Invalid SSL Certificate Requirements Flag: no$",
        ),
    ],
)
def test_a_start_refused_for_auth_keyring_or_redis_url_creates_nothing(
    tmp_path: Path, overrides: dict[str, object], error: str
) -> None:
    """Review: these were refused only after the data dir and database (and for [auth], a
    new keyring) had been created."""
    (tmp_path / "bad.json").write_text("{not json")
    overrides = {
        k: str(v).format(tmp=tmp_path) if k == "keyring_file" else v for k, v in overrides.items()
    }
    data = tmp_path / "data"
    with pytest.raises(ConfigError, match=error):
        create_server(make_config(data, **overrides))
    assert not data.exists()


def test_an_unreachable_postgresql_leaves_no_data_dir(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path / "data"
    url = f"postgresql://riskd@127.0.0.1:{port}/riskd"
    with pytest.raises(ConfigError, match=r"^database_url: cannot open"):
        create_server(make_config(data, database_url=url))
    assert not data.exists()


def test_the_watcher_tells_its_caller_of_each_new_program_and_of_nothing_else(
    tmp_path: Path,
) -> None:
    """The server process's watcher tells its scoring workers to reload at once (review:
    each worker polled on its own schedule, and a batch split between them was decided
    under two rule versions for up to a poll)."""
    rules = copy_rules(tmp_path / "rules")
    config = make_config(tmp_path / "data", rules_dir=str(rules), reload_interval_s=0.05)
    components = build_components(config, SystemClock())
    swaps: list[str] = []
    metrics = Metrics()
    try:
        components.start_watching(
            metrics, 0.05, lambda: swaps.append(components.rules.current.version)
        )
        path = rules / "checkout.rules"
        text = path.read_text()
        path.write_text(text.replace("> 10000000", "> 1000"))
        assert eventually(lambda: swaps == [components.rules.current.version], 10)
        path.write_text(text.replace('orders("device", "1h") >= 2', "nosuch >= 2"))
        assert eventually(lambda: metrics.value("riskd_rule_reload_failures_total") == 1, 10)
        time.sleep(4 * 0.05)
        assert len(swaps) == 1  # a refused edit swaps nothing
    finally:
        components.close()


def test_the_catch_up_spills_to_the_data_dir_at_a_locked_stop_for_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The data folder reaches the catch-up wherever the components are built (a scoring
    worker builds its own here too): orders its stop could not keep in a database held
    locked go to a file named by the process, and the next start takes them."""
    monkeypatch.setattr(catchup, "KEEP_WAIT_S", 0.2)
    config = make_config(tmp_path)
    components = build_components(config, SystemClock())
    scorer = components.scorer
    while not scorer.breaker.is_open:  # Redis away: nothing is counted before the stop
        scorer.breaker.failure(UnavailableError("down"))
    scorer.catch_up.submit(
        [(full_order("o-1"), time.time())], components.rules.current.feature_queries
    )
    holder = sqlite3.connect(tmp_path / "riskd.db", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        components.close()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    (path,) = spillfile.files(tmp_path, catchup.PREFIX)
    assert path.name.endswith(f"-{os.getpid()}.jsonl")
    assert sum(scorer.catch_up.dropped().values()) == 0
    caplog.set_level(logging.INFO, logger="riskd.engine.catchup")
    again = build_components(config, SystemClock())
    try:
        assert spillfile.files(tmp_path, catchup.PREFIX) == []
        (queued,) = [r for r in caplog.records if r.getMessage().startswith("spilled orders")]
        assert queued.fields == {"file": path.name, "orders": 1, "rows": 1}  # type: ignore[attr-defined]
        assert again.scorer.catch_up.wait(5)
        assert sum(again.scorer.catch_up.dropped().values()) == 0
    finally:
        again.close()


def test_close_runs_the_concurrent_closers_beside_the_others_and_skips_none_that_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The scoring workers' stop (a concurrent closer) runs beside the scorer's close and
    the stores', which still close in reverse order; one closer raising, on either side,
    skips none of the others; close returns once all have."""
    components = build_components(make_config(tmp_path), SystemClock())
    ran: list[str] = []
    scorer_closing = threading.Event()

    def recorded(close: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            ran.append(getattr(close, "__qualname__", "?"))
            if close == components.scorer.close:
                scorer_closing.set()
            close()

        return run

    def workers_stop() -> None:  # returns only once the scorer's close has begun
        ran.append(f"workers stop beside the scorer: {scorer_closing.wait(10)}")
        raise UnavailableError("a worker's flush timed out")

    def broken() -> None:
        raise RuntimeError("a bug")

    serial = [*components.closers, broken]
    components.closers = [recorded(c) for c in serial]
    components.concurrent_closers += [workers_stop, broken]
    with caplog.at_level(logging.ERROR, logger="riskd.service.wiring"):
        components.close()
    assert "workers stop beside the scorer: True" in ran
    ran.remove("workers stop beside the scorer: True")
    assert ran == [getattr(c, "__qualname__", "?") for c in reversed(serial)]
    failed = [r for r in caplog.records if r.getMessage() == "close failed"]
    assert len(failed) == 3  # the workers' stop and both broken ones, each logged
    assert components.closers == components.concurrent_closers == []


PG = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg_role() -> Iterator[str]:
    """A login role with no privilege of its own on the database (PostgreSQL 15: no
    CREATE on it, nor on its public schema)."""
    import psycopg

    role = f"riskd_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
    yield role
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'DROP OWNED BY "{role}"')
        conn.execute(f'DROP ROLE "{role}"')


@pytest.mark.postgres
@pytest.mark.parametrize("schema", [True, False])
def test_a_database_this_role_cannot_write_is_refused_by_name_and_creates_nothing(
    tmp_path: Path, pg_role: str, schema: bool
) -> None:
    """Review: a role without CREATE (on the database for ``?schema=``, on ``public``
    without) ended ``riskd serve`` in a psycopg traceback after a keyring was generated."""
    if not schema:  # PostgreSQL 15 on: PUBLIC may not create in public (14 and older may)
        import psycopg

        with psycopg.connect(PG) as conn:
            row = conn.execute("SELECT has_schema_privilege(%s, 'public', 'CREATE')", (pg_role,))
            if row.fetchone() == (True,):
                pytest.skip("this PostgreSQL lets every role create in public")
    name = f"riskd_noschema_{uuid.uuid4().hex[:8]}"
    url = f"postgresql://{pg_role}@127.0.0.1:5432/test" + (f"?schema={name}" if schema else "")
    data = tmp_path / "data"
    with pytest.raises(ConfigError) as e:
        create_server(make_config(data, database_url=url))
    assert str(e.value).startswith(
        "database_url: cannot open the database: InsufficientPrivilege: permission denied"
    )
    assert not data.exists()  # no keyring


def test_a_daemon_refuses_a_keyring_other_than_its_databases(tmp_path: Path) -> None:
    """Review: a fresh keyring in the key file's place started silently; every blind index
    changed and buyers first seen then got data keys the right keyring cannot unwrap."""
    running = create_server(make_config(tmp_path))
    running.components.scorer.score(full_order("o-1"), timeout_s=5.0)
    running.stop(0)
    key_file = tmp_path / "keyring.json"
    right = Keyring.load(key_file)
    foreign = Keyring.generate()
    foreign.save(key_file)
    with pytest.raises(ConfigError, match=r"^keyring_file: .*keyring\.json is not the keyring"):
        create_server(make_config(tmp_path))
    with pytest.raises(ConfigError, match=r"^RISKD_KEYRING is not the keyring") as e:
        create_server(make_config(tmp_path, keyring=foreign.to_json()))
    assert foreign.to_json() not in str(e.value) and right.to_json() not in str(e.value)
    right.add_version().save(key_file)  # `riskd pii keygen`: the same keyring, rotated
    create_server(make_config(tmp_path)).stop(0)


def test_a_database_from_before_keyring_fingerprints_is_checked_by_its_data_keys(
    tmp_path: Path,
) -> None:
    running = create_server(make_config(tmp_path))
    running.components.scorer.score(full_order("o-1"), timeout_s=5.0)
    running.stop(0)
    db = Database(f"sqlite:///{tmp_path / 'riskd.db'}")
    db.run(lambda tx: tx.execute("DROP TABLE pii_keyring"))  # as an older riskd left it
    db.close()
    key_file = tmp_path / "keyring.json"
    right = Keyring.load(key_file)
    Keyring.generate().save(key_file)
    with pytest.raises(ConfigError, match=r"^keyring_file: .* is not the keyring"):
        create_server(make_config(tmp_path))
    right.save(key_file)
    create_server(make_config(tmp_path)).stop(0)  # recorded now
    Keyring.generate().save(key_file)
    with pytest.raises(ConfigError, match=r"^keyring_file: .* is not the keyring"):
        create_server(make_config(tmp_path))


@pytest.mark.postgres
def test_replicas_on_one_postgresql_refuse_a_keyring_of_their_own(tmp_path: Path) -> None:
    """A replica with a keyring of its own (`riskd pii keygen` run per container) over the
    shared database is refused instead of splitting the counters and sealing unreadable PII."""
    url = f"{PG}?schema=riskd_keyring_{uuid.uuid4().hex[:8]}"
    first = create_server(make_config(tmp_path / "a", database_url=url))
    try:
        own = tmp_path / "b" / "keyring.json"
        Keyring.generate().save(own)
        with pytest.raises(ConfigError, match=r"^keyring_file: .* is not the keyring"):
            create_server(make_config(tmp_path / "b", database_url=url))
        shared = str(tmp_path / "a" / "keyring.json")
        create_server(make_config(tmp_path / "c", database_url=url, keyring_file=shared)).stop(0)
    finally:
        first.stop(0)
        db = Database(url)
        db.drop_schema()
        db.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_start_creates_the_decision_log_tables_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """Review: the wiring, the decision log and the PII access each ran the evidence DDL
    (idempotent, but on PostgreSQL three advisory-lock turns and three transactions of
    17 statements each at every start, replica and scoring worker)."""
    runs: list[str] = []
    script = Database.executescript

    def counted(db: Database, ddl: str) -> None:
        if "CREATE TABLE IF NOT EXISTS decision_log" in ddl:
            runs.append(ddl)
        script(db, ddl)

    monkeypatch.setattr(Database, "executescript", counted)
    url = f"{PG}?schema=riskd_ddl_{uuid.uuid4().hex[:8]}" if backend == "postgres" else ""
    config = make_config(tmp_path, database_url=url)
    try:
        components = build_components(config, SystemClock())
        components.close()
    finally:
        if url:
            db = Database(url)
            db.drop_schema()
            db.close()
    assert len(runs) == 1


@pytest.mark.parametrize("record_late", [True, False])
def test_a_scoring_workers_scorer_records_nothing_it_decided_after_the_deadline(
    tmp_path: Path, record_late: bool
) -> None:
    """``record_late=False`` (a scoring worker's components): an order decided with no
    time left is not recorded, and the call is late, so the gRPC process's fallback
    stands alone; one process's scorer records and answers it."""
    components = build_components(make_config(tmp_path), SystemClock(), record_late=record_late)
    try:
        order = full_order("o-late")
        log = components.decision_log
        assert log is not None
        if record_late:
            [decision] = components.scorer.score_batch([order], timeout_s=-1e-6, refuse_late=True)
            log.flush(10)
            record = log.get("o-late")
            assert record is not None and record.decision == decision
        else:
            with pytest.raises(DeadlineExceededError, match="nothing recorded"):
                components.scorer.score_batch([order], timeout_s=-1e-6, refuse_late=True)
            log.flush(10)
            assert log.get("o-late") is None
    finally:
        components.close()
