"""The one server interceptor that turns riskd errors into gRPC status codes.

``RiskdError.status`` names the code and the message goes to the caller (riskd
messages never contain PII). Any other exception is a bug: the caller gets
``INTERNAL`` with no details, and the log gets the exception type and method.
Every call is logged (method, code, milliseconds) and timed in the metrics.

It also refuses a unary request larger than ``max_message_bytes`` with
``INVALID_ARGUMENT`` naming the field that holds most of it (``order.buyer.address.detail``,
``orders``), before any servicer sees it. gRPC's own receive limit is set a few times
higher (``RECEIVE_LIMIT_FACTOR``) so that such requests arrive to be named; beyond that
limit gRPC itself answers ``RESOURCE_EXHAUSTED`` without reading the message.

A handler that set its own status and then raised (grpc's generated base servicers do
this for a method they do not implement, e.g. ``Health.List``: ``UNIMPLEMENTED``) keeps
that status; it is not a bug, so no traceback is logged.

Interceptors that wrap a handler keep the attributes grpcio reads off its behaviour
(``keep_flags``): without ``experimental_non_blocking`` a health ``Watch`` stream would
hold an RPC thread for as long as the client keeps it open.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import Message

from riskd.errors import InvalidArgumentError, RiskdError
from riskd.service.metrics import Metrics

log = logging.getLogger("riskd.service.rpc")

Handler = Callable[[Any, grpc.ServicerContext], Any]

RECEIVE_LIMIT_FACTOR = 4
"""gRPC's receive limit is this many times ``max_message_bytes`` (see the module docstring)."""

if TYPE_CHECKING:  # generic only in the type stubs
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.ServerInterceptor

_F = TypeVar("_F", bound=Callable[..., Any])

GRPC_FLAGS = ("experimental_non_blocking", "experimental_thread_pool")
"""Attributes grpcio reads off a method's behaviour (``grpc._server``): a non-blocking
streaming behaviour gets a ``send_response_callback`` and returns at once; a thread pool
runs the call instead of the server's."""


def keep_flags(inner: Callable[..., Any], wrapper: _F) -> _F:
    """``wrapper`` carrying ``inner``'s ``GRPC_FLAGS`` (a wrapper that drops them turns a
    non-blocking stream into one that holds an RPC thread while it is open)."""
    for name in GRPC_FLAGS:
        if hasattr(inner, name):
            setattr(wrapper, name, getattr(inner, name))
    return wrapper


