"""Calls reach a worker thread only once their request is complete; the excess is refused.

grpcio's sync server hands every new call to a pool thread at once, and that thread then
waits for the request message. A client that opens streams and never finishes their bodies
holds one thread each: with ``workers`` such streams the server stops answering everyone,
health checks included. And its pool queues without bound: under overload every caller
waits, none is told.

``Dispatcher`` is the thread pool given to ``grpc.server``; with it, the server's polling
thread asks for the request message itself and dispatches the call only when the message is
there, so an unfinished request costs a little memory in gRPC's core and no thread:

- unary calls run on the ``workers`` threads, once their request has arrived; a complete
  request is refused at once with RESOURCE_EXHAUSTED (retryable, with ``RetryInfo``) when
  ``max_queued`` calls already wait for a thread, or when it could not end before its
  deadline: the expected wait (calls waiting x the recent mean time a call holds a thread /
  workers) plus its own method's recent mean exceeds what is left;
- streams (server-streaming, client-streaming: WatchKeyChanges, health Watch, reflection)
  run on a pool of their own of ``max_streams`` threads, so they never take a unary worker;
  beyond it new streams are refused with RESOURCE_EXHAUSTED.

This replaces one private function of ``grpc._server`` (``_handle_with_method_handler``) for
servers built with a ``Dispatcher``; servers with any other pool keep gRPC's own. The parts
of gRPC's server it uses are checked once at import; pyproject.toml pins grpcio to the minor
versions it was checked against, and tests/integration/test_dispatch.py holds the behaviour.
"""

import importlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any, Final

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from apikeys_server.rpc.errors import DOMAIN

log = logging.getLogger(__name__)

# Private modules, typed as what they are to this module: untyped.
grpc_server: Any = importlib.import_module("grpc._server")
cygrpc: Any = importlib.import_module("grpc._cython.cygrpc")

# What this module uses of grpc._server (present in 1.85; see the module docstring).
_USED: Final = (
    "_handle_with_method_handler",
    "_handle_stream_unary",
    "_handle_stream_stream",
    "_unary_response_in_pool",
    "_stream_response_in_pool",
    "_receive_close_on_server",
    "_serialized_request",
    "_possibly_finish_call",
    "_is_rpc_state_active",
    "_abort",
    "_common",
    "_OPEN",
    "_CLOSED",
    "_RECEIVE_CLOSE_ON_SERVER_TOKEN",
    "_RECEIVE_MESSAGE_TOKEN",
)
SUPPORTED: Final = all(hasattr(grpc_server, name) for name in _USED)

_MEAN_WEIGHT: Final = 0.05  # of each new call in the running mean of a call's thread time
_OVERLOADED_REASON: Final = "OVERLOADED"


Refusal = tuple[bytes, tuple[tuple[str, str | bytes], ...]]


def _refusal(message: str, retry_after: float) -> Refusal:
    """RESOURCE_EXHAUSTED's details and the trailing metadata carrying its google.rpc.Status
    (ErrorInfo + RetryInfo), built once: a refusal must cost less than an answer."""
    retry = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(nanos=int(retry_after * 1e9))
    )
    info = error_details_pb2.ErrorInfo(reason=_OVERLOADED_REASON, domain=DOMAIN)
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message)
    for detail in (info, retry):
        status.details.add().Pack(detail)
    metadata = rpc_status.to_status(status).trailing_metadata
    return message.encode(), tuple(metadata)


