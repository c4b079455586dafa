"""Last-used times: gathered in memory, flushed in batches, kept on failure."""

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from apikeys_server.domain.errors import Unavailable
from apikeys_server.domain.ports import Presented
from apikeys_server.storage.last_used import LastUsedRecorder

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
T1 = T0 + timedelta(seconds=1)
T2 = T0 + timedelta(seconds=2)
LONG = 3600.0


class FakeStore:
    """The touch_last_used and record_presented parts of the KeyStore port, recording each batch."""

    def __init__(self) -> None:
        self.batches: list[dict[str, datetime]] = []
        self.presented: list[list[Presented]] = []
        # Whether the database would give an asked-for tripwire event (False: another process
        # wrote one within the minute).
        self.grant = True
        self.fail_next = 0
        self.during_write: Callable[[], None] | None = None
        self.written = threading.Event()

    def touch_last_used(self, used: Mapping[str, datetime]) -> None:
        if self.during_write is not None:
            action, self.during_write = self.during_write, None
            action()
        if self.fail_next:
            self.fail_next -= 1
            raise Unavailable("database down")
        self.batches.append(dict(used))
        self.written.set()

    def record_presented(self, presented: Sequence[Presented]) -> set[str]:
        if self.fail_next:
            self.fail_next -= 1
            raise Unavailable("database down")
        self.presented.append(list(presented))
        return {p.key_id for p in presented if p.event and self.grant}


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def recorder(store: FakeStore) -> LastUsedRecorder:
    return LastUsedRecorder(store, LONG)  # type: ignore[arg-type]


