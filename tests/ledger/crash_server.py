"""A ledger gRPC server in its own process, for the crash tests (``python crash_server.py URL``).

Prints its port on the first line of stdout, then serves until killed. With
``--die-in-transaction`` it instead runs one deposit that ``os._exit``s after
posting its transfers and before its transaction commits.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent import futures
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import grpc

from riskd.ledger import Book
from riskd.service.interceptors import ErrorInterceptor
from riskd.service.ledger import add_ledger_service
from riskd.service.metrics import Metrics


def serve(url: str) -> None:
    book = Book.open(url)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16), interceptors=[ErrorInterceptor(Metrics())]
    )
    # Every RPC thread may run a ledger call: this server serves nothing else.
    add_ledger_service(server, book, actor_of=lambda ctx: "crash-test", max_in_flight=16)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    threading.Event().wait()


def die_in_transaction(url: str) -> None:
    book = Book.open(url)
    book.register_shop("s-crash")

    def exit_now(*args: object, **kwargs: object) -> None:
        os._exit(9)

    book.store.put_request = exit_now  # type: ignore[method-assign]
    book.deposit("dying", "s-crash", 12_345, actor="crash-test")


if __name__ == "__main__":
    if sys.argv[2:] == ["--die-in-transaction"]:
        die_in_transaction(sys.argv[1])
    else:
        serve(sys.argv[1])
