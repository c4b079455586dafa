"""The transport's limits (rpc/dispatch.py, app.make_grpc_server), with real gRPC and raw HTTP/2.

Each guarantee has its negative control: the same test against gRPC's own thread pool (the
server before the dispatcher), which must fail it.
"""

import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from apikeys.v1 import key_verifier_pb2
from apikeys_client._errors import ResourceExhausted, from_rpc_error
from apikeys_server import app
from apikeys_server.config import Settings
from apikeys_server.rpc import dispatch
from bench.h2gen import ACK, GOAWAY, PING, PREFACE, SETTINGS, frame
from bench.unfinished import UnfinishedStreams
from tests.support import RunningServer, running_server, server_settings

VERIFY = "/apikeys.v1.KeyVerifier/Verify"
SLEEP = "/test.Slow/Sleep"
ENHANCE_YOUR_CALM = 0xB


def stock_server(settings: Settings, _pool: object = None) -> grpc.Server:
    """gRPC's own pool with the same options: the negative control."""
    pool = futures.ThreadPoolExecutor(settings.workers, thread_name_prefix="rpc")
    return grpc.server(pool, options=app.server_options(settings))


@pytest.fixture(params=["dispatcher", pytest.param("stock", id="stock-negative-control")])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "stock":
        monkeypatch.setattr(app, "make_grpc_server", stock_server)
    return str(request.param)


def _verify_malformed(server: RunningServer, timeout: float) -> grpc.StatusCode:
    """A Verify every server answers without a lookup; its status code."""
    with server.channel() as channel:
        _, verifier = server.stubs(channel)
        try:
            verifier.Verify(
                key_verifier_pb2.VerifyRequest(key="ak_bogus", tenant_id="acme"),
                metadata=(("x-api-key", server.admin_key),),
                timeout=timeout,
            )
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


class TestUnfinishedRequests:
    def test_a_thousand_unfinished_streams_hold_no_worker(
        self, transport: str, sqlite_url: str
    ) -> None:
        """1 000 calls whose bodies never finish, over 10 connections, leave Verify and health
        checks answering; gRPC's own pool gives each a thread and stops answering."""
        with (
            running_server(server_settings(sqlite_url, workers=16)) as server,
            UnfinishedStreams(server.app.port, VERIFY, connections=10, streams=100) as held,
        ):
            time.sleep(0.3)  # let the server take them all in
            codes = []
            for _ in range(20):
                codes.append(_verify_malformed(server, timeout=2.0))
                if codes[-1] != grpc.StatusCode.OK:
                    break  # the negative control: no need to wait out the rest
            with server.channel() as channel:
                health = health_pb2_grpc.HealthStub(channel)
                try:
                    health.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                    healthy = True
                except grpc.RpcError:
                    healthy = False
            assert held.refused == 0  # all 1 000 streams were accepted and are open
        if transport == "dispatcher":
            assert codes == [grpc.StatusCode.OK] * 20
            assert healthy
        else:
            assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
            assert not healthy

    def test_a_connection_may_open_max_streams_per_connection(self, sqlite_url: str) -> None:
        """The server announces its per-connection stream cap and refuses streams beyond it."""
        settings = server_settings(sqlite_url, max_streams_per_connection=10)
        with (
            running_server(settings) as server,
            UnfinishedStreams(server.app.port, VERIFY, connections=1, streams=15) as held,
        ):
            deadline = time.monotonic() + 5
            while held.refused < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert held.max_concurrent_streams == [10]
            assert held.refused == 5


@contextmanager
def _reflection_streams(server: RunningServer, count: int) -> Iterator[list[grpc.StatusCode]]:
    """Opens ``count`` reflection streams that ask once and stay open (each holds a thread of
    the server, waiting for its next request); yields the code each ended with (OK: open)."""
    channel = server.channel()
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests: list[queue.Queue[reflection_pb2.ServerReflectionRequest | None]] = []
    calls = []
    codes = []
    for _ in range(count):
        asked: queue.Queue[reflection_pb2.ServerReflectionRequest | None] = queue.Queue()
        asked.put(reflection_pb2.ServerReflectionRequest(list_services=""))
        requests.append(asked)
        call = stub.ServerReflectionInfo(iter(asked.get, None), timeout=30)
        calls.append(call)
        try:
            next(call)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            codes.append(error.code())
    try:
        yield codes
    finally:
        for asked, call in zip(requests, calls, strict=True):
            asked.put(None)
            call.cancel()
        channel.close()


