"""The JSON log lines: what an exception contributes to a record, and what it never does."""

from __future__ import annotations

import io
import json
import logging

from riskd.errors import InvalidArgumentError, UnavailableError
from riskd.service.logs import JsonFormatter

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


def test_any_other_exceptions_message_stays_out() -> None:
    """A KeyError, ValueError... may carry a request value: type and frames only."""
    for error in (KeyError(PHONE), ValueError(f"bad phone {PHONE}")):
        entry, text = _logged(error)
        assert entry["error_type"] == type(error).__name__
        assert "error" not in entry
        assert PHONE not in text
