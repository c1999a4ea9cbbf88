"""No plaintext PII reaches the evidence database: masked + blind index (+ Vault ciphertext)."""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from psycopg.errors import DiskFull

import riskd.evidence.log as log_module
from riskd.domain.clock import FakeClock
from riskd.domain.decision import Decision, Outcome
from riskd.domain.order import Amounts, Item, PaymentMethod
from riskd.errors import InvalidArgumentError
from riskd.evidence.log import (
    DecisionLog,
    blind_index_entries,
    encrypted_fields,
    forget_subject,
    orders_with,
)
from riskd.evidence.records import DecisionRecord
from riskd.evidence.request import protect_order
from riskd.pii import BlindIndexer, Keyring, SqlKeyStore, Vault
from riskd.sql import Database

from .conftest import DEVICE, ID_NUMBER, IP, NAME, PHONE, STREET, make_order

PLAINTEXTS = (PHONE, NAME, ID_NUMBER, STREET, DEVICE, IP, "12345678", "1234-5678")


def log_order(log: DecisionLog, order_id: str) -> None:
    order = make_order(order_id)
    decision = Decision(order_id, Outcome.ALLOW, 0.0, (), "v1", decided_at=1.0)
    log.append(DecisionRecord(decision, log.protect(order)), order=order)


def stored_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file())


@pytest.mark.parametrize("with_vault", [False, True])
def test_sqlite_file_holds_no_plaintext_pii(tmp_path: Path, with_vault: bool) -> None:
    keyring = Keyring.generate()
    db = Database(tmp_path / "evidence.db")
    vault = Vault(keyring, SqlKeyStore(db)) if with_vault else None
    log = DecisionLog(db, vault=vault, indexer=BlindIndexer(keyring))
    for i in range(20):
        log_order(log, f"o-{i}")
    log.close()
    request = log.get("o-3")
    assert request is not None
    buyer = request.request["buyer"]
    assert buyer["phone"] == {"masked": "139****5678"}  # the chain holds masks only
    assert buyer["address"]["masked"] == "浙江省杭州市西湖区"
    assert "ip" not in request.request
    digests = blind_index_entries(db, "o-3")
    assert digests["phone"] == BlindIndexer(keyring).index("phone", PHONE)
    assert set(digests) == {"phone", "name", "id_number", "address", "device", "ip"}
    assert len(digests["ip"]) == 32
    db.close()  # the WAL and the main file are both on disk now
    raw = stored_bytes(tmp_path)
    for value in PLAINTEXTS:
        assert value.encode() not in raw, "plaintext PII found in the database files"
    assert (b"139****5678" in raw) and (b"v1" in raw)  # the grep does see stored text


def test_the_chained_request_is_the_whole_order_with_its_pii_masked() -> None:
    """The record keeps every field of the order (to explain and replay the decision);
    only the PII fields are masked, the IP left out."""
    order = replace(
        make_order("o-1"),
        items=(Item("sku-1", "beauty", 4_300, 3),),
        amounts=Amounts(items=12_900, discount=500, coupon=300, shipping=800, total=12_900),
        payment_method=PaymentMethod.BANK_CARD,
        coupon_code="C-7",
        client_time=1_700_000_000.5,
    )
    assert protect_order(order) == {
        "order_id": "o-1",
        "buyer": {
            "buyer_id": "b-1",
            "account_age_days": 3,
            "phone": {"masked": "139****5678"},
            "name": {"masked": "王**"},
            "id_number": {"masked": "110***********123X"},
            "address": {"masked": "浙江省杭州市西湖区"},
        },
        "shop_id": "s-1",
        "merchant_id": "m-1",
        "items": [{"sku": "sku-1", "category": "beauty", "unit_price": 4_300, "quantity": 3}],
        "amounts": {
            "items": 12_900,
            "discount": 500,
            "coupon": 300,
            "shipping": 800,
            "total": 12_900,
        },
        "channel": "LIVE_ROOM",
        "live_room_id": "lr-9",
        "video_id": "",
        "creator_id": "",
        "coupon_code": "C-7",
        "device": {"masked": "****E7DC"},
        "payment_method": "BANK_CARD",
        "client_time": 1_700_000_000.5,
    }


