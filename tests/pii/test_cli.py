"""``riskd pii`` commands against a real key file and SQLite database."""

from __future__ import annotations

import argparse
import base64
import errno
import os
import select
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path

import pytest

from riskd.cli import pii as pii_cli
from riskd.domain.decision import Decision, Outcome
from riskd.errors import CryptoError
from riskd.evidence.chain import verify
from riskd.evidence.log import DecisionLog, blind_index_entries, encrypted_fields
from riskd.evidence.records import DecisionRecord
from riskd.pii import keystore
from riskd.pii.blind import BlindIndexer
from riskd.pii.keyring import STALE_PART_S, Keyring, locked, new_part_name
from riskd.pii.keystore import SqlKeyStore
from riskd.pii.vault import Vault
from riskd.sql import Database
from tests.evidence.test_pii import buyer_secrets
from tests.pg_roles import ADMIN, select_only_url
from tests.service.sample import full_order

PHONE = "13800138000"


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="riskd")
    pii_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pii", *argv])
    rc: int = args.func(args)
    return rc


@pytest.fixture
def paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], Path, str]:
    monkeypatch.delenv("RISKD_KEYRING", raising=False)
    monkeypatch.delenv("RISKD_CONFIG", raising=False)
    key_file = tmp_path / "keyring.json"
    url = f"sqlite:///{tmp_path / 'riskd.db'}"
    Database(url).close()  # the daemon's database exists (the commands never create it)
    return ["--keyring", str(key_file), "--database", url], key_file, url


