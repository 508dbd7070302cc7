"""The ``stethoscope`` command line: ``up``, ``agent``, ``sql``, ``config``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence

from . import __version__
from .config import Config, describe, load_config, parse_duration, reference_markdown
from .errors import StethoscopeError

__all__ = ["main", "build_parser"]

log = logging.getLogger("stethoscope")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _config(args: argparse.Namespace, overrides: dict) -> Config:
    overrides = dict(overrides)
    overrides["log_level"] = args.log_level
    return load_config(args.config, overrides=overrides)


def _wait_for_signal(stop: threading.Event, duration: float | None) -> None:
    def handler(signum, _frame):
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    stop.wait(duration)


def _build_agent(cfg: Config, endpoint: str | None = None):
    from .agents import Agent, build_resource, load_collectors

    return Agent(
        endpoint=endpoint or cfg.agent.endpoint,
        interval_s=parse_duration(cfg.agent.interval),
        collectors=load_collectors(cfg.agent.collectors),
        resource=build_resource(cfg.agent.service_name),
    )


def cmd_up(args: argparse.Namespace) -> int:
    cfg = _config(
        args,
        {
            "store.data_dir": args.data_dir,
            "store.clickhouse_url": args.clickhouse_url,
            "collector.otlp_http_port": args.otlp_http_port,
            "collector.host": args.host,
            "sql.host": args.host,
            "sql.port": args.sql_port,
            "sql.writable": True if args.sql_writable else None,
        },
    )
    _setup_logging(cfg.log_level)
    from .exporters.service import Service

    service = Service(cfg)
    service.start()
    agent = None
    stop = threading.Event()
    try:
        if args.with_agent:
            endpoint = f"http://{cfg.collector.host}:{cfg.collector.otlp_http_port}"
            agent = _build_agent(cfg, endpoint)
            agent.start()
            log.info("host agent running in-process, sending to %s every %s", endpoint, cfg.agent.interval)
        print(
            f"stethoscope {__version__} up: OTLP http://{cfg.collector.host}:{cfg.collector.otlp_http_port}  "
            f"SQL http://{cfg.sql.host}:{cfg.sql.port}  (Ctrl-C to stop)",
            flush=True,
        )
        _wait_for_signal(stop, args.duration)
    finally:
        if agent is not None:
            agent.shutdown()
        service.stop()
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    cfg = _config(
        args,
        {
            "agent.endpoint": args.endpoint,
            "agent.interval": args.interval,
            "agent.collectors": args.collectors,
        },
    )
    _setup_logging(cfg.log_level)
    agent = _build_agent(cfg)
    if args.once:
        ok = agent.export_once()
        if not ok:
            print(f"stethoscope agent: export to {cfg.agent.endpoint} failed", file=sys.stderr)
        return 0 if ok else 1
    agent.start()
    log.info("agent sending to %s every %s", cfg.agent.endpoint, cfg.agent.interval)
    stop = threading.Event()
    try:
        _wait_for_signal(stop, args.duration)
    finally:
        agent.shutdown()
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    fmt = args.format or ("PrettyCompact" if sys.stdout.isatty() else "TabSeparated")
    url = args.url.rstrip("/") + "/?" + urllib.parse.urlencode({"default_format": fmt})
    req = urllib.request.Request(url, data=args.query.encode("utf-8"), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            sys.stdout.buffer.write(resp.read())
    except urllib.error.HTTPError as exc:
        print(exc.read().decode("utf-8", "replace").rstrip(), file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"stethoscope sql: cannot reach {args.url}: {reason} (is `stethoscope up` running?)", file=sys.stderr)
        return 2
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "check":
        load_config(args.config)
        print(f"{args.config or 'defaults'}: ok")
        return 0
    if args.markdown:
        print(reference_markdown(), end="")
        return 0
    width = max(len(k) for k, *_ in describe())
    for key, env, default, help_ in describe():
        print(f"{key:<{width}}  {env}\n{'':<{width}}  default {default!r}: {help_}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stethoscope", description=__doc__)
    p.add_argument("--version", action="version", version=f"stethoscope {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML configuration file")
    common.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", parents=[common], help="run collector, store and SQL endpoint in one process")
    up.add_argument("--data-dir", help="embedded chDB data directory (default ./stethoscope-data)")
    up.add_argument("--clickhouse-url", help="use a ClickHouse server instead of the embedded store")
    up.add_argument("--host", help="address to bind (default 127.0.0.1)")
    up.add_argument("--otlp-http-port", type=int, help="OTLP/HTTP port (default 4318)")
    up.add_argument("--sql-port", type=int, help="SQL endpoint port (default 8123)")
    up.add_argument("--sql-writable", action="store_true", help="allow INSERT and DDL through the SQL endpoint")
    up.add_argument("--with-agent", action="store_true", help="also run the host agent in-process")
    up.add_argument("--duration", type=float, help="stop after this many seconds")
    up.set_defaults(func=cmd_up)

    ag = sub.add_parser("agent", parents=[common], help="run the node agent")
    ag.add_argument("--endpoint", help="OTLP/HTTP endpoint (default http://127.0.0.1:4318)")
    ag.add_argument("--interval", help="collection interval, e.g. 10s")
    ag.add_argument("--collectors", help="comma-separated collectors (default host)")
    ag.add_argument("--once", action="store_true", help="collect and send once, then exit")
    ag.add_argument("--duration", type=float, help="stop after this many seconds")
    ag.set_defaults(func=cmd_agent)

    sq = sub.add_parser("sql", help="run a query against the SQL endpoint and print the result")
    sq.add_argument("query")
    sq.add_argument("--url", default="http://127.0.0.1:8123", help="SQL endpoint (default http://127.0.0.1:8123)")
    sq.add_argument("--format", help="output format (default PrettyCompact on a terminal, else TabSeparated)")
    sq.add_argument("--timeout", type=float, default=60.0)
    sq.set_defaults(func=cmd_sql)

    cf = sub.add_parser("config", help="list settings, or check a configuration file")
    cf.add_argument("action", choices=["list", "check"])
    cf.add_argument("--config", help="TOML configuration file to check")
    cf.add_argument("--markdown", action="store_true", help="print the reference as Markdown")
    cf.set_defaults(func=cmd_config)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StethoscopeError as exc:
        print(f"stethoscope {args.command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # e.g. a port already in use: say which
        print(f"stethoscope {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
