"""A loopback TCP proxy that can turn into a blackhole: a real network fault, no privileges.

    forward      bytes pass both ways (the start state)
    blackhole()  every connection stays open and new ones are accepted, but no byte passes
                 either way: what arrives is read and dropped, nothing is closed. A client sees
                 silence, as behind a firewall that drops packets.
    resume()     forward again. Bytes sent during the blackhole are lost (closer to a dropped
                 path than delivering them late); connections that saw traffic or were closed
                 by one side meanwhile are closed, as their streams no longer line up.
    refuse()     close the listener and every connection: the database has stopped.
                 resume() listens again on the same port.
    stop()       refuse() for good. It also happens by itself after ``lifetime`` seconds.
    delay        seconds added before each answer from upstream is passed on (0: none): a slow
                 database link.

Threads: one accepting, two per connection (one per direction), all daemons; at most
``max_connections`` pairs at once (more are closed on arrival).
"""

import contextlib
import socket
import threading
import time


class _Pair:
    """A client connection and, once forwarding, its upstream connection."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.desynced = False  # bytes were dropped or a side closed during a blackhole

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
            sock.close()


class TcpProxy:
    def __init__(
        self, target: tuple[str, int], lifetime: float = 300.0, max_connections: int = 64
    ) -> None:
        self._target = target
        self._max_connections = max_connections
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._ended = False
        self.delay = 0.0
        self._listener: socket.socket | None = None
        self.port = 0
        self._listen()
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def blackhole(self) -> None:
        self._forwarding.clear()

    def resume(self) -> None:
        with self._lock:
            desynced = [pair for pair in self._pairs if pair.desynced or pair.upstream is None]
            self._pairs.difference_update(desynced)
        for pair in desynced:
            pair.close()
        self._forwarding.set()
        if self._listener is None and not self._ended:
            self._listen()

    def refuse(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            pairs, self._pairs = self._pairs, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # stops listening now, even mid-accept
            listener.close()
        for pair in pairs:
            pair.close()

    def stop(self) -> None:
        self._ended = True
        self._timer.cancel()
        self.refuse()

    # -- threads ---------------------------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 2.0
        while True:
            try:
                listener.bind(("127.0.0.1", self.port))
                break
            except OSError:
                # The old listener lingers until its accept thread wakes (one accept timeout).
                if time.monotonic() > deadline:
                    listener.close()
                    raise
                time.sleep(0.01)
        listener.listen(64)
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by refuse()
            client.settimeout(None)
            pair = _Pair(client)
            with self._lock:
                full = len(self._pairs) >= self._max_connections
                if not full:
                    self._pairs.add(pair)
            if full:
                pair.close()
                continue
            if self._forwarding.is_set():
                try:
                    pair.upstream = socket.create_connection(self._target, timeout=5)
                    pair.upstream.settimeout(None)
                except OSError:
                    self._drop(pair)
                    continue
                threading.Thread(target=self._pump, args=(pair, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, True), daemon=True).start()

    def _pump(self, pair: _Pair, from_client: bool) -> None:
        """Copies one direction while forwarding; reads and drops while blackholed."""
        source = pair.client if from_client else pair.upstream
        assert source is not None
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            forwarding = self._forwarding.is_set()
            if not forwarding:
                pair.desynced = True  # seen on resume; the other side hears nothing now
                if not data:
                    return
                continue
            sink = pair.upstream if from_client else pair.client
            if not data or sink is None:
                self._drop(pair)
                return
            if not from_client and self.delay:
                time.sleep(self.delay)
            try:
                sink.sendall(data)
            except OSError:
                self._drop(pair)
                return

    def _drop(self, pair: _Pair) -> None:
        with self._lock:
            self._pairs.discard(pair)
        pair.close()