class Dispatcher(futures.ThreadPoolExecutor):
    """The unary worker pool, with its admission rule and the separate pool for streams."""

    def __init__(self, workers: int, max_queued: int, max_streams: int, name: str = "rpc") -> None:
        super().__init__(max_workers=workers, thread_name_prefix=name)
        # All workers now, not one per call as calls come: gRPC's polling thread would start
        # them, and Thread.start() waits for the new thread to run. On a busy core that wait
        # stalled a fresh server's first burst for most of a second (measured with another
        # process spinning on its core: 0-50 answers in the first 0.4 s; 1 900-3 000 with the
        # threads started here).
        for _ in range(workers):
            self._adjust_thread_count()
        self.workers = workers
        self.max_queued = max_queued
        self.max_streams = max_streams
        self.streams = futures.ThreadPoolExecutor(max_streams, thread_name_prefix=f"{name}-stream")
        self._lock = threading.Lock()
        self._waiting = 0  # dispatched, not yet on a thread
        self._open_streams = 0
        # Recent means of the time a unary call holds a thread: over all, and per method.
        self._mean_seconds = 0.0
        self._method_seconds: dict[object, float] = {}
        # Refusals so far, read by the metrics: calls for overload, streams over the cap.
        self.refused_calls = 0
        self.refused_streams = 0
        self._queue_full = _refusal(
            f"the server is overloaded ({max_queued} calls are waiting): retry with backoff",
            0.05,
        )
        self._too_late = _refusal(
            "the server is overloaded: the calls waiting ahead of this one would not let it "
            "end before its deadline; retry with backoff or a longer deadline",
            0.05,
        )
        self._streams_full = _refusal(
            f"too many open streams (at most {max_streams} at once): retry later", 1.0
        )

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def open_streams(self) -> int:
        return self._open_streams

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.streams.shutdown(wait, cancel_futures=cancel_futures)
        super().shutdown(wait, cancel_futures=cancel_futures)

    def handle(self, rpc_event: Any, state: Any, method_handler: Any) -> futures.Future[None]:
        """What gRPC calls (on its polling thread) for each new call with a handler."""
        done: futures.Future[None] = futures.Future()
        with state.condition:
            call = rpc_event.call
            call.start_server_batch(
                (cygrpc.ReceiveCloseOnServerOperation(0),),
                grpc_server._receive_close_on_server(state),
            )
            state.due.add(grpc_server._RECEIVE_CLOSE_ON_SERVER_TOKEN)
            if method_handler.request_streaming:
                job = self._start_stream(rpc_event, state, method_handler)
            else:
                call.start_server_batch(
                    (cygrpc.ReceiveMessageOperation(0),),
                    self._on_request(rpc_event, state, method_handler, done),
                )
                state.due.add(grpc_server._RECEIVE_MESSAGE_TOKEN)
                return done
        _chain(job, done)
        return done

    def _start_stream(self, rpc_event: Any, state: Any, handler: Any) -> futures.Future[None]:
        if not self._take_stream_slot():
            self._refuse(rpc_event, state, self._streams_full)
            return _finished()
        start = (
            grpc_server._handle_stream_stream
            if handler.response_streaming
            else grpc_server._handle_stream_unary
        )
        job: futures.Future[None] = start(rpc_event, state, handler, self.streams)
        job.add_done_callback(self._release_stream_slot)
        return job

    def _on_request(
        self, rpc_event: Any, state: Any, handler: Any, done: futures.Future[None]
    ) -> Callable[[Any], Any]:
        """The callback gRPC runs on its polling thread when the request message arrived."""

        def received(event: Any) -> Any:
            serialized = grpc_server._serialized_request(event)
            job: futures.Future[None] | None = None
            with state.condition:
                if serialized is None:
                    if state.client is grpc_server._OPEN:
                        state.client = grpc_server._CLOSED
                    if state.client is grpc_server._CLOSED:
                        method = rpc_event.call_details.method.decode()
                        details = f'"{method}" requires exactly one request message.'
                        grpc_server._abort(
                            state, rpc_event.call, cygrpc.StatusCode.unimplemented, details.encode()
                        )
                else:
                    request = grpc_server._common.deserialize(
                        serialized, handler.request_deserializer
                    )
                    if request is None:
                        grpc_server._abort(
                            state,
                            rpc_event.call,
                            cygrpc.StatusCode.internal,
                            b"Exception deserializing request!",
                        )
                    elif grpc_server._is_rpc_state_active(state):
                        job = self._dispatch(rpc_event, state, handler, request)
                state.condition.notify_all()
                finished = grpc_server._possibly_finish_call(
                    state, grpc_server._RECEIVE_MESSAGE_TOKEN
                )
            # Outside the call's lock: completing `done` takes the server's lock, which gRPC
            # takes before a call's lock elsewhere.
            if job is None:
                done.set_result(None)
            else:
                _chain(job, done)
            return finished

        return received

    def _dispatch(
        self, rpc_event: Any, state: Any, handler: Any, request: Any
    ) -> futures.Future[None] | None:
        """With the call's lock held: the job that answers it, or None when refused."""
        if handler.response_streaming:
            if not self._take_stream_slot():
                self._refuse(rpc_event, state, self._streams_full)
                return None
            job = self.streams.submit(
                state.context.run,
                grpc_server._stream_response_in_pool,
                rpc_event,
                state,
                handler.unary_stream,
                _still_wanted(state, request),
                handler.request_deserializer,
                handler.response_serializer,
            )
            job.add_done_callback(self._release_stream_slot)
            return job
        behavior = handler.unary_unary
        refusal = self._admit(rpc_event.call_details.deadline, behavior)
        if refusal is not None:
            self._refuse(rpc_event, state, refusal)
            return None
        return self.submit(
            self._run_unary,
            rpc_event,
            state,
            behavior,
            _still_wanted(state, request),
            handler.request_deserializer,
            handler.response_serializer,
        )

    def _admit(self, deadline: float, behavior: object) -> Refusal | None:
        """Takes a place in the queue (None), or says why not."""
        with self._lock:
            waiting = self._waiting
            if waiting >= self.max_queued:
                return self._queue_full
            # The wait behind the calls ahead (whatever their methods), then its own time
            # (its method's: a cache hit takes a fraction of a database write).
            expected = waiting * self._mean_seconds / self.workers
            expected += self._method_seconds.get(behavior, 0.0)
            if time.time() + expected > deadline:
                return self._too_late
            self._waiting = waiting + 1
            return None

    def _run_unary(self, rpc_event: Any, state: Any, behavior: object, *arguments: Any) -> None:
        started = time.perf_counter()
        with self._lock:
            self._waiting -= 1
        try:
            state.context.run(
                grpc_server._unary_response_in_pool, rpc_event, state, behavior, *arguments
            )
        finally:
            spent = time.perf_counter() - started
            with self._lock:
                self._mean_seconds = _moved(self._mean_seconds, spent)
                self._method_seconds[behavior] = _moved(
                    self._method_seconds.get(behavior, 0.0), spent
                )

    def _refuse(self, rpc_event: Any, state: Any, refusal: Refusal) -> None:
        details, trailing = refusal
        state.trailing_metadata = trailing
        grpc_server._abort(state, rpc_event.call, cygrpc.StatusCode.resource_exhausted, details)
        with self._lock:
            if refusal is self._streams_full:
                self.refused_streams += 1
            else:
                self.refused_calls += 1

    def _take_stream_slot(self) -> bool:
        with self._lock:
            if self._open_streams >= self.max_streams:
                return False
            self._open_streams += 1
            return True

    def _release_stream_slot(self, _job: object) -> None:
        with self._lock:
            self._open_streams -= 1


