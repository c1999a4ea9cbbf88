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
  fallback (``router._wait_until``: 20 ms and twice the part's ``answer_time_s``, that
  times the batches deciding in the server process at once, or 5 % of a long budget; at
  most a quarter of the budget): the server process answers with the fallback policy (a
  degraded decision, ``features`` unavailable) inside the deadline, records it, and
  discards the late answer. A call
  carries that deadline itself (``CLOCK_MONOTONIC`` is the machine's), and a worker that
  reads a call after it (stalled meanwhile) answers ``late`` without scoring it, so it
  cannot decide the order a second time once it resumes. A worker records a call's
  decisions all together, and only by that deadline less the time to answer once they
  are recorded (``worker_main.ANSWER_RESERVE_S``, and
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
answer, unary or a batch's, for ``answers.RECENT_KEEP_S`` (``RecentAnswers``; not one the
worker's log will not hold, its queue full, which the worker's answer names: its retry is
scored again; and only while that worker lives: a dead one lost what its log had not
committed)
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
reports end of file); meanwhile the server process closes its own scorer and stores
(``Components.close``: on a database hung or locked, each side waits its time at once,
not one after the other). One that does not acknowledge ``HUNG_AFTER_S`` after its stop (or
after the answer it owed) is killed (review: a stalled worker held the exit 30 s each).
The server process's metrics count every decision it returns, and every order it answered
itself (``riskd_score_worker_fallbacks_total`` by reason: down, busy, late). What only a
worker sees, it counts in its own ``Metrics``: the monitor asks each worker for a snapshot
once a second (``pool.RESPAWN_EVERY_S``; a worker held by calls is asked next round) and adds it
to the server process's ``riskd_rule_errors_total``, ``riskd_evidence_superseded_total``,
``riskd_evidence_writer_restarts_total`` and ``riskd_evidence_commit_hook_failures_total``
(what it counted since its last report) and to the other ``riskd_evidence_*`` gauges
(each worker's decision-log writer as last reported). A worker that dies takes what it
counted since its last report with it. Rule errors count evaluations: an order answered by
the fallback because its worker was stalled while scoring it is evaluated twice (here and,
later, in the worker) and its erring rules count twice. Reloads are counted by the server
process alone: it watches and reloads the same files (each worker reloading them too is not
counted again).

Where the parts live:

* here: ``Worker``, one worker process as the gRPC process calls it (one call at a time,
  the answers it owes, hangs, its stop);
* ``riskd.service.pool``: the ``WorkerPool`` that starts, watches, replaces and stops them;
* ``riskd.service.router``: the ``PooledScoringServicer`` that routes each order to its
  worker, or answers it in the gRPC process;
* ``riskd.service.answers``: the workers' recent answers, kept for retries;
* ``riskd.service.worker_main``: the worker process (``python -m riskd.service.worker_main FD``);
* ``riskd.service.channel``: the messages between the two processes.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from typing import Any

from riskd import errors
from riskd.errors import InvalidArgumentError, RiskdError
from riskd.service.channel import Channel

log = logging.getLogger("riskd.service.workers")

IPC_MARGIN_S = 0.001  # kept back from a worker's budget for the answer's trip back
BUSY_WAIT_S = 0.02  # the longest a call waits for a worker another call holds
HUNG_AFTER_S = 2.0  # an answer owed this long past its deadline: the worker is killed


# a worker's answer: its bytes, and the order ids whose decisions its log did not take
Answer = tuple[bytes, frozenset[str]]


class WorkerGone(Exception):
    """The worker has exited, broke or hangs: score the order in this process."""


class WorkerBusy(WorkerGone):
    """The worker is held by another call or owes a late answer: score the order here."""


class Worker:
    """One worker process and its channel; one call at a time (the worker is one thread).

    ``owed`` is the deadline (monotonic) of the last call sent while its answer has not
    come back: set by ``begin``, cleared when the answer arrives. A call that takes the
    worker while an answer is still owed (the last call gave up waiting for it) looks,
    without waiting, whether it has come back since, and sends nothing if not
    (``WorkerBusy``); the monitor kills a worker whose answer is owed ``HUNG_AFTER_S``
    past that deadline. The normal path, where nothing is owed, pays no system call more.
    """

    def __init__(self, index: int, proc: subprocess.Popen[bytes], channel: Channel) -> None:
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

    def finish(self, seq: int, deadline: float) -> Answer | None:
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
        raise rebuild(reply[2], reply[3], reply[4])

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


def rebuild(name: str, message: str, field: str | None) -> RiskdError:
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
