"""The ``stethoscope`` command line: ``up``, ``agent``, ``sql``, ``config``."""

from __future__ import annotations

import argparse
import logging
import os
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


def _spool_dir(setting: str) -> str | None:
    if setting.strip().lower() == "none":
        return None
    if setting:
        return os.path.expanduser(setting)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return "/var/lib/stethoscope/spool"
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "stethoscope", "spool")


def _collector_options(cfg: Config) -> dict[str, dict]:
    a = cfg.agent
    return {
        "dcgm": {"url": a.dcgm_url},
        "simulate": {"gpus": a.simulate_gpus or 8},
        "gpu": {"dcgm_url": a.dcgm_url, "simulate_gpus": a.simulate_gpus},
        "nvml": {},
        "scrape": {"targets": a.scrape_targets},
    }


def _build_agent(cfg: Config, endpoint: str | None = None, *, in_process: bool = False, dry_run=None):
    from .agents import Agent, build_resource, load_collectors

    a = cfg.agent
    readers = []
    exposition = None
    if a.prometheus_port and not in_process and dry_run is None:
        from .agents.prometheus import PrometheusExposition

        exposition = PrometheusExposition(host=a.prometheus_host, port=a.prometheus_port)
        readers.append(exposition.reader)
    agent = Agent(
        endpoint=endpoint or a.endpoint,
        interval_s=parse_duration(a.interval),
        fast_interval_s=parse_duration(a.fast_interval),
        fast_hold_s=parse_duration(a.fast_hold),
        collectors=load_collectors(a.collectors, _collector_options(cfg)),
        resource=build_resource(a.service_name),
        spool_dir=None if dry_run is not None else _spool_dir(a.spool_dir),
        spool_max_bytes=a.spool_max_bytes,
        # In-process with `up`, the process's CPU and memory are mostly chDB's: no budget.
        cpu_budget=None if in_process or not a.cpu_budget else a.cpu_budget,
        rss_budget_bytes=None if in_process or not a.rss_budget_bytes else a.rss_budget_bytes,
        retry_max_s=parse_duration(a.retry_max),
        gzip=a.gzip,
        extra_readers=readers,
        dry_run=dry_run,
        token=os.environ.get(a.token_env, "").strip() or None if a.token_env else None,
        ca_file=os.path.expanduser(a.ca_file) if a.ca_file else None,
    )
    return agent, exposition


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
            agent, _ = _build_agent(cfg, endpoint, in_process=True)
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
    if args.dry_run and not args.once:
        print("stethoscope agent: --dry-run needs --once", file=sys.stderr)
        return 2
    cfg = _config(
        args,
        {
            "agent.endpoint": args.endpoint,
            "agent.interval": args.interval,
            "agent.fast_interval": args.fast_interval,
            "agent.collectors": args.collectors,
            "agent.spool_dir": "none" if args.no_spool else args.spool_dir,
            "agent.dcgm_url": args.dcgm_url,
            "agent.simulate_gpus": args.simulate_gpus,
            "agent.prometheus_port": args.prometheus_port,
        },
    )
    _setup_logging(cfg.log_level)
    agent, exposition = _build_agent(cfg, dry_run=sys.stdout if args.dry_run else None)
    if args.once:
        ok = agent.export_once()
        if not ok:
            print(
                f"stethoscope agent: not delivered to {cfg.agent.endpoint} in time"
                + ("; kept in the spool for the next run" if agent.spool is not None else ""),
                file=sys.stderr,
            )
        return 0 if ok else 1
    if exposition is not None:
        exposition.start()
        log.info("Prometheus metrics on http://%s:%d/metrics", cfg.agent.prometheus_host, cfg.agent.prometheus_port)
    agent.start()
    log.info("agent sending to %s every %s", cfg.agent.endpoint, cfg.agent.interval)
    stop = threading.Event()
    try:
        _wait_for_signal(stop, args.duration)
    finally:
        agent.shutdown()
        if exposition is not None:
            exposition.close()
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    fmt = args.format or ("PrettyCompact" if sys.stdout.isatty() else "TabSeparated")
    url = args.url.rstrip("/") + "/?" + urllib.parse.urlencode({"default_format": fmt})
    headers = {}
    if args.token_env:
        token = os.environ.get(args.token_env, "").strip()
        if not token:
            print(f"stethoscope sql: --token-env {args.token_env}: that environment variable is unset or empty",
                  file=sys.stderr)
            return 2
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=args.query.encode("utf-8"), method="POST", headers=headers)
    context = None
    if args.ca_file:
        import ssl

        context = ssl.create_default_context(cafile=args.ca_file)
    try:
        with urllib.request.urlopen(req, timeout=args.timeout, context=context) as resp:
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


