"""DecisionLog's writer thread survives its own bugs: an exception that escapes a batch's
commit is logged once (type and frames, no PII), counted in ``restarts``, and the writer
goes on after a bounded pause with the batch it held: what committed is not written
again, what did not is written, the chain verifies, flush and close return.

The bugs are injected by making one method of the real objects raise (a real SQLite file,
real transactions); the rest runs as in production."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from riskd.domain.events import OrderEvent, OrderEventKind
from riskd.errors import UnavailableError
from riskd.evidence.chain import verify
from riskd.evidence.log import DecisionLog
from riskd.pii import BlindIndexer, Keyring, SqlKeyStore, Vault
from riskd.service.logs import JsonFormatter
from riskd.sql import Database

from .conftest import (
    DEVICE,
    ID_NUMBER,
    IP,
    NAME,
    PHONE,
    STREET,
    lose_commit_answer,
    make_order,
    make_record,
    refuse_o2,
)

PII = (PHONE, NAME, ID_NUMBER, STREET, DEVICE, IP, "b-secret-buyer")
RESTARTED = "decision log writer failed; restarting it"
HOOK_FAILED = "decision log commit hook failed; the commit stands"


class Bug(Exception):
    """What the injected bug raises: its message quotes a buyer's PII, as a careless
    ``f"{order}"`` in a real bug would."""


def break_once(
    obj: object, name: str, monkeypatch: pytest.MonkeyPatch, times: int = 1
) -> list[int]:
    """Make ``obj.name`` raise ``Bug`` on its next ``times`` calls; returns the raise count."""
    real = getattr(obj, name)
    raised: list[int] = []

    def broken(*args: Any, **kwargs: Any) -> Any:
        if len(raised) < times:
            raised.append(1)
            raise Bug(f"buyer b-secret-buyer phone {PHONE} name {NAME}")
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, broken)
    return raised


def append_order(log: DecisionLog, order_id: str) -> None:
    order = make_order(order_id)
    order = replace(order, buyer=replace(order.buyer, buyer_id="b-secret-buyer"))
    log.append(make_record(order_id, request=log.protect(order)), order=order)


def stored_ids(db: Database) -> list[str]:
    return [str(r[0]) for r in db.query("SELECT order_id FROM decision_log ORDER BY seq")]


def json_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The records as ``riskd serve`` writes them (``riskd.service.logs``)."""
    formatter = JsonFormatter()
    return [formatter.format(r) for r in caplog.records]


def break_done(log: DecisionLog, vault: Vault, mp: pytest.MonkeyPatch) -> list[int]:
    return break_once(log, "_done", mp)  # the batch committed: its accounting raises


def break_reject(log: DecisionLog, vault: Vault, mp: pytest.MonkeyPatch) -> list[int]:
    refuse_o2(log.db)
    return break_once(log, "_reject", mp)  # setting aside the item the database refuses


def break_is_transient(log: DecisionLog, vault: Vault, mp: pytest.MonkeyPatch) -> list[int]:
    lose_commit_answer(log.db, mp)  # before writing again, the writer looks for its heads
    return break_once(log.db, "is_transient", mp)  # judging a COMMIT of unknown outcome


def break_landed(log: DecisionLog, vault: Vault, mp: pytest.MonkeyPatch) -> list[int]:
    lose_commit_answer(log.db, mp)
    return break_once(log, "_landed", mp)  # looking for the heads of that COMMIT


def break_adopt(log: DecisionLog, vault: Vault, mp: pytest.MonkeyPatch) -> list[int]:
    return break_once(vault, "adopt", mp)  # caching the data keys the batch committed


def break_digests(log: DecisionLog, vault: Vault, mp: pytest.MonkeyPatch) -> list[int]:
    return break_once(log, "_digests", mp)  # preparing the batch, before its transaction


def break_prepare_in(log: DecisionLog, vault: Vault, mp: pytest.MonkeyPatch) -> list[int]:
    return break_once(log, "_prepare_in", mp)  # in the batch's transaction, before COMMIT


