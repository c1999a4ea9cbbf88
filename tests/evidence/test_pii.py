"""No plaintext PII reaches the evidence database: masked + blind index (+ Vault ciphertext)."""

from __future__ import annotations

from pathlib import Path

import pytest

from riskd.domain.decision import Decision, Outcome
from riskd.evidence.log import DecisionLog, encrypted_fields
from riskd.evidence.records import DecisionRecord
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
    assert buyer["phone"] == {
        "masked": "139****5678",
        "index": BlindIndexer(keyring).index("phone", PHONE),
    }
    assert buyer["address"]["masked"] == "浙江省杭州市西湖区"
    assert len(request.request["ip"]["index"]) == 32
    db.close()  # the WAL and the main file are both on disk now
    raw = stored_bytes(tmp_path)
    for value in PLAINTEXTS:
        assert value.encode() not in raw, "plaintext PII found in the database files"
    assert (b"139****5678" in raw) and (b"v1" in raw)  # the grep does see stored text


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
