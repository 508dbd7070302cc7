"""``stethoscope alerts silence add|list|expire``: silences for the alerts of a running ``up``.

The command does not talk to ``up`` over the network: it leaves a *request* (one
small JSON file, written to a temporary name and renamed, so it is never read half
written) in the silence folder (``alerts.silence_dir``, by default
``silence-requests`` in the store's data directory). The alert runner picks requests
up on its next tick (every ``alerts.poll_interval``), applies them to the engine it
holds in memory (nothing else it knows is lost), saves a snapshot (silences live in
the ``alerts`` table from then on, and survive restarts) and only then deletes the
file. Whoever may write to the data directory may silence; no port is opened and the
read-only SQL endpoint stays read-only. ``list`` reads the newest snapshot through the
SQL endpoint and adds the requests not applied yet.

Examples
--------
>>> import tempfile
>>> from stethoscope.alerts.state import AlertEngine
>>> d = tempfile.mkdtemp()
>>> req = add_request(d, parse_matchers(["node=n1", "alertname=~Gpu.*"]), until=200.0, comment="swap", by="ana")
>>> [r["op"] for _, r in read_requests(d)]
['add']
>>> eng = AlertEngine([])
>>> apply_request(eng, req, now=100.0)
>>> eng.silences[req["id"]].matches({"node": "n1", "alertname": "GpuHot"}, now=150.0)
True
>>> apply_request(eng, expire_request(d, req["id"]), now=120.0); eng.silences
{}
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .state import AlertEngine, Silence

__all__ = ["parse_matchers", "add_request", "expire_request", "read_requests", "apply_request", "add_arguments", "run"]

_LABEL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def parse_matchers(items: Iterable[str]) -> dict[str, str]:
    """``["node=n1", "alertname=~Gpu.*"]`` -> matchers; a value starting with ``~`` is a regex.

    Raises :class:`ValueError` naming every bad item.
    """
    out: dict[str, str] = {}
    bad = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _LABEL.match(key.strip()):
            bad.append(f"{item!r}: expected label=value (label like node or alertname)")
            continue
        if value.startswith("~"):
            try:
                re.compile(value[1:])
            except re.error as exc:
                bad.append(f"{item!r}: not a valid regex: {exc}")
                continue
        out[key.strip()] = value
    if bad:
        raise ValueError("; ".join(bad))
    if not out:
        raise ValueError("a silence needs at least one --match label=value")
    return out


def _write(folder: str | os.PathLike[str], req: Mapping[str, Any]) -> None:
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    name = f"{time.time_ns():020d}-{req['op']}-{req['id']}"
    tmp = d / f".{name}.tmp"
    tmp.write_text(json.dumps(req, sort_keys=True))
    os.replace(tmp, d / f"{name}.json")


def add_request(folder: str | os.PathLike[str], matchers: Mapping[str, str], *, until: float, comment: str = "",
                by: str = "") -> dict[str, Any]:
    """Leave an ``add`` request in ``folder``; return it (its ``id`` names the new silence)."""
    req = {"op": "add", "id": "s-" + secrets.token_hex(6), "matchers": dict(matchers), "until": float(until),
           "comment": comment, "created_by": by, "requested_at": time.time()}
    _write(folder, req)
    return req


def expire_request(folder: str | os.PathLike[str], silence_id: str) -> dict[str, Any]:
    """Leave an ``expire`` request for ``silence_id`` in ``folder``; return it."""
    if not _ID.match(silence_id):
        raise ValueError(f"not a silence id: {silence_id!r}")
    req = {"op": "expire", "id": silence_id, "requested_at": time.time()}
    _write(folder, req)
    return req


def read_requests(folder: str | os.PathLike[str]) -> list[tuple[Path, dict[str, Any]]]:
    """The requests waiting in ``folder``, oldest first; an unreadable file comes back as ``{}``."""
    d = Path(folder)
    try:
        paths = sorted(p for p in d.iterdir() if p.suffix == ".json" and not p.name.startswith("."))
    except FileNotFoundError:
        return []
    out = []
    for p in paths:
        try:
            req = json.loads(p.read_text())
        except (OSError, ValueError):
            req = {}
        out.append((p, req if isinstance(req, dict) else {}))
    return out


def apply_request(engine: AlertEngine, req: Mapping[str, Any], now: float) -> None:
    """Apply one request to ``engine``; raises :class:`ValueError` (or KeyError) on a malformed one."""
    op = req.get("op")
    if op == "add":
        if not _ID.match(str(req["id"])):
            raise ValueError(f"bad silence id {req['id']!r}")
        matchers = parse_matchers(f"{k}={v}" for k, v in dict(req["matchers"]).items())
        engine.add_silence(Silence(str(req["id"]), matchers, float(req["until"]), str(req.get("comment", "")),
                                   str(req.get("created_by", ""))))
    elif op == "expire":
        engine.expire_silence(str(req["id"]))
    else:
        raise ValueError(f"unknown silence request op {op!r}")


# --- command line ------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``silence add|list|expire`` under ``stethoscope alerts``."""
    sub = p.add_subparsers(dest="silence_command", required=True)
    a = sub.add_parser("add", help="silence alerts whose labels match, for a while")
    a.add_argument("--match", action="append", default=[], metavar="LABEL=VALUE",
                   help="label to match (repeatable); a value starting with ~ is a regex")
    a.add_argument("--for", dest="duration", required=True, help="how long, e.g. 2h or 30m")
    a.add_argument("--comment", required=True, help="why (shown in silence list)")
    a.add_argument("--by", default=os.environ.get("USER", ""), help="who (default $USER)")
    a.add_argument("--wait", type=float, default=5.0, help="seconds to wait for up to apply it (default 5)")
    sub.add_parser("list", help="active silences and requests not applied yet")
    e = sub.add_parser("expire", help="end a silence now")
    e.add_argument("id")
    e.add_argument("--wait", type=float, default=5.0, help="seconds to wait for up to apply it (default 5)")
    for q in (a, e, sub.choices["list"]):
        q.add_argument("--config", help="TOML configuration file (store.data_dir, alerts.silence_dir, sql.port)")
        q.add_argument("--url", help="SQL endpoint of up (default http://sql.host:sql.port/)")


