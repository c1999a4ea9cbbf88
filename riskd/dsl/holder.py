"""Hot rule reload: the program the scorer reads, swapped atomically when files change.

The scorer reads ``holder.current`` once per order and uses that one
``Program`` for the whole evaluation: a program is immutable, and replacing the
reference is a single atomic store, so a request sees either the old rule set
or the new one, never a mix. New files are compiled by whoever calls
``reload`` (the watcher thread, an admin command, a SIGHUP handler), never on
the request path; a rule set with errors leaves the running program in place
and returns the diagnostics.

Wiring SIGHUP (in the ``serve`` command)::

    signal.signal(signal.SIGHUP, lambda *_: holder.request_reload())
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from riskd.dsl.diagnostics import Diagnostic, Diagnostics
from riskd.dsl.program import Program, check_rules, rule_files
from riskd.errors import RuleCompileError

_log = logging.getLogger("riskd.dsl.rules")

Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(directory: Path) -> Fingerprint:
    """Name, mtime and size of every rule file: changes on any edit, addition or removal."""
    out: list[tuple[str, int, int]] = []
    for p in rule_files(directory):
        try:
            st = p.stat()
        except OSError:  # removed between listing and stat: the next poll sees it gone
            continue
        out.append((str(p), st.st_mtime_ns, st.st_size))
    return tuple(out)


NO_RULES = "riskd_no_rules"


def _compile(directory: Path) -> tuple[Program | None, Diagnostics]:
    """Compile a rules directory; an empty one is an error, never an empty rule set.

    (A deleted or unmounted folder must not silently turn every rule off.)
    """
    files = rule_files(directory)
    if not files:
        msg = "no *.rules files in the rules directory"
        return None, Diagnostics((Diagnostic(NO_RULES, msg, str(directory), 1, 1),))
    return check_rules(*files)


class ProgramHolder:
    """Holds the current ``Program`` of a rules directory and reloads it.

    The constructor compiles the directory and raises ``RuleCompileError`` if
    it does not compile: a daemon must not start without rules.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._fingerprint = fingerprint(directory)
        program, diags = _compile(directory)
        if program is None:
            raise RuleCompileError(diags)
        self._program: Program = program
        self._last: Diagnostics = diags

    @property
    def current(self) -> Program:
        """The program to evaluate with (read it once per request)."""
        return self._program

    @property
    def last_diagnostics(self) -> Diagnostics:
        """What the most recent reload reported (empty after a good one)."""
        return self._last

    def reload(self) -> Diagnostics:
        """Compile the directory now; swap in the result if it has no errors.

        Returns the diagnostics: empty when the new program (or the same one,
        if nothing changed) is in place, every error when the old one stays.
        The caller logs the outcome (the holder's own watcher does; the daemon's
        ``riskd.service.wiring`` logs it once, with its metrics).
        """
        with self._reload_lock:
            self._fingerprint = fingerprint(self.directory)  # before reading: never miss an edit
            program, diags = _compile(self.directory)
            self._last = diags
            if program is not None and program.version != self._program.version:
                self._program = program  # one reference store: readers see old or new
            return diags

    def changed(self) -> bool:
        """Whether the files differ from what the last (re)load read."""
        return fingerprint(self.directory) != self._fingerprint

    def request_reload(self) -> None:
        """Ask the watcher to reload at once (safe to call from a signal handler)."""
        self._wake.set()

    def start_watching(self, interval_s: float = 2.0) -> None:
        """Poll the files' mtimes every ``interval_s`` seconds in a daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._watch, args=(interval_s,), name="riskd-rules-watch", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the watcher thread (idempotent)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _watch(self, interval_s: float) -> None:
        while not self._stop.is_set():
            woken = self._wake.wait(interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            if woken or self.changed():
                before = self._program.version
                try:
                    diags = self.reload()
                except Exception:  # a watcher that dies silently would freeze the rules
                    _log.exception("rules reload crashed; will retry on the next change")
                    continue
                if not diags.ok:
                    _log.warning("rules reload failed; keeping version %s:\n%s", before, diags)
                elif self._program.version != before:
                    _log.info("rules reloaded: %s -> %s", before, self._program.version)