def cmd_alerts(args: argparse.Namespace) -> int:
    from .alerts import DEFAULT_RULES, check

    paths = args.paths or [DEFAULT_RULES]
    problems = check(paths)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"{', '.join(map(str, paths))}: ok")
    return 1 if problems else 0


def cmd_demo(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from .demo import run_demo

    result = run_demo(duration_s=args.duration, speedup=args.speedup, out_dir=args.out, data_dir=args.data_dir)
    return 0 if result.ok else 1


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
    ag.add_argument("--fast-interval", help="interval while signals change quickly, e.g. 1s")
    ag.add_argument("--spool-dir", help="durable spool directory")
    ag.add_argument("--no-spool", action="store_true", help="send without a durable spool")
    ag.add_argument("--dcgm-url", help="dcgm-exporter endpoint (default http://127.0.0.1:9400/metrics)")
    ag.add_argument("--simulate-gpus", type=int, help="simulate this many GPUs (series marked simulated)")
    ag.add_argument("--prometheus-port", type=int, help="port of the agent's own /metrics (0 turns it off)")
    ag.add_argument("--once", action="store_true", help="collect and send once, then exit")
    ag.add_argument("--dry-run", action="store_true", help="with --once: print the collection as JSON lines, send nothing")
    ag.add_argument("--duration", type=float, help="stop after this many seconds")
    ag.set_defaults(func=cmd_agent)

    sq = sub.add_parser("sql", help="run a query against the SQL endpoint and print the result")
    sq.add_argument("query")
    sq.add_argument("--url", default="http://127.0.0.1:8123", help="SQL endpoint (default http://127.0.0.1:8123)")
    sq.add_argument("--format", help="output format (default PrettyCompact on a terminal, else TabSeparated)")
    sq.add_argument("--timeout", type=float, default=60.0)
    sq.add_argument("--token-env", help="environment variable holding a bearer token to send (the token never goes on the command line)")
    sq.add_argument("--ca-file", help="PEM CA bundle that verifies an https endpoint")
    sq.set_defaults(func=cmd_sql)

    from .analytics import drift_cli

    dr = sub.add_parser("drift", help="compare a current table (CSV or Parquet) with a reference")
    drift_cli.add_arguments(dr)
    dr.set_defaults(func=drift_cli.run)

    from .analytics import analyze_cli

    an = sub.add_parser("analyze", help="offline analysis of exported runs (analyze training FILE)")
    analyze_cli.add_arguments(an)
    an.set_defaults(func=analyze_cli.run)

    from .dashboards import cli as dashboards_cli

    db = sub.add_parser("dashboards", help="export Grafana dashboards and provisioning, or push them to Grafana")
    dashboards_cli.add_arguments(db)
    db.set_defaults(func=dashboards_cli.run)

    from .dashboards import report as report_cli

    rp = sub.add_parser("report", help="write a self-contained HTML report of the dashboards for a time range")
    report_cli.add_arguments(rp)
    rp.set_defaults(func=report_cli.run)

    al = sub.add_parser("alerts", help="alert rules")
    al_sub = al.add_subparsers(dest="alerts_command", required=True)
    alc = al_sub.add_parser("check", help="validate rule files, reporting every problem with its file and line")
    alc.add_argument("paths", nargs="*", help="rule files or folders (default: the shipped default pack)")
    alc.set_defaults(func=cmd_alerts)
    from .alerts import silences as silences_cli

    als = al_sub.add_parser("silence", help="silence alerts of the running up: add, list, expire")
    silences_cli.add_arguments(als)
    als.set_defaults(func=silences_cli.run)
    from .alerts import actions as actions_cli

    actions_cli.add_cli(al_sub)  # approve, reject, pending: remediation approvals

    dm = sub.add_parser("demo", help="run up with a simulated fleet, inject incidents, and show what was detected")
    dm.add_argument("--duration", type=float, default=420.0, help="seconds to run (default 420)")
    dm.add_argument("--speedup", type=float, default=1.0, help="simulated seconds per wall second (default 1)")
    dm.add_argument("--out", default=".", help="folder for the HTML report and the JSON summary (default .)")
    dm.add_argument("--data-dir", help="keep the store here (default: a temporary folder, removed after)")
    dm.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    dm.set_defaults(func=cmd_demo)

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
