"""A small gRPC load generator speaking raw HTTP/2 (h2c): ``python -m bench.h2gen PLAN.json``.

Why not h2load for everything: h2load sends one fixed body, so it cannot walk a working set of
many keys, which a cache-miss measurement with a cached caller needs. Why not grpcio's client:
it spends about as much CPU per call as the server, so it cannot saturate it from one core.
This one precomputes every frame (HPACK literals, no dynamic table, no Huffman), keeps many
streams in flight on a few connections from one thread, and compares every answer's bytes with
the expected response, so correctness is checked on every call, not only sampled.

It honours what a server may ask of a client (SETTINGS and PING acks, connection flow control)
and nothing more; it is a measuring tool, not an HTTP/2 implementation.
"""

import base64
import json
import resource
import selectors
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from bench.proc import context_switches, cpu_times

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_ENABLE_PUSH = 0x2
RECEIVE_WINDOW = 1 << 30
_HEAD = struct.Struct(">HBBBI")  # 24-bit length as (high 16, low 8), type, flags, stream id
_U32 = struct.Struct(">I")


def frame_head(length: int, kind: int, flags: int, stream: int) -> bytes:
    return _HEAD.pack(length >> 8, length & 0xFF, kind, flags, stream)


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return frame_head(len(payload), kind, flags, stream) + payload


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_string(text: str) -> bytes:
    raw = text.encode("ascii")
    return hpack_int(len(raw), 7) + raw


def request_header_block(authority: str, path: str, extra: list[tuple[str, str]]) -> bytes:
    """HPACK: indexed :method POST and :scheme http, every other field a literal not indexed."""
    block = bytearray(b"\x83\x86")  # static table 3 (:method POST), 6 (:scheme http)
    block += hpack_int(4, 4) + hpack_string(path)  # name from static 4 (:path)
    block += hpack_int(1, 4) + hpack_string(authority)  # static 1 (:authority)
    block += hpack_int(31, 4) + hpack_string("application/grpc")  # static 31 (content-type)
    for name, value in [("te", "trailers"), *extra]:
        block += b"\x00" + hpack_string(name) + hpack_string(value)
    return bytes(block)


def grpc_message(payload: bytes) -> bytes:
    """The gRPC length-prefixed message: uncompressed flag, 4-byte big-endian length, bytes."""
    return b"\x00" + _U32.pack(len(payload)) + payload


@dataclass
class Stats:
    completed: int = 0
    wrong: int = 0
    reset: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    wrong_sample: bytes = b""
    # With ``refusals_ok``: answers without a message (a refusal or an expired deadline: the
    # status alone), apart from the answers proper and their latencies.
    refusals_ok: bool = False
    refused: int = 0
    refused_latencies_ns: list[int] = field(default_factory=list)


class Connection:
    def __init__(
        self, host: str, port: int, header_block: bytes, requests: list[tuple[bytes, bytes]]
    ) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._block = header_block
        self._requests = requests
        self._next_stream = 1
        self._send_window = 65_535
        self._received = 0
        self._buffer = bytearray()
        self._out: list[bytes] = []
        # stream id -> (start ns, expected answer, answer so far)
        self.inflight: dict[int, list[Any]] = {}
        settings = struct.pack(
            ">HIHI", SETTINGS_ENABLE_PUSH, 0, SETTINGS_INITIAL_WINDOW_SIZE, 1 << 24
        )
        self.sock.sendall(
            PREFACE
            + frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, _U32.pack(RECEIVE_WINDOW - 65_535))
        )

    def can_send(self, index: int) -> bool:
        return self._send_window >= len(self._requests[index % len(self._requests)][0])

    def send(self, index: int, start_ns: int) -> None:
        body, expected = self._requests[index % len(self._requests)]
        stream = self._next_stream
        self._next_stream += 2
        self._send_window -= len(body)
        self._out.append(frame_head(len(self._block), HEADERS, END_HEADERS, stream))
        self._out.append(self._block)
        self._out.append(frame_head(len(body), DATA, END_STREAM, stream))
        self._out.append(body)
        self.inflight[stream] = [start_ns, expected, b""]

    def flush(self) -> None:
        if self._out:
            self.sock.sendall(b"".join(self._out))
            self._out.clear()

    def receive(self, stats: Stats | None) -> int:
        """Reads what is there, handles whole frames; returns how many calls completed."""
        chunk = self.sock.recv(1 << 18)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        buffer = self._buffer
        buffer += chunk
        position, size, done = 0, len(buffer), 0
        now = time.perf_counter_ns()
        while size - position >= 9:
            high, low, kind, flags, stream = _HEAD.unpack_from(buffer, position)
            length = (high << 8) | low
            end = position + 9 + length
            if end > size:
                break
            if kind == DATA:
                payload = bytes(buffer[position + 9 : end])
                self._received += length
                if flags & PADDED:
                    payload = payload[1 : len(payload) - payload[0]]
                call = self.inflight.get(stream)
                if call is not None:
                    call[2] += payload
                    if flags & END_STREAM:
                        done += self._complete(stream, now, stats)
            elif kind == HEADERS:
                if flags & END_STREAM:
                    done += self._complete(stream, now, stats)
            elif kind == RST_STREAM:
                if self.inflight.pop(stream, None) is not None:
                    done += 1
                    if stats is not None:
                        stats.reset += 1
            elif kind == SETTINGS:
                if not flags & ACK:
                    self._out.append(frame(SETTINGS, ACK, 0))
            elif kind == PING:
                if not flags & ACK:
                    self._out.append(frame(PING, ACK, 0, bytes(buffer[position + 9 : end])))
            elif kind == WINDOW_UPDATE:
                if stream == 0:
                    self._send_window += _U32.unpack_from(buffer, position + 9)[0] & 0x7FFFFFFF
            elif kind == GOAWAY:
                raise ConnectionError("the server sent GOAWAY")
            position = end
        del buffer[:position]
        if self._received > RECEIVE_WINDOW // 2:
            self._out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._received)))
            self._received = 0
        return done

    def _complete(self, stream: int, now: int, stats: Stats | None) -> int:
        call = self.inflight.pop(stream, None)
        if call is None:
            return 0
        if stats is not None:
            if stats.refusals_ok and not call[2]:
                stats.refused += 1
                stats.refused_latencies_ns.append(now - call[0])
                return 1
            stats.completed += 1
            stats.latencies_ns.append(now - call[0])
            if call[2] != call[1]:
                stats.wrong += 1
                stats.wrong_sample = call[2]
        return 1