Setup = Callable[[DecisionLog, Vault, pytest.MonkeyPatch], list[int]]
ALL = ["o-1", "o-2", "o-3", "o-4", "o-5"]
# what breaks; the decisions the table holds after (o-2 refused by the database: set aside)
CASES: dict[str, tuple[Setup, list[str]]] = {
    "_done": (break_done, ALL),
    "_reject": (break_reject, ["o-1", "o-3", "o-4", "o-5"]),
    "is_transient": (break_is_transient, ALL),
    "_landed": (break_landed, ALL),
    "adopt": (break_adopt, ALL),
    "_digests": (break_digests, ALL),
    "_prepare_in": (break_prepare_in, ALL),
}


@pytest.mark.parametrize("where", list(CASES))
def test_a_bug_in_the_writer_restarts_it_and_loses_or_doubles_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    where: str,
) -> None:
    """Review: an exception escaping ``_commit`` killed the thread, told only by a plain
    traceback on stderr quoting its message; the queue filled and every answer after
    went out unlogged. ``_landed`` raising was taken for a refusal of the items' data:
    decisions that had committed were written again (counted superseded), and so was a
    batch after whose commit ``vault.adopt`` raised. A bug raised while writing the batch,
    before its COMMIT (``_digests``, ``_prepare_in``), was taken for the database refusing
    the items' data: the batch was written again one item at a time, no restart counted
    or logged, and an item on which the bug recurred was set aside."""
    setup, expected = CASES[where]
    caplog.set_level(logging.INFO, logger="riskd.evidence.log")
    db = Database(tmp_path / "evidence.db")
    keyring = Keyring.generate()
    vault = Vault(keyring, SqlKeyStore(db))  # keys in the log's database, as riskd serve has it
    # max_batch=3 and a long gathering time: the first three appends make one batch
    log = DecisionLog(
        db, vault=vault, indexer=BlindIndexer(keyring), max_batch=3, flush_interval_s=10
    )
    raised = setup(log, vault, monkeypatch)
    append_order(log, "o-1")
    log.append_event(OrderEvent("o-1", OrderEventKind.REFUNDED, at=2.0))
    append_order(log, "o-2")
    log.flush(10)  # the bug struck during this batch's commit; the writer went on
    assert raised == [1]
    for order_id in ("o-3", "o-4", "o-5"):
        append_order(log, order_id)
    log.append_event(OrderEvent("o-4", OrderEventKind.PAID, at=3.0))
    log.close(10)
    monkeypatch.undo()

    assert stored_ids(db) == expected  # each once, in order
    assert len(log.events("o-1")) == 1 and len(log.events("o-4")) == 1
    assert log.superseded == 0 and log.rejected == len(ALL) - len(expected)
    assert log.unsealed == 0  # each stored decision has its ciphertexts
    sealed = db.query("SELECT DISTINCT order_id FROM decision_pii ORDER BY order_id")
    assert [str(r[0]) for r in sealed] == expected
    result = verify(db)
    assert result.ok and result.head["decision_log"][0] == len(expected)
    assert log.restarts == 1
    lines = json_lines(caplog)
    failed = [json.loads(line) for line in lines if RESTARTED in line]
    assert len(failed) == 1
    assert failed[0]["error"] == "Bug" and failed[0]["where"].split(":")[1] == "broken"
    assert any(f.startswith("riskd.evidence.log:_commit:") for f in failed[0]["frames"])
    for value in PII:
        assert all(value not in line for line in lines)


