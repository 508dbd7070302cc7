"""The collector's write-ahead journal: exactly-once storage across crashes and replays.

Before the writer inserts a batch, the batch goes to the journal (its
deduplication token, the idempotency keys of the requests inside it and every
table's RowBinary rows) and the journal is flushed to disk. Only then are the
tables inserted, each with the token ``<batch token>-<table>``. When the inserts
are done a small *done* record follows. That ordering gives three guarantees:

- **A crash never loses an acknowledged request and never stores one twice.**
  After ``kill -9`` (or a power cut) the journal still holds every batch that was
  not marked done; :meth:`Journal.recover` hands them back and the writer inserts
  them again with the *same* tokens, so a table whose insert had committed before
  the crash is deduplicated by the store (``non_replicated_deduplication_window``
  on MergeTree, built in on ReplicatedMergeTree) and one that had not is written.
- **A client's replay is recognised.** Clients that keep a spool (the node agent,
  the SDK) send an ``Idempotency-Key`` per request and reuse it when they send the
  same records again. Keys of committed batches are kept for ``window_s``
  (default one hour, at most ``max_keys``, 200,000 by default: about 200 bytes
  each) and survive restarts, so a request whose
  ``200`` was lost in the crash is answered ``200`` again without a second copy.
- **Nothing is half-written.** Every record carries a CRC32; a torn record at the
  end of the last segment (the crash happened while writing it) is cut off, and
  the batch it described was never inserted, so its clients still hold it.

Layout: numbered segment files ``journal-00000001.wal`` in one directory. A
record is ``crc32 u32 | length u32 | type u8 | payload`` (little endian, the CRC
over type and payload). Types: ``B`` a batch, ``D`` a batch done (committed or
abandoned), ``K`` a snapshot of the committed keys still inside the window,
written at the head of each new segment so that old segments can be deleted.
A segment is deleted once every batch in it is done and a newer segment exists.

Examples
--------
>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> j = Journal(d)
>>> j.recover()
[]
>>> j.append_batch("t1", [b"agent-1:5-9"], {"otel_metrics_gauge": [(2, b"rows")]})
>>> j.committed(b"agent-1:5-9"), j.pending_batches
(False, 1)
>>> j.close()                       # crash before the insert finished: no done record
>>> j = Journal(d)
>>> [(b.token, b.keys, b.tables) for b in j.recover()]
[('t1', [b'agent-1:5-9'], {'otel_metrics_gauge': [(2, b'rows')]})]
>>> j.mark_done("t1")
>>> j.committed(b"agent-1:5-9")
True
>>> j.close()
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stethoscope.errors import StoreError

__all__ = ["Journal", "JournalBatch", "JournalError"]

log = logging.getLogger(__name__)

_FRAME = struct.Struct("<II")  # crc32, length of (type + payload)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
_BATCH, _DONE, _KEYS = b"B", b"D", b"K"
_PREFIX, _SUFFIX = "journal-", ".wal"
#: Longest key kept; longer client keys are hashed down to this (see :meth:`Journal.key`).
MAX_KEY_BYTES = 200


class JournalError(StoreError):
    """The journal could not be written (a full disk, a read-only directory)."""


@dataclass
class JournalBatch:
    """A batch read back from the journal that was never marked done."""

    token: str
    keys: list[bytes]
    tables: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)


def _pack_bytes(b: bytes) -> bytes:
    return _U32.pack(len(b)) + b


class _Reader:
    __slots__ = ("buf", "off")

    def __init__(self, buf: bytes) -> None:
        self.buf, self.off = buf, 0

    def u32(self) -> int:
        (v,) = _U32.unpack_from(self.buf, self.off)
        self.off += 4
        return v

    def u64(self) -> int:
        (v,) = _U64.unpack_from(self.buf, self.off)
        self.off += 8
        return v

    def f64(self) -> float:
        (v,) = _F64.unpack_from(self.buf, self.off)
        self.off += 8
        return v

    def bytes_(self) -> bytes:
        n = self.u32()
        end = self.off + n
        if end > len(self.buf):
            raise ValueError("field runs past the record")
        v = self.buf[self.off : end]
        self.off = end
        return v


def _encode_batch(token: str, keys: Sequence[bytes], tables: Mapping[str, Sequence[tuple[int, bytes]]]) -> bytes:
    out = [_BATCH, _pack_bytes(token.encode()), _U32.pack(len(keys))]
    out.extend(_pack_bytes(k) for k in keys)
    out.append(_U32.pack(len(tables)))
    for table, parts in tables.items():
        out.append(_pack_bytes(table.encode()))
        out.append(_U32.pack(len(parts)))
        for rows, data in parts:
            out.append(_U64.pack(rows))
            out.append(_pack_bytes(data))
    return b"".join(out)


def _decode_batch(r: _Reader) -> JournalBatch:
    token = r.bytes_().decode()
    keys = [r.bytes_() for _ in range(r.u32())]
    tables: dict[str, list[tuple[int, bytes]]] = {}
    for _ in range(r.u32()):
        table = r.bytes_().decode()
        tables[table] = [(r.u64(), r.bytes_()) for _ in range(r.u32())]
    return JournalBatch(token, keys, tables)


class _Segment:
    __slots__ = ("path", "number", "tokens")

    def __init__(self, path: Path, number: int) -> None:
        self.path, self.number = path, number
        self.tokens: set[str] = set()  # batches written here and not yet done


class Journal:
    """Write-ahead journal of insert batches in ``directory`` (created if missing).

    ``segment_bytes``: size at which a new segment is started. ``window_s`` and
    ``max_keys``: how long, and how many, committed idempotency keys are remembered.
    ``fsync=False`` skips the flush to disk (survives a killed process, not a power
    cut); only for tests and benchmarks.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        segment_bytes: int = 64 * 1024 * 1024,
        window_s: float = 3600.0,
        max_keys: int = 200_000,
        fsync: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.window_s = window_s
        self.max_keys = max_keys
        self.fsync = fsync
        self._clock = clock
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._fd: int | None = None
        self._size = 0
        self._keys: OrderedDict[bytes, float] = OrderedDict()  # committed key -> when
        self._open: dict[str, tuple[_Segment, list[bytes]]] = {}  # token -> (segment, keys)
        self._recovered = False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(f"cannot create the ingest journal directory {self.directory}: {exc}") from exc
        self._lock_fd = self._take_directory()

    def _take_directory(self) -> int:
        """flock() the directory's ``lock`` file: two collectors must never share a journal."""
        import fcntl

        try:
            fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise JournalError(f"cannot open {self.directory / 'lock'}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalError(
                f"the ingest journal {self.directory} is in use by another collector; give each `up` its own "
                "store.data_dir or store.journal_dir"
            ) from None
        return fd

    # --- keys ---------------------------------------------------------------

    @staticmethod
    def key(value: str | bytes, scope: str = "") -> bytes:
        """The stored form of a client's idempotency key, scoped (e.g. by tenant).

        >>> Journal.key("agent-1:5-9", "team-a")
        b'team-a\\x00agent-1:5-9'
        >>> len(Journal.key("x" * 500))
        32
        """
        raw = value.encode("utf-8", "replace") if isinstance(value, str) else bytes(value)
        k = scope.encode() + b"\x00" + raw if scope else raw
        if len(k) > MAX_KEY_BYTES:
            import hashlib

            k = hashlib.blake2b(k, digest_size=32).digest()
        return k

    def committed(self, key: bytes) -> bool:
        """True if a batch holding ``key`` was committed within the window."""
        with self._lock:
            t = self._keys.get(key)
            if t is None:
                return False
            if t < self._clock() - self.window_s:
                return False
            return True

    @property
    def pending_batches(self) -> int:
        """Batches written and not yet marked done."""
        with self._lock:
            return len(self._open)

    @property
    def remembered_keys(self) -> int:
        with self._lock:
            return len(self._keys)

    def _remember(self, keys: Sequence[bytes], when: float) -> None:
        for k in keys:
            self._keys[k] = when
            self._keys.move_to_end(k)
        horizon = self._clock() - self.window_s
        while self._keys:
            k, t = next(iter(self._keys.items()))
            if t >= horizon and len(self._keys) <= self.max_keys:
                break
            self._keys.popitem(last=False)

    # --- recovery -----------------------------------------------------------

    def recover(self) -> list[JournalBatch]:
        """Read every segment; return the batches not marked done, oldest first.

        Call once, before the first :meth:`append_batch`. A torn record at the end
        of the newest segment is cut off; a damaged record elsewhere ends the
        reading of that segment, with an error in the log.
        """
        with self._lock:
            if self._recovered:
                raise RuntimeError("Journal.recover() runs once, before the first batch")
            self._recovered = True
            batches: dict[str, JournalBatch] = {}
            numbers = sorted(
                int(p.name[len(_PREFIX) : -len(_SUFFIX)])
                for p in self.directory.glob(f"{_PREFIX}*{_SUFFIX}")
                if p.name[len(_PREFIX) : -len(_SUFFIX)].isdigit()
            )
            for i, n in enumerate(numbers):
                seg = _Segment(self._path(n), n)
                self._segments.append(seg)
                self._read_segment(seg, batches, last=(i == len(numbers) - 1))
            for token, b in batches.items():
                seg = next(s for s in self._segments if token in s.tokens)
                self._open[token] = (seg, b.keys)
            self._start_segment()
            self._drop_finished_segments()
            if batches:
                log.warning("ingest journal: %d batch(es) were not confirmed stored before the last stop; "
                            "inserting them again with their deduplication tokens", len(batches))
            return list(batches.values())

    def _read_segment(self, seg: _Segment, batches: dict[str, JournalBatch], *, last: bool) -> None:
        try:
            data = seg.path.read_bytes()
        except OSError as exc:
            raise JournalError(f"cannot read the ingest journal {seg.path}: {exc}") from exc
        off = 0
        while off < len(data):
            bad = None
            if off + _FRAME.size > len(data):
                bad = "a torn record header"
            else:
                crc, length = _FRAME.unpack_from(data, off)
                end = off + _FRAME.size + length
                if length == 0 or end > len(data):
                    bad = "a torn record"
                elif zlib.crc32(data[off + _FRAME.size : end]) != crc:
                    bad = "a record with a bad checksum"
            if bad is not None:
                if last:
                    log.warning("ingest journal %s: cutting off %s at byte %d (written as the process stopped)",
                                seg.path.name, bad, off)
                    with open(seg.path, "r+b") as f:
                        f.truncate(off)
                else:
                    log.error("ingest journal %s: %s at byte %d; the rest of this segment is skipped",
                              seg.path.name, bad, off)
                return
            body = data[off + _FRAME.size : end]
            off = end
            try:
                self._apply(seg, body, batches)
            except (ValueError, struct.error, UnicodeDecodeError) as exc:
                log.error("ingest journal %s: undecodable record (%s); skipped", seg.path.name, exc)

    def _apply(self, seg: _Segment, body: bytes, batches: dict[str, JournalBatch]) -> None:
        kind, r = body[:1], _Reader(body[1:])
        if kind == _BATCH:
            b = _decode_batch(r)
            batches[b.token] = b
            seg.tokens.add(b.token)
        elif kind == _DONE:
            token = r.bytes_().decode()
            failed = {r.bytes_() for _ in range(r.u32())}
            when = r.f64()
            b = batches.pop(token, None)
            for s in self._segments:
                s.tokens.discard(token)
            if b is not None:
                self._remember([k for k in b.keys if k not in failed], when)
        elif kind == _KEYS:
            for _ in range(r.u32()):
                k = r.bytes_()
                self._remember([k], r.f64())
        else:
            raise ValueError(f"unknown record type {kind!r}")

    # --- writing ------------------------------------------------------------

    def _path(self, n: int) -> Path:
        return self.directory / f"{_PREFIX}{n:08d}{_SUFFIX}"

    def _write(self, body: bytes, *, sync: bool) -> None:
        frame = _FRAME.pack(zlib.crc32(body), len(body)) + body
        assert self._fd is not None
        try:
            view = memoryview(frame)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            if sync and self.fsync:
                os.fdatasync(self._fd)
        except OSError as exc:
            # Cut off whatever part of the record reached the file, so the next record is readable.
            try:
                os.ftruncate(self._fd, self._size)
                os.lseek(self._fd, self._size, os.SEEK_SET)
            except OSError:
                pass
            raise JournalError(f"cannot write the ingest journal under {self.directory}: {exc}") from exc
        self._size += len(frame)

    def _start_segment(self) -> None:
        n = self._segments[-1].number + 1 if self._segments else 1
        path = self._path(n)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise JournalError(f"cannot create the ingest journal segment {path}: {exc}") from exc
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._size = fd, 0
        self._segments.append(_Segment(path, n))
        self._remember([], 0.0)  # expire old keys before the snapshot
        if self._keys:
            parts = [_KEYS, _U32.pack(len(self._keys))]
            for k, t in self._keys.items():
                parts.append(_pack_bytes(k))
                parts.append(_F64.pack(t))
            self._write(b"".join(parts), sync=True)
        elif self.fsync:
            os.fsync(fd)
        if self.fsync:  # the new file's name must survive too
            dfd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def _drop_finished_segments(self) -> None:
        while len(self._segments) > 1 and not self._segments[0].tokens:
            seg = self._segments.pop(0)
            try:
                seg.path.unlink()
            except OSError as exc:
                log.warning("ingest journal: cannot delete %s: %s", seg.path, exc)

    def append_batch(self, token: str, keys: Sequence[bytes], tables: Mapping[str, Sequence[tuple[int, bytes]]]) -> None:
        """Write a batch and flush it to disk; raise :class:`JournalError` if that fails."""
        body = _encode_batch(token, keys, tables)
        with self._lock:
            if not self._recovered:
                raise RuntimeError("call Journal.recover() before writing")
            if token in self._open:
                return  # already journaled (a retry of the same batch)
            if self._size > self.segment_bytes:
                self._start_segment()
                self._drop_finished_segments()
            self._write(body, sync=True)
            seg = self._segments[-1]
            seg.tokens.add(token)
            self._open[token] = (seg, list(keys))

    def mark_done(self, token: str, failed_keys: Sequence[bytes] = ()) -> None:
        """Record that a batch is finished; never raises.

        Its keys count as committed except ``failed_keys`` (requests the store
        refused for good, whose clients were told so). Not flushed: if this record
        is lost, the batch is inserted again after a restart and the store drops
        it by its tokens.
        """
        with self._lock:
            entry = self._open.pop(token, None)
            if entry is None:
                return
            seg, keys = entry
            seg.tokens.discard(token)
            now = self._clock()
            failed = set(failed_keys)
            self._remember([k for k in keys if k not in failed], now)
            body = b"".join((_DONE, _pack_bytes(token.encode()), _U32.pack(len(failed)),
                             *(_pack_bytes(k) for k in failed), _F64.pack(now)))
            try:
                self._write(body, sync=False)
            except JournalError as exc:
                log.warning("%s (the batch is stored; after a restart it is deduplicated by its tokens)", exc)
            if seg is not self._segments[-1]:
                self._drop_finished_segments()

    def close(self) -> None:
        with self._lock:
            try:
                if self._fd is not None:
                    try:
                        if self.fsync:
                            os.fsync(self._fd)
                    finally:
                        os.close(self._fd)
                        self._fd = None
            finally:
                if self._lock_fd >= 0:
                    os.close(self._lock_fd)  # releases the flock
                    self._lock_fd = -1
