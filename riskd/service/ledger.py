"""``LedgerService``: the gRPC face of ``riskd.ledger.Book`` (thin: convert, call, convert).

The actor recorded on every transfer is the authenticated caller
(``riskd.service.auth.current_identity()``: ``cert:<CN>`` or ``token:<name>``),
never a request field, so the journal says who moved the money. ``RiskdError``s
propagate to the error interceptor, which maps ``.status`` to the gRPC code.

Ledger calls share the server's RPC threads with scoring. At most
``max_in_flight`` (default ``MAX_IN_FLIGHT``) run at once; one more is answered
UNAVAILABLE at once (retry with the same idempotency key) rather than queued on
a thread (``riskd.service.slots``), so a stalled ledger (another replica holding
the ledger lock, a slow database) never takes the threads scoring needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from riskd.errors import InvalidArgumentError
from riskd.ledger import Account, Book, Receipt, Transfer
from riskd.service.auth import current_identity
from riskd.service.gen.riskd.v1 import ledger_pb2 as pb
from riskd.service.gen.riskd.v1 import ledger_pb2_grpc as pb_grpc
from riskd.service.slots import Slots, bounded

ANONYMOUS = "anonymous"
MAX_IN_FLIGHT = 2  # ledger calls running at once (the server adds LEDGER_THREADS for them)

ActorOf = Callable[[grpc.ServicerContext], str]


def caller(context: grpc.ServicerContext) -> str:
    """The authenticated principal of this call, or ``anonymous``."""
    identity = current_identity()
    return identity.principal if identity is not None else ANONYMOUS


# GetAccountStatement and ListAccounts stop where their reply would pass the server's
# send limit (review: 1,500 transfers with 1,000-character reasons, or 15,000 accounts,
# were RESOURCE_EXHAUSTED, and ListAccounts had no way to page)
DEFAULT_MAX_REPLY_BYTES = 4 * 1024 * 1024
_M = TypeVar("_M", bound=Message)


def add_ledger_service(
    server: grpc.Server,
    book: Book,
    *,
    actor_of: ActorOf = caller,
    max_in_flight: int = MAX_IN_FLIGHT,
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
) -> None:
    """Register ``riskd.v1.LedgerService`` on ``server``, backed by ``book``;
    ``max_reply_bytes``: the server's send limit (``max_message_bytes``)."""
    servicer = LedgerServicer(
        book, actor_of, max_in_flight=max_in_flight, max_reply_bytes=max_reply_bytes
    )
    pb_grpc.add_LedgerServiceServicer_to_server(servicer, server)


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(round(seconds * 1e9))
    return ts


REPLY_MARGIN_BYTES = 64 * 1024  # the account and the framing around the list


def _fitting(items: list[_M], budget: int) -> tuple[list[_M], bool]:
    """The first ``items`` whose encoded size (each with its field tag and length) stays
    within ``budget``; True when some were left out."""
    used = 0
    for i, item in enumerate(items):
        used += item.ByteSize() + 6
        if used > budget and i > 0:
            return items[:i], True
    return items, False


def transfer_to_proto(t: Transfer) -> pb.Transfer:
    return pb.Transfer(
        id=t.id,
        debit_account=t.debit_account,
        credit_account=t.credit_account,
        amount_fen=t.amount,
        code=int(t.code),  # type: ignore[arg-type]
        ref=t.ref,
        idempotency_key=t.request_key,
        actor=t.actor,
        reason=t.reason,
        evidence=t.evidence,
        posted_at=timestamp(t.at),
        seq=t.seq,
    )


def receipt_to_proto(r: Receipt) -> pb.Receipt:
    msg = pb.Receipt(
        idempotency_key=r.key,
        operation=r.operation,
        transfers=[transfer_to_proto(t) for t in r.transfers],
        replayed=r.replayed,
    )
    if r.frozen_until:
        msg.frozen_until.CopyFrom(timestamp(r.frozen_until))
    return msg


def account_to_proto(a: Account) -> pb.Account:
    return pb.Account(
        id=a.id,
        kind=a.kind.value,
        debits_fen=a.debits,
        credits_fen=a.credits,
        balance_fen=a.balance,
        shop_id=a.shop_id,
    )