class TestStreams:
    def test_streams_run_beside_the_workers(self, transport: str, sqlite_url: str) -> None:
        """With one worker, an open WatchKeyChanges stream leaves it free for unary calls;
        gRPC's pool gives the stream its only thread."""
        settings = server_settings(sqlite_url, workers=1, max_streams=4)
        with running_server(settings) as server, server.channel() as channel:
            _, verifier = server.stubs(channel)
            watch = verifier.WatchKeyChanges(
                key_verifier_pb2.WatchKeyChangesRequest(),
                metadata=(("x-api-key", server.admin_key),),
                timeout=30,
            )
            next(watch)  # open and answering
            code = _verify_malformed(server, timeout=2.0)
            watch.cancel()
        if transport == "dispatcher":
            assert code == grpc.StatusCode.OK
        else:
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED

    def test_streams_beyond_max_streams_are_refused(self, sqlite_url: str) -> None:
        """The stream after the cap is refused at once with RESOURCE_EXHAUSTED; unary calls
        still answer."""
        settings = server_settings(sqlite_url, workers=2, max_streams=2)
        with running_server(settings) as server, _reflection_streams(server, 3) as opened:
            code = _verify_malformed(server, timeout=2.0)
        assert opened == [grpc.StatusCode.OK] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert code == grpc.StatusCode.OK


# -- overload: a server whose one method sleeps, so queues form on demand -------------------


# One entry per call the slow method has started running (appends are atomic).
_STARTED: list[float] = []


def _sleeper(request: bytes, context: grpc.ServicerContext) -> bytes:
    _STARTED.append(time.monotonic())
    time.sleep(int(request.decode()) / 1000)
    return b"done"


def _queued(pool: futures.ThreadPoolExecutor) -> int:
    """Calls that reached the server and wait for its one thread."""
    if isinstance(pool, dispatch.Dispatcher):
        return pool.waiting
    return pool._work_queue.qsize()  # gRPC's own pool queues each call as it arrives


def _wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("the server did not get there in time")
        time.sleep(0.005)


@contextmanager
def _slow_server(pool: futures.ThreadPoolExecutor) -> Iterator[grpc.Channel]:
    dispatch.install()
    server = grpc.server(pool)
    handler = grpc.unary_unary_rpc_method_handler(_sleeper)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Slow", {"Sleep": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        server.stop(0).wait()


def _call(channel: grpc.Channel, millis: int, timeout: float) -> tuple[grpc.StatusCode, Any, float]:
    """(code, the RpcError or None, seconds it took)."""
    sleep: Callable[..., bytes] = channel.unary_unary(SLEEP)
    started = time.monotonic()
    try:
        sleep(str(millis).encode(), timeout=timeout)
        return grpc.StatusCode.OK, None, time.monotonic() - started
    except grpc.RpcError as error:
        return error.code(), error, time.monotonic() - started


def _pool(kind: str) -> futures.ThreadPoolExecutor:
    if kind == "dispatcher":
        return dispatch.Dispatcher(workers=1, max_queued=2, max_streams=1)
    return futures.ThreadPoolExecutor(1)


