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

A request grpcio cannot parse (a string that is not UTF-8, cut-off bytes: what a
non-Python or hostile client can send) would be answered ``INTERNAL`` by grpcio itself,
before any interceptor sees the call; the request deserializer here hands such bytes on
as ``Undecodable`` instead, and the call gets ``INVALID_ARGUMENT`` naming the field
(``order.buyer.name``; ``request`` when the bytes are not a message at all), after the
authentication of the interceptors outside this one, logged and counted as any refusal.
Streaming methods (health ``Watch``, reflection) get the same: without it grpcio answers
``INTERNAL`` and logs a traceback at error level for each such request.

grpcio deserializes a request before any interceptor runs, so whatever that costs, any
caller can make the server pay it: 16 MiB of empty orders (16 KB gzipped) take seconds
of CPU to build. Requests over ``EAGER_PARSE_BYTES`` are therefore handed on unparsed
(``Deferred``) and parsed after admission (``parsed``: the authentication interceptor's
cost of a batch, else here); the field naming walk of ``Undecodable`` runs only after
admission too, and visits at most ``NAMING_FIELDS`` fields. Before that parse their bytes
are read (``riskd.service.wire``): one over ``max_message_bytes`` is refused by its size,
one with more elements than its ``ElementLimits`` allow (orders, items) by that count,
neither built (``Refused``); one whose bytes protobuf refuses is ``Undecodable`` unbuilt.

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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError, Message

from riskd.errors import InvalidArgumentError, RiskdError
from riskd.service import wire
from riskd.service.metrics import Metrics

log = logging.getLogger("riskd.service.rpc")

Handler = Callable[[Any, grpc.ServicerContext], Any]

RECEIVE_LIMIT_FACTOR = 4
"""gRPC's receive limit is this many times ``max_message_bytes`` (see the module docstring)."""

EAGER_PARSE_BYTES = 64 * 1024
"""Requests up to this size are parsed by grpcio's deserializer (a checkout order is ~1 KB;
at most ~30,000 empty messages, a few ms); larger ones after admission (``Deferred``)."""

NAMING_FIELDS = 50_000
"""The most fields ``Undecodable`` reads to name the one that spoils a request (~0.1 s)."""

SIZE_NAMING_FIELDS = 10_000
"""The most fields read to name what holds most of a request refused by its size unparsed."""

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


