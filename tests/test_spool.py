"""The on-disk spool: order, acknowledgement, bounds, and surviving torn writes and kill -9."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stethoscope.agents import spool as spool_mod
from stethoscope.agents.spool import HEADER_BYTES, Spool, SpoolError, SpoolFullError
from stethoscope.errors import ConfigError, StethoscopeError


def payload(i: int) -> bytes:
    """A record whose content says which one it is, with varying length."""
    return f"record-{i}:".encode() + bytes([i % 251]) * (i * 37 % 300)


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def test_fifo_order_and_ack(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        seqs = [spool.append(payload(i)) for i in range(1, 6)]
        assert seqs == [1, 2, 3, 4, 5]
        assert spool.pending == 5
        assert spool.peek(10) == [(i, payload(i)) for i in seqs]
        assert spool.peek(2) == [(1, payload(1)), (2, payload(2))]
        assert spool.peek(10, max_bytes=1) == [(1, payload(1))]  # always at least one
        assert spool.peek(10) == spool.peek(10)  # peeking does not consume
        spool.ack(2)
        assert spool.pending == 3
        assert [s for s, _ in spool.peek(10)] == [3, 4, 5]
        spool.ack(2)  # acknowledging again is a no-op
        spool.ack(99)  # beyond the end: everything
        assert spool.pending == 0 and spool.peek(10) == []
        assert spool.append(b"next") == 6


def test_rotation_and_deletion_of_acked_segments(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1000) as spool:
        for i in range(1, 41):
            spool.append(payload(i))
        files = segments(tmp_path)
        assert len(files) > 5
        assert spool.size_bytes == sum(f.stat().st_size for f in files)
        assert [s for s, _ in spool.peek(100, max_bytes=1 << 20)] == list(range(1, 41))
        spool.ack(20)
        remaining = segments(tmp_path)
        assert len(remaining) < len(files)
        assert all(int(f.stem) <= 40 for f in remaining)
        assert spool.peek(1) == [(21, payload(21))]
        spool.ack(40)
        assert len(segments(tmp_path)) == 1  # only the active segment is kept
        assert spool.pending == 0


def test_bounded_drops_oldest_whole_segments_and_counts(tmp_path: Path) -> None:
    record = b"x" * 200
    frame = HEADER_BYTES + len(record)
    with Spool(tmp_path, max_bytes=4000, segment_bytes=1000) as spool:
        spool.ack(0)
        for _ in range(60):
            spool.append(record, weight=3)
            assert spool.size_bytes <= 4000
        stats = spool.stats()
        kept = [s for s, _ in spool.peek(100, max_bytes=1 << 20)]
        assert kept == list(range(61 - len(kept), 61))  # the newest, contiguous
        assert stats.pending == len(kept)
        assert stats.dropped_records == 60 - len(kept) > 0
        assert stats.dropped_bytes == stats.dropped_records * frame
        assert stats.dropped_weight == 3 * stats.dropped_records
        assert stats.pending_weight == 3 * len(kept)


def test_dropping_partly_acked_segment_counts_only_unacked(tmp_path: Path) -> None:
    record = b"y" * 100
    with Spool(tmp_path, max_bytes=2000, segment_bytes=500) as spool:
        for _ in range(4):
            spool.append(record)
        spool.ack(2)
        for _ in range(30):
            spool.append(record)
        assert spool.dropped_records + spool.pending == 34 - 2


def test_record_larger_than_the_spool_is_refused(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=100_000) as spool:
        with pytest.raises(SpoolError, match="cannot fit"):
            spool.append(b"z" * 100_000)
        assert spool.append(b"ok") == 1


def test_bad_arguments_are_reported_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Spool(tmp_path, max_bytes=0, segment_bytes=-1, fsync_interval_s=-1)
    assert len(info.value.problems) == 3


def test_cursor_survives_reopen(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=500) as spool:
        for i in range(1, 11):
            spool.append(payload(i))
        spool.ack(6)
    with Spool(tmp_path, segment_bytes=500) as spool:
        assert spool.pending == 4
        assert spool.peek(10) == [(i, payload(i)) for i in range(7, 11)]
        assert spool.append(b"after") == 11  # sequence numbers keep increasing
        spool.ack(11)
    with Spool(tmp_path) as spool:
        assert spool.pending == 0
        assert spool.append(b"later") == 12


@pytest.mark.parametrize("damage", ["truncate_mid_record", "garbage_tail", "flipped_byte"])
def test_torn_write_is_detected_and_truncated(tmp_path: Path, damage: str) -> None:
    with Spool(tmp_path, fsync_interval_s=0) as spool:
        for i in range(1, 9):
            spool.append(payload(i))
    (seg,) = segments(tmp_path)
    data = seg.read_bytes()
    last_frame = HEADER_BYTES + len(payload(8))
    if damage == "truncate_mid_record":
        seg.write_bytes(data[: len(data) - last_frame // 2])
        survivors = 7
    elif damage == "garbage_tail":
        seg.write_bytes(data + os.urandom(5) + b"\xff" * 40)
        survivors = 8
    else:  # a bit flipped inside the last record's payload
        broken = bytearray(data)
        broken[-3] ^= 0x40
        seg.write_bytes(bytes(broken))
        survivors = 7
    with Spool(tmp_path) as spool:
        assert spool.peek(100, max_bytes=1 << 20) == [(i, payload(i)) for i in range(1, survivors + 1)]
        assert spool.append(b"new") == survivors + 1
        assert spool.peek(100, max_bytes=1 << 20)[-1] == (survivors + 1, b"new")
    with Spool(tmp_path) as spool:  # and the repair itself is durable
        assert spool.pending == survivors + 1


def test_disk_full_raises_a_stethoscope_error_and_leaves_no_partial_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = spool_mod._write_all

    def half_then_enospc(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    with Spool(tmp_path) as spool:
        spool.append(b"before")
        monkeypatch.setattr(spool_mod, "_write_all", half_then_enospc)
        with pytest.raises(SpoolFullError, match="disk full") as info:
            spool.append(b"lost" * 100)
        assert isinstance(info.value, StethoscopeError)
        monkeypatch.setattr(spool_mod, "_write_all", real_write)
        assert spool.append(b"after") == 2
        assert spool.peek(10) == [(1, b"before"), (2, b"after")]
    with Spool(tmp_path) as spool:
        assert spool.peek(10) == [(1, b"before"), (2, b"after")]


def test_one_process_per_directory(tmp_path: Path) -> None:
    with Spool(tmp_path):
        with pytest.raises(SpoolError, match="in use"):
            Spool(tmp_path)
    Spool(tmp_path).close()  # released on close


_WRITER = textwrap.dedent(
    """
    import sys
    from stethoscope.agents.spool import Spool

    def payload(i):
        return f"record-{i}:".encode() + bytes([i % 251]) * (i * 37 % 300)

    spool = Spool(sys.argv[1], segment_bytes=4096, fsync_interval_s=None)
    i = 0
    while True:
        i += 1
        spool.append(payload(i))
        if i == 200:
            print("ready", flush=True)
    """
)


def test_kill_9_while_appending_loses_no_complete_record(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        if child.stdout is not None:
            child.stdout.close()
    with Spool(tmp_path, segment_bytes=4096) as spool:
        records = spool.peek(1_000_000, max_bytes=1 << 30)
        assert len(records) >= 200
        assert [seq for seq, _ in records] == list(range(1, len(records) + 1))
        assert all(data == payload(seq) for seq, data in records)
        assert spool.append(b"resumed") == len(records) + 1


# -- a model check -------------------------------------------------------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 300)),
        st.tuples(st.just("peek"), st.integers(1, 8)),
        st.tuples(st.just("ack"), st.integers(0, 6)),
        st.tuples(st.just("reopen"), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ops)
def test_matches_a_list_model(ops: list[tuple[str, int]]) -> None:
    """Any mix of append/peek/ack/reopen behaves like a plain list (no drops at this size)."""
    with tempfile.TemporaryDirectory() as directory:
        opts = {"max_bytes": 1 << 20, "segment_bytes": 700, "fsync_interval_s": None}
        spool = Spool(directory, **opts)
        model: list[tuple[int, bytes]] = []
        next_seq = 1
        try:
            for op, arg in ops:
                if op == "append":
                    data = bytes([next_seq % 256]) * arg
                    assert spool.append(data) == next_seq
                    model.append((next_seq, data))
                    next_seq += 1
                elif op == "peek":
                    assert spool.peek(arg) == model[:arg]
                elif op == "ack":
                    if model:
                        upto = model[min(arg, len(model) - 1)][0]
                        spool.ack(upto)
                        model = [(s, d) for s, d in model if s > upto]
                else:
                    spool.close()
                    spool = Spool(directory, **opts)
                assert spool.pending == len(model)
            assert spool.peek(1000, max_bytes=1 << 30) == model
        finally:
            spool.close()
