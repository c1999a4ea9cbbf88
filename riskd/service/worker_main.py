"""A scoring worker process: ``python -m riskd.service.worker_main FD``, started by the pool.

Where it sits: one of the ``score_workers`` processes beside the gRPC process
(``riskd.service.pool`` starts it); it reads its configuration and rules from the socket
pair ``FD`` (``riskd.service.channel``), builds the components one process builds, and
answers the gRPC process's calls (``Score``, ``ScoreBatch``, ``Rules``, ``Stats``) until it
is told to stop. The design: ``riskd.service.workers``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import json
import logging
import os
import pickle
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from riskd.config import Config
from riskd.domain.clock import SystemClock
from riskd.dsl.holder import RulesState
from riskd.errors import DeadlineExceededError, RiskdError
from riskd.service.channel import Channel
from riskd.service.gen.riskd.v1 import scoring_pb2
from riskd.service.logs import configure_logging, install_hooks
from riskd.service.metrics import Metrics
from riskd.service.scoring import ScoringServicer
from riskd.service.wiring import Components, build_components

# one logger for every line about the scoring workers, wherever the code that writes it lives
log = logging.getLogger("riskd.service.workers")

# Kept back by the worker itself for what follows its decisions: appending them to its log,
# converting, serializing and sending the answer while its own log writer competes for the
# GIL (unary: p99 2.1-2.5 ms, max 5-11 ms; ~40 us more per order of a batch, 2-core VM). A
# call's decisions are recorded by its deadline less this (the base at most a quarter of
# the time left), or none are; an answer slower than that arrives late with them recorded.
ANSWER_RESERVE_S = 0.004
ANSWER_RESERVE_PER_ORDER_S = 50e-6


def main(argv: Sequence[str]) -> int:
    """A worker process: ``python -m riskd.service.worker_main FD`` (started by ``WorkerPool``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server process drains, then stops us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # rules come from the server process
    channel = Channel(socket.socket(fileno=int(argv[0])))
    try:
        config: Config
        rules: RulesState | None
        config, rules = channel.recv()
    except (EOFError, OSError):  # the server process stopped before it sent the config
        return 1
    configure_logging(config.log_level)
    install_hooks()
    try:
        # decisions made after their call's deadline are not recorded: the server process
        # has answered that call with the fallback, and records that (riskd.service.workers)
        components = build_components(config, SystemClock(), record_late=False, rules=rules)
    except Exception as e:
        channel.send(("failed", f"{type(e).__name__}: {e}"))
        return 1
    metrics = Metrics()  # not exported: the server process asks for snapshots (``Stats``)
    unlogged: list[str] = []  # each call's answers the log will not hold (``_serve``)
    servicer = ScoringServicer(
        components.scorer,
        metrics,
        components.clock,
        default_deadline_s=config.deadline_s,
        max_batch=config.max_batch,
        on_decided=lambda ds: unlogged.extend(d.order_id for d in ds if d.unlogged),
    )
    # the server process watches the rule files and sends each new program (``Rules``),
    # compiled here in this order, off the calls' thread
    adopting = concurrent.futures.ThreadPoolExecutor(1, "riskd-rules-adopt")
    # the version of the last program sent (queued or in place), reported with ``Stats``
    queued = [components.rules.current.version]

    def adopt(payload: bytes) -> None:
        state: RulesState = pickle.loads(payload)
        if state.version != queued[0]:  # one compile per program, however often sent
            queued[0] = state.version
            adopting.submit(_adopt, components, state, queued)

    # as ``riskd serve`` does: start-up objects (compiled rules, modules) out of the
    # collector's generations, so full collections on the scoring path skip them
    gc.collect()
    gc.freeze()

    def report() -> bytes:
        waiting = components.scorer.catch_up.queued()
        scorer = components.scorer
        snapshot = metrics.snapshot(
            components.decision_log, waiting, scorer.unavailable(), scorer.catch_up.dropped()
        )
        return json.dumps({**snapshot, "rules": queued[0]}).encode()

    try:  # the server process may have stopped while this one started (SIGTERM then)
        channel.send(("ready", os.getpid()))
        _serve(channel, servicer, report, unlogged, adopt)
    except (EOFError, OSError):
        log.warning("server process gone; flushing the decision log and exiting")
    finally:
        components.close()
    return 0


def _adopt(components: Components, state: RulesState, queued: list[str]) -> None:
    """Take the server process's program; one that fails (compiled there: a bug, never a
    rule error) is logged, and the worker reports its own again so that it is resent."""
    try:
        diagnostics = components.rules.adopt(state)
        failure = None if diagnostics.ok else str(diagnostics)
    except Exception as e:
        failure = f"{type(e).__name__}: {e}"
    if failure is None:
        return
    fields = {"version": state.version, "error": failure}
    log.error("scoring worker could not take the rules", extra={"fields": fields})
    if queued[0] == state.version:  # nothing newer sent since
        queued[0] = components.rules.current.version


def _serve(
    channel: Channel,
    servicer: ScoringServicer,
    report: Callable[[], bytes],
    unlogged: list[str],
    adopt: Callable[[bytes], None] = lambda payload: None,
) -> None:
    """Answer the server process's calls until it says stop. ``unlogged``: filled by the
    servicer (``on_decided``) with the order ids of each call's answers that the decision
    log neither holds nor will hold (``Decision.unlogged``: its queue was full, or an
    in-flight retry's fallback); an answer names them, so that the server process keeps
    no such answer for retries."""
    while True:
        message = channel.recv()
        if message[0] == "stop":
            with contextlib.suppress(OSError):  # then the log is flushed (main)
                channel.send(("stopping",))
            return
        seq, method, payload, deadline, *stamp = message  # stamp: (at,) from this release
        unlogged.clear()
        try:
            if method == "Stats":
                channel.send((seq, "ok", report()))
                continue
            if method == "Rules":
                adopt(payload)
                channel.send((seq, "ok", b""))
                continue
            if deadline <= time.monotonic():  # the server process answered it already
                channel.send((seq, "late"))
                continue
            base = min(ANSWER_RESERVE_S, (deadline - time.monotonic()) / 4)
            if method == "Score":
                request = scoring_pb2.ScoreRequest.FromString(payload)
                by = deadline - base - ANSWER_RESERVE_PER_ORDER_S
                response: Any = servicer.score_request(request, by - time.monotonic(), deadline=by)
            else:
                batch = scoring_pb2.ScoreBatchRequest.FromString(payload)
                by = deadline - base - ANSWER_RESERVE_PER_ORDER_S * len(batch.orders)
                at = stamp[0] if stamp else None  # the batch's time, all its parts alike
                response = servicer.score_batch_request(
                    batch, by - time.monotonic(), deadline=by, refuse_late=True, at=at
                )  # refused: answered late, the gRPC process answers the fallback
        except DeadlineExceededError:  # decided too late: nothing recorded (record_late)
            channel.send((seq, "late"))
            continue
        except RiskdError as e:
            channel.send((seq, "error", type(e).__name__, str(e), getattr(e, "field", None)))
            continue
        except Exception:
            log.error("scoring worker call failed", exc_info=True)
            channel.send((seq, "error", RiskdError.__name__, "internal error", None))
            continue
        channel.send((seq, "ok", response.SerializeToString(), tuple(unlogged)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
