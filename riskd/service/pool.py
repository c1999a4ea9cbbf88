"""The scoring worker pool: ``score_workers`` processes started, watched, replaced and stopped.

Where it sits: ``create_server`` (``riskd.service.server``) starts a ``WorkerPool`` beside
the gRPC server and hands it to the ``PooledScoringServicer`` (``riskd.service.router``);
its monitor thread replaces workers that exited or hang, collects their metrics snapshots
and sends them the rules. The design, failures included: ``riskd.service.workers``.
"""

from __future__ import annotations

import json
import logging
import pickle
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

from riskd.config import Config
from riskd.dsl.holder import RulesState
from riskd.engine.scorer import CLOSE_MAX_S
from riskd.errors import RiskdError, UnavailableError
from riskd.evidence.log import STUCK_WAIT_S, WRITER_EXIT_S
from riskd.service import workers
from riskd.service.channel import Channel
from riskd.service.metrics import Metrics
from riskd.service.workers import Worker, WorkerGone

__all__ = ["WorkerPool"]

# one logger for every line about the scoring workers, wherever the code that writes it lives
log = logging.getLogger("riskd.service.workers")

START_TIMEOUT_S = 120.0  # a worker imports riskd, compiles the rules and opens the stores
# a stopping worker flushes its decision log (30 s) and keeps its catch-up's queue (up to
# 13 s more: ``Scorer.close``), then, on a database still hung or locked, stops its writer
# and spills the queue: killed before, it lost both queues (review: at 36 s, on a SQLite
# file held locked, while the catch-up still waited 10 s for the lock after the flush)
STOP_TIMEOUT_S = CLOSE_MAX_S + STUCK_WAIT_S + WRITER_EXIT_S + 2.0
RESPAWN_EVERY_S = 1.0  # how often the monitor looks for workers that exited or hang
RESTART_BACKOFF_MAX_S = 30.0  # a failing restart is tried after 1, 2, 4 ... s, at most this
STATS_WAIT_S = 0.5  # the longest the monitor waits for a worker's metrics snapshot


# a worker's decision-log counts that only grow while it lives (``_PoolEvidence``)
_RUNNING_TOTALS = ("rejected", "unsealed")


class WorkerPool:
    """``count`` scoring worker processes, started, watched and stopped by the server process.

    With ``metrics`` the monitor adds the workers' own counts to them (``riskd.service.workers``);
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
        self._workers: list[Worker | None] = [None] * count
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
        started: list[Worker] = []
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

    def get(self, index: int) -> Worker:
        """The worker at ``index``; ``WorkerGone`` while it is down or being replaced.

        A worker that exited since the monitor last looked is found by the call itself
        (its socket breaks: ``WorkerGone``), so a call pays no ``waitpid`` here.
        """
        worker = self._workers[index]
        if worker is None or worker.broken:
            raise WorkerGone
        return worker

    def workers(self) -> list[Worker]:
        """The workers in service now (for their last metrics snapshots)."""
        return [w for w in self._workers if w is not None and not w.broken]

    def total(self, key: str) -> int:
        """One of the writers' running totals (``_RUNNING_TOTALS``) over every worker
        this pool started: a replaced worker's last report stays counted (review: the
        rejected gauge an alert watches fell back to 0 when its worker was replaced)."""
        with self._retiring:
            held = [w.stats for w in self._workers if w is not None]
            return self._retired[key] + sum(int(st[key]) for st in held if st is not None)

    def others(self, index: int) -> list[Worker]:
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

    def _send_rules(self, *workers: Worker) -> None:
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
            sent: list[tuple[Worker, int]] = []
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
        """Stop the monitor, then every worker (each flushes its decision log); the
        server process runs it beside its own scorer's close (``Components.close``)."""
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

    def _spawn(self, index: int) -> Worker:
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "riskd.service.worker_main", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        worker = Worker(index, proc, Channel(ours))
        rules = None if self._rules is None else self._rules()
        worker.rules = "" if rules is None else rules.version
        # the keyring travels over the private pair only
        worker.channel.send((self._config, rules))
        return worker

    def _await_ready(self, worker: Worker) -> None:
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
                    # read where Worker.hung reads it (the split imported a copy of it here)
                    hung_s = workers.HUNG_AFTER_S
                    w.take_out(f"no answer {hung_s:g} s past a call's deadline")
                if not w.alive:
                    self._restart(i, w)
                elif self._metrics is not None:
                    self._collect(w, self._metrics)
            self.reload()

    def _collect(self, w: Worker, metrics: Metrics) -> None:
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

    def _restart(self, i: int, w: Worker) -> None:
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

    def _replace(self, i: int, w: Worker) -> None:
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

    @property
    def unavailable(self) -> set[str]:
        """The dependencies in an outage in any worker in service (``Scorer.unavailable``)."""
        stats = [w.stats for w in self._pool.workers() if w.stats is not None]
        return {name for s in stats for name in s.get("unavailable", ())}
