"""Prometheus metrics at ``http://HOST:PORT/metrics`` (``--metrics-listen``), prometheus-client.

Two kinds of figures:

* Per call, recorded where every handler is already wrapped (rpc/registration.py): a counter
  and a latency histogram per method and status code, under the names gateways' dashboards
  expect (go-grpc-prometheus: ``grpc_server_handled_total``, ``grpc_server_handling_seconds``),
  and ``apikeys_verify_total{code}``. In one process they are plain numbers (``CallTable``):
  a call costs two clock reads, a dict lookup, a bisect and three adds under one lock (~1 µs);
  with several processes, prometheus-client's multiprocess Counter/Histogram (``SharedCalls``).
* Everything else (cache hits, misses, evictions and sizes, database pool and errors, last-used
  flush lag, change-feed lag) is counted by the code that does the work with plain integers or
  is already known there, and read only when scraped (``ServiceCollector``): the Verify path
  pays an integer add under a lock it already holds, not a metrics call.

One process (the default) serves its own registry from a thread of prometheus-client's HTTP
server, started and stopped with the App. With ``--processes N`` the parent serves: it sets up
``PROMETHEUS_MULTIPROC_DIR`` in a new temporary directory before forking (``ParentExporter``),
workers write their figures to files there (prometheus-client's multiprocess mode), and the
parent merges them on each scrape; it marks each dead worker's files dead so its live gauges
vanish (counters keep their totals, as Prometheus expects). A scrape therefore sees the whole
service through one address, whichever worker the kernel gave a connection to. Scrape-time
figures cannot reach the parent from a worker's memory, so each worker copies them into
multiprocess metrics every ``SAMPLE_SECONDS`` (off the call path); with several processes they
are that much older.
"""

import logging
import math
import os
import shutil
import tempfile
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from apikeys.v1 import key_verifier_pb2
from apikeys_server.config import Settings
from apikeys_server.rpc.dispatch import Dispatcher
from apikeys_server.storage.cache import KeyCache
from apikeys_server.storage.database import Database
from apikeys_server.storage.errors import FAILURES
from apikeys_server.storage.follower import FeedFollower
from apikeys_server.storage.last_used import LastUsedRecorder

log = logging.getLogger(__name__)

MULTIPROC_VARIABLE: Final = "PROMETHEUS_MULTIPROC_DIR"
# Cache hits take tens of microseconds: the default buckets (5 ms and up) would put every
# Verify in the first one.
LATENCY_BUCKETS: Final = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
SAMPLE_SECONDS: Final = 1.0

Observe = Callable[[float, "grpc.StatusCode | None"], None]


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROC_VARIABLE))


# -- scrape-time figures --------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One scrape-time metric: ``read`` answers (label values, value) pairs."""

    name: str
    help: str
    kind: str  # "counter" or "gauge"
    labels: tuple[str, ...]
    read: Callable[[], Iterable[tuple[tuple[str, ...], float]]]
    # How the parent merges a gauge of several workers (prometheus-client multiprocess_mode).
    merge: Literal["livesum", "livemax", "livemin"] = "livesum"