_MAKERS: dict[str, Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def rewrapped(
    handler: grpc.RpcMethodHandler[Any, Any],
    wrap: Callable[[str, Callable[..., Any]], Callable[..., Any]],
    request_deserializer: Callable[[bytes], Any] | None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with its one behaviour (``unary_unary``, ``unary_stream``, …: the kind
    is ``wrap``'s first argument) replaced by ``wrap``'s, flags kept (``keep_flags``)."""
    for kind, make in _MAKERS.items():
        inner = getattr(handler, kind)
        if inner is not None:
            return make(
                keep_flags(inner, wrap(kind, inner)),
                request_deserializer=request_deserializer,
                response_serializer=handler.response_serializer,
            )
    raise AssertionError("a method handler has one behaviour")


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

    def __init__(
        self,
        metrics: Metrics,
        *,
        max_message_bytes: int | None = None,
        limits: wire.ElementLimits | None = None,
    ) -> None:
        self._metrics = metrics
        self._max_bytes = max_message_bytes
        self._limits = limits
        self._wrapped = WrappedHandlers()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        wrapped = self._wrapped.get(method, handler)
        if wrapped is None:
            if (inner := handler.unary_unary) is None:
                wrapped = _streaming(handler, self._refuser(method))
            else:
                wrapped = grpc.unary_unary_rpc_method_handler(
                    keep_flags(inner, self._wrap(method, inner)),
                    request_deserializer=_lenient(
                        handler.request_deserializer, self._max_bytes, self._limits
                    ),
                    response_serializer=handler.response_serializer,
                )
            self._wrapped.keep(method, handler, wrapped)
        return wrapped

    def _refuser(self, method: str) -> Refuse:
        """How a stream of ``method`` refuses an ``Undecodable`` request: ``INVALID_ARGUMENT``,
        logged and counted as a unary call's refusal (streams are not timed)."""
        errors = self._metrics.rpc_errors.labels(method, grpc.StatusCode.INVALID_ARGUMENT.name)

        def refuse(request: Undecodable, context: grpc.ServicerContext) -> NoReturn:
            errors.inc()
            if log.isEnabledFor(logging.INFO):
                fields = {"method": method, "code": grpc.StatusCode.INVALID_ARGUMENT.name}
                log.info("rpc", extra={"fields": fields})
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error()))

        return refuse

    def _wrap(self, method: str, inner: Handler) -> Handler:
        latency = self._metrics.latency.labels(method)
        limit = self._max_bytes

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if isinstance(request, Deferred):
                    request = request.parsed()
                if isinstance(request, _UNPARSED):
                    raise request.error()
                if limit is not None and isinstance(request, Message):
                    _check_size(request, limit)
                reply = inner(request, context)
                # a handler may set its status and return (grpc_health's Check: NOT_FOUND)
                code = _code(context) or grpc.StatusCode.OK
                return reply
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


class Undecodable:
    """Request bytes the method's message type cannot parse; ``error`` names the field that
    spoils them (a walk of the bytes: call it only after admission)."""

    __slots__ = ("data", "descriptor")

    def __init__(self, data: bytes, descriptor: Descriptor | None) -> None:
        self.data, self.descriptor = data, descriptor

    def error(self) -> InvalidArgumentError:
        field = None
        if self.descriptor is not None:
            try:
                field = wire.bad_string(self.descriptor, self.data, budget=[NAMING_FIELDS])
            except (IndexError, wire.OutOfBudget):  # ends inside a field; too long to walk
                field = None
        if field is not None:
            return InvalidArgumentError(field, "is not valid UTF-8")
        return InvalidArgumentError("request", "is not a valid protobuf message")


class Refused:
    """Request bytes refused unparsed (``Deferred``): too many of them, or too many
    elements of a repeated field; ``error`` is why, ``size`` how many bytes."""

    __slots__ = ("_error", "size")

    def __init__(self, error: RiskdError, size: int) -> None:
        self._error, self.size = error, size

    def error(self) -> RiskdError:
        return self._error


class Deferred:
    """Request bytes over ``EAGER_PARSE_BYTES``, parsed on first use (after admission)."""

    __slots__ = ("_data", "_parse", "_result")

    def __init__(self, data: bytes, parse: Callable[[bytes], Any]) -> None:
        self._data, self._parse, self._result = data, parse, None

    def parsed(self) -> Any:
        """The message (or ``Undecodable``); parsed once, kept for the next caller."""
        if self._result is None:
            self._result = self._parse(self._data)
            self._data = b""  # the call holds the message alone from here on
        return self._result


def parsed(request: Any) -> Any:
    """``request`` as the servicer will see it: a ``Deferred`` one parsed now."""
    return request.parsed() if isinstance(request, Deferred) else request


_UNPARSED = (Undecodable, Refused)  # a tuple: ``A | B`` would build a union per call


def _lenient(
    deserializer: Callable[[bytes], Any] | None,
    max_bytes: int | None = None,
    limits: wire.ElementLimits | None = None,
) -> Callable[[bytes], Any] | None:
    """``deserializer``, giving ``Undecodable`` for bytes it refuses instead of raising, and
    ``Deferred`` for bytes over ``EAGER_PARSE_BYTES``, whose bytes are read before their
    parse: ``Refused`` when there are more than ``max_bytes`` or more elements than
    ``limits`` allow."""
    if deserializer is None:
        return None
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)

    def parse(data: bytes) -> Any:
        try:
            if max_bytes is not None and len(data) > max_bytes:
                field = "request"
                if descriptor is not None:
                    field = wire.largest_field(descriptor, data, budget=SIZE_NAMING_FIELDS) or field
                message = f"the request is {len(data)} bytes, more than the limit of {max_bytes}"
                return Refused(InvalidArgumentError(field, message), len(data))
            if limits is not None and descriptor is not None:
                limits.check(descriptor, data)
            return deserializer(data)
        except DecodeError:
            return Undecodable(data, descriptor)
        except wire.Broken:  # the parse would refuse it too; no field to name but request
            return Undecodable(data, None)
        except RiskdError as e:  # a limit's check
            return Refused(e, len(data))

    tolerant = _tolerant(deserializer)

    def deserialize(data: bytes) -> Any:
        if len(data) > EAGER_PARSE_BYTES:
            return Deferred(data, parse)
        return tolerant(data)

    return deserialize


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``deserializer``, giving ``Undecodable`` for bytes it refuses instead of raising."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return Undecodable(data, descriptor)

    return deserialize


Refuse = Callable[[Undecodable, grpc.ServicerContext], NoReturn]
"""Aborts a call whose request is ``Undecodable`` (``ErrorInterceptor._refuser``)."""


def _streaming(
    handler: grpc.RpcMethodHandler[Any, Any], refuse: Refuse
) -> grpc.RpcMethodHandler[Any, Any]:
    """A streaming ``handler`` (health ``Watch``, reflection) whose requests that do not
    parse are refused by ``refuse`` instead of grpcio's ``INTERNAL`` and logged traceback.

    Its requests are parsed by grpcio as they come (never ``Deferred``): these services'
    requests are a few bytes, and gRPC's receive limit bounds what one can cost."""
    deserializer = handler.request_deserializer
    wraps = {"unary_stream": _one_request, "stream_unary": _request_stream,
             "stream_stream": _request_stream}  # fmt: skip
    return rewrapped(
        handler,
        lambda kind, inner: wraps[kind](inner, refuse),
        None if deserializer is None else _tolerant(deserializer),
    )


def _one_request(inner: Callable[..., Any], refuse: Refuse) -> Callable[..., Any]:
    # *callback: a non-blocking behaviour (health Watch) also gets send_response_callback
    def call(request: Any, context: grpc.ServicerContext, *callback: Any) -> Any:
        if isinstance(request, Undecodable):
            refuse(request, context)
        return inner(request, context, *callback)

    return call


def _request_stream(inner: Callable[..., Any], refuse: Refuse) -> Callable[..., Any]:
    def call(requests: Iterable[Any], context: grpc.ServicerContext, *callback: Any) -> Any:
        return inner(_checked(requests, context, refuse), context, *callback)

    return call


def _checked(
    requests: Iterable[Any], context: grpc.ServicerContext, refuse: Refuse
) -> Iterator[Any]:
    """``requests``, the call refused at the first one that does not parse."""
    for request in requests:
        if isinstance(request, Undecodable):
            refuse(request, context)
        yield request