def test_vault_ciphertexts_decrypt_and_are_dropped_on_forget(tmp_path: Path) -> None:
    keyring = Keyring.generate()
    db = Database(tmp_path / "evidence.db")
    vault = Vault(keyring, SqlKeyStore(db))
    log = DecisionLog(db, vault=vault, indexer=BlindIndexer(keyring))
    log_order(log, "o-1")
    log.flush(10)
    secrets = encrypted_fields(db, "o-1")
    assert set(secrets) == {"phone", "name", "id_number", "address", "device", "ip"}
    assert vault.decrypt("b-1", "o-1", "phone", secrets["phone"]) == PHONE
    vault.forget("b-1")
    assert encrypted_fields(db, "o-1") == {}
    assert log.verify().ok  # shredding PII does not break the auditors' chain
    log.close()
    db.close()


def test_forget_deletes_the_blind_indexes_and_the_chain_keeps_none(db: Database) -> None:
    keyring = Keyring.generate()
    indexer = BlindIndexer(keyring)
    vault = Vault(keyring, SqlKeyStore(db))
    log = DecisionLog(db, vault=vault, indexer=indexer)
    log_order(log, "o-1")
    log_order(log, "o-2")
    log.flush(10)
    phone = indexer.index("phone", PHONE)
    assert orders_with(db, "phone", phone) == ["o-1", "o-2"]
    chained = repr(db.query("SELECT content FROM decision_log"))
    for digest in blind_index_entries(db, "o-1").values():
        assert digest not in chained  # the digests live beside the chain only
    vault.forget("b-1")
    assert blind_index_entries(db, "o-1") == {} and orders_with(db, "phone", phone) == []
    assert encrypted_fields(db, "o-2") == {}
    result = log.verify()
    assert result.ok and result.head["decision_log"][0] == 2
    record = log.get("o-1")
    assert record is not None and record.request["buyer"]["phone"]["masked"] == "139****5678"
    log.close()


def test_forget_subject_from_another_process_deletes_only_that_buyer(db: Database) -> None:
    keyring = Keyring.generate()
    log = DecisionLog(db, vault=Vault(keyring, SqlKeyStore(db)), indexer=BlindIndexer(keyring))
    log_order(log, "o-1")
    other = make_order("o-2")
    other = replace(other, buyer=replace(other.buyer, buyer_id="b-2"))
    decision = Decision("o-2", Outcome.ALLOW, 0.0, (), "v1", decided_at=1.0)
    log.append(DecisionRecord(decision, log.protect(other)), order=other)
    log.close()
    assert forget_subject(db, "b-1") == 12  # 6 ciphertexts + 6 blind indexes
    assert blind_index_entries(db, "o-1") == {} and encrypted_fields(db, "o-1") == {}
    assert len(blind_index_entries(db, "o-2")) == 6 and len(encrypted_fields(db, "o-2")) == 6
    assert forget_subject(db, "b-1") == 0
    assert log.verify().ok
    with pytest.raises(InvalidArgumentError):
        forget_subject(db, "")


def test_a_decision_superseded_by_another_replicas_stores_nothing_beside_the_chain(
    db: Database,
) -> None:
    # the order's recorded decision is the other one: PII of this request must not be
    # revealed or matched as that decision's
    keyring = Keyring.generate()
    first = DecisionLog(db)  # a replica without the Vault: the masked record only
    log_order(first, "o-1")
    first.close()
    log = DecisionLog(db, vault=Vault(keyring, SqlKeyStore(db)), indexer=BlindIndexer(keyring))
    other = make_order("o-1")
    other = replace(other, buyer=replace(other.buyer, buyer_id="b-2"))
    decision = Decision("o-1", Outcome.BLOCK, 0.0, (), "v1", decided_at=2.0)
    log.append(DecisionRecord(decision, log.protect(other)), order=other)
    log.close()
    assert (log.superseded, log.rejected) == (1, 0)
    assert encrypted_fields(db, "o-1") == {} and blind_index_entries(db, "o-1") == {}


