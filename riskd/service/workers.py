"""Scoring worker processes: gRPC in one process, the scoring work in ``score_workers`` others.

With ``score_workers = N`` (> 0) ``riskd serve`` starts N worker processes beside the
gRPC server. The server process then does gRPC's own work, authentication and routing:
each order goes, as protobuf bytes over a private socket pair, to the worker chosen by a
hash of its order id (so retries of one order meet in one process and its in-flight
de-duplication), which converts, validates, scores and logs it exactly as the server
process does without workers, and answers with the serialized response. Scoring then
runs on as many cores as there are workers instead of sharing one GIL with gRPC::

    caller ── gRPC ── server process ── socket pair ── worker i = crc32(order_id) % N
                      (auth, routing,                    (convert, validate, features,
                       metrics, fallback)                 rules, decision log)

A ``ScoreBatch`` is validated whole in the server process (errors name ``orders[i]`` of
the caller's batch), split by worker, sent to all of them at once and put back in order.
Every part is stamped with the batch's one time, so an order sees its own part's orders
before it and another part's once their worker has recorded them (one process scores a
batch in order: each order sees those before it, none after; review: each worker used
to stamp its part when it took it, and the earlier part never saw the later one).

Failures:

* A worker that has exited (or is being replaced) gets no calls: its orders go to the
  first other worker free at that moment (for a ``ScoreBatch``, one with no part of the
  batch; counted in ``riskd_score_worker_reroutes_total``), else the server process
  scores them itself; either way with the same rules, stores and log, in what is left
  of each caller's budget, while a monitor thread starts a new worker.
* A worker that has not answered by the caller's deadline, less a reserve for the
  fallback (``_wait_until``: 20 ms and twice the part's ``answer_time_s``, that times the
  batches deciding in the server process at once; at most a quarter of the budget): the
  server process answers with the fallback policy (a degraded decision, ``features``
  unavailable) inside the deadline, records it, and discards the late answer. A call
  carries that deadline itself (``CLOCK_MONOTONIC`` is the machine's), and a worker that
  reads a call after it (stalled meanwhile) answers ``late`` without scoring it, so it
  cannot decide the order a second time once it resumes. A worker records a call's
  decisions all together, and only by that deadline less the time to answer once they
  are recorded (``ANSWER_RESERVE_S``, and
  ``ANSWER_RESERVE_PER_ORDER_S`` per order); one that could not (stalled mid-scoring,
  its log's queue full until then) records none of them and answers ``late`` too
  (``Scorer``'s ``record_late``). Left: a worker that stalls between recording its
  decisions and sending them, or whose answer takes longer than that reserve, answers
  late with decisions recorded, and the decision log keeps the first committed (the
  other is counted in ``riskd_evidence_superseded_total``).
* A worker that is busy (another call holds it for longer than ``BUSY_WAIT_S``) or still
  owes a late answer gets no more calls meanwhile: its orders go elsewhere as a down
  worker's do, in the time left. So a worker that stalls holds one RPC thread, for one
  deadline, not every thread its orders arrive on (there are only about two RPC threads
  per worker), and the other worker's calls and health checks keep their threads.
* A worker whose answer is ``HUNG_AFTER_S`` past its call's deadline is stopped, not
  slow (stopped by a signal, swapping, deadlocked in a library): the monitor kills it
  (``SIGKILL``) and starts a new one, logging why. A worker that answers late but
  answers is left alone: restarting it costs a start (imports, rule compilation) on a
  machine that is most likely overloaded already.

Retries: a decision is recorded by the process that made it, and a worker's log commits
it a batch later (``evidence_flush_ms``; longer while another process holds the
database), so for a while only that process can find it. Meanwhile a retry that goes
elsewhere (its worker busy, stalled or down) would be decided a second time, and the log
might keep the decision nobody acted on. So the server process keeps each worker's
answer, unary or a batch's, for ``RECENT_KEEP_S`` (``_Recent``; not one the worker's log
will not hold, its queue full, which the worker's answer names: its retry is scored again;
and only while that worker lives: a dead one lost what its log had not committed)
and replays a fallback it decided itself from its own log's queue, for ``Score`` and
``ScoreBatch`` alike; and it keeps a flight per order id (``riskd.engine.flights``), led
by the unary call or the batch routing that order: a retry, unary or a batch's entry,
arriving meanwhile waits for that answer (its time up first: the fallback, degraded
``inflight``, not recorded, as in one process; a batch first routes the orders it leads,
and leads none while it waits, so two calls never wait on each other). A retry gets the
answer marked ``replayed`` (other content: ``ALREADY_EXISTS``). Left: a retry more than
``RECENT_KEEP_S`` later while its decision is still uncommitted in a worker that cannot
take it.

Workers need the Redis feature store: velocity counters are shared state, and in-process
counters would be split between the processes (``Config`` refuses that combination).
Workers run the server process's rules and only those: only the server process watches
the rule files (and takes ``SIGHUP``); each worker starts on its program
(``ProgramHolder.state``: the texts it compiled) and is sent each new one it swaps in
(``Rules``, compiled by the worker in the background; the monitor sends it again to a
worker that was busy, started meanwhile or has not got it yet). Review: each worker used
to compile the files itself, so a worker started while a refused edit was on disk failed
to start every round, a worker that read an edit before the server process stayed ahead
of it for good, and a SIGHUP sent during a worker's start was lost. A batch split between
workers while they compile a new program may still see two versions.
Workers ignore ``SIGINT``/``SIGTERM``/``SIGHUP``: the server process drains its calls
first, then asks every worker to stop, and a worker acknowledges, then flushes its
decision log before it exits (also when the server process is gone: the socket pair
reports end of file). One that does not acknowledge ``HUNG_AFTER_S`` after its stop (or
after the answer it owed) is killed (review: a stalled worker held the exit 30 s each).
The server process's metrics count every decision it returns, and every order it answered
itself (``riskd_score_worker_fallbacks_total`` by reason: down, busy, late). What only a
worker sees, it counts in its own ``Metrics``: the monitor asks each worker for a snapshot
once a second (``RESPAWN_EVERY_S``; a worker held by calls is asked next round) and adds it
to the server process's ``riskd_rule_errors_total`` and ``riskd_evidence_superseded_total``
(what it counted since its last report) and to the other ``riskd_evidence_*`` gauges
(each worker's decision-log writer as last reported). A worker that dies takes what it
counted since its last report with it. Rule errors count evaluations: an order answered by
the fallback because its worker was stalled while scoring it is evaluated twice (here and,
later, in the worker) and its erring rules count twice. Reloads are counted by the server
process alone: it watches and reloads the same files (each worker reloading them too is not
counted again).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import enum
import errno
import functools
import gc
import json
import logging
import os
import pickle
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from riskd import errors
from riskd.config import Config
from riskd.domain.clock import Clock, SystemClock
from riskd.domain.decision import Decision, Outcome
from riskd.domain.order import Order
from riskd.dsl.holder import RulesState
from riskd.engine.flights import Flight, Flights
from riskd.engine.scorer import refuse_changed_duplicates, scored_for_other_content
from riskd.errors import DeadlineExceededError, InvalidArgumentError, RiskdError, UnavailableError
from riskd.evidence.request import protect_order, same_order
from riskd.service import convert, validate
from riskd.service.gen.riskd.v1 import order_pb2, scoring_pb2
from riskd.service.logs import configure_logging
from riskd.service.metrics import Metrics
from riskd.service.scoring import ScorerLike, ScoringServicer
from riskd.service.wiring import Components, build_components

__all__ = ["PooledScoringServicer", "WorkerPool"]

log = logging.getLogger("riskd.service.workers")

START_TIMEOUT_S = 120.0  # a worker imports riskd, compiles the rules and opens the stores
STOP_TIMEOUT_S = 30.0  # a stopping worker flushes its decision log
IPC_MARGIN_S = 0.001  # kept back from a worker's budget for the answer's trip back
# Kept back by the worker itself for what follows its decisions: appending them to its log,
# converting, serializing and sending the answer while its own log writer competes for the
# GIL (unary: p99 2.1-2.5 ms, max 5-11 ms; ~40 us more per order of a batch, 2-core VM). A
# call's decisions are recorded by its deadline less this (the base at most a quarter of
# the time left), or none are; an answer slower than that arrives late with them recorded.
ANSWER_RESERVE_S = 0.004
ANSWER_RESERVE_PER_ORDER_S = 50e-6
FALLBACK_RESERVE_S = (
    0.02  # at most this (a quarter of the budget) kept for a late worker's fallback
)
BUSY_WAIT_S = 0.02  # the longest a call waits for a worker another call holds
PARTIAL_GRACE_S = 0.02  # past the deadline, to read the rest of an answer begun
RELOOK_EVERY_S = 0.002  # a batch waiting for other calls' orders looks at them this often
HUNG_AFTER_S = 2.0  # an answer owed this long past its deadline: the worker is killed
RESPAWN_EVERY_S = 1.0  # how often the monitor looks for workers that exited or hang
RESTART_BACKOFF_MAX_S = 30.0  # a failing restart is tried after 1, 2, 4 ... s, at most this
STATS_WAIT_S = 0.5  # the longest the monitor waits for a worker's metrics snapshot
RECENT_KEEP_S = 2.0  # how long the gRPC process keeps a worker's answer for retries
RECENT_MAX = 20_000  # answers kept at most (the oldest go first)
RECENT_MAX_BYTES = 64 << 20  # and at most this many bytes of orders
_HEADER = struct.Struct("!I")
_NOTHING = object()  # no whole message buffered yet
_CHUNK = 1 << 16


# a worker's answer: its bytes, and the order ids whose decisions its log did not take
_Answer = tuple[bytes, frozenset[str]]


class WorkerGone(Exception):
    """The worker has exited, broke or hangs: score the order in this process."""


class WorkerBusy(WorkerGone):
    """The worker is held by another call or owes a late answer: score the order here."""


class _Channel:
    """Length-prefixed pickles over a socket; partial frames wait in a buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()

    def send(self, message: object, deadline: float | None = None) -> None:
        """Send one message; by ``deadline`` (monotonic) if given, else however long it
        takes. Never under the timeout a last ``recv`` left on the socket: a big batch
        waits for the peer to read, and that leftover could be a millisecond or
        seconds. ``OSError`` (a timeout too) leaves a partial frame: the channel is broken.
        """
        body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        self.sock.settimeout(left)
        self.sock.sendall(_HEADER.pack(len(body)) + body)

    def poll(self) -> Any:
        """The next message if it has arrived, else None; never waits."""
        while (message := self._take()) is _NOTHING:
            if not self._fill():
                return None
        return message

    def ready(self) -> bool:
        """Whether a whole message has arrived, or the socket's end or an error (what
        ``recv`` then raises at once); reads what is there, never waits. A frame begun is
        not ready: its sender may have stalled half-way (review: a batch then waited on
        it while another worker's whole answer sat unread)."""
        try:
            while not self._whole():
                if not self._fill():
                    return False
        except (OSError, EOFError):
            return True
        return True

    def _fill(self) -> bool:
        """Read what has arrived, never waiting; whether anything had. ``EOFError`` at
        the end; ``OSError`` once closed (a replaced worker's: poll refuses -1)."""
        if self.sock.fileno() < 0:
            raise OSError(errno.EBADF, "channel closed")
        ready = select.poll()  # not select.select: the descriptor may be above 1023
        ready.register(self.sock, select.POLLIN)
        if not ready.poll(0):
            return False
        chunk = self.sock.recv(_CHUNK)
        if not chunk:
            raise EOFError
        self._buf += chunk
        return True

    def recv(self, deadline: float | None = None) -> Any:
        """The next message; ``TimeoutError`` at ``deadline`` (monotonic), ``EOFError`` at end.

        A message already in the socket at ``deadline`` is still taken (review: a batch
        that waited out its deadline on one stalled worker then threw away the other
        workers' answers sitting there, and answered their recorded orders again), and a
        frame begun is read to its end for up to ``PARTIAL_GRACE_S`` more: its sender is
        writing it now (review: a 760 KB answer, bigger than the socket buffer, was
        dropped half-read, its 300 recorded decisions answered again, after the deadline).
        """
        try:
            return self._read(deadline)
        except TimeoutError:
            message = self.poll()
            if message is not None:
                return message
            if not self._buf:
                raise
            return self._read(time.monotonic() + PARTIAL_GRACE_S)

    def _read(self, deadline: float | None) -> Any:
        """The next message, waiting until ``deadline`` at most (``TimeoutError``)."""
        while (message := self._take()) is _NOTHING:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.sock.settimeout(left)
            chunk = self.sock.recv(_CHUNK)  # socket.timeout is a TimeoutError
            if not chunk:
                raise EOFError
            self._buf += chunk
        return message

    def _take(self) -> Any:
        """The first whole message in the buffer, else ``_NOTHING``."""
        if not self._whole():
            return _NOTHING
        buf = self._buf
        end = _HEADER.size + _HEADER.unpack_from(buf)[0]
        message = pickle.loads(memoryview(buf)[_HEADER.size : end])
        del buf[:end]
        return message

    def _whole(self) -> bool:
        """Whether a whole message is in the buffer."""
        buf = self._buf
        return len(buf) >= _HEADER.size and len(buf) >= _HEADER.size + _HEADER.unpack_from(buf)[0]

    def close(self) -> None:
        self.sock.close()


