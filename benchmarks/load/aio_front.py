"""A measuring prototype, not riskd: an asyncio gRPC front for riskd's scoring workers.

riskd's worker mode (``score_workers``) keeps grpcio's threaded server: each call holds an
RPC thread that sends the order to its worker and blocks on the answer, and that hand-off
is what limits the gRPC process (``RESULTS.md``). This script measures the other design:
one ``grpc.aio`` event loop, each worker's socket pair read by a task, calls pipelined to
the workers (a worker scores one order at a time; the next waits in its socket), raw bytes
in and out (the request is parsed only for its order id, the worker's serialized answer is
returned as it is). The workers are riskd's own (``WorkerPool``: same rules, Redis
features, decision log). No authentication, metrics, deadlines, fallbacks or worker
replacement: the ceiling of the design, to weigh against building it.

    python benchmarks/load/aio_front.py --listen 127.0.0.1:50070 --score-workers 8

with riskd's ``RISKD_*`` environment (``RISKD_REDIS_URL`` is required, as for workers).
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import signal
import socket
import struct
import sys
import time
from typing import Any

import grpc

from riskd.config import load_config
from riskd.service.gen.riskd.v1 import scoring_pb2
from riskd.service.pool import WorkerPool

_HEADER = struct.Struct("!I")
_METHOD = "/riskd.v1.ScoringService/Score"


class _Link:
    """One worker's socket pair, pipelined: calls by sequence number, answers in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._seq = 0
        self._waiting: dict[int, asyncio.Future[Any]] = {}

    async def call(self, payload: bytes, timeout_s: float) -> bytes:
        self._seq += 1
        seq = self._seq
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[seq] = future
        call = (seq, "Score", payload, time.monotonic() + timeout_s)  # the deadline itself
        body = pickle.dumps(call, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(_HEADER.pack(len(body)) + body)
        reply = await future
        if reply[1] != "ok":
            raise RuntimeError(f"worker answered {reply[1:]!r}")  # an error, or "late"
        return bytes(reply[2])

    async def read_forever(self) -> None:
        while True:
            head = await self._reader.readexactly(_HEADER.size)
            (size,) = _HEADER.unpack(head)
            reply = pickle.loads(await self._reader.readexactly(size))
            future = self._waiting.pop(reply[0], None)
            if future is not None and not future.done():
                future.set_result(reply)


async def serve(
    listen: str, pool: WorkerPool, links_socks: list[socket.socket], deadline_s: float
) -> None:
    links: list[_Link] = []
    for sock in links_socks:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        links.append(_Link(reader, writer))
    readers = [asyncio.create_task(link.read_forever()) for link in links]

    async def score(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        order_id = scoring_pb2.ScoreRequest.FromString(request).order.order_id
        link = links[pool.worker_for(order_id)]  # riskd's own routing
        return await link.call(request, deadline_s)

    handler = grpc.method_handlers_generic_handler(
        "riskd.v1.ScoringService",
        {"Score": grpc.unary_unary_rpc_method_handler(score)},  # bytes in, bytes out
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"aio front serving on {port}", file=sys.stderr, flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_signal_handler(signal.SIGINT, done.set)
    await done.wait()
    await server.stop(1)
    for task in readers:
        task.cancel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:50070")
    parser.add_argument("--score-workers", type=int, default=8)
    args = parser.parse_args()
    config = load_config(score_workers=args.score_workers)
    pool = WorkerPool(config, args.score_workers)  # riskd's workers, started and ready
    pool.start()
    try:
        # the pool's own monitor reads a socket only for a call it sent: it sends none here
        socks = [pool.get(i).channel.sock.dup() for i in range(args.score_workers)]
        asyncio.run(serve(args.listen, pool, socks, config.deadline_s))
    finally:
        pool.close(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
