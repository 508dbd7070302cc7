"""Group-commit batching, retries with insert tokens, backpressure and isolation of bad parts."""

from __future__ import annotations

import threading

import pytest

from stethoscope.errors import StoreError, StoreUnavailable
from stethoscope.exporters.ingest import Ingestor, Saturated

COLS = {"otel_logs": ("SeverityText", "SeverityNumber", "LogAttributes")}
ROW = b"\x00\x00\x00"  # SeverityText '', SeverityNumber 0, LogAttributes {}


class Flaky:
    """Wraps a real store: fails the first ``failures`` inserts as unavailable, records tokens."""

    def __init__(self, store, failures: int = 0) -> None:
        self.store, self.failures = store, failures
        self.tokens: list[str] = []
        self.gate = threading.Event()
        self.gate.set()

    def insert(self, table, columns, data, *, fmt="RowBinary", token=None):
        self.gate.wait(10)
        self.tokens.append(token)
        if self.failures > 0:
            self.failures -= 1
            # the insert may even have reached the store before the error: the token must save us
            self.store.insert(table, columns, data, fmt=fmt, token=token)
            raise StoreUnavailable("connection reset")
        return self.store.insert(table, columns, data, fmt=fmt, token=token)


def count(store) -> int:
    return int(store.query("SELECT count() FROM otel_logs", "TabSeparated").data)


def test_retry_reuses_the_token_and_stores_once(store):
    flaky = Flaky(store, failures=2)
    ing = Ingestor(flaky, COLS, flush_interval_s=0.001, attempts=5)
    ing.start()
    try:
        assert ing.submit([("otel_logs", 4, ROW * 4)]).wait(30)
    finally:
        ing.close()
    assert len(flaky.tokens) == 3 and len(set(flaky.tokens)) == 1
    assert count(store) == 4
    assert ing.metrics.batches.labels(table="otel_logs", outcome="retried")._value.get() == 2


def test_gives_up_after_the_attempts_and_reports(store):
    flaky = Flaky(store, failures=10)
    ing = Ingestor(flaky, COLS, flush_interval_s=0.001, attempts=2)
    ing.start()
    try:
        with pytest.raises(StoreUnavailable):
            ing.submit([("otel_logs", 1, ROW)]).wait(30)
    finally:
        ing.close()
    assert ing.metrics.batches.labels(table="otel_logs", outcome="failed")._value.get() == 1


def test_concurrent_submissions_share_one_insert(store):
    flaky = Flaky(store)
    ing = Ingestor(flaky, COLS, batch_rows=1000, flush_interval_s=0.05)
    flaky.gate.clear()  # hold the writer so submissions pile up
    ing.start()
    try:
        first = ing.submit([("otel_logs", 1, ROW)])
        tickets = [ing.submit([("otel_logs", 2, ROW * 2)]) for _ in range(9)]
        flaky.gate.set()
        assert all(t.wait(30) for t in [first, *tickets])
    finally:
        ing.close()
    assert count(store) == 19
    assert len(flaky.tokens) <= 2  # at most: the first alone, then the other nine together


def test_a_bad_part_fails_alone(store):
    flaky = Flaky(store)
    ing = Ingestor(flaky, COLS, batch_rows=1000, flush_interval_s=0.05)
    flaky.gate.clear()
    ing.start()
    try:
        good = ing.submit([("otel_logs", 1, ROW)])
        bad = ing.submit([("otel_logs", 1, b"\x05ab")])  # a string cut short: chDB refuses it
        good2 = ing.submit([("otel_logs", 1, ROW)])
        flaky.gate.set()
        assert good.wait(30) and good2.wait(30)
        with pytest.raises(StoreError, match="CANNOT_READ_ALL_DATA"):
            bad.wait(30)
    finally:
        ing.close()
    assert count(store) == 2


def test_backpressure_when_the_queue_is_full(store):
    flaky = Flaky(store)
    flaky.gate.clear()
    ing = Ingestor(flaky, COLS, queue_max_rows=5, flush_interval_s=0.001)
    ing.start()
    try:
        t1 = ing.submit([("otel_logs", 4, ROW * 4)])
        with pytest.raises(Saturated, match="already waiting"):
            ing.submit([("otel_logs", 2, ROW * 2)])
        assert ing.queued_rows == 4
        flaky.gate.set()
        assert t1.wait(30)
        assert ing.submit([("otel_logs", 2, ROW * 2)]).wait(30)
    finally:
        ing.close()
    assert count(store) == 6


def test_cancel_withdraws_a_waiting_submission(store):
    flaky = Flaky(store)
    ing = Ingestor(flaky, COLS, flush_interval_s=3600, batch_rows=10**6)
    ing.start()
    ticket = ing.submit([("otel_logs", 3, ROW * 3)])
    assert ticket.wait(0.05) is False
    assert ing.cancel(ticket) is True
    assert ing.queued_rows == 0
    ing.close()
    assert count(store) == 0


def test_close_drains_what_was_accepted(store):
    ing = Ingestor(store, COLS, flush_interval_s=3600, batch_rows=10**6)
    ing.start()
    ticket = ing.submit([("otel_logs", 5, ROW * 5)])
    ing.close()
    assert ticket.wait(0) and count(store) == 5
    with pytest.raises(Saturated, match="shutting down"):
        ing.submit([("otel_logs", 1, ROW)])


def test_unknown_table_is_a_programming_error(store):
    ing = Ingestor(store, COLS)
    with pytest.raises(KeyError, match="nope"):
        ing.submit([("nope", 1, ROW)])