def test_forget_subject_deletes_every_spelling_counted_as_the_buyer(db: Database) -> None:
    """``b-77 `` and full-width ``ｂ-７７`` are buyer b-77 to the velocity counters."""
    keyring = Keyring.generate()
    log = DecisionLog(db, vault=Vault(keyring, SqlKeyStore(db)), indexer=BlindIndexer(keyring))
    buyers = {"o-1": "b-77", "o-2": "b-77 ", "o-3": "ｂ-７７", "o-4": "b-777", "o-5": "B-77"}
    for order_id, buyer in buyers.items():
        order = make_order(order_id)
        order = replace(order, buyer=replace(order.buyer, buyer_id=buyer))
        decision = Decision(order_id, Outcome.ALLOW, 0.0, (), "v1", decided_at=1.0)
        log.append(DecisionRecord(decision, log.protect(order)), order=order)
    log.close()
    assert forget_subject(db, "b-77") == 3 * 12
    for order_id in ("o-1", "o-2", "o-3"):
        assert blind_index_entries(db, order_id) == {} and encrypted_fields(db, order_id) == {}
    for order_id in ("o-4", "o-5"):  # other buyers
        assert len(blind_index_entries(db, order_id)) == 6
        assert len(encrypted_fields(db, order_id)) == 6
    assert log.verify().ok


def test_engine_digests_are_reused(tmp_path: Path) -> None:
    db = Database(tmp_path / "evidence.db")
    log = DecisionLog(db, indexer=BlindIndexer(Keyring.generate()))
    order = make_order("o-1")
    decision = Decision("o-1", Outcome.ALLOW, 0.0, (), "v1", decided_at=1.0)
    log.append(DecisionRecord(decision, log.protect(order)), order=order, digests={"ip": "f" * 32})
    log.close()
    assert blind_index_entries(db, "o-1")["ip"] == "f" * 32
    db.close()


@pytest.mark.postgres
def test_postgres_rows_hold_no_plaintext_pii(pg: Database) -> None:
    keyring = Keyring.generate()
    log = DecisionLog(pg, vault=Vault(keyring, SqlKeyStore(pg)), indexer=BlindIndexer(keyring))
    log_order(log, "o-1")
    log.close()
    dumped = repr(pg.query("SELECT * FROM decision_log")) + repr(
        pg.query("SELECT * FROM decision_pii")
    )
    assert "139****5678" in dumped
    for value in PLAINTEXTS:
        assert value not in dumped
    assert vault_roundtrip(pg, keyring)


def vault_roundtrip(db: Database, keyring: Keyring) -> bool:
    secret = encrypted_fields(db, "o-1")["name"]
    return Vault(keyring, SqlKeyStore(db)).decrypt("b-1", "o-1", "name", secret) == NAME


