"""The ingest journal and exactly-once ingest: crashes, replays, store outages, torn writes."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from stethoscope.errors import StoreError, StoreUnavailable
from stethoscope.exporters.ingest import Ingestor
from stethoscope.exporters.journal import Journal, JournalError

COLS = {"otel_logs": ("SeverityText", "SeverityNumber", "LogAttributes"), "labels": ("Model",)}
LOG_ROW = b"\x00\x00\x00"  # SeverityText '', SeverityNumber 0, LogAttributes {}
LABEL_ROW = b"\x01m"  # Model 'm'


def rows(store, table: str = "otel_logs") -> int:
    return int(store.query(f"SELECT count() FROM {table}", "TabSeparated").data)


def request(n: int = 4) -> list[tuple[str, int, bytes]]:
    """One client request that spans two tables."""
    return [("otel_logs", n, LOG_ROW * n), ("labels", 1, LABEL_ROW)]


class Flaky:
    """A real store whose inserts into ``table`` fail as unavailable while ``down`` is set.

    ``commit_then_fail`` stores the rows before raising, as a server that commits and
    then drops the connection would.
    """

    def __init__(self, store, table: str | None = None, *, commit_then_fail: bool = False) -> None:
        self.store, self.table, self.commit_then_fail = store, table, commit_then_fail
        self.down = threading.Event()
        self.tokens: list[tuple[str, str]] = []

    def insert(self, table, columns, data, *, fmt="RowBinary", token=None):
        self.tokens.append((table, token))
        if self.down.is_set() and self.table in (None, table):
            if self.commit_then_fail:
                self.store.insert(table, columns, data, fmt=fmt, token=token)
            raise StoreUnavailable("connection refused")
        return self.store.insert(table, columns, data, fmt=fmt, token=token)


def ingestor(store, journal_dir, **kw) -> Ingestor:
    kw.setdefault("flush_interval_s", 0.001)
    kw.setdefault("attempts", 2)
    ing = Ingestor(store, COLS, journal=Journal(journal_dir, fsync=False), retry_max_s=0.05, **kw)
    ing.start()
    return ing


# --- the journal on its own ---------------------------------------------------


def test_batches_not_marked_done_come_back_in_order(tmp_path):
    j = Journal(tmp_path)
    assert j.recover() == []
    j.append_batch("a", [b"k1"], {"otel_logs": [(1, b"x")]})
    j.append_batch("b", [b"k2", b"k3"], {"otel_logs": [(2, b"yy")], "labels": [(1, b"z")]})
    j.append_batch("c", [], {"labels": [(1, b"w")]})
    j.mark_done("b")
    j.close()
    j = Journal(tmp_path)
    got = j.recover()
    assert [(b.token, b.keys, b.tables) for b in got] == [
        ("a", [b"k1"], {"otel_logs": [(1, b"x")]}),
        ("c", [], {"labels": [(1, b"w")]}),
    ]
    assert j.committed(b"k2") and j.committed(b"k3") and not j.committed(b"k1")
    j.close()


def test_a_torn_record_at_the_end_is_cut_off_and_writing_goes_on(tmp_path):
    j = Journal(tmp_path)
    j.recover()
    j.append_batch("a", [b"k1"], {"otel_logs": [(1, b"x")]})
    j.append_batch("b", [b"k2"], {"otel_logs": [(1, b"y" * 100)]})
    j.close()
    (seg,) = list(tmp_path.glob("journal-*.wal"))
    size = seg.stat().st_size
    with open(seg, "r+b") as f:  # the process died while writing batch b
        f.truncate(size - 30)
    j = Journal(tmp_path)
    assert [b.token for b in j.recover()] == ["a"]  # b never reached the store: its client still has it
    assert seg.stat().st_size < size - 30
    j.append_batch("c", [], {"otel_logs": [(1, b"z")]})
    j.close()
    j = Journal(tmp_path)
    assert [b.token for b in j.recover()] == ["a", "c"]
    j.close()


def test_a_corrupted_record_is_not_replayed(tmp_path, caplog):
    j = Journal(tmp_path)
    j.recover()
    j.append_batch("a", [], {"otel_logs": [(1, b"x" * 50)]})
    j.close()
    (seg,) = list(tmp_path.glob("journal-*.wal"))
    data = bytearray(seg.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit in the rows
    seg.write_bytes(bytes(data))
    j = Journal(tmp_path)
    assert j.recover() == []
    assert "bad checksum" in caplog.text
    j.close()


def test_finished_segments_are_deleted_and_committed_keys_survive_them(tmp_path):
    j = Journal(tmp_path, segment_bytes=200)
    j.recover()
    for i in range(20):
        j.append_batch(f"t{i}", [f"key{i}".encode()], {"otel_logs": [(1, b"r" * 100)]})
        if i != 3:
            j.mark_done(f"t{i}")
    segments = sorted(tmp_path.glob("journal-*.wal"))
    # batch t3 is still open: its segment stays; every other finished one before the newest is gone
    assert 2 <= len(segments) < 20
    j.mark_done("t3")
    j.append_batch("last", [], {"otel_logs": [(1, b"r" * 300)]})
    j.append_batch("last2", [], {"otel_logs": [(1, b"r")]})
    assert len(list(tmp_path.glob("journal-*.wal"))) <= 2
    j.close()
    j = Journal(tmp_path, segment_bytes=200)
    assert [b.token for b in j.recover()] == ["last", "last2"]
    assert all(j.committed(f"key{i}".encode()) for i in range(20))  # from the key snapshot
    j.close()


def test_keys_expire_after_the_window_and_beyond_the_cap(tmp_path):
    now = [1000.0]
    j = Journal(tmp_path, window_s=60, max_keys=3, clock=lambda: now[0])
    j.recover()
    for i in range(5):
        j.append_batch(f"t{i}", [bytes([i])], {})
        j.mark_done(f"t{i}")
    assert j.remembered_keys == 3 and not j.committed(b"\x00") and j.committed(b"\x04")
    now[0] += 61
    assert not j.committed(b"\x04")
    j.close()


def test_requests_the_store_refused_are_not_remembered(tmp_path):
    j = Journal(tmp_path)
    j.recover()
    j.append_batch("t", [b"good", b"bad"], {"otel_logs": [(1, b"x"), (1, b"y")]})
    j.mark_done("t", [b"bad"])
    j.close()
    j = Journal(tmp_path)
    j.recover()
    assert j.committed(b"good") and not j.committed(b"bad")
    j.close()


def test_a_write_that_fails_is_an_error_and_leaves_the_journal_readable(tmp_path, monkeypatch):
    j = Journal(tmp_path)
    j.recover()
    j.append_batch("a", [], {"otel_logs": [(1, b"x")]})
    real_write = os.write
    calls = []

    def short_then_full(fd, data):
        calls.append(1)
        if len(calls) == 1:
            return real_write(fd, bytes(data)[:7])  # part of the record reaches the file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(JournalError, match="No space left"):
        j.append_batch("b", [], {"otel_logs": [(1, b"y")]})
    monkeypatch.setattr(os, "write", real_write)
    j.append_batch("c", [], {"otel_logs": [(1, b"z")]})
    j.close()
    j = Journal(tmp_path)
    assert [b.token for b in j.recover()] == ["a", "c"]
    j.close()


def test_recover_runs_once_and_first(tmp_path):
    j = Journal(tmp_path)
    with pytest.raises(RuntimeError, match="recover"):
        j.append_batch("a", [], {})
    j.recover()
    with pytest.raises(RuntimeError, match="once"):
        j.recover()
    j.close()


def test_an_unusable_directory_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(JournalError, match="cannot create the ingest journal directory"):
        Journal(tmp_path / "file" / "journal")


# --- exactly-once ingest with a real store --------------------------------------


def test_a_replayed_request_is_stored_once(store, tmp_path):
    ing = ingestor(store, tmp_path / "j")
    try:
        first = ing.submit(request(), key=b"spool-a:1-3")
        assert first.wait(30) and not first.duplicate
        again = ing.submit(request(), key=b"spool-a:1-3")
        # Committed: a duplicate ticket. Just answered but not yet released by the writer: the
        # first request's own ticket, whose outcome it shares. Either way nothing is queued again.
        assert (again.duplicate or again is first) and again.wait(0)
        other = ing.submit(request(), key=b"spool-a:4-4")  # a new key is new data
        assert other.wait(30) and not other.duplicate
    finally:
        ing.close()
    assert rows(store) == 8 and rows(store, "labels") == 2
    assert ing.metrics.duplicate_requests._value.get() == 1


def test_a_replay_while_the_first_is_still_waiting_shares_its_outcome(store, tmp_path):
    ing = ingestor(store, tmp_path / "j", flush_interval_s=0.3)
    try:
        a = ing.submit(request(), key=b"k")
        b = ing.submit(request(), key=b"k")  # sent again before the first was answered
        assert b is a and a.wait(30)
    finally:
        ing.close()
    assert rows(store) == 4


def test_keys_are_only_honoured_with_a_journal(store):
    ing = Ingestor(store, COLS, flush_interval_s=0.001)
    ing.start()
    try:
        assert ing.submit(request(), key=b"k").wait(30)
        assert not ing.submit(request(), key=b"k").duplicate
    finally:
        ing.close()
    assert rows(store) == 8  # without a journal: at least once, as documented


def crash_after(store, journal_dir, *, inserted: tuple[str, ...]) -> None:
    """What a writer leaves behind when killed: a journaled batch, some tables inserted, no done record."""
    j = Journal(journal_dir, fsync=False)
    j.recover()
    tables = {t: [(n, data)] for t, n, data in request()}
    j.append_batch("crashed", [b"spool-a:7-9"], tables)
    for table in inserted:
        (n, data), = tables[table]
        store.insert(table, COLS[table], data, token=f"crashed-{table}")
    j.close()  # no mark_done: the process died here


@pytest.mark.parametrize("inserted", [(), ("otel_logs",), ("otel_logs", "labels")],
                         ids=["before-any-insert", "between-tables", "after-all-inserts"])
def test_a_crash_anywhere_in_a_batch_stores_it_exactly_once(store, tmp_path, inserted):
    crash_after(store, tmp_path / "j", inserted=inserted)
    ing = ingestor(store, tmp_path / "j")
    try:
        # The client never got its answer and sends the same records again.
        replay = ing.submit(request(), key=b"spool-a:7-9")
        assert replay.wait(30)
        assert rows(store) == 4 and rows(store, "labels") == 1
        assert ing.journal.pending_batches == 0
    finally:
        ing.close()
    ing = ingestor(store, tmp_path / "j")  # and a second restart finds nothing left to do
    ing.close()
    assert rows(store) == 4 and rows(store, "labels") == 1


def test_a_store_outage_between_two_tables_stores_each_table_once(store, tmp_path):
    flaky = Flaky(store, "labels", commit_then_fail=True)
    flaky.down.set()
    ing = ingestor(store=flaky, journal_dir=tmp_path / "j")
    try:
        t = ing.submit(request(), key=b"k1")
        # Accepted: the journal holds it, and the writer keeps retrying behind the client's back.
        assert t.wait(30) and t.error is None
        assert ing.journal.pending_batches == 1
        assert ing.metrics.journal_pending._value.get() == 1
        # The client may still send it again (it timed out on its side): nothing new is queued.
        assert ing.submit(request(), key=b"k1") is t or ing.submit(request(), key=b"k1").duplicate
        flaky.down.clear()
        for _ in range(600):
            if ing.journal.pending_batches == 0:
                break
            threading.Event().wait(0.05)
        assert ing.journal.pending_batches == 0
    finally:
        ing.close()
    assert rows(store) == 4 and rows(store, "labels") == 1
    label_tokens = {tok for table, tok in flaky.tokens if table == "labels"}
    assert len(label_tokens) == 1  # every retry reused the batch's token for that table


def test_stopping_while_the_store_is_down_keeps_the_batch_for_the_next_start(store, tmp_path):
    flaky = Flaky(store)
    flaky.down.set()
    ing = ingestor(flaky, tmp_path / "j")
    assert ing.submit(request(), key=b"k").wait(30)
    ing.close(timeout=10)
    assert rows(store) == 0
    ing = ingestor(store, tmp_path / "j")  # the store is back
    try:
        for _ in range(600):
            if rows(store) == 4:
                break
            threading.Event().wait(0.05)
        assert ing.submit(request(), key=b"k").wait(30)
    finally:
        ing.close()
    assert rows(store) == 4 and rows(store, "labels") == 1


def test_without_a_journal_an_outage_is_reported_to_the_client(store):
    flaky = Flaky(store)
    flaky.down.set()
    ing = Ingestor(flaky, COLS, flush_interval_s=0.001, attempts=2)
    ing.start()
    try:
        with pytest.raises(StoreUnavailable):
            ing.submit(request()).wait(30)
    finally:
        ing.close()


def test_a_request_the_store_refuses_for_good_is_not_remembered(store, tmp_path):
    class Refusing:
        def insert(self, table, columns, data, *, fmt="RowBinary", token=None):
            raise StoreError("Code: 27. Cannot parse input")

    ing = ingestor(Refusing(), tmp_path / "j")
    try:
        with pytest.raises(StoreError, match="Cannot parse"):
            ing.submit(request(), key=b"k").wait(30)
        assert not ing.journal.committed(b"k")
        assert not ing.submit(request(), key=b"k").duplicate  # a fixed retry is tried again
    finally:
        ing.close()


def test_a_journal_that_cannot_be_written_refuses_the_batch(store, tmp_path, monkeypatch):
    ing = ingestor(store, tmp_path / "j")
    try:
        def full(*_a, **_k):
            raise JournalError("cannot write the ingest journal under j: [Errno 28] No space left on device")

        monkeypatch.setattr(ing.journal, "append_batch", full)
        with pytest.raises(JournalError, match="No space left"):
            ing.submit(request(), key=b"k").wait(30)
        monkeypatch.undo()
        assert ing.submit(request(), key=b"k").wait(30)  # nothing was stored, so the retry is new
    finally:
        ing.close()
    assert rows(store) == 4


def test_keys_are_scoped_by_signal_and_by_the_sending_token():
    from stethoscope.exporters.auth import TokenEntry
    from stethoscope.exporters.otlp_http import idempotency_key

    a = TokenEntry(name="team-a", sha256="0" * 64, permissions=frozenset({"ingest"}))
    b = TokenEntry(name="team-b", sha256="1" * 64, permissions=frozenset({"ingest"}))
    keys = {idempotency_key("spool:1-3", t, sig) for t in (None, a, b) for sig in ("metrics", "logs")}
    assert len(keys) == 6  # one tenant's key never suppresses another's data, nor logs metrics
    assert idempotency_key("spool:1-3", a, "metrics") == idempotency_key("spool:1-3", a, "metrics")
    assert len(idempotency_key("x" * 10_000, a, "metrics")) == 32  # a huge header is hashed, not stored


def test_two_collectors_cannot_share_a_journal(tmp_path):
    first = Journal(tmp_path)
    with pytest.raises(JournalError, match="in use by another collector"):
        Journal(tmp_path)
    first.close()
    Journal(tmp_path).close()  # free again once the first is closed