def _active(url: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    q = ("SELECT Body FROM alerts WHERE Kind = 'silence' AND Version = (SELECT max(Version) FROM alerts) "
         "FORMAT JSONEachRow")
    req = urllib.request.Request(url, data=q.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        lines = resp.read().decode().splitlines()
    return [json.loads(json.loads(line)["Body"]) for line in lines if line.strip()]


def _wait_applied(folder: Path, req: Mapping[str, Any], wait: float) -> bool:
    deadline = time.monotonic() + max(wait, 0.0)
    while True:
        if not any(r.get("requested_at") == req["requested_at"] and r.get("id") == req["id"]
                   for _, r in read_requests(folder)):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def run(args: argparse.Namespace) -> int:
    from ..config import load_config, parse_duration
    from .runner import silence_dir

    cfg = load_config(args.config)
    folder = silence_dir(cfg)
    url = args.url or f"http://{cfg.sql.host}:{cfg.sql.port}/"
    cmd = args.silence_command
    if cmd == "add":
        try:
            matchers = parse_matchers(args.match)
            seconds = float(parse_duration(args.duration))
        except ValueError as exc:
            print(f"stethoscope alerts silence add: {exc}", file=sys.stderr)
            return 2
        if seconds <= 0:
            print(f"stethoscope alerts silence add: --for must be longer than 0, got {args.duration!r}", file=sys.stderr)
            return 2
        req = add_request(folder, matchers, until=time.time() + seconds, comment=args.comment, by=args.by)
        applied = _wait_applied(folder, req, args.wait)
        print(f"{req['id']}\t{'applied' if applied else 'queued: up has not picked it up yet'}\tuntil "
              f"{_fmt_time(req['until'])}")
        return 0
    if cmd == "expire":
        try:
            known = {s["id"] for s in _active(url)} | {r.get("id") for _, r in read_requests(folder)}
        except (urllib.error.URLError, OSError, ValueError):
            known = None  # up is not reachable: leave the request; it applies when up starts
        if known is not None and args.id not in known:
            print(f"stethoscope alerts silence expire: no active silence {args.id!r}", file=sys.stderr)
            return 2
        try:
            req = expire_request(folder, args.id)
        except ValueError as exc:
            print(f"stethoscope alerts silence expire: {exc}", file=sys.stderr)
            return 2
        applied = _wait_applied(folder, req, args.wait)
        print(f"{args.id}\t{'expired' if applied else 'queued: up has not picked it up yet'}")
        return 0
    try:
        active = _active(url)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"stethoscope alerts silence list: cannot read silences from {url}: {exc}", file=sys.stderr)
        return 2
    rows = [(s["id"], _matchers_text(s["matchers"]), _fmt_time(s["until"]), s.get("created_by", ""),
             s.get("comment", "")) for s in sorted(active, key=lambda s: s["until"]) if s["until"] > time.time()]
    for _, r in read_requests(folder):
        if r.get("op") == "add":
            rows.append((r.get("id", "?"), _matchers_text(r.get("matchers", {})), _fmt_time(float(r.get("until", 0))),
                         r.get("created_by", ""), "(pending) " + r.get("comment", "")))
        elif r.get("op") == "expire":
            rows.append((r.get("id", "?"), "", "", "", "(pending expire)"))
    _print_table(("ID", "MATCHERS", "UNTIL", "BY", "COMMENT"), rows)
    return 0


def _matchers_text(m: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(m.items()))


def _print_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for r in (head, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())
