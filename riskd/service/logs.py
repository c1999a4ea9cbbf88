"""Structured JSON logs: one object per line on stderr.

Callers pass context as ``extra={"fields": {...}}``; only what they pass is
written, so PII stays out as long as callers never pass it (the interceptor
logs method, status code and latency; never request fields). With ``exc_info``
the exception's type and frames are written, and its message only for a
``RiskdError`` (whose messages never carry values). Other libraries' warnings and
errors (psycopg, grpc, redis) are JSON lines too, with their message's template and
never its arguments, which may quote data (review: psycopg's plain-text "error ignored
terminating <Pipeline>" lines broke JSON log parsers).

``install_hooks`` (``riskd serve`` and each scoring worker) sends what Python itself would
write to stderr as plain text the same way: an exception no code caught, in any thread
(its type and frames; Python's default hooks print its message, which may quote a value),
one Python could not raise (in a ``__del__``), and a warning (its category and where it
was raised; not its message).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import traceback
import warnings
from types import TracebackType
from typing import IO, Any

from riskd.errors import RiskdError

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class JsonFormatter(logging.Formatter):
    """``{"ts": ..., "level": ..., "logger": ..., "msg": ..., **fields}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage() if _ours(record) else _template(record),
        }
        if not _ours(record) and isinstance(record.args, tuple) and record.args:
            entry["arg_types"] = [type(a).__name__ for a in record.args]
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            entry["error_type"] = record.exc_info[0].__name__
            # A RiskdError's message names fields, never their values (the rule in
            # riskd.errors), and says why (a rule file's diagnostics, a worker that did not
            # start): it is written. Any other exception's message may carry request values
            # (a KeyError names its key): the type and the frames only.
            if isinstance(record.exc_info[1], RiskdError):
                entry["error"] = str(record.exc_info[1])
            entry["traceback"] = "".join(traceback.format_tb(record.exc_info[2]))
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str = "info", stream: IO[str] | None = None) -> None:
    """Route the ``riskd`` loggers to ``stream`` (stderr) as JSON lines at ``level``, and
    the other libraries' warnings and errors too (their messages' templates only)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("riskd")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    root.propagate = False
    others = logging.StreamHandler(stream or sys.stderr)
    others.setFormatter(JsonFormatter())
    others.setLevel(logging.WARNING)
    others.addFilter(_not_noise)
    top = logging.getLogger()
    for old in [h for h in top.handlers if getattr(h, "riskd_json", False)]:
        top.removeHandler(old)
    others.riskd_json = True  # type: ignore[attr-defined]
    top.addHandler(others)


_uncaught = logging.getLogger("riskd.uncaught")


def install_hooks() -> None:
    """Log uncaught exceptions (main thread and others) and warnings as JSON lines through
    ``riskd.uncaught``, never their messages (``JsonFormatter``: a ``RiskdError``'s only)."""
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    sys.unraisablehook = _log_unraisable
    warnings.showwarning = _log_warning


def _log_uncaught(
    kind: type[BaseException], error: BaseException, tb: TracebackType | None
) -> None:
    _uncaught.critical("uncaught exception", exc_info=(kind, error, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:  # as Python's own hook: a thread's sys.exit() is quiet
        return
    thread = args.thread.name if args.thread is not None else "?"
    error = args.exc_value
    _uncaught.error(
        "uncaught exception in a thread",
        exc_info=False if error is None else (args.exc_type, error, args.exc_traceback),
        extra={"fields": {"thread": thread, "error_type": args.exc_type.__name__}},
    )


def _log_unraisable(args: sys.UnraisableHookArgs) -> None:
    """An exception Python could not raise (in a ``__del__``, a finalizer): its type and
    frames, not the object it names (its repr may hold data)."""
    error = args.exc_value
    _uncaught.error(
        "exception ignored",
        exc_info=False if error is None else (args.exc_type, error, args.exc_traceback),
        extra={"fields": {"error_type": args.exc_type.__name__}},
    )


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: IO[str] | None = None,
    line: str | None = None,
) -> None:
    fields = {"category": category.__name__, "where": f"{filename}:{lineno}"}
    _uncaught.warning("python warning", extra={"fields": fields})


def _ours(record: logging.LogRecord) -> bool:
    return record.name == "riskd" or record.name.startswith("riskd.")


def _template(record: logging.LogRecord) -> str:
    """Another library's message without its arguments (they may quote data); one built
    before logging an exception (grpc's "Exception calling application: {}".format(e))
    up to its first ": " (the exception's text may quote data too)."""
    text = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
    if record.exc_info and not record.args:
        text = text.split(": ", 1)[0]
    return text


# other libraries' lines that say nothing an operator can act on: psycopg's, when a
# pipeline's transaction failed (a serialization failure ``Database.run`` retries)
_NOISE = frozenset({("psycopg", "error ignored terminating %r: %s")})


def _not_noise(record: logging.LogRecord) -> bool:
    return (record.name, record.msg) not in _NOISE
