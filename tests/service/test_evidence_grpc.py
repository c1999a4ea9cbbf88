"""EvidenceService through a real server: analysts reveal PII (audited); others are denied.

Real server on port 0 (SQLite evidence, the Vault), one bearer token per role; the
checkout gateway scores an order, the analyst reveals its PII, the auditor reads the
audit trail; then ``riskd pii forget`` (its own Vault, like its own process) shreds the
buyer and the next reveal is refused and recorded.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from riskd.cli import pii as pii_cli
from riskd.config import EVIDENCE_THREADS
from riskd.domain.order import Order
from riskd.evidence import access
from riskd.evidence.chain import verify
from riskd.service import convert
from riskd.service.gen.riskd.v1 import (
    evidence_pb2,
    evidence_pb2_grpc,
    scoring_pb2,
    scoring_pb2_grpc,
)
from riskd.service.server import RunningServer, create_server
from riskd.sql import Database
from tests.service.conftest import make_config
from tests.service.test_scoring import fresh
from tests.test_pii_canary import _parser

TOKENS = {"tok-analyst": "ts-1:analyst", "tok-audit": "au-1:auditor", "tok-gw": "gw:checkout"}


def as_(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[RunningServer]:
    server = create_server(make_config(tmp_path, auth={"tokens": TOKENS}))
    yield server
    server.stop(1)


def code_of(call: object, request: object, token: str) -> grpc.StatusCode:
    try:
        call(request, timeout=5, metadata=as_(token))  # type: ignore[operator]
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def trail_of(
    evidence: evidence_pb2_grpc.EvidenceServiceStub, **request: str | int
) -> list[evidence_pb2.PiiAccessEntry]:
    """The audit trail as an auditor lists it (``request``: ListPiiAccess's fields)."""
    listing = evidence_pb2.ListPiiAccessRequest(**request)  # type: ignore[arg-type]
    return list(evidence.ListPiiAccess(listing, timeout=5, metadata=as_("tok-audit")).entries)


def reveal(order_id: str, reason: str = "chargeback case 42") -> evidence_pb2.RevealOrderPiiRequest:
    return evidence_pb2.RevealOrderPiiRequest(order_id=order_id, reason=reason)


def scored(ch: grpc.Channel, running: RunningServer) -> Order:
    """A fresh order scored by the checkout gateway, its decision committed."""
    order = fresh()
    scoring_pb2_grpc.ScoringServiceStub(ch).Score(
        scoring_pb2.ScoreRequest(order=convert.order_to_proto(order)),
        timeout=5,
        metadata=as_("tok-gw"),
    )
    assert running.components.decision_log is not None
    running.components.decision_log.flush(5)
    return order


def hold_writer_lock(data_dir: Path) -> sqlite3.Connection:
    """Another process's transaction on the daemon's SQLite file (ROLLBACK and close it)."""
    holder = sqlite3.connect(data_dir / "riskd.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def test_analyst_reveals_and_every_access_is_audited(running: RunningServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        evidence = evidence_pb2_grpc.EvidenceServiceStub(ch)
        order = fresh()
        scoring_pb2_grpc.ScoringServiceStub(ch).Score(
            scoring_pb2.ScoreRequest(order=convert.order_to_proto(order)),
            timeout=5,
            metadata=as_("tok-gw"),
        )
        got = evidence.RevealOrderPii(
            reveal(order.order_id), timeout=5, metadata=as_("tok-analyst")
        )
        assert got.pii.phone == order.buyer.phone
        assert got.pii.name == order.buyer.name
        assert got.pii.id_number == order.buyer.id_number
        assert got.pii.address.endswith(order.buyer.address.detail)
        assert (got.pii.device, got.pii.ip) == (order.device_id, order.ip)
        assert got.access.principal == "token:ts-1"
        assert got.access.outcome == evidence_pb2.PII_ACCESS_OUTCOME_REVEALED

        # denied before the servicer: nothing decrypted, nothing recorded
        assert code_of(evidence.RevealOrderPii, reveal(order.order_id), "tok-audit") == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        assert code_of(evidence.RevealOrderPii, reveal(order.order_id), "tok-gw") == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        listing = evidence_pb2.ListPiiAccessRequest(order_id=order.order_id)
        assert code_of(evidence.ListPiiAccess, listing, "tok-gw") == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        trail = evidence.ListPiiAccess(listing, timeout=5, metadata=as_("tok-audit")).entries
        assert [(e.principal, e.reason, list(e.fields)) for e in trail] == [
            (
                "token:ts-1",
                "chargeback case 42",
                ["phone", "name", "id_number", "address", "device", "ip"],
            )
        ]
        assert trail[0].hash == got.access.hash and trail[0].at.seconds > 0
        assert order.buyer.phone not in str(trail)  # auditors never see plaintext

        with pytest.raises(grpc.RpcError) as e:
            evidence.RevealOrderPii(
                reveal(order.order_id, ""), timeout=5, metadata=as_("tok-analyst")
            )
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "reason" in (e.value.details() or "")
        with pytest.raises(grpc.RpcError) as e:
            evidence.RevealOrderPii(reveal("o-nope"), timeout=5, metadata=as_("tok-analyst"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        outcomes = [
            x.outcome
            for x in evidence.ListPiiAccess(
                evidence_pb2.ListPiiAccessRequest(), timeout=5, metadata=as_("tok-analyst")
            ).entries
        ]
        assert outcomes == [
            evidence_pb2.PII_ACCESS_OUTCOME_REVEALED,
            evidence_pb2.PII_ACCESS_OUTCOME_NOT_FOUND,
        ]


def test_forgotten_buyer_is_refused_and_nothing_is_decrypted(
    running: RunningServer, tmp_path: Path
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        evidence = evidence_pb2_grpc.EvidenceServiceStub(ch)
        order = fresh()
        scoring_pb2_grpc.ScoringServiceStub(ch).Score(
            scoring_pb2.ScoreRequest(order=convert.order_to_proto(order)),
            timeout=5,
            metadata=as_("tok-gw"),
        )
        # the first reveal waits for the decision's commit and warms the server's key cache
        evidence.RevealOrderPii(reveal(order.order_id), timeout=5, metadata=as_("tok-analyst"))
        parser = _parser(pii_cli)
        args = parser.parse_args(
            [
                "pii",
                "forget",
                order.buyer.buyer_id,
                "--keyring",
                str(tmp_path / "keyring.json"),
                "--database",
                f"sqlite:///{tmp_path / 'riskd.db'}",
            ]
        )
        assert args.func(args) == 0
        with pytest.raises(grpc.RpcError) as e:
            evidence.RevealOrderPii(reveal(order.order_id), timeout=5, metadata=as_("tok-analyst"))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "forgotten" in (e.value.details() or "")
        assert order.buyer.phone not in (e.value.details() or "")
        trail = trail_of(evidence, order_id=order.order_id)
        assert [x.outcome for x in trail] == [
            evidence_pb2.PII_ACCESS_OUTCOME_REVEALED,
            evidence_pb2.PII_ACCESS_OUTCOME_FORGOTTEN,
        ]
    db = Database(f"sqlite:///{tmp_path / 'riskd.db'}")
    try:
        deadline = time.monotonic() + 5
        while not (result := verify(db)).ok and time.monotonic() < deadline:
            time.sleep(0.1)
        assert result.ok and result.head["pii_access_log"][0] == 2
    finally:
        db.close()


def test_a_held_database_lock_never_starves_scoring(tmp_path: Path) -> None:
    """Another process (``riskd pii rotate``, a stalled replica) holds the SQLite file's
    writer lock: analysts' reveals wait on it for their audit entry, but at most
    ``EVIDENCE_THREADS`` of them at once; the rest are refused at once (UNAVAILABLE), and
    the checkout's Score on the same server still answers promptly meanwhile."""

    running = create_server(make_config(tmp_path, auth={"tokens": TOKENS}))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            evidence = evidence_pb2_grpc.EvidenceServiceStub(ch)
            scoring = scoring_pb2_grpc.ScoringServiceStub(ch)

            def score() -> float:
                started = time.monotonic()
                request = scoring_pb2.ScoreRequest(order=convert.order_to_proto(fresh()))
                scoring.Score(request, timeout=2, metadata=as_("tok-gw"))
                return time.monotonic() - started

            order = scored(ch, running)
            holder = hold_writer_lock(tmp_path)
            reveals = [
                evidence.RevealOrderPii.future(
                    reveal(order.order_id), timeout=8, metadata=as_("tok-analyst")
                )
                for _ in range(12)
            ]
            time.sleep(0.3)  # the admitted ones are waiting for the lock
            assert score() < 0.5
            refused = [f for f in reveals if f.done() and f.code() == grpc.StatusCode.UNAVAILABLE]
            # reading the trail takes an evidence slot too: no thread beyond EVIDENCE_THREADS
            listing = evidence_pb2.ListPiiAccessRequest(order_id=order.order_id)
            assert code_of(evidence.ListPiiAccess, listing, "tok-audit") == (
                grpc.StatusCode.UNAVAILABLE
            )
            holder.execute("ROLLBACK")
            holder.close()
            answered = [f for f in reveals if f.code() == grpc.StatusCode.OK]
            assert len(refused) == 12 - EVIDENCE_THREADS
            assert all("evidence busy" in f.details() for f in refused)
            assert len(answered) == EVIDENCE_THREADS
            again = evidence.RevealOrderPii(
                reveal(order.order_id), timeout=5, metadata=as_("tok-analyst")
            )
            assert again.pii.phone == order.buyer.phone
    finally:
        running.stop(1)


def test_a_reveal_against_a_held_database_is_unavailable_within_its_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit entry comes first: while another process holds the SQLite file's writer
    lock a reveal waits at most ``AUDIT_WAIT_S`` and is then UNAVAILABLE, nothing revealed
    and nothing recorded (not held for every retry's 30 s busy timeout, then INTERNAL)."""

    monkeypatch.setattr(access, "AUDIT_WAIT_S", 0.3)
    running = create_server(make_config(tmp_path, auth={"tokens": TOKENS}))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            evidence = evidence_pb2_grpc.EvidenceServiceStub(ch)
            order = scored(ch, running)
            holder = hold_writer_lock(tmp_path)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                evidence.RevealOrderPii(
                    reveal(order.order_id), timeout=10, metadata=as_("tok-analyst")
                )
            assert time.monotonic() - started < 2
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "nothing was revealed" in (refused.value.details() or "")
            holder.execute("ROLLBACK")
            holder.close()
            got = evidence.RevealOrderPii(
                reveal(order.order_id), timeout=5, metadata=as_("tok-analyst")
            )
            assert got.pii.phone == order.buyer.phone
            trail = trail_of(evidence, order_id=order.order_id)
            assert [e.seq for e in trail] == [got.access.seq]
    finally:
        running.stop(1)


def test_a_reveal_reason_holding_pii_is_refused_and_recorded_nowhere(
    running: RunningServer,
) -> None:
    """The reason is chained into ``pii_access_log`` in clear, for good."""
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        evidence = evidence_pb2_grpc.EvidenceServiceStub(ch)
        order = scored(ch, running)
        with pytest.raises(grpc.RpcError) as e:
            evidence.RevealOrderPii(
                reveal(order.order_id, "buyer phoned from 139 8765 4321"),
                timeout=5,
                metadata=as_("tok-analyst"),
            )
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == (
            "reason: looks like it holds a mobile phone number; "
            "free text must not carry personal data"
        )
        trail = evidence.ListPiiAccess(
            evidence_pb2.ListPiiAccessRequest(), timeout=5, metadata=as_("tok-audit")
        ).entries
        assert list(trail) == []


def test_an_unknown_field_to_reveal_is_named_by_its_place_never_its_text(
    running: RunningServer,
) -> None:
    """Review: ``fields: unknown field '13912345678'``: an analyst who pasted a phone number
    into ``fields`` got it back in the error (riskd's errors never quote a value)."""
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        evidence = evidence_pb2_grpc.EvidenceServiceStub(ch)
        order = scored(ch, running)
        request = reveal(order.order_id)
        request.fields.extend(["phone", "13912345678"])
        with pytest.raises(grpc.RpcError) as e:
            evidence.RevealOrderPii(request, timeout=5, metadata=as_("tok-analyst"))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == (
            "fields[1]: unknown field; expected some of phone, name, id_number, address, device, ip"
        )
        trail = evidence.ListPiiAccess(
            evidence_pb2.ListPiiAccessRequest(), timeout=5, metadata=as_("tok-audit")
        ).entries
        assert list(trail) == []  # refused before the audit trail: nothing revealed


def test_the_audit_trail_pages_by_order_after_seq_and_page_size(
    running: RunningServer, tmp_path: Path
) -> None:
    """Auditors page the trail: one order's entries or all, after ``after_seq``, at most
    ``page_size`` (0: 100); each entry names its order, its place in the chain (the seq
    and hash ``riskd evidence verify`` reports) and only the fields that were asked for."""
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        evidence = evidence_pb2_grpc.EvidenceServiceStub(ch)
        first, second = scored(ch, running), scored(ch, running)
        phone_only = reveal(first.order_id)
        phone_only.fields.append("phone")
        got = evidence.RevealOrderPii(phone_only, timeout=5, metadata=as_("tok-analyst"))
        assert got.order_id == first.order_id
        assert (got.pii.phone, got.pii.name, got.pii.ip) == (first.buyer.phone, "", "")
        for order in (second, first, first):
            evidence.RevealOrderPii(reveal(order.order_id), timeout=5, metadata=as_("tok-analyst"))

        trail = trail_of(evidence)
        seqs = [e.seq for e in trail]
        assert seqs == sorted(set(seqs)) and len(seqs) == 4 and seqs[0] > 0
        assert (seqs[0], trail[0].hash) == (got.access.seq, got.access.hash)
        assert [e.order_id for e in trail] == [
            first.order_id,
            second.order_id,
            *[first.order_id] * 2,
        ]
        assert [list(e.fields) for e in trail][:2] == [["phone"], list(access.PII_FIELDS)]

        def seqs_of(**request: str | int) -> list[int]:
            return [e.seq for e in trail_of(evidence, **request)]

        assert seqs_of(order_id=first.order_id) == [seqs[0], seqs[2], seqs[3]]
        assert seqs_of(order_id=first.order_id, after_seq=seqs[0], page_size=1) == [seqs[2]]
        assert seqs_of(after_seq=seqs[1]) == seqs[2:]
        with pytest.raises(grpc.RpcError) as e:
            trail_of(evidence, page_size=access.MAX_PAGE + 1)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (e.value.details() or "").startswith("page_size")
    db = Database(f"sqlite:///{tmp_path / 'riskd.db'}")
    try:
        assert verify(db).head["pii_access_log"] == (trail[-1].seq, trail[-1].hash)
    finally:
        db.close()


def test_a_ciphertext_that_does_not_decrypt_is_refused_and_listed_as_unreadable(
    running: RunningServer, tmp_path: Path
) -> None:
    """An altered ciphertext is ``UNREADABLE`` in the trail (not NOT_FOUND, not FORGOTTEN:
    the auditor tells a damaged store from a shredded buyer); nothing is revealed."""
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        evidence = evidence_pb2_grpc.EvidenceServiceStub(ch)
        order = scored(ch, running)
        other = sqlite3.connect(tmp_path / "riskd.db", isolation_level=None)
        try:
            [(ct,)] = other.execute(
                "SELECT ciphertext FROM decision_pii WHERE order_id = ? AND field = 'phone'",
                (order.order_id,),
            ).fetchall()
            other.execute(
                "UPDATE decision_pii SET ciphertext = ? WHERE order_id = ? AND field = 'phone'",
                (bytes(ct[:-1]) + bytes([ct[-1] ^ 0x01]), order.order_id),
            )
        finally:
            other.close()
        request = reveal(order.order_id)
        request.fields.append("phone")
        with pytest.raises(grpc.RpcError) as e:
            evidence.RevealOrderPii(request, timeout=5, metadata=as_("tok-analyst"))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert order.buyer.phone not in (e.value.details() or "")
        trail = trail_of(evidence, order_id=order.order_id)
        assert [x.outcome for x in trail] == [evidence_pb2.PII_ACCESS_OUTCOME_UNREADABLE]