class _Worker:
    """One worker process and its channel; one call at a time (the worker is one thread).

    ``owed`` is the deadline (monotonic) of the last call sent while its answer has not
    come back: set by ``begin``, cleared when the answer arrives. A call that takes the
    worker while an answer is still owed (the last call gave up waiting for it) looks,
    without waiting, whether it has come back since, and sends nothing if not
    (``WorkerBusy``); the monitor kills a worker whose answer is owed ``HUNG_AFTER_S``
    past that deadline. The normal path, where nothing is owed, pays no system call more.
    """

    def __init__(self, index: int, proc: subprocess.Popen[bytes], channel: _Channel) -> None:
        self.index = index
        self.proc = proc
        self.channel = channel
        self.lock = threading.Lock()
        self.seq = 0
        self.owed: float | None = None
        self.broken = False
        self.why = ""  # why it was taken out of service, for the monitor's log
        self.stats: dict[str, Any] | None = None  # its last metrics snapshot (monitor's)
        self.rules = ""  # the rules version it started on, was sent or last reported
        self.asked = False  # sent its stop (``ask_stop``), which it acknowledges by ack_by
        self.ack_by = 0.0

    @property
    def alive(self) -> bool:
        return not self.broken and self.proc.poll() is None

    def begin(
        self,
        method: str,
        payload: bytes,
        deadline: float,
        wait_s: float = BUSY_WAIT_S,
        at: float | None = None,
    ) -> int | None:
        """Take the worker and send it a call; the sequence number, or None when the
        deadline passed first (the worker is then not taken). ``at``: the time (clock
        seconds) to stamp a batch's orders with, the whole batch's (default: the worker's
        now).

        Raises:
            WorkerBusy: another call held the worker for ``wait_s``, or the worker
                still owes a late answer: score the order elsewhere.
            WorkerGone: the worker broke.
        """
        left = deadline - time.monotonic() - IPC_MARGIN_S
        if left <= 0:
            return None
        if not self.lock.acquire(timeout=min(left, wait_s)):
            if left > wait_s:
                raise WorkerBusy
            return None
        try:
            seq = self._send(method, payload, deadline, at)
        except BaseException:
            self.lock.release()
            raise
        if seq is None:
            self.lock.release()
        return seq

    def _send(self, method: str, payload: bytes, deadline: float, at: float | None) -> int | None:
        """``begin`` with the worker taken."""
        if self.broken:
            raise WorkerGone
        if self.owed is not None and not self._settle():
            raise WorkerBusy
        now = time.monotonic()
        left = deadline - now - IPC_MARGIN_S
        if left <= 0:
            return None
        self.seq += 1
        self.owed = now + left
        try:
            # the deadline itself (CLOCK_MONOTONIC is the machine's, not the process's):
            # a worker that reads the call after it (stalled meanwhile) does not score it
            self.channel.send((self.seq, method, payload, self.owed, at), deadline)
        except OSError as e:
            self.take_out("its socket broke")
            raise WorkerGone from e
        return self.seq

    def _settle(self) -> bool:
        """Read the late answers that have come back; whether the worker owes none now."""
        try:
            while (reply := self.channel.poll()) is not None:
                if reply[0] == self.seq:
                    self.owed = None
        except (OSError, EOFError) as e:
            self.take_out("its socket broke")
            raise WorkerGone from e
        return self.owed is None

    def finish(self, seq: int, deadline: float) -> _Answer | None:
        """The answer to call ``seq`` (sent by ``begin``): its bytes and the order ids
        whose decisions the worker's log did not take; None when it is not there by
        ``deadline`` (it is then owed). Releases the worker. Raises the worker's
        ``RiskdError``."""
        try:
            while True:
                reply = self.channel.recv(deadline)
                if reply[0] == seq:
                    break  # earlier sequence numbers: answers that came too late
            self.owed = None
        except TimeoutError:
            return None
        except (OSError, EOFError) as e:
            self.take_out("its socket broke")
            raise WorkerGone from e
        finally:
            self.lock.release()
        if reply[1] == "ok":
            return bytes(reply[2]), frozenset(reply[3] if len(reply) > 3 else ())
        if reply[1] == "late":  # read after its deadline: not scored, nothing recorded
            return None
        raise _rebuild(reply[2], reply[3], reply[4])

    def answering(self) -> bool:
        """Whether an answer has come back whole (or the channel broke); never waits.
        Else ``fileno`` becomes readable as more of one comes (-1: closed)."""
        return self.channel.ready()

    def fileno(self) -> int:
        return self.channel.sock.fileno()

    def give_up(self) -> None:
        """Release the worker without its answer, which stays owed (as a late one)."""
        self.lock.release()

    def hung(self, now: float) -> bool:
        """Whether an answer is owed ``HUNG_AFTER_S`` past its deadline and has not come
        back. A late answer waits in the socket until a call reads it, so with no calls
        the monitor reads it here (when no call holds the worker; else next round)."""
        owed = self.owed
        if owed is None or now - owed <= HUNG_AFTER_S:
            return False
        if not self.lock.acquire(blocking=False):
            return False
        try:
            return not self._settle()
        except WorkerGone:  # taken out already: replaced as a broken worker
            return False
        finally:
            self.lock.release()

    def take_out(self, why: str) -> None:
        """No more calls; the monitor replaces the worker."""
        if self.broken:
            return
        self.broken = True
        self.why = why
        fields = {"worker": self.index, "reason": why}
        log.warning("scoring worker taken out of service", extra={"fields": fields})

    def ask_stop(self, until: float, *, wait: bool = True) -> bool:
        """Send the worker its stop, once the call holding it is done (by ``until``; at
        once or not at all without ``wait``); whether it is asked or needs no asking
        (out of service: killed by ``wait_stopped``). It acknowledges at once, then
        flushes its decision log and exits (``wait_stopped``)."""
        if self.broken:
            return True
        now = time.monotonic()
        if not self.lock.acquire(timeout=max(until - now, 0.0) if wait else 0.0):
            return False
        try:
            # a worker answers the call it owes (if any) before it reads the stop
            self.ack_by = min(until, max(now, self.owed or now) + HUNG_AFTER_S)
            self.channel.send(("stop",), until)
            self.asked = True
        except OSError:
            pass
        finally:
            self.lock.release()
        return True

    def wait_stopped(self, until: float) -> None:
        """Wait until ``until`` for the worker to exit, killing it sooner when it has not
        acknowledged its stop ``HUNG_AFTER_S`` after it (or after the answer it owed):
        it is hung, as the monitor would have found (review: a stalled worker held the
        server's exit 30 s, and each one after it as long again); and at once when it
        was out of service (the monitor kills those: its socket broke, or it hung)."""
        fields = {"worker": self.index}
        if self.broken and self.proc.poll() is None:
            log.warning(
                "scoring worker out of service at stop; killing it", extra={"fields": fields}
            )
            self.proc.kill()
        elif self.asked:
            try:
                while self.channel.recv(self.ack_by)[0] != "stopping":
                    pass  # a late answer or report: nobody waits for it any more
            except TimeoutError:
                msg = "scoring worker does not answer its stop; killing it"
                log.error(msg, extra={"fields": fields})
                self.proc.kill()
            except (OSError, EOFError):
                pass  # gone already: its exit is waited for below
        try:
            self.proc.wait(max(until - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            log.error("scoring worker did not stop; killing it", extra={"fields": fields})
            self.proc.kill()
        self.proc.wait()
        self.channel.close()


def _rebuild(name: str, message: str, field: str | None) -> RiskdError:
    """A worker's ``RiskdError`` as the same class here (the status code follows it)."""
    if name == InvalidArgumentError.__name__ and field is not None:
        return InvalidArgumentError(field, message.removeprefix(f"{field}: "))
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, RiskdError) and cls is not InvalidArgumentError:
        try:
            return cls(message)
        except TypeError:
            pass
    return RiskdError(message)


# a worker's decision-log counts that only grow while it lives (``_PoolEvidence``)
_RUNNING_TOTALS = ("rejected", "unsealed")


class WorkerPool:
    """``count`` scoring worker processes, started, watched and stopped by the server process.

    With ``metrics`` the monitor adds the workers' own counts to them (module docstring);
    ``evidence`` is the workers' decision-log writers as they last reported them.
    """

    def __init__(
        self,
        config: Config,
        count: int,
        metrics: Metrics | None = None,
        rules: Callable[[], RulesState] | None = None,
    ) -> None:
        self._config = config
        self._rules = rules  # the server process's rules, sent to each worker
        self._rules_lock = threading.Lock()  # sends in the order their states were read
        self._workers: list[_Worker | None] = [None] * count
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._retry_at: dict[int, tuple[float, float]] = {}  # slot: next restart, backoff
        self._restarting: dict[int, threading.Thread] = {}  # slot: its restart (_restart)
        # what replaced workers last reported of their writers' running totals
        self._retired = dict.fromkeys(_RUNNING_TOTALS, 0)
        self._retiring = threading.Lock()  # a scrape sees a replaced worker's once
        self._metrics = metrics
        self.evidence = _PoolEvidence(self)

    def start(self) -> None:
        """Start every worker and wait until each has its rules and stores open.

        Raises:
            UnavailableError: a worker failed to start (its reason is in the message).
        """
        started: list[_Worker] = []
        try:
            started.extend(self._spawn(i) for i in range(len(self._workers)))
            for worker in started:
                self._await_ready(worker)
                self._workers[worker.index] = worker
        except BaseException:
            for worker in started:
                if worker.proc.poll() is None:
                    worker.proc.kill()
                worker.proc.wait()
                worker.channel.close()
            self._workers = [None] * len(self._workers)
            raise
        self._monitor = threading.Thread(target=self._watch, name="riskd-workers", daemon=True)
        self._monitor.start()
        log.info("scoring workers started", extra={"fields": {"pids": self.pids()}})

    def worker_for(self, order_id: str) -> int:
        return zlib.crc32(order_id.encode()) % len(self._workers)

    def get(self, index: int) -> _Worker:
        """The worker at ``index``; ``WorkerGone`` while it is down or being replaced.

        A worker that exited since the monitor last looked is found by the call itself
        (its socket breaks: ``WorkerGone``), so a call pays no ``waitpid`` here.
        """
        worker = self._workers[index]
        if worker is None or worker.broken:
            raise WorkerGone
        return worker

    def workers(self) -> list[_Worker]:
        """The workers in service now (for their last metrics snapshots)."""
        return [w for w in self._workers if w is not None and not w.broken]

    def total(self, key: str) -> int:
        """One of the writers' running totals (``_RUNNING_TOTALS``) over every worker
        this pool started: a replaced worker's last report stays counted (review: the
        rejected gauge an alert watches fell back to 0 when its worker was replaced)."""
        with self._retiring:
            held = [w.stats for w in self._workers if w is not None]
            return self._retired[key] + sum(int(st[key]) for st in held if st is not None)

    def others(self, index: int) -> list[_Worker]:
        """The workers in service other than ``index``, from the one after it on."""
        n = len(self._workers)
        around = (self._workers[(index + k) % n] for k in range(1, n))
        return [w for w in around if w is not None and not w.broken]

    def pids(self) -> list[int | None]:
        return [None if w is None else w.proc.pid for w in self._workers]

    def reload(self) -> None:
        """Send the server process's rules to every worker not on them yet (after each
        program it swaps in; the monitor sends them again to a worker that missed them)."""
        self._send_rules(*self.workers())

    def _send_rules(self, *workers: _Worker) -> None:
        """Send these workers the server process's current rules unless they have them
        (or have them queued), all at once and then waiting for each (review: one at a
        time, a stalled worker held back the next by its wait). What a worker has is
        what it last reported (``Stats``: its ``rules``), so one that missed a program,
        took a stale one late or could not compile it is sent the current one again by
        the monitor's next round."""
        if self._rules is None or self._stop.is_set():  # closing: the workers are stopping
            return  # (review: a reload racing the stop took them out of service, logged)
        with self._rules_lock:
            state = self._rules()
            late = [w for w in workers if w.alive and w.rules != state.version]
            if not late:
                return
            payload = pickle.dumps(state)
            deadline = time.monotonic() + STATS_WAIT_S
            sent: list[tuple[_Worker, int]] = []
            for w in late:
                try:
                    seq = w.begin("Rules", payload, deadline)
                except (WorkerGone, RiskdError):
                    continue
                if seq is not None:
                    sent.append((w, seq))
            for w, seq in sent:
                try:
                    reply = w.finish(seq, deadline)
                except (WorkerGone, RiskdError):
                    continue
                if reply is not None:
                    w.rules = state.version

    def close(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop the monitor, then every worker (each flushes its decision log)."""
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(timeout=START_TIMEOUT_S)
        until = time.monotonic() + timeout_s
        workers = [w for w in self._workers if w is not None]
        # all asked first, so they flush their logs at the same time; those a call still
        # holds after (review: waiting on one held by a stalled worker's long call first
        # left the others unasked, then killed them with their decisions uncommitted)
        held = [w for w in workers if not w.ask_stop(until, wait=False)]
        for w in held:
            w.ask_stop(until)
        for w in workers:
            w.wait_stopped(until)
        self._workers = [None] * len(self._workers)

    def _spawn(self, index: int) -> _Worker:
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "riskd.service.workers", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        worker = _Worker(index, proc, _Channel(ours))
        rules = None if self._rules is None else self._rules()
        worker.rules = "" if rules is None else rules.version
        # the keyring travels over the private pair only
        worker.channel.send((self._config, rules))
        return worker

    def _await_ready(self, worker: _Worker) -> None:
        try:
            reply = worker.channel.recv(time.monotonic() + START_TIMEOUT_S)
        except (TimeoutError, EOFError, OSError) as e:
            worker.proc.kill()
            worker.proc.wait()
            worker.channel.close()
            raise UnavailableError(f"scoring worker {worker.index} did not start") from e
        if reply[0] != "ready":
            worker.proc.wait()
            worker.channel.close()
            raise UnavailableError(f"scoring worker {worker.index} failed to start: {reply[1]}")

    def _watch(self) -> None:
        """Replace workers that exited, broke or hang (their orders are scored here
        meanwhile), collect the others' snapshots, then send the rules to any that
        reported others."""
        while not self._stop.wait(RESPAWN_EVERY_S):
            for i, w in enumerate(self._workers):
                if self._stop.is_set() or w is None:
                    continue
                if w.alive and w.hung(time.monotonic()):
                    w.take_out(f"no answer {HUNG_AFTER_S:g} s past a call's deadline")
                if not w.alive:
                    self._restart(i, w)
                elif self._metrics is not None:
                    self._collect(w, self._metrics)
            self.reload()

    def _collect(self, w: _Worker, metrics: Metrics) -> None:
        """Ask ``w`` for its metrics snapshot and add what it counted since the last one.

        A worker held by calls for ``BUSY_WAIT_S`` is asked next round; one that does not
        answer within ``STATS_WAIT_S`` owes the answer like a late call (read and dropped
        by the next call or round).
        """
        deadline = time.monotonic() + STATS_WAIT_S
        try:
            seq = w.begin("Stats", b"", deadline)
            reply = None if seq is None else w.finish(seq, deadline)
        except (WorkerGone, RiskdError):
            return
        if reply is None:
            return
        now = json.loads(reply[0])
        metrics.absorb_worker(w.stats, now)
        w.stats = now
        w.rules = now["rules"]  # what it runs or has queued: the next round corrects it

    def _restart(self, i: int, w: _Worker) -> None:
        """Replace ``w`` (slot ``i``, down) on a thread of its own, unless one is at it or
        its backoff has not run out: a start takes seconds, and up to ``START_TIMEOUT_S``
        on a locked database (review: the monitor's own start of a worker froze the
        workers' metrics and the hang checks of the others for 30 s)."""
        running = self._restarting.get(i)
        if running is not None and running.is_alive():
            return
        if time.monotonic() < self._retry_at.get(i, (0.0, 0.0))[0]:
            return
        thread = threading.Thread(
            target=self._replace, args=(i, w), name=f"riskd-worker-restart-{i}", daemon=True
        )
        self._restarting[i] = thread
        thread.start()

    def _replace(self, i: int, w: _Worker) -> None:
        """Start a new worker in slot ``i`` for ``w``, which is down; if that fails, the
        next try waits twice as long as the last, up to ``RESTART_BACKOFF_MAX_S`` (review:
        with the database down a start was tried every 2 s, each costing ~0.9 s of CPU
        and two log lines)."""
        code = w.proc.poll()
        fields: dict[str, Any] = {"worker": i, "exit_code": code, "reason": w.why or "exited"}
        if i not in self._retry_at:  # the first try for this worker
            log.warning("scoring worker down; starting a new one", extra={"fields": fields})
        if code is None:
            w.proc.kill()  # SIGKILL: ends a stopped or hung process too
        w.proc.wait()
        with self._retiring:  # once, also when this start fails and is tried again
            if w.stats is not None:
                for key in _RUNNING_TOTALS:
                    self._retired[key] += int(w.stats[key])
                w.stats = None
        # A call still on the old socket sees its end of file and lets go of the worker;
        # closing under the lock keeps its descriptor from being reused under that call.
        taken = w.lock.acquire(timeout=1.0)
        w.channel.close()
        if taken:
            w.lock.release()
        try:
            fresh = self._spawn(i)
            self._await_ready(fresh)
        except Exception:
            delay = min(
                2 * self._retry_at.get(i, (0.0, RESPAWN_EVERY_S / 2))[1], RESTART_BACKOFF_MAX_S
            )
            self._retry_at[i] = (time.monotonic() + delay, delay)
            fields = {"worker": i, "retry_in_s": delay}
            log.error("scoring worker restart failed", exc_info=True, extra={"fields": fields})
            return
        self._retry_at.pop(i, None)
        if self._stop.is_set():  # the pool closed while it started: not put in service
            fresh.proc.kill()
            fresh.proc.wait()
            fresh.channel.close()
            return
        self._workers[i] = fresh
        self._send_rules(fresh)  # a program swapped in while it started (review: lost)


class _PoolEvidence:
    """The workers' decision-log writers, summed as last reported (``EvidenceLike``): the
    backlogs of the workers in service, the running totals of every worker started."""

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    def _sum(self, key: str) -> int:
        return sum(int(w.stats[key]) for w in self._pool.workers() if w.stats is not None)

    @property
    def backlog(self) -> int:
        return self._sum("backlog")

    @property
    def rejected(self) -> int:
        return self._pool.total("rejected")

    @property
    def unsealed(self) -> int:
        return self._pool.total("unsealed")

    @property
    def catch_up(self) -> int:
        """The workers' orders waiting to be counted in their windows (``catchup``)."""
        return self._sum("catch_up")


class _Missing(enum.Enum):
    """Why the gRPC process answers a worker's orders itself (the fallbacks metric's label)."""

    DOWN = "down"
    BUSY = "busy"
    LATE = "late"


_DOWN, _BUSY, _LATE = _Missing.DOWN, _Missing.BUSY, _Missing.LATE


@dataclass(frozen=True, slots=True)
class _Seen:
    """What the metrics count of a decision a worker answered."""

    outcome: Outcome
    reasons: Sequence[scoring_pb2.Reason]
    degraded: Sequence[str]
    replayed: bool


def _seen(d: scoring_pb2.Decision) -> _Seen:
    return _Seen(Outcome(d.outcome), d.reasons, d.unavailable, d.replayed)


class _Source(Protocol):
    """The worker an answer came from (``_Worker``): its kept answers last while it lives."""

    @property
    def alive(self) -> bool: ...


class _Recent:
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


_PART_ENTRY = re.compile(r"orders\[(\d+)\](?=[.:])")


def _renumbered(error: RiskdError, indexes: Sequence[int], size: int) -> RiskdError:
    """A worker's refusal of its part of a batch (``indexes``: the caller's index of each
    of the part's orders; ``size``: the caller's batch), naming the caller's entry: the
    part's ``orders[j]`` is the caller's ``orders[indexes[j]]``. Any other error as it is."""
    text = str(error)
    found = _PART_ENTRY.match(text)
    if found is None or size <= 1:
        return error
    j = int(found.group(1))
    if j >= len(indexes):
        return error
    where = f"orders[{indexes[j]}]"
    field = getattr(error, "field", None)
    if isinstance(field, str):
        field = where + field[found.end() :]
    return _rebuild(type(error).__name__, where + text[found.end() :], field)


def _wait_until(started: float, timeout_s: float, answer_s: float = 0.0) -> float:
    """How long (monotonic) to wait for workers: the budget less time for the fallback
    (``answer_s``: the scorer's ``answer_time_s`` of a batch's orders; kept twice over,
    since the fallback here also converts each order and decision: 80-140 us an order
    measured on the 2-core VM, ~160 us with the workers busy, against the scorer's 110).
    Review: a fixed 20 ms answered a 500-order batch whose worker stalled 2-52 ms after
    its 1 s deadline."""
    return started + timeout_s - min(FALLBACK_RESERVE_S + 2 * answer_s, timeout_s / 4)


class PooledScorer(ScorerLike, Protocol):
    """What the pooled servicer needs of the server process's ``Scorer``."""

    def inflight(self, order: Order, started: float, at: float | None = None) -> Decision: ...

    def refuse_if_late(self, orders: Sequence[Order], timeout_s: float) -> None: ...

    def answer_time_s(self, orders: int) -> float: ...


class QueuedLog(Protocol):
    """What the pooled servicer needs of the server process's ``DecisionLog``."""

    def queued(self, order_ids: Sequence[str]) -> Mapping[str, object]: ...


class PooledScoringServicer(ScoringServicer):
    """``ScoringService`` that hands scoring to the workers (see the module docstring).

    ``scorer`` is the server process's own: it scores the orders of a worker that is
    down, answers with the fallback when a worker is late, and takes ``ReportOutcome``;
    ``log`` is its decision log (if any). An order whose decision this process made and
    has not committed yet (its writer gathers a batch for a few milliseconds) is answered
    here, from that log, not by a worker that could not see it yet and would decide again.
    """

    def __init__(
        self,
        pool: WorkerPool,
        scorer: PooledScorer,
        log: QueuedLog | None,
        metrics: Metrics,
        clock: Clock,
        *,
        default_deadline_s: float,
        max_batch: int,
    ) -> None:
        super().__init__(
            scorer, metrics, clock, default_deadline_s=default_deadline_s, max_batch=max_batch
        )
        self._pool = pool
        self._pooled_scorer = scorer
        self._log = log
        self._fallbacks = {m: metrics.worker_fallbacks.labels(m.value) for m in _Missing}
        self._reroutes = metrics.worker_reroutes
        # unary calls being routed now, by order id: (request bytes, answer)
        self._flights = Flights[tuple[bytes, scoring_pb2.ScoreResponse]]()
        self._recent = _Recent()  # workers' answers, for retries
        self._batching = 0  # ScoreBatch calls in this process now (their fallbacks share it)
        self._batching_lock = threading.Lock()

    def _fell_back(self, why: _Missing, orders: int) -> None:
        self._fallbacks[why].inc(orders)

    def _here(
        self, why: _Missing, request: scoring_pb2.ScoreRequest, timeout_s: float
    ) -> scoring_pb2.ScoreResponse:
        """``request`` scored by this process because its worker was ``why`` (counted
        unless the answer is a replay of a recorded decision)."""
        response = super().score_request(request, timeout_s)
        if not response.decision.replayed:
            self._fell_back(why, 1)
        return response

    def _send(
        self,
        method: str,
        payload: bytes,
        orders: int,
        index: int,
        deadline: float,
        avoid: Collection[int] = (),
        at: float | None = None,
    ) -> tuple[_Worker, int | None] | _Missing:
        """Send ``orders`` orders to worker ``index``; when it is down or busy, to the
        first other worker free right now and not in ``avoid``
        (``riskd_score_worker_reroutes_total``); else why not.

        A rerouted order is scored as the gRPC process would score it, by another process
        with the same rules, stores and log (its in-flight de-duplication is that
        process's), at a worker's cost instead of the gRPC process's: the gRPC process is
        the one that limits worker mode.
        """
        try:
            worker = self._pool.get(index)
            return worker, worker.begin(method, payload, deadline, at=at)
        except WorkerBusy:
            why = _BUSY
        except WorkerGone:
            why = _DOWN
        for other in self._pool.others(index):
            if other.index in avoid:
                continue
            try:
                seq = other.begin(method, payload, deadline, wait_s=0.0, at=at)
            except WorkerGone:  # busy or broken too: the next one
                continue
            if seq is not None:  # else the deadline passed: the fallback, not a reroute
                self._reroutes.inc(orders)
            return other, seq
        return why

    def score_request(
        self,
        request: scoring_pb2.ScoreRequest,
        timeout_s: float,
        *,
        deadline: float | None = None,
    ) -> scoring_pb2.ScoreResponse:
        """One order, through this process's flight for its order id (the module
        docstring's "Retries").

        The first call for an order id (the leader) answers it (``_route``); a
        concurrent retry waits for the leader's answer (no longer than its own budget
        less the fallback's reserve) and, for the same request, gets that answer marked
        ``replayed``. For other bytes, or when the leader failed, the waiting calls join
        the flight again (one leads: its kept answer, a replay or ``ALREADY_EXISTS`` for
        other content, or the order routed); when the leader is not done in the retry's
        time, the retry gets the fallback, degraded ``inflight`` and not recorded
        (``_inflight``).
        """
        started = time.monotonic()
        if deadline is not None:
            timeout_s = deadline - started
        payload = request.SerializeToString()
        order_bytes = request.order.SerializeToString()
        order_id = request.order.order_id
        while True:  # until this call leads the order's flight or has its answer
            leader, flight = self._flights.join(order_id)
            if leader:
                break
            led = flight.wait(max(_wait_until(started, timeout_s) - time.monotonic(), 0.0))
            if led is not None and led[0] == payload:
                response = scoring_pb2.ScoreResponse()
                response.CopyFrom(led[1])
                response.decision.replayed = True  # counted once, as the leader's
                return response
            if not flight.done.is_set():  # the leader is still at it and our time is up
                return self._inflight(request, started)
            # the leader failed or sent other bytes: join again, so that of the calls
            # that waited one leads and the others wait for it, not all route at once
        answer: tuple[bytes, scoring_pb2.ScoreResponse] | None = None
        try:
            response = self._route(request, payload, order_bytes, started, timeout_s)
            answer = (payload, response)
            return response
        finally:
            self._flights.land(order_id, flight)
            flight.finish(answer)  # None (the leader failed): each follower answers itself

    def _inflight(
        self, request: scoring_pb2.ScoreRequest, started: float
    ) -> scoring_pb2.ScoreResponse:
        """The fallback for a retry whose leader did not finish in the retry's time, not
        recorded (the leader's decision is): as the scorer answers such a retry in one
        process, so that it does not become a second decision for the order."""
        order = convert.order_from_proto(request.order)
        validate.validate_order(order)
        decision = self._pooled_scorer.inflight(order, started)
        self._metrics.observe_decisions((decision,))
        return scoring_pb2.ScoreResponse(decision=convert.decision_to_proto(decision))

    def _route(
        self,
        request: scoring_pb2.ScoreRequest,
        payload: bytes,
        order_bytes: bytes,
        started: float,
        timeout_s: float,
    ) -> scoring_pb2.ScoreResponse:
        """A worker's recent answer for this order (``_Recent``: replayed, or
        ``ALREADY_EXISTS`` for other content; looked up once no other call is routing the
        order, and a leader keeps its answer before it lands), else the order scored by
        its worker, another free one, or this process (the docstring of the module),
        within ``timeout_s`` from ``started``."""
        kept = self._recent.replay(request.order, order_bytes, lambda: "order")
        if kept is not None:
            return scoring_pb2.ScoreResponse(decision=kept)
        deadline = _wait_until(started, timeout_s)
        order_id = request.order.order_id
        if self._log is not None and self._log.queued((order_id,)):  # decided here: replay
            return super().score_request(request, max(started + timeout_s - time.monotonic(), 0))
        try:
            index = self._pool.worker_for(order_id)
            sent = self._send("Score", payload, 1, index, deadline)
            if isinstance(sent, _Missing):  # every worker down or busy: scored here
                left = max(started + timeout_s - time.monotonic(), 0.0)
                return self._here(sent, request, left)
            worker, seq = sent
            reply = None if seq is None else worker.finish(seq, deadline)
        except WorkerGone:  # broke mid-call: scored here, in the time that is left
            return self._here(_DOWN, request, max(started + timeout_s - time.monotonic(), 0.0))
        if reply is None:  # late: the fallback, now
            return self._here(_LATE, request, 0.0)
        body, unrecorded = reply
        response = scoring_pb2.ScoreResponse.FromString(body)
        self._metrics.observe_decisions((_seen(response.decision),))
        if order_id not in unrecorded:
            self._recent.put(((order_bytes, response.decision),), worker)
        return response

    def score_batch_request(
        self,
        request: scoring_pb2.ScoreBatchRequest,
        timeout_s: float,
        *,
        deadline: float | None = None,
        refuse_late: bool = False,
        at: float | None = None,
    ) -> scoring_pb2.ScoreBatchResponse:
        """Each order answered as a unary call's would be, under its order id's flight (the
        module docstring's "Retries"): the orders whose flights this call leads at once
        first (``_route_batch``); then, in the time left, those another call (unary or a
        batch) is routing, each looked up again soon after that call is done (within
        ``RELOOK_EVERY_S``), or, still out at the deadline, the fallback, degraded
        ``inflight`` and not recorded (``_answer_inflight``). A call never waits while it
        leads a flight, so two calls never wait on each other. Every part is stamped with
        the batch's one time ``at`` (default: now), as one process stamps a batch (review:
        each worker stamped its part when it took it, a millisecond or more apart, and the
        earlier part's orders never saw the later part's)."""
        started = time.monotonic()
        at = self._clock.now() if at is None else at
        if deadline is not None:
            timeout_s = deadline - started
        validate.validate_batch_size(len(request.orders), self._max_batch)
        orders = convert.orders_from_proto(request.orders)
        validate.validate_batch(orders, self._max_batch)
        refuse_changed_duplicates(orders, protect_order)  # before any worker scores its part
        if refuse_late:  # as one process refuses it
            self._pooled_scorer.refuse_if_late(orders, timeout_s - (time.monotonic() - started))
        entries: dict[str, list[int]] = {}  # order id -> its entries, in order
        for i, order in enumerate(orders):
            entries.setdefault(order.order_id, []).append(i)
        # the fallback's reserve grows with the batches deciding here at once: their late
        # parts' fallbacks share this process (review: 4 batches of 200 at 0.5 s at once on
        # 2 cores came back after the deadline half the time, one at a time never)
        with self._batching_lock:
            self._batching += 1
            at_once = self._batching
        try:
            answer_s = at_once * self._pooled_scorer.answer_time_s(len(entries))
            until = _wait_until(started, timeout_s, answer_s)
            return self._batch(request, orders, entries, started, until, at)
        finally:
            with self._batching_lock:
                self._batching -= 1

    def _batch(
        self,
        request: scoring_pb2.ScoreBatchRequest,
        orders: Sequence[Order],
        entries: dict[str, list[int]],
        started: float,
        until: float,
        at: float,
    ) -> scoring_pb2.ScoreBatchResponse:
        """``score_batch_request``'s routing and waiting, until ``until``."""
        decisions: list[scoring_pb2.Decision | None] = [None] * len(request.orders)
        ids = list(entries)
        awaited: dict[str, Flight[tuple[bytes, scoring_pb2.ScoreResponse]]] = {}
        led: dict[str, Flight[tuple[bytes, scoring_pb2.ScoreResponse]]] = {}

        def land(order_ids: Iterable[str]) -> None:
            """Land the flights this call leads for ``order_ids`` (first, as a unary leader
            does); their followers look again: the kept answer, or a log."""
            for order_id in order_ids:
                flight = led.pop(order_id, None)
                if flight is not None:
                    self._flights.land(order_id, flight)
                    flight.finish(None)

        route_at = at
        while ids or awaited:
            led.clear()
            for order_id in ids:
                leader, flight = self._flights.join(order_id)
                (led if leader else awaited)[order_id] = flight
            try:
                if led:
                    self._route_batch(request, orders, until, decisions, set(led), land, route_at)
            finally:
                land(list(led))  # those not landed as their worker's answer came
            # an order led later (its other call failed) is decided at its own time, as one
            # process decides it again when its leader gave up (``Abandoned``)
            route_at = self._clock.now()
            if not awaited:
                break
            left = until - time.monotonic()
            next(iter(awaited.values())).wait(min(max(left, 0.0), RELOOK_EVERY_S))
            landed = {oid: flight.done.is_set() for oid, flight in awaited.items()}  # read once
            ids = [oid for oid, done in landed.items() if done]
            for order_id in ids:
                del awaited[order_id]
            if time.monotonic() >= until:  # the rest are still out: answered as retries
                for order_id in awaited:
                    self._answer_inflight(orders, entries[order_id], started, decisions, at)
                awaited.clear()
        assert all(d is not None for d in decisions), "every order has its answer"
        return scoring_pb2.ScoreBatchResponse(decisions=cast(list[scoring_pb2.Decision], decisions))

    def _answer_inflight(
        self,
        orders: Sequence[Order],
        indexes: Sequence[int],
        started: float,
        decisions: list[scoring_pb2.Decision | None],
        at: float,
    ) -> None:
        """The unrecorded ``inflight`` fallback for the entries ``indexes`` of one order id
        (the first not replayed, repeats replayed, as the scorer answers them), stamped
        with the batch's time ``at`` (review: it took the clock at the deadline)."""
        decision = self._pooled_scorer.inflight(orders[indexes[0]], started, at)
        self._metrics.observe_decisions((decision,))
        for n, i in enumerate(indexes):
            answer = convert.decision_to_proto(decision)
            answer.replayed = n > 0
            decisions[i] = answer

    def _route_batch(
        self,
        request: scoring_pb2.ScoreBatchRequest,
        orders: Sequence[Order],
        deadline: float,
        decisions: list[scoring_pb2.Decision | None],
        ids: Collection[str],
        land: Callable[[Iterable[str]], None],
        at: float,
    ) -> None:
        """Answer, in ``decisions``, the entries of the order ids ``ids`` (whose flights
        this call leads): a worker's kept answer, this process's queued decision, else
        each worker's part routed to it (or rerouted, or scored here). The orders of a
        worker's answer are kept for retries and ``land``ed as it comes, not when the
        last part does (review: with one worker stalled, retries of the orders another
        worker had decided and recorded got the ``inflight`` fallback until the batch's
        deadline, a second outcome for them)."""
        todo = [i for i, o in enumerate(orders) if o.order_id in ids and decisions[i] is None]
        # the workers' recent answers, before anything is counted
        order_bytes = {i: request.orders[i].SerializeToString() for i in todo}
        for i in todo:
            where = functools.partial("orders[{}]".format, i)
            decisions[i] = self._recent.replay(request.orders[i], order_bytes[i], where)
        todo = [i for i in todo if decisions[i] is None]
        queued = {} if self._log is None else self._log.queued([orders[i].order_id for i in todo])
        here = [i for i in todo if orders[i].order_id in queued]
        if here:  # decided by this process, not committed yet: replayed from its log first
            left = max(deadline - time.monotonic(), 0.0)
            part = self._part_here(orders, here, left, at)
            for i, decision in zip(here, part, strict=True):
                decisions[i] = decision
        groups: dict[int, list[int]] = {}
        for i in todo:
            if orders[i].order_id not in queued:
                groups.setdefault(self._pool.worker_for(orders[i].order_id), []).append(i)
        parts = {
            w: scoring_pb2.ScoreBatchRequest(orders=[request.orders[i] for i in idx])
            for w, idx in groups.items()
        }

        def arrived(w: int, worker: _Worker, answer: _Answer) -> None:
            # counted and kept whatever happens to the other parts: those orders are
            # decided and recorded, and a retry must get them back
            body, unrecorded = answer
            idx = groups[w]
            part = scoring_pb2.ScoreBatchResponse.FromString(body).decisions
            self._metrics.observe_decisions([_seen(d) for d in part])
            kept = [(i, d) for i, d in zip(idx, part, strict=True) if d.order_id not in unrecorded]
            self._recent.put(((order_bytes[i], d) for i, d in kept), worker)
            for i, decision in zip(idx, part, strict=True):
                decisions[i] = decision
            land({d.order_id for _, d in kept})

        answers, refused = self._ask_all(parts, deadline, arrived, at)
        if refused is not None:  # a worker refused its part: the batch is refused
            w, error = refused
            raise _renumbered(error, groups[w], len(orders))
        for w, idx in groups.items():
            got = answers[w]
            if isinstance(got, _Missing):  # DOWN/BUSY: here in the time left; LATE: fallback
                left = 0.0 if got is _LATE else max(deadline - time.monotonic(), 0.0)
                part = self._part_here(orders, idx, left, at)
                self._fell_back(got, sum(not d.replayed for d in part))
                for i, decision in zip(idx, part, strict=True):
                    decisions[i] = decision

    def _part_here(
        self, orders: Sequence[Order], indexes: Sequence[int], left: float, at: float
    ) -> Sequence[scoring_pb2.Decision]:
        """The entries ``indexes`` of a batch (its ``orders``, converted and validated)
        scored in this process in ``left`` seconds; a refusal names the caller's entry.
        Not converted again: that was a third of a late part's fallback (review: a
        stalled worker's 500 orders answered after the deadline)."""
        try:
            return self.score_orders([orders[i] for i in indexes], left, at=at).decisions
        except RiskdError as e:
            raise _renumbered(e, indexes, len(orders)) from None

    def _ask_all(
        self,
        parts: dict[int, scoring_pb2.ScoreBatchRequest],
        deadline: float,
        arrived: Callable[[int, _Worker, _Answer], None],
        at: float,
    ) -> tuple[dict[int, _Answer | _Missing], tuple[int, RiskdError] | None]:
        """Send every part (own workers taken in index order, each wait timed: a batch
        holding a rerouted worker waits at most ``BUSY_WAIT_S`` for another), then collect
        them as they come (``_arrivals``), each answer handed to ``arrived`` at once.

        A part whose worker is down or busy goes to a worker free right now that has no
        part of this batch (taken without waiting), as a unary ``Score`` would.
        Per worker: the answer, ``_DOWN`` (gone or broken) or ``_BUSY`` (score it here),
        or ``_LATE`` (the fallback); none for a worker that refused its part; and the
        first refusal (the other parts' answers are still collected).
        """
        sent: dict[int, tuple[_Worker, int | None]] = {}
        out: dict[int, _Answer | _Missing] = {}
        taken = set(parts)  # workers with a part of their own, or one rerouted to them
        for w in sorted(parts):
            payload = parts[w].SerializeToString()
            n = len(parts[w].orders)
            got = self._send("ScoreBatch", payload, n, w, deadline, taken, at)
            if isinstance(got, _Missing):
                out[w] = got
                continue
            sent[w] = got
            taken.add(got[0].index)
        first_error: tuple[int, RiskdError] | None = None
        held = {w for w, (_, seq) in sent.items() if seq is not None}
        try:
            for w in _arrivals(sent, deadline):
                worker, seq = sent[w]
                held.discard(w)
                try:
                    reply = None if seq is None else worker.finish(seq, deadline)
                except WorkerGone as e:
                    out[w] = _BUSY if isinstance(e, WorkerBusy) else _DOWN
                    continue
                except RiskdError as e:  # the other workers' calls are still collected
                    first_error = first_error or (w, e)
                    continue
                out[w] = _LATE if reply is None else reply
                if reply is not None:
                    arrived(w, worker, reply)
        finally:  # never leave a worker taken (review: one then refused every call for good)
            for w in held:
                sent[w][0].give_up()
        return out, first_error


def _arrivals(sent: Mapping[int, tuple[_Worker, int | None]], deadline: float) -> Iterator[int]:
    """The parts of ``sent`` in the order their answers begin to come back (those not
    sent first; at ``deadline``, the rest in index order), so that one worker stalled
    does not hold the answers the others have given. One part: no waiting here."""
    waiting = {w for w, (_, seq) in sent.items() if seq is not None}
    yield from (w for w in sent if w not in waiting)
    while len(waiting) > 1:
        ready = [w for w in sorted(waiting) if sent[w][0].answering()]
        if not ready:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            fds = [sent[w][0].fileno() for w in waiting]
            if min(fds) < 0:
                continue  # closed since it was looked at: ``answering`` says so now
            poller = select.poll()  # not select.select: the descriptors may be above 1023
            for fd in fds:
                poller.register(fd, select.POLLIN)
            poller.poll(max(left * 1000, 1.0))  # then each is looked at again
            continue
        for w in ready:
            waiting.discard(w)
            yield w
    yield from sorted(waiting)


def main(argv: Sequence[str]) -> int:
    """A worker process: ``python -m riskd.service.workers FD`` (started by ``WorkerPool``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server process drains, then stops us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # rules come from the server process
    channel = _Channel(socket.socket(fileno=int(argv[0])))
    try:
        config: Config
        rules: RulesState | None
        config, rules = channel.recv()
    except (EOFError, OSError):  # the server process stopped before it sent the config
        return 1
    configure_logging(config.log_level)
    try:
        # decisions made after their call's deadline are not recorded: the server process
        # has answered that call with the fallback, and records that (module docstring)
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
        snapshot = metrics.snapshot(components.decision_log, waiting)
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
    channel: _Channel,
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
