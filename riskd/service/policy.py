"""The access table: which roles may call each method, and what a call costs.

Roles: ``checkout`` (score, report outcomes), ``analyst`` (cases, replay,
penalties, compensation, decrypting a case's PII), ``auditor`` (reports and
verification, masked PII only), ``operator`` (fund top-ups, key rotation,
configuration). ``PUBLIC`` in a policy entry lets anyone call (health checks).

Where it sits: ``AuthInterceptor`` (``riskd.service.auth``) applies it to each call; the
``[auth]`` settings (``riskd.service.callers``) grant these roles.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from riskd.service.interceptors import Refused, Undecodable

CHECKOUT: Final = "checkout"
ANALYST: Final = "analyst"
AUDITOR: Final = "auditor"
OPERATOR: Final = "operator"
ROLES: Final = frozenset({CHECKOUT, ANALYST, AUDITOR, OPERATOR})
PUBLIC: Final = "public"
"""Pseudo-role in ``POLICY``: the method needs no credentials."""

_SCORING = "/riskd.v1.ScoringService/"
_LEDGER = "/riskd.v1.LedgerService/"
_EVIDENCE = "/riskd.v1.EvidenceService/"
_HEALTH = "/grpc.health.v1.Health/"

POLICY: dict[str, frozenset[str]] = {
    _SCORING + "Score": frozenset({CHECKOUT}),
    _SCORING + "ScoreBatch": frozenset({CHECKOUT}),
    _SCORING + "ReportOutcome": frozenset({CHECKOUT}),
    # Money moves: merchants' deposits and the fund are the platform operator's business;
    # penalties and compensation follow an analyst's case; statements are read-only.
    _LEDGER + "RegisterShop": frozenset({OPERATOR}),
    _LEDGER + "Deposit": frozenset({OPERATOR}),
    _LEDGER + "Withdraw": frozenset({OPERATOR}),
    _LEDGER + "TopUpFund": frozenset({OPERATOR}),
    _LEDGER + "CollectClaim": frozenset({OPERATOR}),
    _LEDGER + "WriteOffClaim": frozenset({OPERATOR}),
    _LEDGER + "UnfreezeShop": frozenset({OPERATOR}),
    _LEDGER + "PenalizeShop": frozenset({ANALYST}),
    _LEDGER + "OpenDispute": frozenset({ANALYST}),
    _LEDGER + "CompensateBuyer": frozenset({ANALYST}),
    _LEDGER + "PayLateShipmentCoupon": frozenset({ANALYST, OPERATOR}),
    _LEDGER + "GetAccountStatement": frozenset({ANALYST, AUDITOR, OPERATOR}),
    _LEDGER + "GetShopStatement": frozenset({ANALYST, AUDITOR, OPERATOR}),
    _LEDGER + "GetDisputeStatement": frozenset({ANALYST, AUDITOR, OPERATOR}),
    _LEDGER + "ListAccounts": frozenset({ANALYST, AUDITOR, OPERATOR}),
    _LEDGER + "VerifyLedger": frozenset({AUDITOR, OPERATOR}),
    # Decrypting a decision's PII is an analyst's audited act; auditors read the audit
    # trail (which holds no PII), never the plaintext.
    _EVIDENCE + "RevealOrderPii": frozenset({ANALYST}),
    _EVIDENCE + "ListPiiAccess": frozenset({ANALYST, AUDITOR}),
    _HEALTH + "Check": frozenset({PUBLIC}),
    _HEALTH + "Watch": frozenset({PUBLIC}),
    # These name every service and message: any known caller (grpcurl and friends), never
    # an unauthenticated one.
    _HEALTH + "List": ROLES,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": ROLES,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": ROLES,
}
"""Full gRPC method name → roles allowed to call it. Anything not listed is denied."""

UNMETERED: Final = frozenset({_HEALTH + "Check"})
"""``PUBLIC`` methods no rate limit applies to: a health check is cheaper to answer than to
refuse, and a load balancer's checks share their address (an L7 proxy's) with every client
behind it, so a bucket per address let a neighbour's flood get the backend ejected
(review). A ``Watch`` stays bounded: it opens a stream."""


MAX_STREAMS_PER_PEER: Final = 32
"""Streaming calls (health ``Watch``, reflection) one peer host may keep open at once."""


REFUSED_BYTES_PER_TOKEN: Final = 1024
"""A batch refused unparsed (``riskd.service.interceptors.Refused``: too large, too many
orders or items) or unparsable (``Undecodable``) costs a token per this many of its bytes
(a checkout order is ~0.3–1 KB), as it would have per order; reading and refusing one
costs at most ~0.5 ms of CPU per token (``benchmarks/load/screen_cost.py``)."""


def _orders(request: Any) -> int:
    if isinstance(request, Refused):
        return request.size // REFUSED_BYTES_PER_TOKEN
    if isinstance(request, Undecodable):
        return len(request.data) // REFUSED_BYTES_PER_TOKEN
    return len(getattr(request, "orders", ()))


COSTS: Final[Mapping[str, Callable[[Any], int]]] = {_SCORING + "ScoreBatch": _orders}
"""Methods whose call spends more than one rate-limit token: ``ScoreBatch`` one per order,
capped at the caller's burst (so a batch is never refused for its size alone)."""