def test_writer_creates_a_batchs_new_data_keys_in_one_transaction(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keyring = Keyring.generate()
    keys_db = Database(tmp_path / "keys.db")
    store = SqlKeyStore(keys_db)
    vault = Vault(keyring, store)
    old = vault.encrypt("buyer-0", "earlier", "phone", PHONE)  # a known buyer
    vault.forget("buyer-1")  # nothing to destroy yet; a later write starts generation 1
    writes: list[int] = []
    transaction = keys_db.transaction
    monkeypatch.setattr(keys_db, "transaction", lambda **kw: writes.append(1) or transaction(**kw))
    log = DecisionLog(db, vault=vault, indexer=BlindIndexer(keyring), flush_interval_s=10.0)
    for i in range(40):
        order = make_order(f"o-{i}")
        order = replace(order, buyer=replace(order.buyer, buyer_id=f"buyer-{i % 20}"))
        decision = Decision(order.order_id, Outcome.ALLOW, 0.0, (), "v1", decided_at=1.0)
        log.append(DecisionRecord(decision, log.protect(order)), order=order)
    log.flush(10)
    assert len(writes) == 1  # 19 new buyers' keys, one transaction
    fresh = Vault(keyring, SqlKeyStore(keys_db))  # no cache: the stored keys
    for i in range(40):
        secret = encrypted_fields(db, f"o-{i}")["phone"]
        assert fresh.decrypt(f"buyer-{i % 20}", f"o-{i}", "phone", secret) == PHONE
    assert fresh.decrypt("buyer-0", "earlier", "phone", old) == PHONE
    log.close()
    keys_db.close()


def test_new_buyers_keys_commit_in_the_batchs_own_transaction(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One transaction per batch, and a batch retried after a failed write stores
    ciphertexts that decrypt: no key of the rolled-back attempt is used or cached."""
    keyring = Keyring.generate()
    vault = Vault(keyring, SqlKeyStore(db))
    log = DecisionLog(db, vault=vault, indexer=BlindIndexer(keyring), flush_interval_s=0.05)
    transactions = 0
    # a failure of the database's state (retried as a whole), as each dialect raises it
    transient = sqlite3.OperationalError("disk I/O error")
    failures = [transient if db.dialect == "sqlite" else DiskFull("could not extend file")]
    real_transaction, real_append = db.transaction, log_module.append_texts

    def counted(**kwargs: Any) -> Any:
        nonlocal transactions
        transactions += 1
        return real_transaction(**kwargs)

    def append_once_failing(*args: Any, **kwargs: Any) -> Any:
        if failures:  # after the batch's keys were written in this transaction
            raise failures.pop()
        return real_append(*args, **kwargs)

    monkeypatch.setattr(db, "transaction", counted)
    monkeypatch.setattr(log_module, "append_texts", append_once_failing)
    for i, buyer in enumerate(("b-1", "b-2", "b-3")):
        order = replace(make_order(f"o-{i}"), buyer=replace(make_order("x").buyer, buyer_id=buyer))
        decision = Decision(order.order_id, Outcome.ALLOW, 0.0, (), "v1", decided_at=1.0)
        log.append(DecisionRecord(decision, log.protect(order)), order=order)
    log.flush(10)
    assert transactions == 2  # the failed attempt and its retry: keys and records together
    fresh = Vault(keyring, SqlKeyStore(db))  # reads the keys that were committed
    for i, buyer in enumerate(("b-1", "b-2", "b-3")):
        secrets = encrypted_fields(db, f"o-{i}")
        assert fresh.decrypt(buyer, f"o-{i}", "phone", secrets["phone"]) == PHONE
        assert vault.decrypt(buyer, f"o-{i}", "phone", secrets["phone"]) == PHONE
    log.close()


@pytest.mark.parametrize(
    ("queued_as", "forgotten_as"), [("b-1 ", "b-1"), ("ｂ-１", "b-1"), ("b-1 ", "　b-1")]
)
def test_an_order_queued_under_a_new_spelling_before_a_forget_is_not_sealed(
    tmp_path: Path, queued_as: str, forgotten_as: str
) -> None:
    """Review: an order still queued when `riskd pii forget` ran, under a spelling of the
    buyer's id that had nothing stored yet (its first order sent as `b-1 `), was sealed
    under a new key: the forget had marked only the spellings it found. Now every
    forget marks the normalized spelling too, and the writer reads it beside each
    buyer's own; the buyer's next order under that spelling is sealed anew."""
    db = Database(tmp_path / "evidence.db")
    keyring = Keyring.generate()
    log = DecisionLog(
        db,
        vault=Vault(keyring, SqlKeyStore(db)),
        indexer=BlindIndexer(keyring),
        flush_interval_s=30.0,
    )

    def log_as(order_id: str, buyer_id: str) -> None:
        order = make_order(order_id)
        order = replace(order, buyer=replace(order.buyer, buyer_id=buyer_id))
        decision = Decision(order_id, Outcome.ALLOW, 0.0, (), "v1", decided_at=1.0)
        log.append(DecisionRecord(decision, log.protect(order)), order=order)

    log_as("o-0", "b-1")
    log.flush(10)  # a key under `b-1` only
    log_as("o-1", queued_as)  # queued: the writer gathers for 30 s
    cli_db = Database(tmp_path / "evidence.db")  # `riskd pii forget`, its own process
    cli = Vault(keyring, SqlKeyStore(cli_db))
    cli.add_forget_hook(lambda s: forget_subject(cli_db, s))
    cli.forget(forgotten_as)
    cli_db.close()
    log_as("o-2", queued_as)  # the buyer orders again after the forget
    log.flush(10)
    assert log.get("o-1") is not None  # the masked, chained record stays
    assert encrypted_fields(db, "o-1") == {} and blind_index_entries(db, "o-1") == {}
    assert encrypted_fields(db, "o-0") == {}
    fields = encrypted_fields(db, "o-2")
    phone = Vault(keyring, SqlKeyStore(db)).decrypt(queued_as, "o-2", "phone", fields["phone"])
    assert phone == PHONE and blind_index_entries(db, "o-2")
    assert log.unsealed == 0 and log.verify().ok
    log.close()
    db.close()


def test_decisions_logged_without_their_ciphertexts_are_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A buyer whose data key is wrapped under a master key version this daemon cannot
    use (not in its keyring: a keygen it has not loaded): the decision is still logged,
    masked, and it shows. (A retired version starts the buyer's next generation.)"""
    keyring = Keyring.generate()
    newer = keyring.add_version()
    db = Database(tmp_path / "evidence.db")
    first = DecisionLog(db, vault=Vault(newer, SqlKeyStore(db)), indexer=BlindIndexer(newer))
    log_order(first, "o-1")
    first.close()
    log = DecisionLog(db, vault=Vault(keyring, SqlKeyStore(db)), indexer=BlindIndexer(keyring))
    with caplog.at_level(logging.WARNING, logger="riskd.evidence.log"):
        log_order(log, "o-2")
        log.flush(10)
    assert log.get("o-2") is not None and encrypted_fields(db, "o-2") == {}
    assert log.unsealed == 1
    warning = next(r for r in caplog.records if "without their encrypted PII" in r.getMessage())
    assert warning.fields["first"] == "o-2"  # type: ignore[attr-defined]
    assert all(v not in caplog.text for v in PLAINTEXTS)
    log.close()
    retired = newer.add_version().retire(2)  # v2 destroyed: b-1's next order gets a new key
    log = DecisionLog(db, vault=Vault(retired, SqlKeyStore(db)), indexer=BlindIndexer(retired))
    log_order(log, "o-3")
    log.flush(10)
    phone = encrypted_fields(db, "o-3")["phone"]
    assert Vault(retired, SqlKeyStore(db)).decrypt("b-1", "o-3", "phone", phone) == PHONE
    assert log.unsealed == 0
    log.close()
    db.close()


@pytest.mark.parametrize("first_order_committed", [True, False])
def test_an_order_queued_before_a_forget_in_another_process_is_not_sealed(
    tmp_path: Path, first_order_committed: bool
) -> None:
    """`riskd pii forget` runs while the buyer's order waits in the writer's batch: the
    forget covers it (masked record only), and the buyer's next order is sealed anew;
    also when the buyer had no key yet (its first order still queued)."""
    db = Database(tmp_path / "evidence.db")
    keyring = Keyring.generate()
    vault = Vault(keyring, SqlKeyStore(db))
    log = DecisionLog(db, vault=vault, indexer=BlindIndexer(keyring), flush_interval_s=30.0)
    log_order(log, "o-0")
    if first_order_committed:
        log.flush(10)  # b-1's generation 1 is cached by the daemon's vault
    log_order(log, "o-1")  # queued: the writer gathers for 30 s
    cli_db = Database(tmp_path / "evidence.db")  # `riskd pii forget b-1`, its own process
    cli = Vault(keyring, SqlKeyStore(cli_db))
    cli.add_forget_hook(lambda s: forget_subject(cli_db, s))
    cli.forget("b-1")
    cli_db.close()
    log_order(log, "o-2")  # the buyer orders again after the forget
    log.flush(10)
    assert log.get("o-1") is not None  # the masked, chained record stays
    assert encrypted_fields(db, "o-1") == {} and blind_index_entries(db, "o-1") == {}
    assert encrypted_fields(db, "o-0") == {} and blind_index_entries(db, "o-0") == {}
    fields = encrypted_fields(db, "o-2")
    assert {bytes(c)[1:5] for c in fields.values()} == {(2).to_bytes(4, "big")}
    assert Vault(keyring, SqlKeyStore(db)).decrypt("b-1", "o-2", "phone", fields["phone"]) == PHONE
    assert blind_index_entries(db, "o-2")
    assert log.unsealed == 0 and log.verify().ok
    log.close()
    db.close()


def test_an_order_appended_at_the_forgets_own_clock_reading_is_not_sealed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a coarse clock reads the same for an append and a forget: the forget covers the order
    now = 1_700_000_000.0
    monkeypatch.setattr(log_module.time, "time", lambda: now)
    db = Database(tmp_path / "evidence.db")
    keyring = Keyring.generate()
    vault = Vault(keyring, SqlKeyStore(db))
    log = DecisionLog(db, vault=vault, indexer=BlindIndexer(keyring), flush_interval_s=30.0)
    log_order(log, "o-1")  # queued: the writer gathers for 30 s
    cli_db = Database(tmp_path / "evidence.db")  # `riskd pii forget b-1`, its own process
    cli = Vault(keyring, SqlKeyStore(cli_db), clock=FakeClock(now))
    cli.add_forget_hook(lambda s: forget_subject(cli_db, s))
    cli.forget("b-1")
    cli_db.close()
    log.flush(10)
    assert log.get("o-1") is not None
    assert encrypted_fields(db, "o-1") == {} and blind_index_entries(db, "o-1") == {}
    log.close()
    db.close()


@pytest.fixture
def secure_delete_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every SQLite connection starts with ``secure_delete`` off, as in SQLite's own builds
    (this host's turns it on), until whoever opened it says otherwise."""
    connect = sqlite3.connect

    def connect_off(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = connect(*args, **kwargs)
        conn.execute("PRAGMA secure_delete = OFF")
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect_off)


def buyer_secrets(db: Database, buyer: str) -> list[bytes]:
    """What the database holds of ``buyer`` alone: wrapped keys, ciphertexts, digests."""
    rows = db.query("SELECT wrapped FROM pii_data_keys WHERE subject_id = ?", (buyer,))
    rows += db.query("SELECT ciphertext FROM decision_pii WHERE subject_id = ?", (buyer,))
    for table in ("decision_blind_index", "pii_blind_index"):
        rows += db.query(
            f"SELECT digest FROM {table} WHERE subject_id = ? EXCEPT "
            f"SELECT digest FROM {table} WHERE subject_id <> ?",
            (buyer, buyer),
        )
    return [v.encode() if isinstance(v, str) else bytes(v) for (v,) in rows]


@pytest.mark.usefixtures("secure_delete_off_by_default")
def test_forget_leaves_no_bytes_of_the_buyer_where_sqlite_keeps_deleted_content(
    tmp_path: Path,
) -> None:
    # a forgotten buyer's digests and ciphertexts must not be readable in the file whatever
    # the SQLite build: the writes before the forget (a root page that became interior keeps
    # its old cells) leave copies that the forget's own deletes never reach
    keyring = Keyring.generate()
    indexer = BlindIndexer(keyring)
    db = Database(tmp_path / "evidence.db")
    vault = Vault(keyring, SqlKeyStore(db))
    log = DecisionLog(db, vault=vault, indexer=indexer)
    buyers = [f"b-{b}" for b in range(4)]
    for i in range(200):
        buyer = buyers[i % len(buyers)]
        order = make_order(f"o-{i}")
        phone = f"1390000{i % len(buyers):04d}"
        order = replace(order, buyer=replace(order.buyer, buyer_id=buyer, phone=phone))
        decision = Decision(order.order_id, Outcome.ALLOW, 0.0, (), "v1", decided_at=1.0)
        log.append(DecisionRecord(decision, log.protect(order)), order=order)
        vault.record_index(buyer, {"order": indexer.index("phone", f"{i}-{phone}")})
    log.flush(10)
    secrets = {b: buyer_secrets(db, b) for b in buyers}
    assert all(len(s) == 1 + 50 * 6 + 1 + 50 for s in secrets.values())  # key, 6 a order, digests
    assert all(s in stored_bytes(tmp_path) for s in secrets["b-0"])  # the search sees them
    for buyer in buyers[:3]:
        assert vault.forget(buyer).checkpointed
    raw = stored_bytes(tmp_path)
    assert {b: sum(s in raw for s in secrets[b]) for b in buyers} == {
        "b-0": 0,
        "b-1": 0,
        "b-2": 0,
        "b-3": len(secrets["b-3"]),
    }
    log.close()
    db.close()