def figures(
    cache: KeyCache,
    database: Database,
    last_used: LastUsedRecorder,
    follower: FeedFollower | None,
    transport: Dispatcher | None = None,
) -> list[Figure]:
    def cache_counts() -> Iterator[tuple[tuple[str, ...], float]]:
        stats = cache.stats()
        yield ("positive",), stats.hits
        yield ("negative",), stats.negative_hits

    def pool() -> Iterator[tuple[tuple[str, ...], float]]:
        for engine, name in ((database.read_engine, "read"), (database.write_engine, "write")):
            checked_out = getattr(engine.pool, "checkedout", None)
            if checked_out is not None:
                yield (name,), float(checked_out())

    made = [
        Figure(
            "apikeys_cache_hits",
            "Verify lookups answered by the cache (negative: a known unknown key)",
            "counter",
            ("cache",),
            cache_counts,
        ),
        Figure(
            "apikeys_cache_misses",
            "Verify lookups the cache could not answer (went to the database)",
            "counter",
            (),
            lambda: [((), cache.stats().misses)],
        ),
        Figure(
            "apikeys_cache_invalidations",
            "Digests evicted because a key changed (here or through the change feed)",
            "counter",
            (),
            lambda: [((), cache.stats().evictions)],
        ),
        Figure(
            "apikeys_cache_evictions",
            "Entries dropped to make room (least recently used)",
            "counter",
            ("cache",),
            lambda: [
                (("positive",), cache.stats().positive_dropped),
                (("negative",), cache.stats().negative_dropped),
            ],
        ),
        Figure(
            "apikeys_cache_entries",
            "Entries held (expired ones not yet dropped included)",
            "gauge",
            ("cache",),
            lambda: [
                (("positive",), cache.stats().positive_size),
                (("negative",), cache.stats().negative_size),
            ],
        ),
        Figure(
            "apikeys_db_pool_in_use",
            "Database connections checked out of the pool",
            "gauge",
            ("engine",),
            pool,
        ),
        Figure(
            "apikeys_db_errors",
            "Database operations that failed (unreachable, timed out, refused)",
            "counter",
            (),
            lambda: [((), FAILURES.count)],
        ),
        Figure(
            "apikeys_last_used_flush_lag_seconds",
            "Seconds since last-used times were last all written",
            "gauge",
            (),
            lambda: [((), time.monotonic() - last_used.flushed_at)],
            merge="livemax",
        ),
        Figure(
            "apikeys_last_used_pending_keys",
            "Keys whose last-used time waits for the next flush",
            "gauge",
            (),
            lambda: [((), last_used.pending())],
        ),
    ]
    if transport is not None:
        dispatcher = transport
        made += [
            Figure(
                "apikeys_calls_waiting",
                "Complete calls waiting for a worker thread",
                "gauge",
                (),
                lambda: [((), dispatcher.waiting)],
            ),
            Figure(
                "apikeys_streams_open",
                "Streams (watches, reflection) running on their own threads",
                "gauge",
                (),
                lambda: [((), dispatcher.open_streams)],
            ),
            Figure(
                "apikeys_refused",
                "Calls refused with RESOURCE_EXHAUSTED by the transport: overloaded (too many "
                "waiting, or the deadline could not be met) or streams (over the cap)",
                "counter",
                ("reason",),
                lambda: [
                    (("overloaded",), dispatcher.refused_calls),
                    (("streams",), dispatcher.refused_streams),
                ],
            ),
        ]
    if follower is not None:
        made += [
            Figure(
                "apikeys_feed_position",
                "Change-feed position this process has applied",
                "gauge",
                (),
                lambda: [((), follower.position)],
                merge="livemin",
            ),
            Figure(
                "apikeys_feed_confirmed_age_seconds",
                "Seconds since the change feed was last confirmed read to its end",
                "gauge",
                (),
                lambda: [((), follower.confirmed_age())],
                merge="livemax",
            ),
        ]
    return made


class ServiceCollector(Collector):
    """The figures, computed when scraped (one process)."""

    def __init__(self, made: list[Figure]) -> None:
        self._figures = made

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        for figure in self._figures:
            family: Metric
            if figure.kind == "counter":
                family = CounterMetricFamily(figure.name, figure.help, labels=figure.labels)
            else:
                family = GaugeMetricFamily(figure.name, figure.help, labels=figure.labels)
            for values, value in figure.read():
                family.add_metric(list(values), value)
            yield family