class LedgerServicer(pb_grpc.LedgerServiceServicer):
    """One method per RPC; each is a conversion around one ``Book`` call."""

    def __init__(
        self,
        book: Book,
        actor_of: ActorOf = caller,
        *,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
    ) -> None:
        self.slots = Slots(max_in_flight, "ledger")
        self._book = book
        self._actor_of = actor_of
        # what a list reply may hold: the send limit less room for the rest of it (half of
        # a limit below twice the margin: the margin's floor passed a small limit; review)
        self._reply_budget = max(max_reply_bytes - REPLY_MARGIN_BYTES, max_reply_bytes // 2)

    @bounded
    def RegisterShop(
        self, request: pb.RegisterShopRequest, context: grpc.ServicerContext
    ) -> pb.RegisterShopResponse:
        created = self._book.register_shop(request.shop_id, merchant_id=request.merchant_id)
        return pb.RegisterShopResponse(created=created)

    @bounded
    def Deposit(
        self, request: pb.DepositRequest, context: grpc.ServicerContext
    ) -> pb.DepositResponse:
        r = self._book.deposit(
            request.idempotency_key,
            request.shop_id,
            request.amount_fen,
            actor=self._actor_of(context),
            reason=request.reason,
        )
        return pb.DepositResponse(receipt=receipt_to_proto(r))

    @bounded
    def Withdraw(
        self, request: pb.WithdrawRequest, context: grpc.ServicerContext
    ) -> pb.WithdrawResponse:
        r = self._book.withdraw(
            request.idempotency_key,
            request.shop_id,
            request.amount_fen,
            actor=self._actor_of(context),
            reason=request.reason,
        )
        return pb.WithdrawResponse(receipt=receipt_to_proto(r))

    @bounded
    def TopUpFund(
        self, request: pb.TopUpFundRequest, context: grpc.ServicerContext
    ) -> pb.TopUpFundResponse:
        r = self._book.top_up_fund(
            request.idempotency_key,
            request.amount_fen,
            actor=self._actor_of(context),
            reason=request.reason,
            evidence=request.evidence,
        )
        return pb.TopUpFundResponse(receipt=receipt_to_proto(r))

    @bounded
    def PenalizeShop(
        self, request: pb.PenalizeShopRequest, context: grpc.ServicerContext
    ) -> pb.PenalizeShopResponse:
        r = self._book.penalize_shop(
            request.idempotency_key,
            request.shop_id,
            request.violation,
            request.case_id,
            evidence=request.evidence,
            actor=self._actor_of(context),
            reason=request.reason,
        )
        return pb.PenalizeShopResponse(receipt=receipt_to_proto(r))

    @bounded
    def UnfreezeShop(
        self, request: pb.UnfreezeShopRequest, context: grpc.ServicerContext
    ) -> pb.UnfreezeShopResponse:
        r = self._book.unfreeze(
            request.idempotency_key,
            request.shop_id,
            actor=self._actor_of(context),
            reason=request.reason,
        )
        return pb.UnfreezeShopResponse(receipt=receipt_to_proto(r))

    @bounded
    def OpenDispute(
        self, request: pb.OpenDisputeRequest, context: grpc.ServicerContext
    ) -> pb.OpenDisputeResponse:
        r = self._book.open_dispute(
            request.idempotency_key,
            request.dispute_id,
            request.shop_id,
            request.order_id,
            request.order_amount_fen,
            actor=self._actor_of(context),
            reason=request.reason,
        )
        return pb.OpenDisputeResponse(receipt=receipt_to_proto(r))

    @bounded
    def CompensateBuyer(
        self, request: pb.CompensateBuyerRequest, context: grpc.ServicerContext
    ) -> pb.CompensateBuyerResponse:
        r = self._book.compensate_buyer(
            request.idempotency_key,
            request.dispute_id,
            request.amount_fen,
            actor=self._actor_of(context),
            reason=request.reason,
            evidence=request.evidence,
        )
        return pb.CompensateBuyerResponse(receipt=receipt_to_proto(r))

    @bounded
    def PayLateShipmentCoupon(
        self, request: pb.PayLateShipmentCouponRequest, context: grpc.ServicerContext
    ) -> pb.PayLateShipmentCouponResponse:
        r = self._book.pay_late_shipment_coupon(
            request.idempotency_key,
            request.shop_id,
            request.order_id,
            actor=self._actor_of(context),
            evidence=request.evidence,
        )
        return pb.PayLateShipmentCouponResponse(receipt=receipt_to_proto(r))

    @bounded
    def CollectClaim(
        self, request: pb.CollectClaimRequest, context: grpc.ServicerContext
    ) -> pb.CollectClaimResponse:
        r = self._book.collect_claim(
            request.idempotency_key,
            request.shop_id,
            request.amount_fen,
            actor=self._actor_of(context),
            ref=request.ref,
            reason=request.reason,
        )
        return pb.CollectClaimResponse(receipt=receipt_to_proto(r))

    @bounded
    def WriteOffClaim(
        self, request: pb.WriteOffClaimRequest, context: grpc.ServicerContext
    ) -> pb.WriteOffClaimResponse:
        r = self._book.write_off_claim(
            request.idempotency_key,
            request.shop_id,
            request.ref,
            actor=self._actor_of(context),
            reason=request.reason,
            amount=request.amount_fen,
        )
        return pb.WriteOffClaimResponse(receipt=receipt_to_proto(r))

    @bounded
    def GetAccountStatement(
        self, request: pb.GetAccountStatementRequest, context: grpc.ServicerContext
    ) -> pb.GetAccountStatementResponse:
        s = self._book.account_statement(
            request.account_id, after_seq=request.after_seq, limit=request.limit or 100
        )
        transfers, truncated = _fitting(
            [transfer_to_proto(t) for t in s.transfers], self._reply_budget
        )
        return pb.GetAccountStatementResponse(
            account=account_to_proto(s.account), transfers=transfers, truncated=truncated
        )

    @bounded
    def GetShopStatement(
        self, request: pb.GetShopStatementRequest, context: grpc.ServicerContext
    ) -> pb.GetShopStatementResponse:
        s = self._book.shop_statement(request.shop_id)
        msg = pb.GetShopStatementResponse(
            shop_id=s.shop_id,
            merchant_id=s.merchant_id,
            deposit_fen=s.deposit,
            owed_fen=s.owed,
            claims=[pb.Claim(ref=c.ref, outstanding_fen=c.outstanding) for c in s.claims],
            frozen=s.frozen,
            penalties=s.penalties,
        )
        if s.frozen_until:
            msg.frozen_until.CopyFrom(timestamp(s.frozen_until))
        return msg

    @bounded
    def GetDisputeStatement(
        self, request: pb.GetDisputeStatementRequest, context: grpc.ServicerContext
    ) -> pb.GetDisputeStatementResponse:
        d = self._book.dispute_statement(request.dispute_id)
        return pb.GetDisputeStatementResponse(
            dispute_id=d.dispute_id,
            shop_id=d.shop_id,
            order_id=d.order_id,
            order_amount_fen=d.order_amount,
            paid_fen=d.paid,
            recovered_from_deposit_fen=d.recovered_from_deposit,
            collected_fen=d.collected,
            written_off_fen=d.written_off,
            outstanding_fen=d.outstanding,
            transfers=[transfer_to_proto(t) for t in d.transfers],
        )

    @bounded
    def ListAccounts(
        self, request: pb.ListAccountsRequest, context: grpc.ServicerContext
    ) -> pb.ListAccountsResponse:
        if request.limit < 0:
            raise InvalidArgumentError("limit", "must not be negative")
        rest = sorted(
            (a for a in self._book.accounts() if a.id > request.after_id), key=lambda a: a.id
        )
        page = rest[: request.limit] if request.limit else rest
        accounts, _ = _fitting([account_to_proto(a) for a in page], self._reply_budget)
        more = len(accounts) < len(rest)
        return pb.ListAccountsResponse(
            accounts=accounts, next_after_id=accounts[-1].id if more and accounts else ""
        )

    @bounded
    def VerifyLedger(
        self, request: pb.VerifyLedgerRequest, context: grpc.ServicerContext
    ) -> pb.VerifyLedgerResponse:
        return pb.VerifyLedgerResponse(problems=list(self._book.verify()))
