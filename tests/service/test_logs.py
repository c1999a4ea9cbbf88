"""The JSON log lines: what an exception contributes to a record, and what it never does."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import warnings
import weakref
from pathlib import Path

from riskd.errors import InvalidArgumentError, UnavailableError
from riskd.service.logs import JsonFormatter, configure_logging, install_hooks

PHONE = "13812345678"


def _logged(error: Exception) -> tuple[dict[str, object], str]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("riskd.test.logs")
    logger.addHandler(handler)
    try:
        try:
            raise error
        except Exception:
            logger.error("it failed", exc_info=True, extra={"fields": {"worker": 1}})
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    return json.loads(text), text


def test_a_riskd_errors_message_is_logged_with_its_type_and_frames() -> None:
    entry, _ = _logged(UnavailableError("scoring worker 0 failed to start: rules.x:3:7: E1"))
    assert entry["msg"] == "it failed" and entry["worker"] == 1
    assert entry["error_type"] == "UnavailableError"
    assert entry["error"] == "scoring worker 0 failed to start: rules.x:3:7: E1"
    assert "raise error" in str(entry["traceback"])
    entry, _ = _logged(InvalidArgumentError("order.buyer.phone", "must be digits"))
    assert entry["error"] == "order.buyer.phone: must be digits"


def test_each_line_is_stamped_in_utc_to_the_millisecond() -> None:
    """Log pipelines order and join lines by ``ts``: UTC, milliseconds, a ``Z``."""
    fields = {"name": "riskd.test", "msg": "m", "levelname": "INFO", "created": 86_400.25}
    record = logging.makeLogRecord(fields)
    record.msecs = 250.0  # computed from the real clock when the record was made
    entry = json.loads(JsonFormatter().format(record))
    assert (entry["ts"], entry["level"], entry["logger"], entry["msg"]) == (
        "1970-01-02T00:00:00.250Z",
        "info",
        "riskd.test",
        "m",
    )


def test_a_field_json_cannot_encode_is_written_as_its_text() -> None:
    """A value json does not know (a path, a set) still makes one JSON line; else logging's
    last resort writes a plain-text traceback quoting the record to stderr."""
    fields = {"name": "riskd.test", "msg": "m", "fields": {"file": Path("/data/riskd.db")}}
    entry = json.loads(JsonFormatter().format(logging.makeLogRecord(fields)))
    assert entry["file"] == "/data/riskd.db"


def test_any_other_exceptions_message_stays_out() -> None:
    """A KeyError, ValueError... may carry a request value: type and frames only."""
    for error in (KeyError(PHONE), ValueError(f"bad phone {PHONE}")):
        entry, text = _logged(error)
        assert entry["error_type"] == type(error).__name__
        assert "error" not in entry
        assert PHONE not in text


def test_other_libraries_warnings_are_json_lines_without_their_arguments() -> None:
    """Review: psycopg's "error ignored terminating <Pipeline>" reached stderr as plain text
    (Python's last-resort handler), breaking JSON log parsers; its arguments may quote data."""
    stream = io.StringIO()
    top = logging.getLogger()
    before, level = list(top.handlers), top.level
    try:
        top.setLevel(logging.DEBUG)  # as a library's basicConfig may: riskd's handler filters
        configure_logging("info", stream)
        configure_logging("info", stream)  # once more (a reload): one handler, not two
        logging.getLogger("psycopg").warning("connection %s failed: %s", "P", "13912345678")
        logging.getLogger("psycopg").warning("error ignored terminating %r: %s", "P", "x")
        logging.getLogger("psycopg").info("below warning: not written")
        phone = "139" + "12345678"  # not in the source lines the traceback quotes
        try:
            raise ValueError(f"phone {phone}")
        except ValueError as e:  # grpc formats the exception into its message
            logging.getLogger("grpc._server").exception(f"Exception calling application: {e}")
        # an exception object as the message (``log.warning(e)``): its type, not its text
        logging.getLogger("redis").warning(ValueError(f"phone {phone}"))
        logging.getLogger("riskd.test").info("ours %s", "with its arguments")
    finally:
        top.setLevel(level)
        for handler in [h for h in top.handlers if h not in before]:
            top.removeHandler(handler)
        logging.getLogger("riskd").handlers.clear()
        logging.getLogger("riskd").propagate = True
        logging.getLogger("riskd").setLevel(logging.NOTSET)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["logger"], e["msg"]) for e in lines] == [
        ("psycopg", "connection %s failed: %s"),  # the noise after it: filtered out
        ("grpc._server", "Exception calling application"),
        ("redis", "ValueError"),
        ("riskd.test", "ours with its arguments"),
    ]
    assert lines[0]["arg_types"] == ["str", "str"]
    assert lines[1]["error_type"] == "ValueError"
    assert "13912345678" not in stream.getvalue()


