"""``EvidenceService``: analysts' audited access to an order's PII (thin: convert, call, convert).

The principal recorded in the audit trail is the authenticated caller
(``riskd.service.auth.current_identity()``), never a request field; a call
without one is refused. Nothing here logs a request or a response: the
plaintext leaves the process only in the ``RevealOrderPii`` response, to a
caller the policy allows (analysts). ``RiskdError``s propagate to the error
interceptor, which maps ``.status`` to the gRPC code.

A reveal waits on the database's writer lock for its audit entry (another process
running ``riskd pii rotate``, a stalled replica): at most ``max_in_flight`` evidence
calls run at once, on RPC threads the server adds for them (``EVIDENCE_THREADS``); one
more is answered UNAVAILABLE at once (``riskd.service.slots``), so analysts never take
the threads the checkout's ``Score`` needs.
"""

from __future__ import annotations

import logging

import grpc

from riskd.errors import PermissionDeniedError
from riskd.evidence.access import AccessEntry, AccessOutcome, PiiAccess
from riskd.service.auth import current_identity
from riskd.service.gen.riskd.v1 import evidence_pb2 as pb
from riskd.service.gen.riskd.v1 import evidence_pb2_grpc as pb_grpc
from riskd.service.ledger import timestamp
from riskd.service.slots import Slots, bounded

log = logging.getLogger("riskd.service.evidence")

DEFAULT_PAGE = 100
MAX_IN_FLIGHT = 2  # evidence calls running at once (the server adds EVIDENCE_THREADS for them)

_OUTCOMES = {
    AccessOutcome.REVEALED: pb.PII_ACCESS_OUTCOME_REVEALED,
    AccessOutcome.NOT_FOUND: pb.PII_ACCESS_OUTCOME_NOT_FOUND,
    AccessOutcome.FORGOTTEN: pb.PII_ACCESS_OUTCOME_FORGOTTEN,
    AccessOutcome.UNREADABLE: pb.PII_ACCESS_OUTCOME_UNREADABLE,
}


def add_evidence_service(
    server: grpc.Server, access: PiiAccess, *, max_in_flight: int = MAX_IN_FLIGHT
) -> None:
    """Register ``riskd.v1.EvidenceService`` on ``server``, backed by ``access``."""
    servicer = EvidenceServicer(access, max_in_flight=max_in_flight)
    pb_grpc.add_EvidenceServiceServicer_to_server(servicer, server)


def entry_to_proto(e: AccessEntry) -> pb.PiiAccessEntry:
    return pb.PiiAccessEntry(
        seq=e.seq,
        order_id=e.order_id,
        at=timestamp(e.at),
        principal=e.principal,
        fields=list(e.fields),
        reason=e.reason,
        outcome=_OUTCOMES[e.outcome],
        hash=e.hash,
    )


class EvidenceServicer(pb_grpc.EvidenceServiceServicer):
    """Reveal an order's PII (audited) and read the audit trail."""

    def __init__(self, access: PiiAccess, *, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.slots = Slots(max_in_flight, "evidence")
        self._access = access

    @bounded
    def RevealOrderPii(
        self, request: pb.RevealOrderPiiRequest, context: grpc.ServicerContext
    ) -> pb.RevealOrderPiiResponse:
        identity = current_identity()
        if identity is None:
            raise PermissionDeniedError("revealing PII needs an authenticated caller")
        revealed = self._access.reveal(
            request.order_id, request.reason, identity.principal, tuple(request.fields)
        )
        # names only: which fields were revealed, never their values
        log.info(
            "pii revealed",
            extra={
                "fields": {
                    "order_id": revealed.order_id,
                    "principal": identity.principal,
                    "pii_fields": list(revealed.fields),
                    "audit_seq": revealed.entry.seq,
                }
            },
        )
        return pb.RevealOrderPiiResponse(
            order_id=revealed.order_id,
            pii=pb.OrderPii(**revealed.fields),
            access=entry_to_proto(revealed.entry),
        )

    @bounded
    def ListPiiAccess(
        self, request: pb.ListPiiAccessRequest, context: grpc.ServicerContext
    ) -> pb.ListPiiAccessResponse:
        entries = self._access.entries(
            request.order_id,
            after_seq=request.after_seq,
            limit=request.page_size or DEFAULT_PAGE,
        )
        return pb.ListPiiAccessResponse(entries=[entry_to_proto(e) for e in entries])