def run(plan: dict[str, Any]) -> dict[str, Any]:
    """Closed loop (``depth`` calls in flight per connection) or open loop at ``rate`` calls/s."""
    requests = [
        (grpc_message(base64.b64decode(body)), grpc_message(base64.b64decode(answer)))
        for body, answer in plan["requests"]
    ]
    host, port = plan["host"], int(plan["port"])
    block = request_header_block(
        f"{host}:{port}", plan["path"], [(name, value) for name, value in plan["headers"]]
    )
    connections = [Connection(host, port, block, requests) for _ in range(plan["connections"])]
    depth: int = plan["depth"]
    rate: float | None = plan.get("rate")
    selector = selectors.DefaultSelector()
    for connection in connections:
        selector.register(connection.sock, selectors.EVENT_READ, connection)
    stats = Stats(refusals_ok=bool(plan.get("refusals_ok")))
    sent = 0
    start = time.perf_counter_ns()
    measure_from = start + int(plan["warmup"] * 1e9)
    measure_to = measure_from + int(plan["duration"] * 1e9)
    interval_ns = int(1e9 / rate) if rate else 0
    server_pid: int | None = plan.get("server_pid")
    usage_before: resource.struct_rusage | None = None
    server_before = (0.0, 0.0)
    switches_before = 0
    while True:
        now = time.perf_counter_ns()
        if usage_before is None and now >= measure_from:
            usage_before = resource.getrusage(resource.RUSAGE_SELF)
            if server_pid:
                server_before = cpu_times(server_pid)
                switches_before = context_switches(server_pid)
        if now >= measure_to:
            break
        recording = now >= measure_from
        held_back = False
        if rate:
            # Open loop: calls start on schedule; latency counts from the scheduled time, so a
            # server falling behind shows up as latency, not as a slower generator.
            due = start + sent * interval_ns
            while due <= now:
                connection = connections[sent % len(connections)]
                if len(connection.inflight) >= depth or not connection.can_send(sent):
                    held_back = True  # wait for answers rather than spin
                    break
                connection.send(sent, due)
                sent += 1
                due = start + sent * interval_ns
        else:
            for connection in connections:
                while len(connection.inflight) < depth and connection.can_send(sent):
                    connection.send(sent, now)
                    sent += 1
        for connection in connections:
            connection.flush()
        timeout = 0.05
        if rate and not held_back:
            timeout = max(0.0, (start + sent * interval_ns - time.perf_counter_ns()) / 1e9)
        for key, _ in selector.select(timeout):
            connection = key.data
            connection.receive(stats if recording else None)
            connection.flush()
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    server_user = server_sys = switches = None
    if server_pid:
        after = cpu_times(server_pid)
        server_user, server_sys = after[0] - server_before[0], after[1] - server_before[1]
        switches = context_switches(server_pid) - switches_before
    server_cpu = None if server_user is None or server_sys is None else server_user + server_sys
    cpu = 0.0
    if usage_before is not None:
        cpu = (usage_after.ru_utime + usage_after.ru_stime) - (
            usage_before.ru_utime + usage_before.ru_stime
        )
    for connection in connections:
        selector.unregister(connection.sock)
        connection.sock.close()
    latencies = sorted(stats.latencies_ns)
    refused = sorted(stats.refused_latencies_ns)
    return {
        "refused": stats.refused,
        "refused_p50_us": _percentile(refused, 0.50),
        "refused_p99_us": _percentile(refused, 0.99),
        "generator": "h2gen",
        "seconds": plan["duration"],
        "completed": stats.completed,
        "throughput": stats.completed / plan["duration"],
        "wrong": stats.wrong,
        "reset": stats.reset,
        "wrong_sample": base64.b64encode(stats.wrong_sample).decode(),
        "p50_us": _percentile(latencies, 0.50),
        "p99_us": _percentile(latencies, 0.99),
        "offered_rate": rate,
        "server_cpu_us_per_call": _per_call(server_cpu, stats.completed),
        "server_sys_us_per_call": _per_call(server_sys, stats.completed),
        "server_switches_per_call": switches / stats.completed
        if switches is not None and stats.completed
        else None,
        "generator_cpu_us_per_call": _per_call(cpu, stats.completed),
    }


def _per_call(seconds: float | None, calls: int) -> float | None:
    return seconds * 1e6 / calls if seconds is not None and calls else None


def _percentile(sorted_ns: list[int], fraction: float) -> float | None:
    if not sorted_ns:
        return None
    return sorted_ns[min(len(sorted_ns) - 1, int(fraction * len(sorted_ns)))] / 1000


def main(argv: list[str]) -> int:
    with open(argv[0], encoding="utf-8") as file:
        plan = json.load(file)
    json.dump(run(plan), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
