"""Analysts' PII reveals: decrypted from the Vault, every access (granted or refused) chained."""

from __future__ import annotations

from dataclasses import replace

import pytest

from riskd.domain.clock import FakeClock
from riskd.domain.decision import Decision, Outcome
from riskd.domain.order import MAX_ORDER_ID_LEN
from riskd.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from riskd.evidence.access import MAX_PAGE, MAX_REASON_CHARS, AccessOutcome, PiiAccess
from riskd.evidence.log import DecisionLog, forget_subject
from riskd.evidence.records import DecisionRecord
from riskd.pii import BlindIndexer, Keyring, SqlKeyStore, Vault
from riskd.sql import Database, Tx

from .conftest import DEVICE, ID_NUMBER, IP, NAME, PHONE, STREET, make_order
from .test_pii import log_order


def setup(db: Database) -> tuple[DecisionLog, Vault, PiiAccess]:
    keyring = Keyring.generate()
    vault = Vault(keyring, SqlKeyStore(db))
    log = DecisionLog(db, vault=vault, indexer=BlindIndexer(keyring))
    return log, vault, PiiAccess(log, vault, clock=FakeClock(1_700_000_000.0))


def count(db: Database) -> int:
    return int(db.query("SELECT COUNT(*) FROM pii_access_log")[0][0])


def test_reveal_decrypts_every_field_and_records_the_access(db: Database) -> None:
    log, _, access = setup(db)
    log_order(log, "o-1")  # not flushed yet: the reveal waits for its commit
    got = access.reveal("o-1", "chargeback case 42", "token:ts-1")
    assert got.fields == {
        "phone": PHONE,
        "name": NAME,
        "id_number": ID_NUMBER,
        "address": f"浙江省 杭州市 西湖区 {STREET}",
        "device": DEVICE,
        "ip": IP,
    }
    [entry] = access.entries("o-1")
    assert entry == got.entry
    assert (entry.principal, entry.reason, entry.outcome) == (
        "token:ts-1",
        "chargeback case 42",
        AccessOutcome.REVEALED,
    )
    assert entry.fields == ("phone", "name", "id_number", "address", "device", "ip")
    assert entry.at == 1_700_000_000.0
    only = access.reveal("o-1", "call the buyer", "token:ts-1", ["phone", "phone"])
    assert only.fields == {"phone": PHONE} and only.entry.fields == ("phone",)
    assert [e.seq for e in access.entries()] == [1, 2]
    # the entry a reveal answers with (its receipt) is the one it chained, seq and hash
    assert access.entries() == [got.entry, only.entry]
    assert [e.seq for e in access.entries(after_seq=1)] == [2]
    result = log.verify()
    assert result.ok and result.head["pii_access_log"][0] == 2
    log.close()


def test_the_audit_trail_holds_no_plaintext(db: Database) -> None:
    log, _, access = setup(db)
    log_order(log, "o-1")
    access.reveal("o-1", "case 7", "token:ts-1")
    dumped = repr(db.query("SELECT * FROM pii_access_log"))
    for value in (PHONE, NAME, ID_NUMBER, STREET, DEVICE, IP):
        assert value not in dumped
    log.close()


@pytest.mark.parametrize(
    ("order_id", "reason", "fields", "field"),
    [
        ("", "why", (), "order_id"),
        ("   ", "why", (), "order_id"),
        ("o" * 129, "why", (), "order_id"),  # longer than Score accepts
        ("o" * 2_000_000, "why", (), "order_id"),
        ("o-1\n\x1b[31m", "why", (), "order_id"),
        ("o-1", "  ", (), "reason"),
        ("o-1", "x" * 501, (), "reason"),
        ("o-1", f"buyer {PHONE} called", (), "reason"),  # chained in clear for good
        ("o-1", "why", ("phone", "email"), "fields[1]"),
    ],
)
def test_bad_requests_name_the_field_and_record_nothing(
    db: Database, order_id: str, reason: str, fields: tuple[str, ...], field: str
) -> None:
    log, _, access = setup(db)
    log_order(log, "o-1")
    with pytest.raises(InvalidArgumentError) as e:
        access.reveal(order_id, reason, "token:ts-1", fields)
    assert e.value.field == field
    assert len(str(e.value)) < 200  # never echoes a long id
    assert count(db) == 0
    log.close()


