"""Several server processes on one host: a parent that forks workers and keeps them running.

The parent never creates a gRPC object: gRPC's core does not survive a fork, so each worker
builds its own server after the fork (as grpc's examples/python/multiprocessing does). The
parent only forks, restarts workers that die, forwards stop signals and waits.

Each worker reports through a pipe: ``ready`` once it serves, ``failed <reason>`` when it
cannot start. A worker that dies before it was ever ready counts as a failed start; too many
in a row and the parent gives up instead of restarting forever.
"""

import ctypes
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 10.0
# A worker that served this long earns its slot the first backoff again on its next death.
STABLE_SECONDS = 30.0
MAX_FAILED_STARTS = 3
# Beyond the workers' own shutdown grace, before a worker that does not exit is killed.
KILL_MARGIN_SECONDS = 5.0
POLL_SECONDS = 0.1
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# What a worker's process exits with when its function raised something unexpected.
WORKER_CRASHED = 70


class WorkersFailed(Exception):
    """The workers could not be kept running; the message is one line."""


@dataclass
class WorkerLink:
    """What a worker function gets: a stop event (set by SIGTERM/SIGINT) and its report pipe."""

    stopping: threading.Event
    _pipe: int

    def ready(self) -> None:
        os.write(self._pipe, b"ready\n")

    def failed(self, reason: str) -> None:
        os.write(self._pipe, f"failed {' '.join(reason.split())}\n".encode())


WorkerFunction = Callable[[WorkerLink], int]


