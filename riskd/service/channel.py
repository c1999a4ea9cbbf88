"""The scoring workers' channel: length-prefixed pickles over one worker's socket pair.

Where it sits: the gRPC process (``riskd.service.workers.Worker``) and a scoring worker
process (``riskd.service.worker_main``) each hold one end of a private socket pair and talk
over it in whole messages; a call's protobuf bytes travel inside them (not gRPC).
"""

from __future__ import annotations

import errno
import pickle
import select
import socket
import struct
import time
from typing import Any

PARTIAL_GRACE_S = 0.02  # past the deadline, to read the rest of an answer begun
_HEADER = struct.Struct("!I")
_NOTHING = object()  # no whole message buffered yet
_CHUNK = 1 << 16


class Channel:
    """Length-prefixed pickles over a socket; partial frames wait in a buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()

    def send(self, message: object, deadline: float | None = None) -> None:
        """Send one message; by ``deadline`` (monotonic) if given, else however long it
        takes. Never under the timeout a last ``recv`` left on the socket: a big batch
        waits for the peer to read, and that leftover could be a millisecond or
        seconds. ``OSError`` (a timeout too) leaves a partial frame: the channel is broken.
        """
        body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        self.sock.settimeout(left)
        self.sock.sendall(_HEADER.pack(len(body)) + body)

    def poll(self) -> Any:
        """The next message if it has arrived, else None; never waits."""
        while (message := self._take()) is _NOTHING:
            if not self._fill():
                return None
        return message

    def ready(self) -> bool:
        """Whether a whole message has arrived, or the socket's end or an error (what
        ``recv`` then raises at once); reads what is there, never waits. A frame begun is
        not ready: its sender may have stalled half-way (review: a batch then waited on
        it while another worker's whole answer sat unread)."""
        try:
            while not self._whole():
                if not self._fill():
                    return False
        except (OSError, EOFError):
            return True
        return True

    def _fill(self) -> bool:
        """Read what has arrived, never waiting; whether anything had. ``EOFError`` at
        the end; ``OSError`` once closed (a replaced worker's: poll refuses -1)."""
        if self.sock.fileno() < 0:
            raise OSError(errno.EBADF, "channel closed")
        ready = select.poll()  # not select.select: the descriptor may be above 1023
        ready.register(self.sock, select.POLLIN)
        if not ready.poll(0):
            return False
        chunk = self.sock.recv(_CHUNK)
        if not chunk:
            raise EOFError
        self._buf += chunk
        return True

    def recv(self, deadline: float | None = None) -> Any:
        """The next message; ``TimeoutError`` at ``deadline`` (monotonic), ``EOFError`` at end.

        A message already in the socket at ``deadline`` is still taken (review: a batch
        that waited out its deadline on one stalled worker then threw away the other
        workers' answers sitting there, and answered their recorded orders again), and a
        frame begun is read to its end for up to ``PARTIAL_GRACE_S`` more: its sender is
        writing it now (review: a 760 KB answer, bigger than the socket buffer, was
        dropped half-read, its 300 recorded decisions answered again, after the deadline).
        """
        try:
            return self._read(deadline)
        except TimeoutError:
            message = self.poll()
            if message is not None:
                return message
            if not self._buf:
                raise
            return self._read(time.monotonic() + PARTIAL_GRACE_S)

    def _read(self, deadline: float | None) -> Any:
        """The next message, waiting until ``deadline`` at most (``TimeoutError``)."""
        while (message := self._take()) is _NOTHING:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.sock.settimeout(left)
            chunk = self.sock.recv(_CHUNK)  # socket.timeout is a TimeoutError
            if not chunk:
                raise EOFError
            self._buf += chunk
        return message

    def _take(self) -> Any:
        """The first whole message in the buffer, else ``_NOTHING``."""
        if not self._whole():
            return _NOTHING
        buf = self._buf
        end = _HEADER.size + _HEADER.unpack_from(buf)[0]
        message = pickle.loads(memoryview(buf)[_HEADER.size : end])
        del buf[:end]
        return message

    def _whole(self) -> bool:
        """Whether a whole message is in the buffer."""
        buf = self._buf
        return len(buf) >= _HEADER.size and len(buf) >= _HEADER.size + _HEADER.unpack_from(buf)[0]

    def close(self) -> None:
        self.sock.close()