class TestOverload:
    @pytest.mark.parametrize("kind", ["dispatcher", pytest.param("stock", id="stock-negative")])
    def test_calls_beyond_the_queue_are_refused_at_once(self, kind: str) -> None:
        """One worker, two places in the queue: of 8 simultaneous 300 ms calls at most 3 are
        answered and the rest refused at once with RESOURCE_EXHAUSTED, OVERLOADED and a retry
        delay; gRPC's pool queues them all."""
        with _slow_server(_pool(kind)) as channel, futures.ThreadPoolExecutor(8) as clients:
            results = list(clients.map(lambda _: _call(channel, 300, 10.0), range(8)))
        codes = [code for code, _, _ in results]
        if kind == "stock":
            assert codes == [grpc.StatusCode.OK] * 8
            return
        refused = [(error, took) for code, error, took in results if code != grpc.StatusCode.OK]
        assert 2 <= codes.count(grpc.StatusCode.OK) <= 3
        assert len(refused) == 8 - codes.count(grpc.StatusCode.OK)
        for error, took in refused:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "overloaded" in error.details()
            assert took < 0.25  # before the first answered call could end
            status = rpc_status.from_call(error)
            assert status is not None
            info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
            assert status.details[0].Unpack(info) and status.details[1].Unpack(retry)
            assert (info.reason, info.domain) == ("OVERLOADED", "apikeys")
            assert retry.retry_delay.ToMilliseconds() > 0
            typed = from_rpc_error(error)  # what the Python client raises
            assert isinstance(typed, ResourceExhausted)
            assert (typed.reason, typed.retry_after) == ("OVERLOADED", 0.05)

    @pytest.mark.parametrize("kind", ["dispatcher", pytest.param("stock", id="stock-negative")])
    def test_a_call_that_would_miss_its_deadline_in_the_queue_is_refused_at_once(
        self, kind: str
    ) -> None:
        """Calls take ~300 ms; with one running and one waiting, a call with a 100 ms deadline
        cannot be answered in time: refused at once, instead of DEADLINE_EXCEEDED later."""
        pool = _pool(kind)
        with _slow_server(pool) as channel, futures.ThreadPoolExecutor(3) as clients:
            assert _call(channel, 300, 10.0)[0] == grpc.StatusCode.OK  # learns the call time
            started = len(_STARTED)
            running = clients.submit(_call, channel, 300, 10.0)
            _wait_for(lambda: len(_STARTED) > started)  # it holds the one thread
            waiting = clients.submit(_call, channel, 300, 10.0)
            _wait_for(lambda: _queued(pool) == 1)
            code, _, took = _call(channel, 300, 0.1)
            assert running.result()[0] == waiting.result()[0] == grpc.StatusCode.OK
        if kind == "stock":
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert took < 0.09


class TestKeepalive:
    def test_a_client_pinging_too_often_is_sent_away(self, sqlite_url: str) -> None:
        """Pings more often than min_client_ping_seconds end the connection with GOAWAY
        ENHANCE_YOUR_CALM (gRPC's too_many_pings)."""
        settings = server_settings(sqlite_url, min_client_ping_seconds=1.0)
        with running_server(settings) as server:
            error_code = _ping_until_goaway(server.app.port, every=0.1, within=5.0)
        assert error_code == ENHANCE_YOUR_CALM

    def test_the_python_client_pings_within_the_servers_allowance(self) -> None:
        """The client's default keepalive interval is one the default server accepts."""
        from apikeys_client._requests import channel_options

        options = dict(channel_options())
        assert options["grpc.keepalive_time_ms"] >= Settings().min_client_ping_seconds * 1000


def _ping_until_goaway(port: int, every: float, within: float) -> int | None:
    """Sends PINGs with no calls; returns the GOAWAY error code, None if none came in time."""
    with socket.create_connection(("127.0.0.1", port), timeout=within) as sock:
        sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        stop = threading.Event()
        found: list[int] = []

        def read() -> None:
            buffer = b""
            while not stop.is_set():
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while len(buffer) >= 9:
                    length = int.from_bytes(buffer[:3], "big")
                    if len(buffer) < 9 + length:
                        break
                    kind, flags = buffer[3], buffer[4]
                    payload, buffer = buffer[9 : 9 + length], buffer[9 + length :]
                    if kind == SETTINGS and not flags & ACK:
                        sock.sendall(frame(SETTINGS, ACK, 0))
                    elif kind == GOAWAY:
                        found.append(struct.unpack_from(">II", payload)[1])
                        return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.monotonic() + within
        try:
            while not found and time.monotonic() < deadline:
                sock.sendall(frame(PING, 0, 0, b"\x00" * 8))
                time.sleep(every)
        except OSError:
            pass
        reader.join(timeout=1)
        stop.set()
    return found[0] if found else None
