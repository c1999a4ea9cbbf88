"""The one server interceptor that turns riskd errors into gRPC status codes.

``RiskdError.status`` names the code and the message goes to the caller (riskd
messages never contain PII). Any other exception is a bug: the caller gets
``INTERNAL`` with no details, and the log gets the exception type and method.
Every call is logged (method, code, milliseconds) and timed in the metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from riskd.errors import RiskdError
from riskd.service.metrics import Metrics

log = logging.getLogger("riskd.service.rpc")

Handler = Callable[[Any, grpc.ServicerContext], Any]

if TYPE_CHECKING:  # generic only in the type stubs
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.ServerInterceptor


def status_code(error: RiskdError) -> grpc.StatusCode:
    """The gRPC code an error class names (``INTERNAL`` for unknown names)."""
    return getattr(grpc.StatusCode, error.status, grpc.StatusCode.INTERNAL)


class ErrorInterceptor(_Interceptor):
    """Maps ``RiskdError`` to status codes, hides unexpected errors, logs and times each call."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # method → (its handler, the wrapped one): wrapped once per method, not per call
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # streaming (health Watch, reflection) passes through untouched
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._wrap(method, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, inner: Handler) -> Handler:
        latency = self._metrics.latency.labels(method)

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return inner(request, context)
            except RiskdError as e:
                code = status_code(e)
                context.abort(code, str(e))
            except Exception as e:
                if _is_abort(e, context):
                    code = _code(context) or grpc.StatusCode.UNKNOWN
                    raise
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