def test_an_exception_no_code_caught_is_logged_without_its_message() -> None:
    """What ``sys.excepthook`` gets (the main thread of ``riskd serve`` or of a scoring
    worker): its type and frames in a JSON line; a ``RiskdError`` says why too."""
    saved = (sys.excepthook, threading.excepthook, warnings.showwarning)
    stream = io.StringIO()
    logger = logging.getLogger("riskd")
    try:
        configure_logging("info", stream)
        install_hooks()
        phone = "139" + "12345678"  # not in the source lines the traceback quotes
        for error in (ValueError(f"bad phone {phone}"), UnavailableError("database unavailable")):
            try:
                raise error
            except Exception:
                sys.excepthook(*sys.exc_info())  # type: ignore[arg-type]
    finally:
        sys.excepthook, threading.excepthook, warnings.showwarning = saved
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["level"], e["msg"], e["error_type"], e.get("error")) for e in lines] == [
        ("critical", "uncaught exception", "ValueError", None),
        ("critical", "uncaught exception", "UnavailableError", "database unavailable"),
    ]
    assert "13912345678" not in stream.getvalue()


def _undo_logging() -> None:
    """Take riskd's JSON handlers off and give the riskd logger back its defaults."""
    top = logging.getLogger()
    for handler in [h for h in top.handlers if getattr(h, "riskd_json", False)]:
        top.removeHandler(handler)
    logger = logging.getLogger("riskd")
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


def test_the_riskd_loggers_write_from_the_configured_level_up() -> None:
    """``log_level`` (RISKD_LOG_LEVEL) sets what the riskd loggers write: an operator who
    asks for warnings gets no info lines, and one who asks for debug gets them."""
    written = {}
    try:
        for level in ("error", "warning", "info", "debug"):
            stream = io.StringIO()
            configure_logging(level, stream)
            for name in ("debug", "info", "warning", "error"):
                getattr(logging.getLogger("riskd.test.level"), name)(f"at {name}")
            written[level] = [json.loads(x)["msg"] for x in stream.getvalue().splitlines()]
    finally:
        _undo_logging()
    assert written == {
        "error": ["at error"],
        "warning": ["at warning", "at error"],
        "info": ["at info", "at warning", "at error"],
        "debug": ["at debug", "at info", "at warning", "at error"],
    }


def test_a_threads_sys_exit_is_quiet_as_in_python_and_its_errors_are_logged() -> None:
    """``threading.excepthook`` as Python's own: a thread that calls ``sys.exit()`` ends
    without a line; one that raises is logged by type and frames, never its message."""
    saved = (sys.excepthook, threading.excepthook, sys.unraisablehook, warnings.showwarning)
    stream = io.StringIO()
    phone = "139" + "12345678"  # not in the source lines the traceback quotes

    def fail() -> None:
        raise ValueError(f"bad phone {phone}")

    try:
        configure_logging("info", stream)
        install_hooks()
        for target in (sys.exit, fail):
            thread = threading.Thread(target=target, name=f"riskd-test-{target.__name__}")
            thread.start()
            thread.join()
    finally:
        sys.excepthook, threading.excepthook, sys.unraisablehook, warnings.showwarning = saved
        _undo_logging()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["level"], e["msg"], e["error_type"], e["thread"]) for e in lines] == [
        ("error", "uncaught exception in a thread", "ValueError", "riskd-test-fail"),
    ]
    assert phone not in stream.getvalue()


class _LeakyCallback:
    """A weakref callback that fails; its repr quotes a value (Python's own hook prints it)."""

    def __init__(self, phone: str) -> None:
        self.phone = phone

    def __repr__(self) -> str:
        return f"<callback for {self.phone}>"

    def __call__(self, ref: object) -> None:
        raise ValueError(f"bad phone {self.phone}")


class _Target:
    pass


def test_an_exception_python_could_not_raise_is_logged_without_its_message_or_object() -> None:
    """``sys.unraisablehook`` (a ``__del__``, a weakref callback): Python's own hook prints
    the object's repr and the exception's message; the JSON line has type and frames only."""
    saved = (sys.excepthook, threading.excepthook, sys.unraisablehook, warnings.showwarning)
    stream = io.StringIO()
    phone = "139" + "12345678"  # not in the source lines the traceback quotes
    try:
        configure_logging("info", stream)
        install_hooks()
        target = _Target()
        ref = weakref.ref(target, _LeakyCallback(phone))
        del target  # the callback runs now and raises: unraisable
    finally:
        sys.excepthook, threading.excepthook, sys.unraisablehook, warnings.showwarning = saved
        _undo_logging()
    assert ref() is None
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["level"], e["msg"], e["error_type"]) for e in lines] == [
        ("error", "exception ignored", "ValueError"),
    ]
    assert phone not in stream.getvalue()


def test_a_python_warning_is_logged_by_category_and_place_never_its_text() -> None:
    """``warnings.showwarning``: Python's own writes the warning's text (which may quote a
    value) to stderr as plain text; riskd writes a JSON line with category and place."""
    saved = (sys.excepthook, threading.excepthook, sys.unraisablehook, warnings.showwarning)
    stream = io.StringIO()
    phone = "139" + "12345678"  # not in the source lines
    try:
        configure_logging("info", stream)
        install_hooks()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            line = sys._getframe().f_lineno + 1
            warnings.warn(f"bad phone {phone}", UserWarning, stacklevel=1)
    finally:
        sys.excepthook, threading.excepthook, sys.unraisablehook, warnings.showwarning = saved
        _undo_logging()
    lines = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert [(e["level"], e["msg"], e["category"]) for e in lines] == [
        ("warning", "python warning", "UserWarning"),
    ]
    assert lines[0]["where"] == f"{__file__}:{line}"
    assert phone not in stream.getvalue()