class TestFlush:
    def test_flush_writes_the_batch(self, store: FakeStore, recorder: LastUsedRecorder) -> None:
        """flush() writes every recorded key once, in one batch, and returns the count."""
        recorder.record("key_a", T0)
        recorder.record("key_b", T1)
        assert recorder.flush() == 2
        assert store.batches == [{"key_a": T0, "key_b": T1}]

    def test_latest_record_per_key_is_written(
        self, store: FakeStore, recorder: LastUsedRecorder
    ) -> None:
        """Many uses of one key between flushes collapse into one entry with the latest time."""
        for seconds in range(100):
            recorder.record("key_a", T0 + timedelta(seconds=seconds))
        recorder.flush()
        assert store.batches == [{"key_a": T0 + timedelta(seconds=99)}]

    def test_out_of_order_record_keeps_the_latest(
        self, store: FakeStore, recorder: LastUsedRecorder
    ) -> None:
        """A use recorded late with an older time does not move the pending time backwards."""
        recorder.record("key_a", T2)
        recorder.record("key_a", T1)
        recorder.flush()
        assert store.batches == [{"key_a": T2}]

    def test_empty_flush_writes_nothing(self, store: FakeStore, recorder: LastUsedRecorder) -> None:
        """With nothing recorded, flush() does not call the store at all."""
        assert recorder.flush() == 0
        assert store.batches == []

    def test_flushed_entries_are_not_written_again(
        self, store: FakeStore, recorder: LastUsedRecorder
    ) -> None:
        """After a successful flush the next one has nothing to write."""
        recorder.record("key_a", T0)
        recorder.flush()
        assert recorder.flush() == 0
        assert len(store.batches) == 1

    def test_failure_keeps_entries_for_next_flush(
        self, store: FakeStore, recorder: LastUsedRecorder
    ) -> None:
        """When the store is Unavailable, the batch is kept and written by the next flush."""
        recorder.record("key_a", T0)
        recorder.record("key_b", T1)
        store.fail_next = 1
        assert recorder.flush() == 0
        assert store.batches == []
        assert recorder.flush() == 2
        assert store.batches == [{"key_a": T0, "key_b": T1}]

    def test_failure_does_not_move_times_backwards(
        self, store: FakeStore, recorder: LastUsedRecorder
    ) -> None:
        """A failed batch never replaces a newer time recorded while it was being written."""
        recorder.record("key_a", T1)
        recorder.record("key_b", T1)

        def uses_during_write() -> None:
            recorder.record("key_a", T2)  # newer than the failed batch: kept
            recorder.record("key_b", T0)  # older than the failed batch: batch time restored
            recorder.record("key_c", T0)

        store.during_write = uses_during_write
        store.fail_next = 1
        assert recorder.flush() == 0
        recorder.flush()
        assert store.batches == [{"key_a": T2, "key_b": T1, "key_c": T0}]

    def test_failure_is_logged_without_key_ids(
        self, store: FakeStore, recorder: LastUsedRecorder, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A failed flush logs a warning with the count; it does not raise."""
        recorder.record("key_a", T0)
        store.fail_next = 1
        with caplog.at_level("WARNING"):
            recorder.flush()
        assert "1 keys" in caplog.text
        assert "key_a" not in caplog.text

    def test_other_errors_propagate(self, recorder: LastUsedRecorder) -> None:
        """Errors other than Unavailable are not swallowed by flush()."""

        class BrokenStore:
            def touch_last_used(self, used: Mapping[str, datetime]) -> None:
                raise RuntimeError("bug")

        broken = LastUsedRecorder(BrokenStore(), LONG)  # type: ignore[arg-type]
        broken.record("key_a", T0)
        with pytest.raises(RuntimeError):
            broken.flush()


class TestLifecycle:
    def test_stop_without_start_flushes(self, store: FakeStore, recorder: LastUsedRecorder) -> None:
        """stop() writes what is pending even if the thread never ran."""
        recorder.record("key_a", T0)
        recorder.stop()
        assert store.batches == [{"key_a": T0}]

    def test_start_runs_a_thread_and_stop_ends_it_and_flushes(
        self, store: FakeStore, recorder: LastUsedRecorder
    ) -> None:
        """start() runs the flush thread; stop() wakes it at once, joins it and flushes."""
        before = set(threading.enumerate())
        recorder.start()
        started = [t for t in threading.enumerate() if t not in before]
        assert [t.name for t in started] == ["last-used-flush"]
        assert started[0].daemon
        recorder.record("key_a", T0)
        recorder.stop()
        assert not started[0].is_alive()
        assert store.batches == [{"key_a": T0}]

    def test_thread_flushes_on_its_interval(self, store: FakeStore) -> None:
        """The background thread writes pending times by itself every interval."""
        recorder = LastUsedRecorder(store, 0.01)  # type: ignore[arg-type]
        recorder.record("key_a", T0)
        recorder.start()
        try:
            assert store.written.wait(timeout=10)
        finally:
            recorder.stop()
        assert store.batches[0] == {"key_a": T0}

    def test_failed_flush_under_way_at_stop_is_the_last_try(self, store: FakeStore) -> None:
        """A flush that fails after stop() began is not tried again: a dead database costs one
        write bound at shutdown, not two."""
        recorder = LastUsedRecorder(store, 0.01)  # type: ignore[arg-type]
        recorder.record("key_a", T0)
        writing, release = threading.Event(), threading.Event()
        attempts: list[int] = []

        def hold() -> None:
            attempts.append(1)
            writing.set()
            release.wait(timeout=10)

        store.during_write = hold
        store.fail_next = 1
        recorder.start()
        assert writing.wait(timeout=10)
        stopper = threading.Thread(target=recorder.stop)
        stopper.start()
        deadline = time.monotonic() + 10
        while not recorder._stopping.is_set() and time.monotonic() < deadline:  # stop() began
            time.sleep(0.001)
        release.set()
        stopper.join(timeout=10)
        assert not stopper.is_alive()
        assert attempts == [1]
        assert store.batches == []

    def test_record_is_thread_safe(self, store: FakeStore, recorder: LastUsedRecorder) -> None:
        """Concurrent record() and flush() calls lose no key."""
        start = threading.Barrier(4)

        def record_many(worker: int) -> None:
            start.wait()
            for i in range(500):
                recorder.record(f"key_{worker}_{i}", T0)
                if i % 50 == 0:
                    recorder.flush()

        threads = [threading.Thread(target=record_many, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        recorder.flush()
        written = {key for batch in store.batches for key in batch}
        assert len(written) == 2000


class _SlowTime(datetime):
    """A time whose comparisons take ``pause`` seconds: a thread preempted inside record()."""

    pause = 0.0
    comparing: threading.Event

    def _slowly(self) -> None:
        self.comparing.set()
        time.sleep(self.pause)

    def __lt__(self, other: object) -> bool:
        self._slowly()
        return super().__lt__(other)  # type: ignore[operator]

    def __gt__(self, other: object) -> bool:
        self._slowly()
        return super().__gt__(other)  # type: ignore[operator]


def _slow(when: datetime, pause: float) -> datetime:
    made = _SlowTime.fromtimestamp(when.timestamp(), UTC)
    made.pause = pause
    made.comparing = threading.Event()
    return made


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


class TestConcurrentRecords:
    @pytest.mark.parametrize("locked", [True, pytest.param(False, id="no-lock-negative-control")])
    def test_a_late_writer_never_moves_a_time_back(self, store: FakeStore, locked: bool) -> None:
        """Two verifies of one key race: the one with the older time is preempted between
        reading the pending time and writing its own; the newer time must stay. Without the
        lock the older one lands last (the negative control)."""
        recorder = LastUsedRecorder(store, LONG)
        if not locked:
            recorder._lock = _NoLock()  # type: ignore[assignment]
        recorder.record("key_a", T0)
        older_time = _slow(T1, 0.2)
        older = threading.Thread(target=recorder.record, args=("key_a", older_time))
        newer = threading.Thread(target=recorder.record, args=("key_a", _slow(T2, 0.01)))
        older.start()
        assert older_time.comparing.wait(5)  # the older verify is inside record(), comparing
        newer.start()
        older.join()
        newer.join()
        recorder.flush()
        assert store.batches[-1]["key_a"] == (T2 if locked else T1)


class TestTripwire:
    def _present(self, recorder: LastUsedRecorder, when: datetime, times: int = 1) -> None:
        for _ in range(times):
            recorder.record_presented("key_a", "acme", when, "key_gw")

    def test_presentations_are_counted_and_the_latest_kept(
        self, store: FakeStore, recorder: LastUsedRecorder
    ) -> None:
        """Presentations between flushes collapse into one count and the latest time."""
        self._present(recorder, T1, 3)
        self._present(recorder, T0)
        assert recorder.flush_presented() == 1
        assert store.presented == [[Presented("key_a", "acme", T1, 4, "key_gw", True)]]

    def test_no_event_asked_within_a_minute_of_one_written(
        self, store: FakeStore, recorder: LastUsedRecorder
    ) -> None:
        """After an event the database gave, this process does not ask again for a minute."""
        for seconds in (0, 59, 60):
            self._present(recorder, T0 + timedelta(seconds=seconds))
            recorder.flush_presented()
        assert [batch[0].event for batch in store.presented] == [True, False, True]

    def test_an_event_refused_by_the_database_is_asked_for_again(
        self, store: FakeStore, recorder: LastUsedRecorder
    ) -> None:
        """When another process holds this minute's event, the next flush asks once more: only
        the database knows when that minute ends."""
        store.grant = False
        self._present(recorder, T0)
        recorder.flush_presented()
        self._present(recorder, T1)
        recorder.flush_presented()
        assert [batch[0].event for batch in store.presented] == [True, True]

    def test_a_failed_flush_keeps_the_count(
        self, store: FakeStore, recorder: LastUsedRecorder
    ) -> None:
        """When the store is Unavailable, the presentations are added to the next flush."""
        self._present(recorder, T0, 2)
        store.fail_next = 1
        assert recorder.flush_presented() == 0
        self._present(recorder, T1)
        recorder.flush_presented()
        assert store.presented == [[Presented("key_a", "acme", T1, 3, "key_gw", True)]]