class Sampler:
    """A worker's figures copied into multiprocess metrics every ``SAMPLE_SECONDS``."""

    def __init__(self, made: list[Figure], registry: CollectorRegistry) -> None:
        self._figures = made
        self._metrics: dict[str, Any] = {}
        self._seen: dict[tuple[str, tuple[str, ...]], float] = {}
        for figure in made:
            if figure.kind == "counter":
                self._metrics[figure.name] = Counter(
                    figure.name, figure.help, figure.labels, registry=registry
                )
            else:
                self._metrics[figure.name] = Gauge(
                    figure.name,
                    figure.help,
                    figure.labels,
                    registry=registry,
                    multiprocess_mode=figure.merge,
                )
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        for figure in self._figures:
            metric = self._metrics[figure.name]
            for values, value in figure.read():
                child = metric.labels(*values) if values else metric
                if figure.kind == "counter":
                    before = self._seen.get((figure.name, values), 0.0)
                    if value > before:
                        child.inc(value - before)
                    self._seen[(figure.name, values)] = value
                else:
                    child.set(value)

    def start(self) -> None:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="metrics-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.wait(SAMPLE_SECONDS):
            try:
                self.sample()
            except Exception:
                log.exception("metrics: sampling failed")


# -- per-call figures -----------------------------------------------------------------------


# VerifyResponse.code -> the label: VALID, NOT_FOUND, REVOKED... (the prefix dropped)
VERIFY_CODES: Final[dict[int, str]] = {
    int(number): name.removeprefix("VERIFY_CODE_")
    for name, number in key_verifier_pb2.VerifyCode.items()
}
CallLabels = tuple[str, str, str, str]  # grpc_type, grpc_service, grpc_method, grpc_code
CALL_LABELS: Final = ("grpc_type", "grpc_service", "grpc_method", "grpc_code")


