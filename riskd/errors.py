"""One exception root for riskd; each class names the gRPC status it maps to.

The tree::

    RiskdError                      INTERNAL
    ├── InvalidArgumentError        INVALID_ARGUMENT   (bad request field; names the field)
    ├── NotFoundError               NOT_FOUND
    ├── AlreadyExistsError          ALREADY_EXISTS     (idempotency key reused with other content)
    ├── FailedPreconditionError     FAILED_PRECONDITION
    │   └── InsufficientFundsError  FAILED_PRECONDITION
    ├── PermissionDeniedError       PERMISSION_DENIED
    ├── UnauthenticatedError        UNAUTHENTICATED
    ├── ResourceExhaustedError      RESOURCE_EXHAUSTED
    ├── UnavailableError            UNAVAILABLE        (a dependency is down)
    │   └── CommitUnknownError      UNAVAILABLE        (lost during COMMIT: may have committed)
    ├── DeadlineExceededError       DEADLINE_EXCEEDED  (no time left: nothing was done)
    ├── RuleCompileError            INVALID_ARGUMENT   (carries every diagnostic)
    ├── ConfigError                 FAILED_PRECONDITION
    └── CryptoError                 FAILED_PRECONDITION (wrong key, retired key, shredded data)

The service layer has one interceptor that maps ``status`` to a gRPC code.
Messages never contain PII: name the field, never echo its value.
"""

from __future__ import annotations

from typing import ClassVar


class RiskdError(Exception):
    """Root of every error riskd raises on purpose."""

    status: ClassVar[str] = "INTERNAL"


class InvalidArgumentError(RiskdError):
    """A request field is missing, malformed or out of range.

    Args:
        field: dotted path of the offending field, e.g. ``order.items[2].quantity``.
        message: what is wrong with it (never its value if it may be PII).
    """

    status: ClassVar[str] = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFoundError(RiskdError):
    status: ClassVar[str] = "NOT_FOUND"


class AlreadyExistsError(RiskdError):
    status: ClassVar[str] = "ALREADY_EXISTS"


class FailedPreconditionError(RiskdError):
    status: ClassVar[str] = "FAILED_PRECONDITION"


class InsufficientFundsError(FailedPreconditionError):
    """A debit would take an account below what it may hold."""


class PermissionDeniedError(RiskdError):
    status: ClassVar[str] = "PERMISSION_DENIED"


class UnauthenticatedError(RiskdError):
    status: ClassVar[str] = "UNAUTHENTICATED"


class ResourceExhaustedError(RiskdError):
    status: ClassVar[str] = "RESOURCE_EXHAUSTED"


class UnavailableError(RiskdError):
    status: ClassVar[str] = "UNAVAILABLE"


class DatabaseBusyError(UnavailableError):
    """Another writer held the database's lock for as long as the caller could wait;
    nothing was written."""


class CommitUnknownError(UnavailableError):
    """The database connection was lost during COMMIT: the transaction may or may not have
    committed. Never replayed blindly; the caller checks (or retries idempotently)."""


class DeadlineExceededError(RiskdError):
    """The call's deadline left no time to do the work: nothing was done."""

    status: ClassVar[str] = "DEADLINE_EXCEEDED"


class ConfigError(RiskdError):
    status: ClassVar[str] = "FAILED_PRECONDITION"


class CryptoError(RiskdError):
    status: ClassVar[str] = "FAILED_PRECONDITION"


class RuleCompileError(RiskdError):
    """A rule set failed to compile; ``diagnostics`` holds every error found.

    ``diagnostics`` is a sequence of objects whose ``str()`` is the
    ``file:line:col: code: message`` block with the source line and caret.
    """

    status: ClassVar[str] = "INVALID_ARGUMENT"

    def __init__(self, diagnostics: object) -> None:
        self.diagnostics = diagnostics
        super().__init__(str(diagnostics))