def test_a_reveal_that_names_no_principal_is_refused_and_records_nothing(db: Database) -> None:
    # an audit entry that does not say who saw the plaintext is no audit
    log, _, access = setup(db)
    log_order(log, "o-1")
    with pytest.raises(InvalidArgumentError) as e:
        access.reveal("o-1", "chargeback case 42", "")
    assert e.value.field == "principal" and count(db) == 0
    log.close()


def test_the_longest_order_id_score_accepts_is_checked_and_recorded(db: Database) -> None:
    log, _, access = setup(db)
    longest = "o" * MAX_ORDER_ID_LEN
    with pytest.raises(NotFoundError):
        access.reveal(longest, "probe", "token:ts-1")
    assert [e.order_id for e in access.entries()] == [longest]
    log.close()


def test_unknown_order_is_refused_and_recorded(db: Database) -> None:
    log, _, access = setup(db)
    with pytest.raises(NotFoundError, match="o-404"):
        access.reveal("o-404", "probe", "token:ts-1")
    [entry] = access.entries("o-404")
    assert entry.outcome is AccessOutcome.NOT_FOUND
    log.close()


def test_forgotten_buyer_is_refused_recorded_and_the_chain_still_verifies(db: Database) -> None:
    log, vault, access = setup(db)
    log_order(log, "o-1")
    access.reveal("o-1", "before", "token:ts-1")
    vault.forget("b-1")
    with pytest.raises(FailedPreconditionError, match="forgotten") as e:
        access.reveal("o-1", "after", "token:ts-1")
    assert PHONE not in str(e.value)
    assert [x.outcome for x in access.entries("o-1")] == [
        AccessOutcome.REVEALED,
        AccessOutcome.FORGOTTEN,
    ]
    assert log.verify().ok
    log.close()


def test_shredded_key_with_ciphertexts_left_is_refused_as_forgotten(db: Database) -> None:
    # another process forgot the buyer without this log's hook: the key is gone anyway
    log, _, access = setup(db)
    log_order(log, "o-1")
    log.flush(10)
    other = Vault(Keyring.generate(), SqlKeyStore(db))
    other.forget("b-1")
    with pytest.raises(FailedPreconditionError, match="forgotten"):
        access.reveal("o-1", "after", "token:ts-1")
    assert access.entries("o-1")[-1].outcome is AccessOutcome.FORGOTTEN
    log.close()


def forget_from_the_cli(db: Database, subject_id: str) -> None:
    """What ``riskd pii forget`` does in its own process: its own Vault, the same database."""
    cli = Vault(Keyring.generate(), SqlKeyStore(db))
    cli.add_forget_hook(lambda s: forget_subject(db, s))
    cli.forget(subject_id)


def generation(db: Database, order_id: str) -> set[int]:
    rows = db.query("SELECT ciphertext FROM decision_pii WHERE order_id = ?", (order_id,))
    return {int.from_bytes(bytes(r[0])[1:5], "big") for r in rows}


def test_orders_after_a_forget_in_another_process_stay_revealable(db: Database) -> None:
    log, _, access = setup(db)
    log_order(log, "o-1")
    access.reveal("o-1", "before", "token:ts-1")  # the daemon has b-1's key cached now
    forget_from_the_cli(db, "b-1")
    log_order(log, "o-2")  # the buyer orders again, well within the cache TTL
    got = access.reveal("o-2", "new order", "token:ts-1")
    assert got.fields["phone"] == PHONE
    assert generation(db, "o-2") == {2}  # sealed under a new key, not the destroyed one
    with pytest.raises(FailedPreconditionError, match="forgotten"):
        access.reveal("o-1", "old order", "token:ts-1")
    assert [e.outcome for e in access.entries()] == [
        AccessOutcome.REVEALED,
        AccessOutcome.REVEALED,
        AccessOutcome.FORGOTTEN,
    ]
    log.close()


