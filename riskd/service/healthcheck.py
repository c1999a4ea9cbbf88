"""The gRPC health service: grpcio-health's servicer, with watchers served from one thread.

Where it sits: ``server.create_server`` registers it; ``RunningServer.set_serving``
turns it SERVING / NOT_SERVING (start, drain), and the drain ends the open watches
(``end_watches``) once new calls are refused.

grpcio-health's ``Watch`` is non-blocking (an open stream holds no RPC thread), but
its ``set()`` and ``Watch()`` send to watchers while holding the servicer's lock, and
a send waits for grpc's poller thread; a watcher that goes away meanwhile has its
close callback run on that poller thread, which needs the same lock: a status change
(at start or at SIGTERM) could then hang for good (seen once under load). Here the
lock only guards the table of watchers; every message is handed to a queue that one
sender thread drains, outside any lock. A watcher that stops reading can delay the
others' updates, never a status change, a drain or an RPC thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from grpc_health.v1 import health, health_pb2

log = logging.getLogger("riskd.service.healthcheck")

_Send = Callable[[Any], None]
_SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health.HealthServicer):
    """``grpc.health.v1.Health``: Check as grpcio-health's; Watch and set() queue sends."""

    def __init__(self) -> None:
        super().__init__(experimental_non_blocking=True)
        self._outbox: queue.SimpleQueue[tuple[_Send, Any] | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_all, name="riskd-health", daemon=True)
        self._sender.start()

    def Watch(self, request: Any, context: Any, send_response_callback: _Send | None = None) -> Any:
        if send_response_callback is None:  # a server without non-blocking streams
            return super().Watch(request, context)
        service = request.service
        with self._lock:
            status = self._server_status.get(service, _SERVICE_UNKNOWN)
            watchers = self._send_response_callbacks.setdefault(service, set())
            watchers.add(send_response_callback)
            if not context.add_callback(self._on_close_callback(send_response_callback, service)):
                # the call ended before it got here (cancelled): no close callback will
                # come (review: those names stayed in the table for good)
                watchers.discard(send_response_callback)
                if not watchers:
                    del self._send_response_callbacks[service]
                return None
            # queued under the lock: a set() after this one is queued after it
            self._outbox.put(
                (send_response_callback, health_pb2.HealthCheckResponse(status=status))
            )
        return None

    def set(self, service: str, status: Any) -> None:
        """Set ``service``'s status and queue it for its watchers; never waits on one."""
        with self._lock:
            if self._gracefully_shutting_down:
                return
            self._server_status[service] = status
            for send in self._send_response_callbacks.get(service, ()):
                self._outbox.put((send, health_pb2.HealthCheckResponse(status=status)))

    def end_watches(self) -> None:
        """End every open ``Watch`` stream (status OK) once what is queued for it is sent.

        A watch never ends by itself: left open, it is an in-flight call that a drain
        waits on for its whole grace. Watches opened after this are still served."""
        with self._lock:
            for watchers in self._send_response_callbacks.values():
                for send in watchers:
                    self._outbox.put((send, None))  # grpcio ends the stream on None
            self._send_response_callbacks.clear()

    def _on_close_callback(self, send_response_callback: _Send, service: str) -> Callable[[], None]:
        """grpcio-health's, for a watcher that may be gone from the table already
        (``end_watches``): theirs raised KeyError in grpc's callback, logged with a traceback
        by ``grpc._server`` for every watch a drain ended. A service name left without
        watchers leaves the table (review: Watch is public, and every name ever watched
        kept an empty set, ~400 B each, 20,000 names +7.8 MiB)."""

        def callback() -> None:
            with self._lock:
                watchers = self._send_response_callbacks.get(service)
                if watchers is not None:
                    watchers.discard(send_response_callback)
                    if not watchers:
                        del self._send_response_callbacks[service]
            send_response_callback(None)

        return callback

    def close(self) -> None:
        """Stop the sender thread once what is queued has been sent (or failed)."""
        self._outbox.put(None)
        self._sender.join(timeout=5.0)

    def _send_all(self) -> None:
        while (item := self._outbox.get()) is not None:
            send, response = item
            try:
                send(response)  # returns at once for a watcher that has gone away
            except Exception:  # one watcher's failure is not the others'
                log.warning("health watch update failed", exc_info=True)
