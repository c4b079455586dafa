"""A client that opens gRPC calls and never finishes them: headers sent, the body cut short.

Raw HTTP/2 over plain sockets (frames from bench/h2gen.py), so nothing in grpcio's client
can finish or cancel the calls behind the test's back. A reader thread per connection
acknowledges the server's SETTINGS and PINGs (a polite, patient client, not a broken one),
records the server's SETTINGS_MAX_CONCURRENT_STREAMS and counts streams the server refused.
"""

import contextlib
import socket
import struct
import threading
from types import TracebackType

from bench.h2gen import (
    ACK,
    DATA,
    END_HEADERS,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    frame,
    request_header_block,
)

SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
_HEAD = struct.Struct(">HBBBI")


class UnfinishedStreams:
    """``streams`` calls of ``path`` on each of ``connections`` connections to 127.0.0.1:port;
    each sends its headers and the first bytes of a gRPC message that never completes."""

    def __init__(
        self,
        port: int,
        path: str,
        connections: int,
        streams: int,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        self.port = port
        self.path = path
        self.connections = connections
        self.streams = streams
        self.headers = headers or []
        self.max_concurrent_streams: list[int] = []
        self.refused = 0  # RST_STREAM frames from the server
        self.goaway = 0
        self._sockets: list[socket.socket] = []
        self._readers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._settings_seen = threading.Semaphore(0)

    def __enter__(self) -> "UnfinishedStreams":
        block = request_header_block(f"127.0.0.1:{self.port}", self.path, self.headers)
        # A gRPC message header announcing 100 bytes, then 3 of them: never complete.
        partial = b"\x00" + struct.pack(">I", 100) + b"abc"
        for _ in range(self.connections):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets.append(sock)
            sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
            reader = threading.Thread(target=self._read, args=(sock,), daemon=True)
            reader.start()
            self._readers.append(reader)
            out = bytearray()
            for number in range(self.streams):
                stream = 2 * number + 1
                out += frame(HEADERS, END_HEADERS, stream, block)
                out += frame(DATA, 0, stream, partial)
            sock.sendall(out)
        for _ in range(self.connections):
            self._settings_seen.acquire(timeout=10)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for reader in self._readers:
            reader.join(timeout=5)

    def _read(self, sock: socket.socket) -> None:
        buffer = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buffer += chunk
                while len(buffer) >= 9:
                    high, low, kind, flags, _stream = _HEAD.unpack_from(buffer)
                    length = (high << 8) | low
                    if len(buffer) < 9 + length:
                        break
                    payload, buffer = buffer[9 : 9 + length], buffer[9 + length :]
                    self._on_frame(sock, kind, flags, payload)
        except OSError:
            return

    def _on_frame(self, sock: socket.socket, kind: int, flags: int, payload: bytes) -> None:
        if kind == SETTINGS and not flags & ACK:
            for offset in range(0, len(payload) - 5, 6):
                name, value = struct.unpack_from(">HI", payload, offset)
                if name == SETTINGS_MAX_CONCURRENT_STREAMS:
                    with self._lock:
                        self.max_concurrent_streams.append(value)
            sock.sendall(frame(SETTINGS, ACK, 0))
            self._settings_seen.release()
        elif kind == PING and not flags & ACK:
            sock.sendall(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            with self._lock:
                self.refused += 1
        elif kind == GOAWAY:
            with self._lock:
                self.goaway += 1