@pytest.mark.parametrize("where", ["_done", "_digests"])
def test_a_bug_that_recurs_is_retried_after_a_growing_pause_and_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """A deterministic bug costs a try after 0.1, 0.2, 0.4 ... s (at most 5 s), not a core;
    one line says so, not one per try; once it is gone the held batch commits, once. Before
    the commit (``_digests``) as after it: review, one raised before it had the item set
    aside, lost, as if the database refused it."""
    caplog.set_level(logging.INFO, logger="riskd.evidence.log")
    db = Database(tmp_path / "evidence.db")
    log = DecisionLog(db)
    raised = break_once(log, where, monkeypatch, times=10**9)
    append_order(log, "o-1")
    with pytest.raises(UnavailableError, match=r"timed out \(Bug\)"):
        log.flush(1.6)
    tries = len(raised)  # pauses of 0.1 + 0.2 + 0.4 + 0.8 s fit in 1.6 s: 5 tries at most
    assert 1 <= tries <= 5 and log.restarts == tries and log.rejected == 0
    monkeypatch.undo()  # the bug is fixed (hot): the next try goes through
    log.flush(10)
    append_order(log, "o-2")
    log.close(10)
    assert stored_ids(db) == ["o-1", "o-2"] and verify(db).ok
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said == [
        ("ERROR", RESTARTED),
        ("INFO", "decision log writer going again after a restart"),
    ]
    assert caplog.records[1].fields == {"restarts": log.restarts}  # type: ignore[attr-defined]


def test_close_returns_while_the_writer_waits_out_a_bug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database(tmp_path / "evidence.db")
    log = DecisionLog(db)
    break_once(log, "_done", monkeypatch, times=10**9)
    append_order(log, "o-1")
    with pytest.raises(UnavailableError, match="timed out"):
        log.close(1)
    log.close(1)  # closed: at once


def test_a_writer_that_hit_a_bug_then_hangs_in_the_database_no_longer_says_a_bug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: ``failing_on_a_bug`` stayed set while the restarted writer hung in a database
    that had stopped answering, so a stop took the database for answering and its
    catch-up waited 10 s more for it. A try begun clears it."""
    db = Database(tmp_path / "evidence.db")
    log = DecisionLog(db)
    answers = threading.Event()
    tries: list[int] = []
    write = log._write

    def bug_then_hang(*args: Any) -> Any:
        tries.append(1)
        if len(tries) == 1:
            raise Bug("a bug in the writer")
        answers.wait(10)  # the database does not answer
        return write(*args)

    monkeypatch.setattr(log, "_write", bug_then_hang)
    append_order(log, "o-1")
    deadline = time.monotonic() + 5
    while len(tries) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(tries) == 2 and log.restarts == 1
    assert not log.failing_on_a_bug
    answers.set()
    log.close(10)
    assert stored_ids(db) == ["o-1"] and not log.failing_on_a_bug


def test_a_commit_hook_that_raises_is_logged_and_counted_and_the_commit_stands(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Review: an exception from a commit hook (the scorer's end of an ``evidence_queue``
    outage) escaped the writer as a bug of its own: counted in ``restarts``, a pause after
    each commit, and the hooks after it never ran. The batch has committed then: it is
    not written again, the failure is counted in ``hook_failures`` and logged once (type
    and frames, no PII), and every other hook runs after each commit."""
    caplog.set_level(logging.INFO, logger="riskd.evidence.log")
    db = Database(tmp_path / "evidence.db")
    log = DecisionLog(db, max_batch=3, flush_interval_s=10)
    refuse_o2(db)  # the first batch is written one item at a time: a hook fails mid-batch

    def broken() -> None:
        raise Bug(f"buyer b-secret-buyer phone {PHONE} name {NAME}")

    calls: list[int] = []
    log.add_commit_hook(broken)
    log.add_commit_hook(lambda: calls.append(1))
    append_order(log, "o-1")
    log.append_event(OrderEvent("o-1", OrderEventKind.REFUNDED, at=2.0))
    append_order(log, "o-2")
    log.flush(10)
    for order_id in ("o-3", "o-4", "o-5"):
        append_order(log, order_id)
    log.close(10)

    assert stored_ids(db) == ["o-1", "o-3", "o-4", "o-5"]  # each once, in order
    assert len(log.events("o-1")) == 1 and verify(db).ok
    assert log.superseded == 0 and log.rejected == 1
    assert log.restarts == 0 and log.hook_failures == len(calls) >= 3  # o-1, its report, o-3..
    lines = json_lines(caplog)
    failed = [json.loads(line) for line in lines if HOOK_FAILED in line]
    assert len(failed) == 1 and not any(RESTARTED in line for line in lines)
    assert failed[0]["error"] == "Bug" and failed[0]["where"].split(":")[1] == "broken"
    for value in PII:
        assert all(value not in line for line in lines)
