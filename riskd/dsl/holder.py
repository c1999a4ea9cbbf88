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
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from riskd.dsl.diagnostics import Diagnostic, Diagnostics
from riskd.dsl.program import Program, read_sources, rule_files
from riskd.dsl.ruleset import compile_sources
from riskd.errors import RuleCompileError

_log = logging.getLogger("riskd.dsl.rules")

Fingerprint = tuple[tuple[str, int, int, int, int], ...]


class RulesState(NamedTuple):
    """A holder's program as texts: another holder started from it (or that ``adopt``s
    it) has the same program and sees the same later changes (a scoring worker's, sent
    by its server process)."""

    version: str  # the program's
    sources: Mapping[str, str]  # the texts it was compiled from, by path
    fingerprint: Fingerprint  # the files as the last (re)load read them


def fingerprint(directory: Path) -> Fingerprint:
    """Name, mtime, size, inode and inode change time of every rule file: changes on
    any edit, addition or removal, also one that keeps the file's size and time (review:
    a same-size edit renamed into place with the old mtime, as ``cp -p``, ``rsync -a``
    or a tar deploy leave it, was never reloaded; a rename gives another inode, and
    setting a time back changes the inode's change time)."""
    out: list[tuple[str, int, int, int, int]] = []
    for p in rule_files(directory):
        try:
            st = p.stat()
        except OSError:
            try:  # a link to nothing (``rule_files``): its own, so its removal is a change
                st = p.lstat()
            except OSError:  # removed between listing and stat: the next poll sees it gone
                continue
        out.append((str(p), st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns))
    return tuple(out)


NO_RULES = "riskd_no_rules"
RULES_CHANGING = "riskd_rules_changing"
# A change the watcher sees is reloaded once the files have stayed the same this long, so a
# file written in place (cp, cat >, an editor saving over it) is not read half-written.
# Writing a temporary file beside it and renaming it over the old one needs no wait.
SETTLE_S = 0.5


def compile_directory(
    directory: Path,
) -> tuple[Program | None, Diagnostics, Mapping[str, str]]:
    """Compile a rules directory (and give the texts read); an empty one is an error,
    never an empty rule set. What the daemon serves, and what ``riskd rules check``
    passes (review: the command passed files the daemon then refused).

    (A deleted or unmounted folder, or files emptied by a writer, must not silently turn
    every rule off.)
    """
    files = rule_files(directory)
    if not files:
        msg = "no *.rules files in the rules directory"
        return None, Diagnostics((Diagnostic(NO_RULES, msg, str(directory), 1, 1),)), {}
    sources, unreadable = read_sources(*files)
    if not unreadable.ok:
        return None, unreadable, {}
    return (*_from_sources(sources, directory), sources)


def _from_sources(
    sources: Mapping[str, str], directory: Path
) -> tuple[Program | None, Diagnostics]:
    program, diags = compile_sources(sources)
    if program is not None and not program.rules:  # review: all-empty files were 0 rules
        msg = "the *.rules files hold no rules"
        return None, Diagnostics((Diagnostic(NO_RULES, msg, str(directory), 1, 1),))
    return program, diags


class ProgramHolder:
    """Holds the current ``Program`` of a rules directory and reloads it.

    The constructor compiles the directory, or the texts of ``state`` (another holder's
    ``state()``: its program, whatever the files say now), and raises
    ``RuleCompileError`` if they do not compile: a daemon must not start without rules.
    """

    def __init__(self, directory: Path, state: RulesState | None = None) -> None:
        self.directory = directory
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        if state is None:
            self._fingerprint = fingerprint(directory)
            program, diags, sources = compile_directory(directory)
        else:
            sources, self._fingerprint = state.sources, state.fingerprint
            program, diags = _from_sources(sources, directory)
        if program is None:
            raise RuleCompileError(diags)
        self._program: Program = program
        self._sources = sources
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
            before = fingerprint(self.directory)  # taken before reading: never miss an edit
            self._fingerprint = before
            program, diags, sources = compile_directory(self.directory)
            if fingerprint(self.directory) != before:  # written while read: maybe a mix
                msg = "the rule files changed while they were read; kept the old rules"
                program = None
                diags = Diagnostics((Diagnostic(RULES_CHANGING, msg, str(self.directory), 1, 1),))
            self._last = diags
            self._swap(program, sources)
            return diags

    def state(self) -> RulesState:
        """The current program's texts and the files' fingerprint as last read (see
        ``RulesState``), taken between reloads."""
        with self._reload_lock:
            return RulesState(self._program.version, dict(self._sources), self._fingerprint)

    def adopt(self, state: RulesState) -> Diagnostics:
        """Take another holder's program (``state``) in place of this one's, as ``reload``
        swaps one in: the diagnostics, empty when it is in place."""
        with self._reload_lock:
            program, diags = _from_sources(state.sources, self.directory)
            self._last = diags
            if program is not None:
                self._fingerprint = state.fingerprint
            self._swap(program, state.sources)
            return diags

    def _swap(self, program: Program | None, sources: Mapping[str, str]) -> None:
        """Put ``program`` (compiled from ``sources``) in place if it is a new one."""
        if program is not None and program.version != self._program.version:
            self._program = program  # one reference store: readers see old or new
            self._sources = sources

    def changed(self) -> bool:
        """Whether the files differ from what the last (re)load read."""
        return fingerprint(self.directory) != self._fingerprint

    def settled_change(self, stop: threading.Event, settle_s: float = SETTLE_S) -> bool:
        """Whether the files differ from what the last (re)load read and then stay the
        same for ``settle_s`` (review: a file written in place was reloaded half-written
        and served); False when ``stop`` is set meanwhile. A change that goes on is
        reloaded at a later call, once it has stopped."""
        seen = fingerprint(self.directory)
        if seen == self._fingerprint or stop.wait(settle_s):
            return False
        return fingerprint(self.directory) == seen

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
            if woken or self.settled_change(self._stop):
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