class CallTable(Collector):
    """Per-call figures of one process as plain numbers: per (method, code) a count, a sum and
    bucket counts, each call adding to them under one lock; exposed as counter and histogram
    families when scraped. prometheus-client's Counter.inc and Histogram.observe take a lock
    each per value (three per call) and a Python loop over the buckets: measured ~6 µs a call
    on the development machine, against ~1 µs here (bisect in C, one lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # labels -> [count, sum of seconds, per-bucket counts (the last one: +Inf)]
        self._rows: dict[CallLabels, list[Any]] = {}
        # VerifyResponse.code (an int: hashing a Python Enum member costs ~0.3 µs) -> count
        self._verified = dict.fromkeys(VERIFY_CODES, 0)

    def row(self, labels: CallLabels) -> list[Any]:
        with self._lock:
            return self._rows.setdefault(labels, [0, 0.0, [0] * (len(LATENCY_BUCKETS) + 1)])

    def observer(self, service: str, method: str, grpc_type: str) -> Observe:
        rows: dict[grpc.StatusCode | None, list[Any]] = {}
        lock, clock, bounds = self._lock, time.perf_counter, LATENCY_BUCKETS

        def observe(started: float, code: grpc.StatusCode | None) -> None:
            elapsed = clock() - started
            row = rows.get(code)
            if row is None:
                name = (code or grpc.StatusCode.OK).name
                row = rows[code] = self.row((grpc_type, service, method, name))
            index = bisect_left(bounds, elapsed)  # the first bucket whose bound is >= elapsed
            with lock:
                row[0] += 1
                row[1] += elapsed
                row[2][index] += 1

        return observe

    def count_verify(self, code: int) -> None:
        with self._lock:
            self._verified[code] += 1

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            rows = [(labels, row[0], row[1], list(row[2])) for labels, row in self._rows.items()]
            verified = dict(self._verified)
        handled = CounterMetricFamily("grpc_server_handled", HANDLED_HELP, labels=CALL_LABELS)
        latency = HistogramMetricFamily(
            "grpc_server_handling_seconds", LATENCY_HELP, labels=CALL_LABELS
        )
        for labels, count, total, buckets in rows:
            handled.add_metric(list(labels), count)
            cumulative, running = [], 0
            for bound, bucket in zip((*LATENCY_BUCKETS, math.inf), buckets, strict=True):
                running += bucket
                cumulative.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
            latency.add_metric(list(labels), cumulative, total)
        yield handled
        yield latency
        answers = CounterMetricFamily("apikeys_verify", VERIFY_HELP, labels=("code",))
        for code, count in verified.items():
            answers.add_metric([VERIFY_CODES[code]], count)
        yield answers


HANDLED_HELP: Final = "RPCs completed on the server, whatever their status"
LATENCY_HELP: Final = "Time handlers took to complete the RPC (server side)"
VERIFY_HELP: Final = "Verify answers by code (VALID, NOT_FOUND, REVOKED...)"


class SharedCalls:
    """Per-call figures in prometheus-client's multiprocess files (several processes): the
    library's own Counter and Histogram, label children resolved once per (method, code)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._handled = Counter("grpc_server_handled", HANDLED_HELP, CALL_LABELS, registry=registry)
        self._latency = Histogram(
            "grpc_server_handling_seconds",
            LATENCY_HELP,
            CALL_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        verified = Counter("apikeys_verify", VERIFY_HELP, ("code",), registry=registry)
        self._verified = {code: verified.labels(name).inc for code, name in VERIFY_CODES.items()}

    def observer(self, service: str, method: str, grpc_type: str) -> Observe:
        children: dict[grpc.StatusCode | None, tuple[Callable[[], None], Callable[[float], None]]]
        children = {}
        handled, latency, clock = self._handled, self._latency, time.perf_counter

        def observe(started: float, code: grpc.StatusCode | None) -> None:
            elapsed = clock() - started
            pair = children.get(code)
            if pair is None:
                labels = (grpc_type, service, method, (code or grpc.StatusCode.OK).name)
                pair = children[code] = (
                    handled.labels(*labels).inc,
                    latency.labels(*labels).observe,
                )
            pair[0]()
            pair[1](elapsed)

        return observe

    def count_verify(self, code: int) -> None:
        self._verified[code]()


class Metrics:
    """One App's metrics: the per-call instruments, the figures, and their exposition."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = CollectorRegistry(auto_describe=False)
        self.calls: CallTable | SharedCalls
        if multiprocess():
            self.calls = SharedCalls(self.registry)
        else:
            self.calls = CallTable()
            self.registry.register(self.calls)
        self.observer = self.calls.observer
        self.count_verify = self.calls.count_verify
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sampler: Sampler | None = None
        self.port = 0

    def watch(self, made: list[Figure]) -> None:
        """Registers the scrape-time figures (sampled instead with several processes)."""
        if multiprocess():
            self._sampler = Sampler(made, self.registry)
        else:
            self.registry.register(ServiceCollector(made))

    def start(self) -> None:
        if self._sampler is not None:
            self._sampler.start()
            return  # the parent serves (ParentExporter)
        host, port = split_listen(self.settings.metrics_listen)
        self._server, self._thread = start_http_server(port, host, self.registry)
        self.port = int(self._server.server_port)
        log.info("metrics at http://%s:%d/metrics", host, self.port)

    def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler.sample()  # the last figures, before the worker exits
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class ParentExporter:
    """With ``--processes N``: the parent's /metrics, merging what the workers wrote."""

    def __init__(self, listen: str) -> None:
        # Before any worker is forked, and before prometheus-client picks its value class.
        self.directory = tempfile.mkdtemp(prefix="apikeys-metrics-")
        os.environ[MULTIPROC_VARIABLE] = self.directory
        self._set_value_class()
        from prometheus_client import multiprocess as mp

        self._mp = mp
        self.registry = CollectorRegistry(auto_describe=False)
        mp.MultiProcessCollector(self.registry, path=self.directory)  # type: ignore[no-untyped-call]
        host, port = split_listen(listen)
        self._server, self._thread = start_http_server(port, host, self.registry)
        log.info("metrics of every worker at http://%s:%d/metrics", host, port)

    @staticmethod
    def _set_value_class() -> None:
        # prometheus-client chooses between in-memory and mmap-file values when imported;
        # this module imported it before the variable was set.
        from prometheus_client import values

        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]

    def worker_exited(self, pid: int) -> None:
        """Its live gauges disappear; its counters and histograms still count."""
        self._mp.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        shutil.rmtree(self.directory, ignore_errors=True)