@dataclass
class _Slot:
    """One of the N workers the parent keeps running, across its successive processes."""

    number: int
    pid: int = 0
    pipe: int = -1
    started: float = 0.0
    ready: bool = False
    failed_starts: int = 0
    backoff: float = FIRST_BACKOFF_SECONDS
    restart_at: float | None = None
    reason: str = ""
    unread: bytearray = field(default_factory=bytearray)


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _drain_when_orphaned(parent: int) -> None:
    """Linux: SIGTERM this worker when the parent dies (even by SIGKILL), so none is left
    serving unsupervised; if the parent is already gone, the worker stops at once."""
    libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter runs on
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("worker %d will outlive its parent (prctl failed)", os.getpid())
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    def __init__(
        self,
        count: int,
        work: WorkerFunction,
        grace_seconds: float,
        on_exit: Callable[[int], None] = lambda pid: None,
    ) -> None:
        self._slots = [_Slot(number) for number in range(1, count + 1)]
        # Told each worker pid that exited (the metrics mark its figures dead).
        self._on_exit = on_exit
        self._work = work
        self._grace = grace_seconds
        self._stop_signal: int | None = None
        self._parent = os.getpid()

    def run(self) -> int:
        """Until SIGTERM/SIGINT: 0 when every worker then drained and exited cleanly."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        log.info("starting %d worker processes (parent pid %d)", len(self._slots), os.getpid())
        for slot in self._slots:
            self._start(slot)
        try:
            while self._stop_signal is None:
                self._read_reports(POLL_SECONDS)
                self._reap(stopping=False)
                self._restart_due()
        except WorkersFailed:
            self._stop_all(signal.SIGTERM)
            raise
        log.info("received signal %d; stopping the workers", self._stop_signal)
        return self._stop_all(self._stop_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self._stop_signal is None:
            self._stop_signal = signum

    # -- starting -----------------------------------------------------------------------------

    def _start(self, slot: _Slot) -> None:
        read_end, write_end = os.pipe()
        # Signals wait until the child has its own handlers (otherwise it would run ours).
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            self._become_worker(write_end)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        os.close(write_end)
        slot.pid, slot.pipe, slot.started = pid, read_end, time.monotonic()
        slot.ready, slot.restart_at, slot.reason = False, None, ""
        slot.unread.clear()
        log.info("worker %d started (pid %d)", slot.number, pid)

    def _become_worker(self, pipe: int) -> None:
        """In the child: never returns (os._exit skips the parent's atexit and finalizers)."""
        code = WORKER_CRASHED
        try:
            for other in self._slots:
                if other.pipe >= 0:
                    os.close(other.pipe)
            stopping = threading.Event()

            def on_signal(signum: int, _frame: object) -> None:
                log.info("worker %d received signal %d; draining", os.getpid(), signum)
                stopping.set()

            for signum in STOP_SIGNALS:
                signal.signal(signum, on_signal)
            _drain_when_orphaned(self._parent)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            code = self._work(WorkerLink(stopping, pipe))
        except BaseException:
            log.exception("worker %d crashed", os.getpid())
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            if slot.restart_at is not None and now >= slot.restart_at:
                self._start(slot)

    # -- watching -----------------------------------------------------------------------------

    def _read_reports(self, timeout: float) -> None:
        pipes = {slot.pipe: slot for slot in self._slots if slot.pipe >= 0}
        if not pipes:
            time.sleep(timeout)
            return
        readable, _, _ = select.select(list(pipes), [], [], timeout)
        for pipe in readable:
            self._read_report(pipes[pipe])

    def _read_report(self, slot: _Slot) -> None:
        chunk = os.read(slot.pipe, 4096)
        if not chunk:
            os.close(slot.pipe)
            slot.pipe = -1
            return
        slot.unread += chunk
        *lines, rest = slot.unread.split(b"\n")
        slot.unread = bytearray(rest)
        for line in lines:
            message = line.decode(errors="replace")
            if message == "ready":
                slot.ready, slot.failed_starts = True, 0
                log.info("worker %d (pid %d) is serving", slot.number, slot.pid)
            elif message.startswith("failed "):
                slot.reason = message.removeprefix("failed ")

    def _reap(self, stopping: bool) -> list[tuple[int, _Slot, int]]:
        """Collects exited workers; unless stopping, schedules their restart (or gives up)."""
        exited = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            slot = next((slot for slot in self._slots if slot.pid == pid), None)
            if slot is None:
                continue
            while slot.pipe >= 0:  # its last words, e.g. why it could not start
                self._read_report(slot)
            slot.pid = 0
            self._on_exit(pid)
            exited.append((pid, slot, status))
            if not stopping:
                self._after_death(slot, pid, status)
        return exited

    def _after_death(self, slot: _Slot, pid: int, status: int) -> None:
        now = time.monotonic()
        how = describe_status(status)
        if not slot.ready:
            slot.failed_starts += 1
            log.error(
                "worker %d (pid %d) %s before serving%s",
                slot.number,
                pid,
                how,
                f": {slot.reason}" if slot.reason else "",
            )
            if slot.failed_starts >= MAX_FAILED_STARTS:
                last = slot.reason or how
                raise WorkersFailed(
                    f"worker {slot.number} failed to start {slot.failed_starts} times in a row "
                    f"(last: {last}); giving up"
                )
        else:
            log.error("worker %d (pid %d) %s after serving", slot.number, pid, how)
            if now - slot.started >= STABLE_SECONDS:
                slot.backoff = FIRST_BACKOFF_SECONDS
        slot.restart_at = now + slot.backoff
        log.info("restarting worker %d in %.1f s", slot.number, slot.backoff)
        slot.backoff = min(slot.backoff * 2, MAX_BACKOFF_SECONDS)

    # -- stopping -----------------------------------------------------------------------------

    def _stop_all(self, signum: int) -> int:
        """Forwards ``signum``, waits grace + margin, kills what is left; 0 if all went well."""
        clean = True
        running = {slot.pid: slot for slot in self._slots if slot.pid}
        for pid in running:
            os.kill(pid, signum)
        deadline = time.monotonic() + self._grace + KILL_MARGIN_SECONDS
        while running and time.monotonic() < deadline:
            self._read_reports(POLL_SECONDS)
            for pid, slot, status in self._reap(stopping=True):
                running.pop(pid, None)
                if status != 0:
                    clean = False
                    log.error("worker %d %s while stopping", slot.number, describe_status(status))
        for pid, slot in running.items():
            log.error(
                "worker %d (pid %d) still running %.0f s after the signal; killing it",
                slot.number,
                pid,
                self._grace + KILL_MARGIN_SECONDS,
            )
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            self._on_exit(pid)
            slot.pid = 0
            clean = False
        for slot in self._slots:
            if slot.pipe >= 0:
                os.close(slot.pipe)
                slot.pipe = -1
        log.info("all workers stopped" if clean else "workers stopped, not all cleanly")
        return 0 if clean else 1