def test_altered_ciphertext_of_a_buyer_forgotten_before_is_unreadable_not_forgotten(
    db: Database,
) -> None:
    log, vault, access = setup(db)
    log_order(log, "o-1")
    log.flush(10)
    vault.forget("b-1")
    log_order(log, "o-2")  # generation 2
    assert access.reveal("o-2", "new order", "token:ts-1").fields["phone"] == PHONE
    assert generation(db, "o-2") == {2}

    def flip_last_byte(tx: Tx) -> None:  # in the tag: the generation header stays
        [(ct,)] = tx.execute(
            "SELECT ciphertext FROM decision_pii WHERE order_id = 'o-2' AND field = 'phone'"
        ).fetchall()
        altered = bytes(ct[:-1]) + bytes([ct[-1] ^ 0x01])
        tx.execute(
            "UPDATE decision_pii SET ciphertext = ? WHERE order_id = 'o-2' AND field = 'phone'",
            (altered,),
        )

    db.run(flip_last_byte)
    with pytest.raises(FailedPreconditionError, match="no readable") as e:
        access.reveal("o-2", "after the damage", "token:ts-1", ["phone"])
    assert "forgotten" not in str(e.value) and PHONE not in str(e.value)
    assert access.entries("o-2")[-1].outcome is AccessOutcome.UNREADABLE
    assert access.reveal("o-2", "other fields", "token:ts-1", ["name"]).fields == {"name": NAME}
    assert log.verify().ok
    log.close()


def test_a_tampered_audit_entry_fails_verify(db: Database) -> None:
    log, _, access = setup(db)
    log_order(log, "o-1")
    access.reveal("o-1", "first", "token:ts-1")
    access.reveal("o-1", "second", "token:ts-1")
    db.run(
        lambda tx: tx.execute(
            "UPDATE pii_access_log SET content = REPLACE(content, 'second', 'benign')"
        )
    )
    result = log.verify()
    assert not result.ok
    assert (result.table, result.seq) == ("pii_access_log", 2)
    log.close()


def test_entries_page_size_is_checked(db: Database) -> None:
    log, _, access = setup(db)
    for limit in (0, MAX_PAGE + 1):
        with pytest.raises(InvalidArgumentError) as e:
            access.entries(limit=limit)
        assert e.value.field == "page_size"
    with pytest.raises(InvalidArgumentError) as e:
        access.entries(after_seq=-1)
    assert e.value.field == "after_seq"
    assert access.entries(limit=1) == [] and access.entries(limit=MAX_PAGE) == []
    log.close()


def test_entries_of_one_order_page_through_its_own_only(db: Database) -> None:
    log, _, access = setup(db)
    log_order(log, "o-1")
    order = replace(make_order("o-2"), ip="")  # no IP: it cannot be revealed
    decision = Decision("o-2", Outcome.ALLOW, 0.0, (), "v1", decided_at=1.0)
    log.append(DecisionRecord(decision, log.protect(order)), order=order)
    longest = "x" * MAX_REASON_CHARS  # kept whole in the trail
    access.reveal("o-1", "case 1", "token:ts-1", ["phone"])
    access.reveal("o-2", longest, "token:ts-1")
    access.reveal("o-1", "case 3", "token:ts-1", ["name"])
    assert [(e.seq, e.reason) for e in access.entries("o-1")] == [(1, "case 1"), (3, "case 3")]
    assert [e.seq for e in access.entries("o-1", after_seq=1)] == [3]
    assert [e.seq for e in access.entries("o-1", limit=1)] == [1]
    [entry] = access.entries("o-2")
    assert entry.reason == longest
    assert entry.fields == ("phone", "name", "id_number", "address", "device")  # as revealed
    assert [e.order_id for e in access.entries(after_seq=1, limit=1)] == ["o-2"]
    log.close()


@pytest.mark.parametrize("after_seq", [2**63, 2**64 - 1])
def test_a_page_after_the_largest_seq_is_empty_on_both_databases(
    db: Database, after_seq: int
) -> None:
    """Review: ListPiiAccess takes a uint64 after_seq; past 2**63 - 1 SQLite could not
    bind it (OverflowError: INTERNAL to the analyst) where PostgreSQL answered an empty
    page. No seq lies after it: an empty page on both."""
    log, _, access = setup(db)
    log_order(log, "o-1")
    access.reveal("o-1", "chargeback case 42", "token:ts-1")
    assert access.entries(after_seq=after_seq) == []
    assert access.entries("o-1", after_seq=after_seq) == []
    assert [e.seq for e in access.entries(after_seq=2**63 - 2)] == []
    assert [e.seq for e in access.entries()] == [1]
    log.close()