class WrappedHandlers:
    """An interceptor's wrapped handler per method, built once rather than on every call
    (and again only if the handler it wraps is another object)."""

    def __init__(self) -> None:
        # method → (the handler wrapped, the wrapped one); only methods with a handler
        self._by_method: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    def get(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """The wrapped handler kept for ``method``, if it wraps ``handler``."""
        cached = self._by_method.get(method)
        return cached[1] if cached is not None and cached[0] is handler else None

    def keep(
        self,
        method: str,
        handler: grpc.RpcMethodHandler[Any, Any],
        wrapped: grpc.RpcMethodHandler[Any, Any],
    ) -> grpc.RpcMethodHandler[Any, Any]:
        self._by_method[method] = (handler, wrapped)
        return wrapped


def status_code(error: RiskdError) -> grpc.StatusCode:
    """The gRPC code an error class names (``INTERNAL`` for unknown names)."""
    return getattr(grpc.StatusCode, error.status, grpc.StatusCode.INTERNAL)


class ErrorInterceptor(_Interceptor):
    """Maps ``RiskdError`` to status codes, hides unexpected errors, logs and times each call."""

    def __init__(self, metrics: Metrics, *, max_message_bytes: int | None = None) -> None:
        self._metrics = metrics
        self._max_bytes = max_message_bytes
        self._wrapped = WrappedHandlers()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or (inner := handler.unary_unary) is None:
            return handler  # streaming (health Watch, reflection) passes through untouched
        method = handler_call_details.method
        wrapped = self._wrapped.get(method, handler)
        if wrapped is None:
            wrapped = grpc.unary_unary_rpc_method_handler(
                keep_flags(inner, self._wrap(method, inner)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
            self._wrapped.keep(method, handler, wrapped)
        return wrapped

    def _wrap(self, method: str, inner: Handler) -> Handler:
        latency = self._metrics.latency.labels(method)
        limit = self._max_bytes

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if limit is not None and isinstance(request, Message):
                    _check_size(request, limit)
                return inner(request, context)
            except RiskdError as e:
                code = status_code(e)
                context.abort(code, str(e))
            except Exception as e:
                if _is_abort(e, context):
                    code = _code(context) or grpc.StatusCode.UNKNOWN
                    raise
                code = _code(context) or grpc.StatusCode.OK
                if code is not grpc.StatusCode.OK:  # the handler set its status, then raised
                    context.abort(code, _details(context))
                code = grpc.StatusCode.INTERNAL
                log.error("unhandled error", exc_info=True, extra={"fields": {"method": method}})
                context.abort(code, "internal error")
            finally:
                self._finish(method, code, time.perf_counter() - start, latency)

        return call

    def _finish(self, method: str, code: grpc.StatusCode, seconds: float, latency: Any) -> None:
        latency.observe(seconds)
        if code is not grpc.StatusCode.OK:
            self._metrics.rpc_errors.labels(method, code.name).inc()
        if log.isEnabledFor(logging.INFO):
            fields = {"method": method, "code": code.name, "ms": round(seconds * 1000, 3)}
            log.info("rpc", extra={"fields": fields})


def _is_abort(error: Exception, context: grpc.ServicerContext) -> bool:
    # context.abort() raises a bare Exception after setting the code; let it through.
    return type(error) is Exception and _code(context) not in (None, grpc.StatusCode.OK)


def _code(context: Any) -> grpc.StatusCode | None:
    # ServicerContext.code() exists at run time but not in the type stubs.
    code: grpc.StatusCode | None = context.code()
    return code


def _details(context: Any) -> str:
    # ServicerContext.details() (bytes or None) exists at run time but not in the type stubs.
    details: bytes | str | None = context.details()
    if isinstance(details, bytes):
        return details.decode("utf-8", "replace")
    return details or ""


def _check_size(request: Message, limit: int) -> None:
    size = request.ByteSize()
    if size > limit:
        message = f"the request is {size} bytes, more than the limit of {limit}"
        raise InvalidArgumentError(_largest_field(request) or "request", message)


def _largest_field(msg: Message) -> str:
    """The path to what holds most of ``msg``'s bytes: descend while one field (or one
    element of a repeated field) holds more than half of its message, e.g.
    ``order.buyer.address.detail``; ``orders`` when no single order does."""
    path = ""
    while True:
        total, best, best_size = msg.ByteSize(), None, -1
        for fd, value in msg.ListFields():
            size = _size(value)
            if size > best_size:
                best, best_size = (fd.name, value), size
        if best is None:
            return path
        name, value = best
        path = f"{path}.{name}" if path else name
        if 2 * best_size <= total:
            return path
        if _is_repeated(value):
            if not value or not isinstance(value[0], Message):
                return path
            i, element = max(enumerate(value), key=lambda e: int(e[1].ByteSize()))
            if 2 * element.ByteSize() <= best_size:
                return path
            path, value = f"{path}[{i}]", element
        if not isinstance(value, Message):
            return path
        msg = value


def _is_repeated(value: Any) -> bool:
    # protobuf registers its repeated containers as Sequences
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def _size(value: Any) -> int:
    """About how many bytes a set field's value takes (exact enough to find the largest)."""
    if isinstance(value, Message):
        return int(value.ByteSize())
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, bytes):
        return len(value)
    if _is_repeated(value):
        return sum(_size(v) for v in value)
    if isinstance(value, Mapping):  # a map field
        return sum(_size(k) + _size(v) for k, v in value.items())
    return 8  # a number, a bool or an enum: a few bytes