def test_cli_refuses_a_database_that_is_not_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`retire` counting keys in an empty database it made would destroy a version in use."""
    key_file = tmp_path / "keyring.json"
    missing = tmp_path / "typo" / "riskd.db"
    opts = ["--keyring", str(key_file), "--database", f"sqlite:///{missing}"]
    assert run("keygen", "--keyring", str(key_file)) == 0
    assert run("keygen", "--keyring", str(key_file)) == 0
    for command in (("retire", "1"), ("rotate",), ("forget", "b1"), ("hold", "b1")):
        assert run(*command, *opts) == 1
        assert "no database at" in capsys.readouterr().err
    assert not missing.exists()
    assert not Keyring.load(key_file).keys[1].retired  # nothing was retired


def vault_at(key_file: Path, url: str) -> tuple[Vault, Database]:
    db = Database(url)
    return Vault(Keyring.load(key_file), SqlKeyStore(db)), db


def test_cli_keygen_rotate_retire_keeps_data_readable(
    paths: tuple[list[str], Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    opts, key_file, url = paths
    assert run("keygen", *opts) == 0
    vault, db = vault_at(key_file, url)
    ct = vault.encrypt("b1", "o1", "phone", PHONE)
    db.close()
    assert run("keygen", *opts) == 0
    assert Keyring.load(key_file).primary_version == 2
    assert run("retire", "1", *opts) == 1  # still wraps a data key
    assert "run `riskd pii rotate` first" in capsys.readouterr().err
    assert run("rotate", *opts) == 0
    assert "re-wrapped 1 data keys under master key version 2" in capsys.readouterr().out
    assert run("retire", "1", *opts) == 0
    assert Keyring.load(key_file).active_versions == (2,)
    vault, db = vault_at(key_file, url)
    assert vault.decrypt("b1", "o1", "phone", ct) == PHONE
    db.close()


def test_cli_retire_force_makes_unrotated_data_unreadable(
    paths: tuple[list[str], Path, str],
) -> None:
    opts, key_file, url = paths
    run("keygen", *opts)
    vault, db = vault_at(key_file, url)
    ct = vault.encrypt("b1", "o1", "phone", PHONE)
    db.close()
    run("keygen", *opts)
    assert run("retire", "1", "--force", *opts) == 0
    vault, db = vault_at(key_file, url)
    with pytest.raises(CryptoError, match="version 1 is retired"):
        vault.decrypt("b1", "o1", "phone", ct)
    db.close()


def test_cli_forget_respects_legal_hold(
    paths: tuple[list[str], Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    opts, key_file, url = paths
    run("keygen", *opts)
    vault, db = vault_at(key_file, url)
    ct = vault.encrypt("b1", "o1", "phone", PHONE)
    db.close()
    assert run("hold", "b1", "--reason", "dispute 42", *opts) == 0
    assert run("forget", "b1", *opts) == 1
    assert "legal hold" in capsys.readouterr().err
    vault, db = vault_at(key_file, url)
    assert vault.decrypt("b1", "o1", "phone", ct) == PHONE
    db.close()
    assert run("hold", "b1", "--release", *opts) == 0
    assert run("forget", "b1", *opts) == 0
    assert "1 data keys destroyed" in capsys.readouterr().out
    vault, db = vault_at(key_file, url)
    with pytest.raises(CryptoError, match="forgotten"):
        vault.decrypt("b1", "o1", "phone", ct)
    db.close()


def test_cli_keyring_from_env_is_read_only(
    paths: tuple[list[str], Path, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, _, url = paths
    monkeypatch.setenv("RISKD_KEYRING", Keyring.generate().to_json())
    assert run("rotate", "--database", url) == 0
    assert run("keygen") == 1
    assert "read-only" in capsys.readouterr().err


def _spellings(secret: bytes) -> list[str]:
    """The ways a key may be printed: base64 (the key file's), URL-safe base64, hex."""
    return [
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode(),
        secret.hex(),
        secret.hex().upper(),
    ]


def test_cli_output_never_contains_key_material(
    paths: tuple[list[str], Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """No command prints a master key or the index secret, in any spelling (review: only
    the master keys' base64, as the key file has it, was looked for)."""
    opts, key_file, _ = paths
    printed, material = [], set()
    for command in (("keygen",), ("keygen",), ("rotate",), ("retire", "1"), ("keygen",)):
        assert run(*command, *opts) == 0
        out = capsys.readouterr()
        printed.append(out.out + out.err)
        ring = Keyring.load(key_file)  # every key that was ever in it, retired ones too
        material |= {ring.index_secret, *(k.material for k in ring.keys.values())} - {b""}
    assert Keyring.load(key_file).keys[1].retired and len(material) == 4
    text = "\n".join(printed)
    assert not [s for m in material for s in _spellings(m) if s in text]


def test_cli_forget_deletes_the_decision_logs_ciphertexts_and_blind_indexes(
    paths: tuple[list[str], Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    opts, key_file, url = paths
    run("keygen", *opts)
    db = Database(url)
    keyring = Keyring.load(key_file)
    log = DecisionLog(db, vault=Vault(keyring, SqlKeyStore(db)), indexer=BlindIndexer(keyring))
    order = full_order("o-1")
    decision = Decision("o-1", Outcome.ALLOW, 0.0, (), "v1", decided_at=1.0)
    log.append(DecisionRecord(decision, log.protect(order)), order=order)
    log.close()
    assert len(blind_index_entries(db, "o-1")) == 6 and len(encrypted_fields(db, "o-1")) == 6
    db.close()
    capsys.readouterr()
    assert run("hold", "b-1", *opts) == 0
    assert run("forget", "b-1", *opts) == 1  # refused under hold: nothing deleted
    db = Database(url)
    assert len(blind_index_entries(db, "o-1")) == 6
    db.close()
    assert run("hold", "b-1", "--release", *opts) == 0
    assert run("forget", "b-1", *opts) == 0
    assert "12 evidence rows deleted" in capsys.readouterr().out
    db = Database(url)
    assert blind_index_entries(db, "o-1") == {} and encrypted_fields(db, "o-1") == {}
    assert verify(db).ok and verify(db).head["decision_log"][0] == 1
    db.close()


def test_cli_forget_whose_evidence_delete_fails_says_the_keys_are_gone_and_a_rerun_ends_it(
    paths: tuple[list[str], Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    # the keys are destroyed before the decision log's rows: an operator told only the
    # database's error would not know the buyer is already unreadable, nor what to do
    opts, key_file, url = paths
    run("keygen", *opts)
    log_buyers(url, Keyring.load(key_file), buyers=1, orders=1)
    db = Database(url)
    db.query(
        "CREATE TRIGGER keep BEFORE DELETE ON decision_pii BEGIN SELECT RAISE(ABORT, 'kept'); END"
    )
    db.close()
    capsys.readouterr()
    assert run("forget", "b-0", *opts) == 1
    err = capsys.readouterr().err
    assert "data keys are destroyed" in err and "run the same forget again" in err
    db = Database(url)
    assert len(encrypted_fields(db, "o-0")) == 6  # the rows the failed delete left
    db.query("DROP TRIGGER keep")
    db.close()
    assert run("forget", "b-0", *opts) == 0
    assert "data keys are destroyed" not in capsys.readouterr().err
    db = Database(url)
    assert blind_index_entries(db, "o-0") == {} and encrypted_fields(db, "o-0") == {}
    db.close()


def test_cli_forget_leaves_nothing_under_another_spelling_of_the_buyer_id(
    paths: tuple[list[str], Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The velocity counters count ``b-77 `` and ``ｂ-７７`` as buyer b-77: so does forget."""
    opts, key_file, url = paths
    run("keygen", *opts)
    db = Database(url)
    keyring = Keyring.load(key_file)
    log = DecisionLog(db, vault=Vault(keyring, SqlKeyStore(db)), indexer=BlindIndexer(keyring))
    buyers = {"o-1": "b-77", "o-2": "b-77 ", "o-3": "ｂ-７７", "o-4": "\u3000b-77", "o-5": "b-777"}
    for order_id, buyer in buyers.items():
        order = full_order(order_id)
        order = replace(order, buyer=replace(order.buyer, buyer_id=buyer))
        decision = Decision(order_id, Outcome.ALLOW, 0.0, (), "v1", decided_at=1.0)
        log.append(DecisionRecord(decision, log.protect(order)), order=order)
    log.close()
    sealed = {o: encrypted_fields(db, o)["phone"] for o in buyers}
    db.close()
    capsys.readouterr()
    assert run("hold", "ｂ-７７", *opts) == 0
    assert run("forget", "b-77", *opts) == 1  # a hold under any spelling holds the buyer
    assert run("hold", "b-77", "--release", *opts) == 0
    assert run("forget", "b-77", *opts) == 0
    assert "4 data keys destroyed" in capsys.readouterr().out
    db = Database(url)
    vault = Vault(keyring, SqlKeyStore(db))
    for order_id in ("o-1", "o-2", "o-3", "o-4"):
        assert blind_index_entries(db, order_id) == {} and encrypted_fields(db, order_id) == {}
        with pytest.raises(CryptoError, match="forgotten"):
            vault.decrypt(buyers[order_id], order_id, "phone", sealed[order_id])
    assert len(encrypted_fields(db, "o-5")) == 6  # another buyer
    assert vault.decrypt("b-777", "o-5", "phone", sealed["o-5"]) == "13812345678"
    db.close()


def log_buyers(url: str, keyring: Keyring, buyers: int, orders: int) -> None:
    """``orders`` orders through the decision log, by buyers b-0 .. b-(buyers - 1), each
    with a phone, device and IP of its own."""
    db = Database(url)
    log = DecisionLog(db, vault=Vault(keyring, SqlKeyStore(db)), indexer=BlindIndexer(keyring))
    for i in range(orders):
        b = i % buyers
        order = full_order(f"o-{i}", device_id=f"dev-{b}")
        buyer = replace(order.buyer, buyer_id=f"b-{b}", phone=f"1390000{b:04d}")
        order = replace(order, buyer=buyer, ip=f"10.9.0.{b}")
        decision = Decision(order.order_id, Outcome.ALLOW, 0.0, (), "v1", decided_at=1.0)
        log.append(DecisionRecord(decision, log.protect(order)), order=order)
    log.close()
    db.close()


def stored_secrets(url: str, buyer: str) -> list[bytes]:
    """What the database at ``url`` holds of ``buyer`` only (``buyer_secrets``)."""
    db = Database(url)
    try:
        return buyer_secrets(db, buyer)
    finally:
        db.close()


def test_cli_forget_leaves_no_bytes_of_the_buyer_in_the_files_the_daemon_holds_open(
    paths: tuple[list[str], Path, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Deleted rows stay in the SQLite file and its WAL until a checkpoint: the forget
    checkpoints after every delete, and says so when a reader held that up."""
    opts, key_file, url = paths
    run("keygen", *opts)
    log_buyers(url, Keyring.load(key_file), buyers=4, orders=200)
    files = [Path(url.removeprefix("sqlite:///")), Path(url.removeprefix("sqlite:///") + "-wal")]

    def on_disk() -> bytes:
        return b"".join(p.read_bytes() for p in files if p.exists())

    daemon = Database(url)  # the daemon's connection: the file stays open, its WAL too
    assert daemon.query("SELECT COUNT(*) FROM decision_pii") == [(1200,)]
    first, second, kept = (stored_secrets(url, b) for b in ("b-1", "b-2", "b-3"))
    assert len(first) == 1 + 50 * 6 + 3  # a key, 50 orders of 6 fields, 3 own digests
    assert all(s in on_disk() for s in first + second + kept)  # the search sees them

    assert run("forget", "b-1", *opts) == 0
    assert [s for s in first if s in on_disk()] == []
    assert all(s in on_disk() for s in second + kept)

    monkeypatch.setattr(keystore, "CHECKPOINT_WAIT_S", 0.1)
    with daemon.transaction(read_only=True) as tx:  # a read in progress: its snapshot
        tx.execute("SELECT COUNT(*) FROM decision_pii").fetchall()
        capsys.readouterr()
        assert run("forget", "b-2", *opts) == pii_cli.FORGET_NOT_CHECKPOINTED
        assert "keep the deleted bytes" in capsys.readouterr().err
        assert any(s in on_disk() for s in second)  # said, and so it is
    assert run("forget", "b-2", *opts) == 0  # again once the read is over
    assert [s for s in second if s in on_disk()] == []
    assert all(s in on_disk() for s in kept)
    daemon.close()


def test_cli_refuses_a_keyring_other_than_the_databases(
    paths: tuple[list[str], Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As the daemon does (review: a rotate with another key file re-wrapped nothing and
    called every data key unrecoverable)."""
    opts, key_file, url = paths
    run("keygen", *opts)
    vault, db = vault_at(key_file, url)
    ct = vault.encrypt("b1", "o1", "phone", PHONE)
    db.close()
    other = tmp_path / "other.json"
    run("keygen", "--keyring", str(other))
    wrong = ["--keyring", str(other), "--database", url]
    for command in (("rotate",), ("forget", "b1"), ("hold", "b1", "--reason", "case 7")):
        assert run(*command, *wrong) == 1
        assert "not the keyring this database's" in capsys.readouterr().err
    assert run("rotate", *opts) == 0  # the right one still works, nothing was changed
    vault, db = vault_at(key_file, url)
    assert vault.decrypt("b1", "o1", "phone", ct) == PHONE
    assert vault.holds("b1") == []
    db.close()


def test_cli_rotate_skips_a_lost_key_and_says_so(
    paths: tuple[list[str], Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Reviewer's repro: a key lost to `retire --force` blocked every later rotate."""
    opts, key_file, url = paths
    run("keygen", *opts)
    vault, db = vault_at(key_file, url)
    vault.encrypt("a-buyer", "o1", "phone", PHONE)
    db.close()
    run("keygen", *opts)
    vault, db = vault_at(key_file, url)
    ct = vault.encrypt("z-buyer", "o2", "phone", PHONE)
    db.close()
    run("retire", "1", "--force", *opts)
    run("keygen", *opts)
    capsys.readouterr()
    assert run("rotate", *opts) == pii_cli.ROTATE_INCOMPLETE == 3
    out = capsys.readouterr()
    assert "re-wrapped 1 data keys under master key version 3" in out.out
    assert "1 data keys could not be unwrapped" in out.err
    assert run("retire", "2", *opts) == 0  # nothing left under 2
    vault, db = vault_at(key_file, url)
    assert vault.decrypt("z-buyer", "o2", "phone", ct) == PHONE
    new = vault.encrypt("a-buyer", "o3", "phone", PHONE)  # a new generation, under v3
    assert vault.decrypt("a-buyer", "o3", "phone", new) == PHONE
    db.close()


def test_cli_parallel_keygens_lose_no_version(
    paths: tuple[list[str], Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Keygens run at once each add their own version: none overwrites another's."""
    opts, key_file, _ = paths
    assert run("keygen", *opts) == 0
    n = 8
    start = threading.Barrier(n)
    codes: list[int] = []

    def keygen() -> None:
        start.wait()
        codes.append(run("keygen", *opts))

    threads = [threading.Thread(target=keygen) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [0] * n
    ring = Keyring.load(key_file)
    assert ring.versions == tuple(range(1, n + 2))
    assert ring.active_versions == ring.versions
    assert ring.primary == n + 1
    reported = [line.split()[3] for line in capsys.readouterr().out.splitlines()]
    assert sorted(map(int, reported)) == list(range(1, n + 2))  # each printed its own
    assert not list(key_file.parent.glob(".*keyring-*"))  # no temporary file left behind


def test_cli_keygen_and_retire_through_a_symlink_update_the_shared_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README's key file on shared storage: each host links to it; the link must stay a link."""
    monkeypatch.delenv("RISKD_KEYRING", raising=False)
    monkeypatch.delenv("RISKD_CONFIG", raising=False)
    shared = tmp_path / "shared" / "keyring.json"
    shared.parent.mkdir()
    link = tmp_path / "node-keyring.json"
    link.symlink_to(shared)
    url = f"sqlite:///{tmp_path / 'riskd.db'}"
    Database(url).close()
    opts = ["--keyring", str(link), "--database", url]
    assert run("keygen", *opts) == 0
    assert run("keygen", *opts) == 0
    assert run("retire", "1", *opts) == 0
    assert link.is_symlink()
    ring = Keyring.load(shared)
    assert (ring.primary_version, ring.active_versions) == (2, (2,))


def test_cli_release_lifts_one_hold_by_reason(
    paths: tuple[list[str], Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    opts, _, _ = paths
    run("keygen", *opts)
    assert run("hold", "b1", "--reason", "court order 7", *opts) == 0
    assert run("hold", "b1", "--reason", "dispute 42", *opts) == 0
    assert "2 in all" in capsys.readouterr().out
    assert run("hold", "b1", "--release", *opts) == 1  # which one? refused
    err = capsys.readouterr().err
    assert "'court order 7', 'dispute 42'" in err and "b1" not in err
    assert run("hold", "b1", "--release", "--reason", "dispute 42", *opts) == 0
    assert "1 still placed" in capsys.readouterr().out
    assert run("forget", "b1", *opts) == 1
    assert "legal hold" in capsys.readouterr().err
    assert run("hold", "b1", "--release", *opts) == 0
    assert run("forget", "b1", *opts) == 0
    # a hold placed without --reason is recorded as 'legal hold' (the help's default)
    assert run("hold", "b2", *opts) == 0
    assert run("hold", "b2", "--reason", "court order 7", *opts) == 0
    capsys.readouterr()
    assert run("hold", "b2", "--release", *opts) == 1
    assert "'court order 7', 'legal hold'" in capsys.readouterr().err
    assert run("hold", "b2", "--release", "--reason", "legal hold", *opts) == 0


def test_cli_release_says_when_no_hold_was_lifted(
    paths: tuple[list[str], Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    opts, key_file, url = paths
    run("keygen", *opts)
    assert run("hold", "b1", "--reason", "court order 7", *opts) == 0
    capsys.readouterr()
    assert run("hold", "b1", "--release", "--reason", "dispute 42", *opts) == 0
    assert capsys.readouterr().out == "no legal hold with that reason (1 placed)\n"
    assert run("hold", "b2", "--release", *opts) == 0
    assert capsys.readouterr().out == "no legal hold was placed\n"
    vault, db = vault_at(key_file, url)
    assert len(vault.holds("b1")) == 1  # the other reason's hold is still placed
    db.close()


def test_cli_keyring_option_wins_over_the_environment(
    paths: tuple[list[str], Path, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--keyring`` names the key file even where RISKD_KEYRING is set (the module's
    docstring: the file, else the variable, else the configuration)."""
    opts, key_file, url = paths
    run("keygen", *opts)
    vault, db = vault_at(key_file, url)
    vault.encrypt("b1", "o1", "phone", PHONE)
    db.close()
    run("keygen", *opts)
    monkeypatch.setenv("RISKD_KEYRING", Keyring.generate().to_json())
    capsys.readouterr()
    assert run("rotate", *opts) == 0
    assert capsys.readouterr().out == "re-wrapped 1 data keys under master key version 2\n"


@pytest.mark.postgres
def test_cli_forget_on_postgresql_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL has no checkpoint to wait for (``checkpointed`` is None): a forget there
    is complete, exit 0 and nothing said on stderr."""
    monkeypatch.delenv("RISKD_KEYRING", raising=False)
    key_file = tmp_path / "keyring.json"
    run("keygen", "--keyring", str(key_file))
    url = f"{ADMIN}?schema=pii_cli_{uuid.uuid4().hex[:8]}"
    db = Database(url)
    Vault(Keyring.load(key_file), SqlKeyStore(db)).encrypt("b1", "o1", "phone", PHONE)
    db.close()
    capsys.readouterr()
    try:
        assert run("forget", "b1", "--keyring", str(key_file), "--database", url) == 0
        out, err = capsys.readouterr()
        assert "1 data keys destroyed" in out and err == ""
    finally:
        db = Database(url)
        db.drop_schema()
        db.close()


KEY_FILE_COMMANDS = (("keygen",), ("retire", "1"))


def assert_key_file_refused(
    err: str, command: tuple[str, ...], key_file: Path, refused: str
) -> None:
    """``err`` is the one line naming the key file, then the path refused and why."""
    prefix = f"riskd pii {command[0]}: error: keyring: cannot write key file {key_file}"
    assert err == f"{prefix}: {refused}\n"


@pytest.mark.parametrize(
    ("under", "code"), [("", errno.EEXIST), ("sub", errno.ENOTDIR)], ids=["file", "file-sub"]
)
def test_cli_a_key_file_under_a_file_is_named_in_one_line_and_nothing_is_written(
    paths: tuple[list[str], Path, str],
    under: str,
    code: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Review: a key file's folder that could not be made (a file in its way) ended in
    a traceback (FileExistsError, NotADirectoryError from locking it). `retire` has no
    key file to read there: test_cli_retire_refuses_a_key_file_it_cannot_read_..."""
    _, key_file, url = paths
    command = ("keygen",)
    blocker = key_file.parent / "blocker"
    blocker.write_text("not a folder")
    before = sorted(key_file.parent.iterdir())
    folder = blocker / under if under else blocker
    assert run(*command, "--keyring", str(folder / "keyring.json"), "--database", url) == 1
    refused = f"{os.path.realpath(folder)}: {os.strerror(code)}"
    assert_key_file_refused(capsys.readouterr().err, command, folder / "keyring.json", refused)
    assert sorted(key_file.parent.iterdir()) == before
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize(
    ("key_path", "code"),
    [
        ("gone/deeper/keyring.json", errno.ENOENT),
        ("keyring.json", errno.ENOENT),
        ("blocker/keyring.json", errno.ENOTDIR),
        ("blocker/sub/keyring.json", errno.ENOTDIR),
    ],
    ids=["no-folder", "no-file", "file", "file-sub"],
)
def test_cli_retire_refuses_a_key_file_it_cannot_read_before_making_anything(
    tmp_path: Path,
    paths: tuple[list[str], Path, str],
    key_path: str,
    code: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Review: `retire` with a key file in a folder not there made the folder and a
    lock file in it, then refused (cannot read key file): a refused command changed
    the disk. `keygen` still makes them (a first key file where none was)."""
    _, _, url = paths
    (tmp_path / "blocker").write_text("not a folder")
    before = sorted(tmp_path.rglob("*"))
    key_file = tmp_path / key_path
    assert run("retire", "1", "--keyring", str(key_file), "--database", url) == 1
    expected = f"keyring: cannot read key file {key_file}: {os.strerror(code)}"
    assert capsys.readouterr().err == f"riskd pii retire: error: {expected}\n"
    assert sorted(tmp_path.rglob("*")) == before
    assert run("keygen", "--keyring", str(tmp_path / "new" / "keyring.json")) == 0
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [
        "keyring.json",
        "keyring.json.lock",
    ]


@pytest.mark.parametrize("command", KEY_FILE_COMMANDS)
def test_cli_a_folder_where_the_lock_should_be_is_named_in_one_line(
    paths: tuple[list[str], Path, str],
    command: tuple[str, ...],
    capsys: pytest.CaptureFixture[str],
) -> None:
    opts, key_file, _ = paths
    run("keygen", *opts)
    run("keygen", *opts)  # version 1 wraps no data key: retire 1 would go through
    lock = key_file.with_name(key_file.name + ".lock")
    lock.unlink()
    lock.mkdir()
    kept = key_file.read_bytes()
    capsys.readouterr()
    assert run(*command, *opts) == 1
    refused = f"{os.path.realpath(lock)}: {os.strerror(errno.EISDIR)}"
    assert_key_file_refused(capsys.readouterr().err, command, key_file, refused)
    assert key_file.read_bytes() == kept
    assert not list(key_file.parent.glob(".*keyring-*"))


def test_cli_a_full_disk_while_saving_the_key_file_is_named_in_one_line(
    paths: tuple[list[str], Path, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opts, key_file, _ = paths

    def full(ring: Keyring, path: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Keyring, "save", full)
    assert run("keygen", *opts) == 1
    refused = os.strerror(errno.ENOSPC)
    assert_key_file_refused(capsys.readouterr().err, ("keygen",), key_file, refused)
    assert not key_file.exists()


DATABASE_COMMANDS = (("rotate",), ("retire", "1"), ("forget", "b1"), ("hold", "b1"))


def assert_refused_in_one_line(err: str, command: tuple[str, ...], refusal: str) -> None:
    assert err == f"riskd pii {command[0]}: error: the database refused ({refusal})\n"


def test_cli_a_file_that_is_not_a_database_is_named_in_one_line_and_left_as_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: a database the driver refused (not a database, locked, a privilege) ended
    in a traceback quoting the driver's text."""
    monkeypatch.delenv("RISKD_KEYRING", raising=False)
    key_file = tmp_path / "keyring.json"
    assert run("keygen", "--keyring", str(key_file)) == 0
    assert run("keygen", "--keyring", str(key_file)) == 0
    garbage = tmp_path / "riskd.db"
    garbage.write_bytes(bytes(range(256)) * 32)
    capsys.readouterr()
    for command in DATABASE_COMMANDS:
        assert run(*command, "--keyring", str(key_file), "--database", str(garbage)) == 1
        refusal = "DatabaseError: file is not a database"
        assert_refused_in_one_line(capsys.readouterr().err, command, refusal)
    assert garbage.read_bytes() == bytes(range(256)) * 32
    assert not Keyring.load(key_file).keys[1].retired


def test_cli_a_database_another_connection_holds_locked_is_named_in_one_line(
    paths: tuple[list[str], Path, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opts, key_file, url = paths
    run("keygen", *opts)
    run("keygen", *opts)  # version 1 wraps no data key: retire 1 would go through
    vault, db = vault_at(key_file, url)
    ct = vault.encrypt("b1", "o1", "phone", PHONE)
    db.close()
    capsys.readouterr()
    monkeypatch.setattr("riskd.sql.BUSY_TIMEOUT_S", 0.05)
    holder = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")  # another process, mid-write, keeping even readers out
    try:
        for command in DATABASE_COMMANDS:
            assert run(*command, *opts) == 1
            refusal = "OperationalError: database is locked"
            assert_refused_in_one_line(capsys.readouterr().err, command, refusal)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert not Keyring.load(key_file).keys[1].retired
    vault, db = vault_at(key_file, url)
    assert vault.decrypt("b1", "o1", "phone", ct) == PHONE
    assert vault.holds("b1") == []
    db.close()


@pytest.mark.postgres
def test_cli_a_role_without_the_privilege_is_named_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RISKD_KEYRING", raising=False)
    key_file = tmp_path / "keyring.json"
    run("keygen", "--keyring", str(key_file))
    schema = f"pii_ro_{uuid.uuid4().hex[:8]}"
    db = Database(f"{ADMIN}?schema={schema}")
    Vault(Keyring.load(key_file), SqlKeyStore(db)).encrypt("b1", "o1", "phone", PHONE)
    db.close()
    capsys.readouterr()
    with select_only_url(schema) as url:
        for command in (("forget", "b1"), ("hold", "b1")):
            assert run(*command, "--keyring", str(key_file), "--database", url) == 1
            err = capsys.readouterr().err
            assert err.startswith(f"riskd pii {command[0]}: error: the database refused (")
            assert "InsufficientPrivilege: permission denied for " in err
            assert err.count("\n") == 1 and url not in err


def test_cli_a_bug_is_named_by_its_kind_alone_never_its_text(
    paths: tuple[list[str], Path, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # review: a bug (neither riskd's error nor the driver's) ended in a traceback quoting
    # its text, in the command group that handles buyers' personal data
    opts, _, _ = paths
    run("keygen", *opts)

    def broken(self: Vault, subject_id: str) -> None:
        raise TypeError(f"cannot shred {subject_id} {PHONE}")

    monkeypatch.setattr(Vault, "forget", broken)
    capsys.readouterr()
    assert run("forget", "b1", *opts) == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", "riskd pii forget: error: TypeError\n")


# ``riskd pii keygen`` in a process of its own, stopped inside the key file's save, its part
# file written and synced, before the rename: it says "saving", then sleeps (to be killed),
# or, with RISKD_TEST_GO, renames once that file exists.
SAVING = """
import os, sys, time
from riskd.cli import main
go, replace = os.environ.get("RISKD_TEST_GO"), os.replace
def held(src, dst):
    print("saving", flush=True)
    while go is None or not os.path.exists(go):
        time.sleep(0.01)
    replace(src, dst)
os.replace = held
sys.exit(main(sys.argv[1:]))
"""


def keygen_saving(key_file: Path, go: Path | None = None) -> subprocess.Popen[str]:
    """A ``riskd pii keygen`` of ``key_file`` held inside its save (its lock held)."""
    env = {**os.environ, **({"RISKD_TEST_GO": str(go)} if go else {})}
    argv = [sys.executable, "-c", SAVING, "pii", "keygen", "--keyring", str(key_file)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    assert ready and proc.stdout.readline() == "saving\n"
    return proc


def parts_of(key_file: Path) -> list[Path]:
    return sorted(key_file.parent.glob(f".{key_file.name}.keyring-*"))


def secrets_of(ring: Keyring) -> list[str]:
    keys = [ring.keys[v].material for v in ring.active_versions]
    return [base64.b64encode(k).decode() for k in (*keys, ring.index_secret)]


def test_cli_keygen_removes_the_part_a_killed_keygen_left_and_retire_leaves_no_old_key(
    paths: tuple[list[str], Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A keygen killed before its rename leaves its part, version 1's key in it: the next
    keygen removes it (by name), so once version 1 is retired no file holds its key."""
    opts, key_file, _ = paths
    assert run("keygen", *opts) == 0
    first = Keyring.load(key_file)
    proc = keygen_saving(key_file)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    [part] = parts_of(key_file)
    killed = Keyring.load(part)  # the crash's leftover: a whole keyring, versions 1 and 2
    assert killed.versions == (1, 2) and killed.keys[1] == first.keys[1]
    assert stat.S_IMODE(part.stat().st_mode) == 0o600
    capsys.readouterr()
    assert run("keygen", *opts) == 0
    assert run("retire", "1", *opts) == 0
    old_key = secrets_of(first)[0].encode()
    files = [p for p in key_file.parent.rglob("*") if p.is_file()]
    assert files and not [p.name for p in files if old_key in p.read_bytes()]
    assert not part.exists() and parts_of(key_file) == []
    said = capsys.readouterr()
    removed = f"riskd pii keygen: removed stale part file {part.name} (a save killed midway)"
    assert said.err == removed + "\n"
    ring = Keyring.load(key_file)
    assert (ring.versions, ring.active_versions) == ((1, 2), (2,))
    shown = said.out + said.err
    assert not any(s in shown for s in secrets_of(killed) + secrets_of(ring))


def test_cli_keygen_leaves_the_part_files_of_another_key_file(
    paths: tuple[list[str], Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Two key files in one folder: a keygen of one never takes the other's parts."""
    opts, key_file, _ = paths
    other = key_file.with_name("other.json")
    assert run("keygen", "--keyring", str(other)) == 0
    theirs = key_file.parent / new_part_name(other)
    theirs.write_bytes(other.read_bytes())
    mine = key_file.parent / new_part_name(key_file)
    mine.write_bytes(other.read_bytes())
    capsys.readouterr()
    assert run("keygen", *opts) == 0
    assert capsys.readouterr().err == (
        f"riskd pii keygen: removed stale part file {mine.name} (a save killed midway)\n"
    )
    assert theirs.exists() and not mine.exists()
    assert Keyring.load(key_file).primary_version == 1
    assert Keyring.load(other).primary_version == 1


def test_cli_a_save_under_way_keeps_its_part_while_keygen_waits_for_the_lock(
    paths: tuple[list[str], Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A part being written is one a keygen holding the lock is saving: another keygen
    waits for the lock, and finds the part renamed by then, not removed under it."""
    opts, key_file, _ = paths
    assert run("keygen", *opts) == 0
    go = tmp_path / "go"
    proc = keygen_saving(key_file, go)
    [part] = parts_of(key_file)
    codes: list[int] = []
    waiting = threading.Thread(target=lambda: codes.append(run("keygen", *opts)))
    waiting.start()
    time.sleep(0.5)
    assert waiting.is_alive() and part.exists()  # held at the lock, the part untouched
    go.touch()
    assert proc.wait(30) == 0
    waiting.join(30)
    assert codes == [0]
    assert Keyring.load(key_file).versions == (1, 2, 3)
    assert parts_of(key_file) == []
    assert "stale part" not in capsys.readouterr().err


def test_cli_retire_waiting_for_the_lock_keeps_the_version_a_keygen_added(
    paths: tuple[list[str], Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retire that waits at the key file's lock while a keygen saves reads the file
    again once it holds the lock: the keygen's new version is kept, not overwritten by
    the versions the retire read before it waited."""
    opts, key_file, _ = paths
    assert run("keygen", *opts) == 0
    assert run("keygen", *opts) == 0  # version 1 wraps no data key: retire 1 goes through
    go = tmp_path / "go"
    proc = keygen_saving(key_file, go)  # holds the lock, version 3 in its part
    at_the_lock = threading.Event()

    def waits(path: Path) -> AbstractContextManager[None]:
        at_the_lock.set()
        return locked(path)

    monkeypatch.setattr("riskd.cli.pii.locked", waits)
    codes: list[int] = []
    retire = threading.Thread(target=lambda: codes.append(run("retire", "1", *opts)))
    retire.start()
    assert at_the_lock.wait(30)  # the key file read once, the lock asked for
    go.touch()
    assert proc.wait(30) == 0
    retire.join(30)
    assert codes == [0]
    ring = Keyring.load(key_file)
    assert (ring.versions, ring.active_versions, ring.primary_version) == ((1, 2, 3), (2, 3), 3)


def test_cli_a_part_it_cannot_remove_is_said_and_keygen_goes_on(
    paths: tuple[list[str], Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    opts, key_file, _ = paths
    assert run("keygen", *opts) == 0
    stuck = key_file.parent / new_part_name(key_file)
    stuck.mkdir()  # unlink refuses a folder, even to root
    capsys.readouterr()
    assert run("keygen", *opts) == 0
    assert capsys.readouterr().err == (
        f"riskd pii keygen: cannot remove stale part file {stuck.name}: "
        f"{os.strerror(errno.EISDIR)}\n"
    )
    assert Keyring.load(key_file).primary_version == 2


def test_cli_keygen_removes_an_old_form_part_once_no_save_can_be_writing_it(
    paths: tuple[list[str], Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``.keyring-*`` parts, of a riskd before parts named their key file, name no key
    file: removed once unwritten for 10 minutes, a younger one left and said."""
    opts, key_file, _ = paths
    assert run("keygen", *opts) == 0
    old, young = key_file.parent / ".keyring-abcd1234", key_file.parent / ".keyring-young123"
    for part in (old, young):
        part.write_bytes(key_file.read_bytes())
    then = time.time() - STALE_PART_S - 1
    os.utime(old, (then, then))
    capsys.readouterr()
    assert run("retire", "1", "--force", *opts) == 1  # refused: 1 is primary
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == [
        f"riskd pii retire: removed stale part file {old.name} (a save killed midway)",
        f"riskd pii retire: left part file {young.name}: an older riskd's, written in the last"
        " 10 minutes (its save may be under way); removed by a later command",
    ]
    assert not old.exists() and young.exists()


def _rows(url: str) -> list[tuple[object, ...]]:
    db = Database(url)
    try:
        return db.query(
            "SELECT subject_id, reason FROM pii_legal_hold_reasons UNION ALL "
            "SELECT subject_id, generation FROM pii_data_keys"
        )
    finally:
        db.close()


@pytest.mark.parametrize(
    "argv",
    [
        ("hold", "b-1", "--reason", "   "),
        ("hold", "b-1", "--reason", "\u3000\t"),
        ("hold", "  ", "--reason", "dispute 2026-17"),
        ("forget", "   "),
        ("forget", "\u3000"),
    ],
)
def test_cli_a_blank_buyer_id_or_hold_reason_is_refused_and_changes_nothing(
    paths: tuple[list[str], Path, str], capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    # a hold no one can explain, or a "forgotten" report for no buyer, misleads the audit
    opts, _, url = paths
    assert run("keygen", *opts) == 0
    SqlKeyStore(db := Database(url)).create_schema()
    db.close()
    before = _rows(url)
    assert run(*argv, *opts) == 1
    err = capsys.readouterr().err
    assert "must not be empty" in err and "forgotten" not in err
    assert _rows(url) == before


def test_cli_a_hold_reason_holding_pii_is_refused_naming_the_kind_never_the_value(
    paths: tuple[list[str], Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    # the reason is stored in clear for good and listed back: it must carry no personal data
    opts, _, url = paths
    assert run("keygen", *opts) == 0
    reason = "buyer 13812345678 disputes"
    assert run("hold", "b-1", "--reason", reason, *opts) == 1
    out = capsys.readouterr()
    assert "reason: looks like it holds a mobile phone number;" in out.err
    assert "13812345678" not in out.err + out.out
    db = Database(url)
    assert SqlKeyStore(db).holds("b-1") == []
    db.close()
    assert run("forget", "b-1", *opts) == 0  # no hold was placed


@pytest.mark.parametrize("command", [("keygen",), ("retire", "1")])
def test_cli_keygen_and_retire_leave_a_key_file_others_could_read_owner_only(
    paths: tuple[list[str], Path, str], command: tuple[str, ...]
) -> None:
    # master keys: a file copied or restored with a looser mode is made 0600 on the next save
    opts, key_file, _ = paths
    assert run("keygen", *opts) == 0
    assert run("keygen", *opts) == 0  # version 1 retirable
    key_file.chmod(0o644)
    assert run(*command, *opts) == 0
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    Keyring.load(key_file)
