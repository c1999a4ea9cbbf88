"""The workers' recent answers, kept by the gRPC process for a while so that a retry gets them.

Where it sits: the ``PooledScoringServicer`` (``riskd.service.router``) keeps each answer a
worker gave, unary or a batch's, and looks a retry up here before it routes it: a worker's
decision is not committed yet when it answers, and a retry that cannot reach that worker
would be decided a second time elsewhere (``riskd.service.workers``, "Retries").
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol

from riskd.engine.scorer import scored_for_other_content
from riskd.evidence.request import protect_order, same_order
from riskd.service import convert, validate
from riskd.service.gen.riskd.v1 import order_pb2, scoring_pb2

RECENT_KEEP_S = 2.0  # how long the gRPC process keeps a worker's answer for retries
RECENT_MAX = 20_000  # answers kept at most (the oldest go first)
RECENT_MAX_BYTES = 64 << 20  # and at most this many bytes of orders


class _Source(Protocol):
    """The worker an answer came from (``Worker``): its kept answers last while it lives."""

    @property
    def alive(self) -> bool: ...


class RecentAnswers:
    """The workers' recent answers, unary or a batch's, by order id: the order's bytes and
    the decision, each for ``RECENT_KEEP_S`` (at most ``RECENT_MAX`` answers and
    ``RECENT_MAX_BYTES`` of orders).

    A worker answers before its decision-log writer commits the decision (it gathers a
    batch, and waits while another process holds the database): meanwhile only that
    worker can find it, and a retry that cannot have that worker (busy, stalled, down)
    would be decided again elsewhere. So the gRPC process answers such a retry itself.
    An answer is replayed only while the worker that gave it is alive: one that died or
    was taken out (and is killed) lost what its log had not committed, so a retry goes
    to the log (a committed decision is replayed from there) or is decided again and
    recorded, never answered with a decision nobody records.
    The decisions kept are the answers' own messages, not copies (a replay is a copy):
    nothing may change an answer once it is built.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: OrderedDict[str, tuple[float, bytes, scoring_pb2.Decision, _Source]] = (
            OrderedDict()
        )
        self._bytes = 0  # of the orders kept

    def put(self, answers: Iterable[tuple[bytes, scoring_pb2.Decision]], source: _Source) -> None:
        """Keep ``(order bytes, decision)`` answers of worker ``source``. Callers leave out
        those the worker's log did not take (its queue full): a retry of such an order is
        scored again, as in one process, so that a process records it."""
        now = time.monotonic()
        kept = self._kept
        with self._lock:
            for order, decision in answers:
                old = kept.pop(decision.order_id, None)
                if old is not None:
                    self._bytes -= len(old[1])
                kept[decision.order_id] = (now + RECENT_KEEP_S, order, decision, source)
                self._bytes += len(order)
            while kept:
                oldest = next(iter(kept.values()))
                full = len(kept) > RECENT_MAX or self._bytes > RECENT_MAX_BYTES
                if oldest[0] > now and not full:
                    break
                self._bytes -= len(kept.popitem(last=False)[1][1])

    def replay(
        self, order: order_pb2.Order, order_bytes: bytes, where: Callable[[], str]
    ) -> scoring_pb2.Decision | None:
        """A copy of the decision kept for ``order`` (``order_bytes``: its bytes), marked
        ``replayed``; else None (none kept, or its worker is gone).

        Raises:
            InvalidArgumentError: the order is bad (as a worker would say).
            AlreadyExistsError: the id was answered for other order content (``where()``:
                ``order`` or ``orders[i]``).
        """
        with self._lock:
            kept = self._kept.get(order.order_id)
        if kept is None or kept[0] <= time.monotonic() or not kept[3].alive:
            return None
        if kept[1] != order_bytes:  # other bytes: the same order if its protected form is
            field = where()
            mine = convert.order_from_proto(order, field)
            validate.validate_order(mine, field)
            first = convert.order_from_proto(order_pb2.Order.FromString(kept[1]))
            if not same_order(protect_order(mine), protect_order(first)):
                raise scored_for_other_content(field)
        decision = scoring_pb2.Decision()
        decision.CopyFrom(kept[2])
        decision.replayed = True  # counted once, when it was made
        return decision