def _moved(mean: float, sample: float) -> float:
    """The running mean with one more sample (the first sample starts it)."""
    return mean + (sample - mean) * _MEAN_WEIGHT if mean else sample


def _still_wanted(state: Any, request: Any) -> Callable[[], Any]:
    """The request, unless the caller gave up (cancelled, deadline passed) while it waited."""
    return lambda: request if grpc_server._is_rpc_state_active(state) else None


def _chain(job: futures.Future[None], done: futures.Future[None]) -> None:
    job.add_done_callback(lambda _job: done.set_result(None))


def _finished() -> futures.Future[None]:
    future: futures.Future[None] = futures.Future()
    future.set_result(None)
    return future


_grpc_handle_with_method_handler: Any = getattr(grpc_server, "_handle_with_method_handler", None)


def _handle_with_method_handler(
    rpc_event: Any, state: Any, method_handler: Any, thread_pool: Any
) -> Any:
    if isinstance(thread_pool, Dispatcher):
        return thread_pool.handle(rpc_event, state, method_handler)
    return _grpc_handle_with_method_handler(rpc_event, state, method_handler, thread_pool)


def install() -> bool:
    """Routes servers built with a Dispatcher through it; False (and a warning) when this
    grpcio lacks what it needs, in which case such servers behave as gRPC's own."""
    if not SUPPORTED:
        log.warning(
            "grpcio %s lacks the server internals the dispatcher needs: unfinished requests "
            "can hold RPC threads and overload is queued, not refused",
            grpc.__version__,
        )
        return False
    grpc_server._handle_with_method_handler = _handle_with_method_handler
    return True
