"""The ``alerts`` table, for store-backed alert state (the integrator adds it to the schema).

Each save writes a whole snapshot under a new ``Version`` (e.g. epoch milliseconds): one
row per alert (``Kind = 'alert'``), per silence (``'silence'``) and one ``'snapshot'``
marker, so an empty state is a snapshot too. :func:`from_rows` reads the newest
snapshot; alerts that ended are simply absent from it. Read back with
``SELECT * FROM alerts WHERE Version = (SELECT max(Version) FROM alerts)``; old
versions may be deleted with a TTL or ``ALTER TABLE alerts DELETE WHERE Version < ...``.

Examples
--------
>>> from stethoscope.alerts.state import AlertEngine, Silence
>>> eng = AlertEngine([])
>>> eng.add_silence(Silence("s1", {"node": "n1"}, until=100.0))
>>> rows = to_rows(eng.state(), version=1)
>>> rows[1]["Kind"], rows[1]["Fingerprint"]
('silence', 's1')
>>> from_rows(rows) == eng.state()
True
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["ALERTS_DDL", "COLUMNS", "ATTEMPTS_DDL", "ATTEMPT_COLUMNS", "to_rows", "from_rows"]

ALERTS_DDL = """CREATE TABLE IF NOT EXISTS alerts
(
    Fingerprint String CODEC(ZSTD(1)),
    Kind LowCardinality(String) CODEC(ZSTD(1)),
    Rule LowCardinality(String) CODEC(ZSTD(1)),
    State LowCardinality(String) CODEC(ZSTD(1)),
    Version UInt64 CODEC(Delta(8), ZSTD(1)),
    Body String CODEC(ZSTD(1))
)
ENGINE = MergeTree
ORDER BY (Version, Kind, Fingerprint)"""

COLUMNS = ("Fingerprint", "Kind", "Rule", "State", "Version", "Body")

#: One row per outbox event (:mod:`.outbox`): ``queued`` when a notification enters the
#: outbox (``Body`` holds the notification, never a secret), then one row per delivery
#: attempt: ``retry`` (failed, tried again at ``NextAttemptAt``), ``delivered``,
#: ``failed`` (the receiver refused it for good) or ``expired`` (given up after the
#: outbox's maximum age). The latest row of an ``OutboxId`` is its state.
ATTEMPTS_DDL = """CREATE TABLE IF NOT EXISTS notification_attempts
(
    Time DateTime64(3) CODEC(Delta(8), ZSTD(1)),
    OutboxId String CODEC(ZSTD(1)),
    Notifier LowCardinality(String) CODEC(ZSTD(1)),
    Fingerprint String CODEC(ZSTD(1)),
    Rule LowCardinality(String) CODEC(ZSTD(1)),
    Status LowCardinality(String) CODEC(ZSTD(1)),
    Attempt UInt32 CODEC(ZSTD(1)),
    HttpStatus UInt16 CODEC(ZSTD(1)),
    Error String CODEC(ZSTD(1)),
    NextAttemptAt DateTime64(3) CODEC(ZSTD(1)),
    Body String CODEC(ZSTD(1))
)
ENGINE = MergeTree
ORDER BY (Time, OutboxId)"""

ATTEMPT_COLUMNS = ("Time", "OutboxId", "Notifier", "Fingerprint", "Rule", "Status", "Attempt", "HttpStatus", "Error",
                   "NextAttemptAt", "Body")


def to_rows(state: Mapping[str, Any], *, version: int) -> list[dict[str, Any]]:
    """Rows for ``state`` (from :meth:`AlertEngine.state`); ``version`` orders writes (e.g. epoch ms)."""
    rows = [{"Fingerprint": "", "Kind": "snapshot", "Rule": "", "State": "", "Version": version, "Body": "{}"}]
    rows += [
        {"Fingerprint": a["fingerprint"], "Kind": "alert", "Rule": a["rule"], "State": a["state"],
         "Version": version, "Body": json.dumps(a, sort_keys=True, allow_nan=False)}
        for a in state.get("alerts", [])
    ]
    rows += [
        {"Fingerprint": s["id"], "Kind": "silence", "Rule": "", "State": "active", "Version": version,
         "Body": json.dumps(s, sort_keys=True, allow_nan=False)}
        for s in state.get("silences", [])
    ]
    return rows


def from_rows(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The state in the newest snapshot among ``rows`` (empty state when there is none)."""
    rows = list(rows)
    if not rows:
        return {"alerts": [], "silences": []}
    newest = max(int(r["Version"]) for r in rows)
    snap = sorted((r for r in rows if int(r["Version"]) == newest), key=lambda r: (r["Kind"], r["Fingerprint"]))
    return {
        "alerts": [json.loads(r["Body"]) for r in snap if r["Kind"] == "alert"],
        "silences": [json.loads(r["Body"]) for r in snap if r["Kind"] == "silence"],
    }
