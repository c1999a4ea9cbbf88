"""A redis-server of a test's own (free port, nothing on disk) that it may kill, stall and restart;
a proxy that makes some of its replies late (``LateReplies``).

Used by the tests that take Redis away mid-test: the shared Redis at 127.0.0.1:6379 is
never stopped.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OwnRedis:
    """``start`` (again on the same port after ``kill``/``stop``), ``kill`` (-9), ``stop``,
    ``freeze``/``thaw`` (SIGSTOP/SIGCONT)."""

    def __init__(
        self, directory: Path | None = None, *, password: str = "", replica_of: int = 0
    ) -> None:
        self.port = free_port()
        self.dir = directory
        self.password = password  # --requirepass; in ``url`` too
        self.replica_of = replica_of  # a port: a (read-only) replica of that redis-server
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is required for this test"
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--daemonize", "no"]
        if self.dir is not None:
            args += ["--dir", str(self.dir)]
        if self.password:
            args += ["--requirepass", self.password]
        if self.replica_of:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(
            port=self.port,
            password=self.password or None,
            socket_connect_timeout=0.2,
            socket_timeout=0.2,
        )
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.thaw()  # in case a test left it stalled
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stall(self, stalled: bool) -> None:
        self.freeze() if stalled else self.thaw()


class LateReplies:
    """A loopback TCP proxy in front of a Redis (``url``; or any TCP server on
    ``upstream_port``): a random ``share`` of the replies (each read from the server)
    reaches the client ``delay_s`` late, the others at once, in order. ``share`` may
    change while it runs; ``cut`` closes every connection and refuses new ones until
    ``restore`` (the network to the server lost). A context manager; its event loop has a
    thread."""

    def __init__(self, upstream_port: int, *, delay_s: float = 0.08, seed: int = 7) -> None:
        self.share = 0.0
        self._upstream = upstream_port
        self._delay = delay_s
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._cut = False
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> LateReplies:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def cut(self) -> None:
        self._cut = True
        asyncio.run_coroutine_threadsafe(self._drop_all(), self._loop).result(10)

    def restore(self) -> None:
        self._cut = False

    async def _drop_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._drop_all()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self._cut:
            client_w.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self._upstream)
            await asyncio.gather(
                self._pipe(client_r, redis_w, late=False), self._pipe(redis_r, client_w, late=True)
            )
        except OSError:
            pass
        finally:
            client_w.close()
            self._tasks.discard(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, late: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if late and self._rng.random() < self.share:
                    await asyncio.sleep(self._delay)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
