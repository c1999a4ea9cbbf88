"""Vault.prepare: a batch's data keys in one read and one write transaction.

Every test runs on a real SQLite file and a real PostgreSQL schema.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from typing import Any

import pytest

from riskd.domain.clock import FakeClock
from riskd.errors import CryptoError, InvalidArgumentError
from riskd.pii.keyring import Keyring
from riskd.pii.keystore import DataKeyRow, SqlKeyStore
from riskd.pii.vault import Vault
from riskd.sql import Tx

PHONE = "13800138000"


class Counts:
    """How many write transactions and reads a key store's database ran."""

    def __init__(self) -> None:
        self.writes = 0
        self.reads = 0


@pytest.fixture
def counts(store: SqlKeyStore, monkeypatch: pytest.MonkeyPatch) -> Counts:
    seen = Counts()
    transaction: Callable[..., AbstractContextManager[Tx]] = store.db.transaction
    query = store.db.query

    def counted_transaction(**kwargs: Any) -> AbstractContextManager[Tx]:
        seen.writes += 1
        return transaction(**kwargs)

    def counted_query(sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        seen.reads += 1
        return query(sql, params)

    monkeypatch.setattr(store.db, "transaction", counted_transaction)
    monkeypatch.setattr(store.db, "query", counted_query)
    return seen


def generation(ciphertext: bytes) -> int:
    return int.from_bytes(ciphertext[1:5], "big")


def test_prepare_creates_new_subjects_keys_in_one_transaction(
    keyring: Keyring, store: SqlKeyStore, counts: Counts
) -> None:
    vault = Vault(keyring, store)
    subjects = [f"b{i}" for i in range(1200)]  # more than one IN (...) chunk
    vault.prepare(subjects + subjects[:10])  # duplicates are harmless
    assert counts.writes == 1
    assert counts.reads == 3 + 3  # latest (3 chunks) + read back (3 chunks)
    latest = store.latest_many(subjects)
    assert sorted(latest) == sorted(subjects)
    assert {r.generation for r in latest.values()} == {1}
    counts.writes = counts.reads = 0
    sealed = {s: vault.encrypt_fields(s, "o1", {"phone": PHONE}) for s in subjects}
    assert (counts.writes, counts.reads) == (0, 0)  # every key came from the cache
    fresh = Vault(keyring, store)  # no cache: reads the stored keys
    for s in subjects[:50] + subjects[-50:]:
        assert fresh.decrypt(s, "o1", "phone", sealed[s]["phone"]) == PHONE


def test_prepare_reuses_cached_and_existing_keys(
    keyring: Keyring, store: SqlKeyStore, counts: Counts
) -> None:
    other = Vault(keyring, store)
    old = other.encrypt("b1", "o1", "phone", PHONE)  # b1's key exists in the store
    vault = Vault(keyring, store)
    counts.writes = 0
    vault.prepare(["b1", "b2"])
    assert counts.writes == 1  # b2 only
    assert {s: r.generation for s, r in store.latest_many(["b1", "b2"]).items()} == {
        "b1": 1,
        "b2": 1,
    }
    assert vault.decrypt("b1", "o1", "phone", old) == PHONE
    new = vault.encrypt("b1", "o2", "phone", PHONE)
    assert other.decrypt("b1", "o2", "phone", new) == PHONE  # the same stored key
    counts.writes = counts.reads = 0
    vault.prepare(["b1", "b2"])
    # both cached: nothing written, one read checks that neither was forgotten since
    assert (counts.writes, counts.reads) == (0, 1)
    counts.reads = 0
    vault.prepare([])
    assert (counts.writes, counts.reads) == (0, 0)


def test_prepare_gives_a_forgotten_subject_a_new_generation(
    keyring: Keyring, store: SqlKeyStore
) -> None:
    vault = Vault(keyring, store)
    before = vault.encrypt("b1", "o1", "phone", PHONE)
    vault.forget("b1")
    for v in (vault, Vault(keyring, store)):  # the forgetting replica and a fresh one
        v.prepare(["b1", "b2"])
        after = v.encrypt("b1", "o2", "phone", PHONE)
        assert generation(after) == 2
        assert v.decrypt("b1", "o2", "phone", after) == PHONE
        with pytest.raises(CryptoError, match="destroyed"):
            v.decrypt("b1", "o1", "phone", before)
    latest = store.latest("b1")
    assert latest is not None and latest.generation == 2 and not latest.shredded
    assert store.get("b1", 1).shredded  # type: ignore[union-attr]  # the tombstone stays


def test_prepare_uses_the_stored_row_when_another_writer_won(
    keyring: Keyring, store: SqlKeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    rival = Vault(keyring, SqlKeyStore(store.db))
    read = store.latest_many

    def read_then_lose_the_race(
        subject_ids: Collection[str], tx: Tx | None = None
    ) -> dict[str, DataKeyRow]:
        rows = read(subject_ids, tx)
        for s in subject_ids:  # another process creates the keys after our read
            rival.encrypt(s, "r", "phone", PHONE)
        return rows

    monkeypatch.setattr(store, "latest_many", read_then_lose_the_race)
    vault = Vault(keyring, store)
    vault.prepare(["b1", "b2"])
    mine = {s: vault.encrypt(s, "o1", "phone", PHONE) for s in ("b1", "b2")}
    fresh = Vault(keyring, SqlKeyStore(store.db))
    for s, ct in mine.items():
        assert generation(ct) == 1
        assert rival.decrypt(s, "o1", "phone", ct) == PHONE
        assert fresh.decrypt(s, "o1", "phone", ct) == PHONE


def test_concurrent_prepares_converge_on_one_key_per_subject(
    keyring: Keyring, store: SqlKeyStore
) -> None:
    vaults = [Vault(keyring, SqlKeyStore(store.db)) for _ in range(4)]
    subjects = [f"b{i}" for i in range(40)]
    sealed: list[dict[str, bytes]] = [{} for _ in vaults]
    barrier = threading.Barrier(len(vaults))

    def write(i: int) -> None:
        barrier.wait()
        vaults[i].prepare(subjects)
        sealed[i].update({s: vaults[i].encrypt(s, f"o{i}", "phone", PHONE) for s in subjects})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(vaults))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    fresh = Vault(keyring, store)
    for i, out in enumerate(sealed):
        assert len(out) == len(subjects)
        for s, ct in out.items():
            assert generation(ct) == 1
            assert fresh.decrypt(s, f"o{i}", "phone", ct) == PHONE


def test_prepare_skips_empty_ids_and_encrypt_still_rejects_them(
    keyring: Keyring, store: SqlKeyStore
) -> None:
    vault = Vault(keyring, store)
    vault.prepare(["", "b1"])
    with pytest.raises(InvalidArgumentError, match="subject_id"):
        vault.encrypt_fields("", "o1", {"phone": PHONE})
    assert vault.encrypt_fields("b1", "o1", {"phone": PHONE})


def test_prepare_leaves_unrecoverable_keys_to_encrypt(store: SqlKeyStore) -> None:
    old = Keyring.generate()
    Vault(old, store).encrypt("b1", "o1", "phone", PHONE)
    vault = Vault(Keyring.generate(), store)  # does not hold the key b1's was wrapped under
    vault.prepare(["b1", "b2"])  # b2 still gets its key
    assert vault.encrypt("b2", "o1", "phone", PHONE)
    with pytest.raises(CryptoError):
        vault.encrypt("b1", "o2", "phone", PHONE)


def test_prepare_in_writes_keys_in_the_callers_transaction(
    keyring: Keyring, store: SqlKeyStore, counts: Counts
) -> None:
    vault = Vault(keyring, store)
    vault.encrypt("b1", "o0", "phone", PHONE)  # b1's key is cached already
    counts.writes = 0
    with store.db.transaction() as tx:
        keys = vault.prepare_in(tx, ["b1", "b2", "", "b2"])
        sealed = {s: vault.encrypt_fields(s, "o1", {"phone": PHONE}, keys) for s in ("b1", "b2")}
        with pytest.raises(CryptoError, match="no data key"):
            vault.encrypt_fields("b3", "o1", {"phone": PHONE}, keys)  # not prepared
    assert counts.writes == 1  # the caller's transaction only
    vault.adopt(keys)
    counts.writes = counts.reads = 0
    assert vault.encrypt("b2", "o2", "phone", PHONE)
    assert (counts.writes, counts.reads) == (0, 0)  # adopted: b2's key is cached now
    fresh = Vault(keyring, store)  # reads the committed keys
    for s, ct in sealed.items():
        assert generation(ct["phone"]) == 1
        assert fresh.decrypt(s, "o1", "phone", ct["phone"]) == PHONE


def test_prepare_in_rolled_back_leaves_no_key_stored_or_cached(
    keyring: Keyring, store: SqlKeyStore
) -> None:
    vault = Vault(keyring, store)
    with pytest.raises(RuntimeError), store.db.transaction() as tx:
        keys = vault.prepare_in(tx, ["b1"])
        lost = vault.encrypt_fields("b1", "o1", {"phone": PHONE}, keys)["phone"]
        raise RuntimeError("the caller's write failed")
    assert store.latest("b1") is None
    again = vault.encrypt("b1", "o1", "phone", PHONE)  # a new key, stored this time
    fresh = Vault(keyring, store)
    assert fresh.decrypt("b1", "o1", "phone", again) == PHONE
    with pytest.raises(CryptoError):  # the rolled-back key is gone with its transaction
        fresh.decrypt("b1", "o1", "phone", lost)


class LatestReads:
    """How many times the key store read the latest generations (one per batch, any size)."""

    def __init__(self, store: SqlKeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        read = store.latest_many

        def counted(subject_ids: Collection[str], tx: Tx | None = None) -> dict[str, DataKeyRow]:
            self.calls += 1
            return read(subject_ids, tx)

        monkeypatch.setattr(store, "latest_many", counted)


def test_prepare_in_replaces_a_cached_key_another_process_forgot(
    keyring: Keyring, store: SqlKeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the daemon's vault has b1's key cached; `riskd pii forget b1` runs in another process
    daemon = Vault(keyring, store)
    before = daemon.encrypt("b1", "o1", "phone", PHONE)
    daemon.encrypt("b2", "o1", "phone", PHONE)
    Vault(keyring, SqlKeyStore(store.db)).forget("b1")
    reads = LatestReads(store, monkeypatch)
    with store.db.transaction() as tx:  # the decision log's next batch, well within the TTL
        keys = daemon.prepare_in(tx, ["b1", "b2"])
        sealed = {s: daemon.encrypt_fields(s, "o2", {"phone": PHONE}, keys) for s in ("b1", "b2")}
    daemon.adopt(keys)
    assert reads.calls == 1  # one read for the batch, cached subjects included
    assert generation(sealed["b1"]["phone"]) == 2  # a new key, not the destroyed one
    assert generation(sealed["b2"]["phone"]) == 1  # b2's cached key is still current
    cli = Vault(keyring, SqlKeyStore(store.db))
    assert cli.decrypt("b1", "o2", "phone", sealed["b1"]["phone"]) == PHONE
    assert cli.decrypt("b2", "o2", "phone", sealed["b2"]["phone"]) == PHONE
    for v in (daemon, cli):  # what was sealed before the forget stays unreadable
        with pytest.raises(CryptoError, match="destroyed"):
            v.decrypt("b1", "o1", "phone", before)
    assert generation(daemon.encrypt("b1", "o3", "phone", PHONE)) == 2  # adopted
    latest = store.latest("b1")
    assert latest is not None and latest.generation == 2 and not latest.shredded


def test_prepare_in_adopts_the_generation_another_replica_started(
    keyring: Keyring, store: SqlKeyStore
) -> None:
    daemon = Vault(keyring, store)
    daemon.encrypt("b1", "o1", "phone", PHONE)  # generation 1 cached
    replica = Vault(keyring, SqlKeyStore(store.db))
    replica.forget("b1")
    theirs = replica.encrypt("b1", "o2", "phone", PHONE)  # the replica starts generation 2
    with store.db.transaction() as tx:
        keys = daemon.prepare_in(tx, ["b1"])
        mine = daemon.encrypt_fields("b1", "o3", {"phone": PHONE}, keys)["phone"]
    daemon.adopt(keys)
    assert generation(mine) == generation(theirs) == 2  # one live key per subject
    assert replica.decrypt("b1", "o3", "phone", mine) == PHONE
    assert daemon.decrypt("b1", "o2", "phone", theirs) == PHONE


def test_prepare_replaces_a_cached_key_another_process_forgot(
    keyring: Keyring, store: SqlKeyStore
) -> None:
    # the same without a shared transaction (key store in another database than the log)
    daemon = Vault(keyring, store)
    before = daemon.encrypt("b1", "o1", "phone", PHONE)
    Vault(keyring, SqlKeyStore(store.db)).forget("b1")
    daemon.prepare(["b1"])
    after = daemon.encrypt_fields("b1", "o2", {"phone": PHONE})["phone"]
    assert generation(after) == 2
    assert Vault(keyring, store).decrypt("b1", "o2", "phone", after) == PHONE
    with pytest.raises(CryptoError, match="destroyed"):
        daemon.decrypt("b1", "o1", "phone", before)


def test_prepare_in_tells_the_latest_forget_of_a_subject_forgotten_twice(
    keyring: Keyring, store: SqlKeyStore
) -> None:
    """An order appended between two forgets belongs to the second: ``forgotten_at`` is
    the later one."""
    clock = FakeClock()
    vault = Vault(keyring, store, clock=clock)
    vault.encrypt("b1", "o1", "phone", PHONE)
    vault.forget("b1")
    clock.advance(10)
    vault.encrypt("b1", "o2", "phone", PHONE)
    clock.advance(10)
    vault.forget("b1")
    with store.db.transaction() as tx:
        keys = vault.prepare_in(tx, ["b1"])
    assert keys.forgotten_at("b1") == clock.now()


def test_prepare_in_sees_a_forget_under_another_spelling_with_nothing_stored(
    keyring: Keyring, store: SqlKeyStore
) -> None:
    """A forget records its time under the normalized spelling too: an order still queued
    under a spelling that has nothing stored yet (``ｂ-1``) is covered by ``forget("b-1 ")``."""
    clock = FakeClock()
    vault = Vault(keyring, store, clock=clock)
    vault.forget("b-1 ")  # nothing stored under any spelling yet
    with store.db.transaction() as tx:
        keys = vault.prepare_in(tx, ["ｂ-1"])
    assert keys.forgotten_at("ｂ-1") == clock.now()


def test_prepare_in_seals_a_buyer_forgotten_twice_under_the_live_generation(
    keyring: Keyring, store: SqlKeyStore
) -> None:
    """A buyer who ordered again after two forgets has a live third key: the batch writer
    must seal under it, not fail or fall back to a destroyed one."""
    vault = Vault(keyring, store)
    for _ in range(2):
        vault.encrypt("b1", "o1", "phone", PHONE)
        vault.forget("b1")
    vault.encrypt("b1", "o2", "phone", PHONE)
    writer = Vault(keyring, store)  # nothing cached
    with store.db.transaction() as tx:
        keys = writer.prepare_in(tx, ["b1"])
    writer.adopt(keys)
    sealed = writer.encrypt_fields("b1", "o3", {"phone": PHONE}, keys)["phone"]
    assert generation(sealed) == 3
    assert vault.decrypt("b1", "o3", "phone", sealed) == PHONE
