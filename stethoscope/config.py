"""Configuration: one frozen object built from defaults, a TOML file, the environment and flags.

Precedence, lowest first: built-in defaults, the ``--config`` TOML file, environment
variables ``STETHOSCOPE_<SECTION>_<KEY>`` (for example ``STETHOSCOPE_SQL_PORT=8124``),
then command-line flags. Every value is checked when the configuration is built and
all problems are reported together in one :class:`~stethoscope.errors.ConfigError`.

>>> cfg = load_config(environ={"STETHOSCOPE_SQL_PORT": "9000"})
>>> cfg.sql.port, cfg.collector.otlp_http_port, cfg.store.data_dir
(9000, 4318, './stethoscope-data')
>>> load_config(environ={"STETHOSCOPE_SQL_PORT": "0", "STETHOSCOPE_STORE_TTL": "3 weeks"})
Traceback (most recent call last):
...
stethoscope.errors.ConfigError: 2 configuration problems:
  - store.ttl (env STETHOSCOPE_STORE_TTL): expected a duration like 30d, 12h, 90m or 0, got '3 weeks'
  - sql.port (env STETHOSCOPE_SQL_PORT): must be a port number 1..65535, got 0
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

__all__ = [
    "Config",
    "StoreConfig",
    "CollectorConfig",
    "SqlConfig",
    "AgentConfig",
    "AnalyticsConfig",
    "AnomalyConfig",
    "AlertsConfig",
    "AuthConfig",
    "TlsConfig",
    "RemediationConfig",
    "load_config",
    "parse_duration",
    "ENV_PREFIX",
]

ENV_PREFIX = "STETHOSCOPE_"

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, None: 1}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``30d``, ``12h``, ``90m``, ``45s``, ``200ms`` or ``0``.

    >>> parse_duration("30d"), parse_duration("200ms"), parse_duration("0")
    (2592000, 0.2, 0)
    """
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"expected a duration like 30d, 12h, 90m or 0, got {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


# --- validators: each returns a problem description or None -------------------


def _port(v: int) -> str | None:
    return None if 1 <= v <= 65535 else f"must be a port number 1..65535, got {v}"


def _positive(v: float) -> str | None:
    return None if v > 0 else f"must be greater than 0, got {v}"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else f"must be 0 or more, got {v}"


def _duration(v: str) -> str | None:
    try:
        parse_duration(v)
    except ValueError as exc:
        return str(exc)
    return None


def _http_url(v: str) -> str | None:
    if v == "":
        return None
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"expected an http:// or https:// URL, got {v!r}"
    return None


def _identifier(v: str) -> str | None:
    return None if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v) else f"expected a plain identifier, got {v!r}"


def _non_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _decoder(v: str) -> str | None:
    ok = ("auto", "native", "python")
    return None if v in ok else f"must be one of {', '.join(ok)}, got {v!r}"


def _log_level(v: str) -> str | None:
    ok = ("DEBUG", "INFO", "WARNING", "ERROR")
    return None if v.upper() in ok else f"must be one of {', '.join(ok)}, got {v!r}"


def _positive_duration(v: str) -> str | None:
    try:
        seconds = parse_duration(v)
    except ValueError as exc:
        return str(exc)
    return None if seconds > 0 else f"must be a duration greater than 0, got {v!r}"


def _probability(v: float) -> str | None:
    return None if 0 < v < 1 else f"must be between 0 and 1 (exclusive), got {v}"


def _at_least_two(v: int) -> str | None:
    return None if v >= 2 else f"must be 2 or more, got {v}"


def _reference(v: str) -> str | None:
    ok = ("previous", "first")
    return None if v in ok else f"must be one of {', '.join(ok)}, got {v!r}"


def _correction(v: str) -> str | None:
    ok = ("bh", "bonferroni")
    return None if v in ok else f"must be one of {', '.join(ok)}, got {v!r}"


def _env_name(v: str) -> str | None:
    if v == "" or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
        return None
    return f"expected the name of an environment variable, got {v!r}"


def _setting(default: Any, help: str, check: Callable[[Any], str | None] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "check": check})


@dataclass(frozen=True)
class StoreConfig:
    """Where telemetry is stored and how it is written."""

    data_dir: str = _setting("./stethoscope-data", "Embedded chDB data directory.", _non_empty)
    clickhouse_url: str = _setting(
        "", "ClickHouse server HTTP URL (http://user:password@host:8123); empty means the embedded chDB store.", _http_url
    )
    database: str = _setting("stethoscope", "Database holding every table.", _identifier)
    cluster: str = _setting("", "ClickHouse cluster for ON CLUSTER DDL (server backend only).")
    engine: str = _setting("", "Table engine replacing MergeTree, e.g. ReplicatedMergeTree on a cluster.")
    ttl: str = _setting("0", "How long rows are kept (30d, 12h, ...); 0 keeps them forever.", _duration)
    batch_rows: int = _setting(10_000, "Insert as soon as this many rows are waiting.", _positive)
    flush_interval: str = _setting("200ms", "Longest time a row waits before its batch is inserted.", _duration)
    queue_max_rows: int = _setting(
        2_000_000, "Rows held in memory before receivers answer 503 (backpressure).", _positive
    )
    insert_attempts: int = _setting(
        8, "Attempts per batch before the store counts as down (503 without a journal; kept and retried with one).",
        _positive,
    )
    journal: bool = _setting(
        True,
        "Write each batch to a write-ahead journal before inserting it: exactly-once delivery across crashes "
        "and client replays (Idempotency-Key), and buffering while the store is down.",
    )
    journal_dir: str = _setting("", "Directory of the ingest journal; empty means <data_dir>/journal.")


@dataclass(frozen=True)
class CollectorConfig:
    """The OTLP receiver."""

    host: str = _setting("127.0.0.1", "Address the OTLP/HTTP receiver binds to.", _non_empty)
    otlp_http_port: int = _setting(4318, "OTLP/HTTP port (/v1/metrics, /v1/logs).", _port)
    max_body_bytes: int = _setting(
        32 * 1024 * 1024, "Largest request body accepted, before and after decompression.", _positive
    )
    request_timeout: str = _setting(
        "30s", "How long a request waits for its rows to be stored before answering 503.", _duration
    )
    decoder: str = _setting(
        "auto", "OTLP metrics decoder: native (C kernel), python (its pure-Python twin) or auto.", _decoder
    )
    sampling_budget: float = _setting(
        100.0, "Sampled rows per second all SDKs may send together (served on /v1/sampling).", _positive
    )
    sampling_default_target: float = _setting(
        1.0, "Sampled rows per second per model stream unless overridden on /v1/sampling.", _non_negative
    )
    cardinality_limit: int = _setting(
        2000,
        "Series per metric name and hour (2000, the OpenTelemetry SDK default): points with further attribute "
        "sets are stored with otel.metric.overflow=true only. 0 turns the limit off; docs/security.md has its cost.",
        lambda v: None if v == 0 or v >= 2 else f"must be 0 (off) or 2 or more, got {v}",
    )


@dataclass(frozen=True)
class SqlConfig:
    """The ClickHouse-compatible HTTP SQL endpoint."""

    host: str = _setting("127.0.0.1", "Address the SQL endpoint binds to.", _non_empty)
    port: int = _setting(8123, "SQL endpoint port (ClickHouse HTTP interface).", _port)
    writable: bool = _setting(False, "Allow INSERT and DDL through the SQL endpoint.")
    max_body_bytes: int = _setting(64 * 1024 * 1024, "Largest query or insert body accepted.", _positive)


@dataclass(frozen=True)
class AgentConfig:
    """The node agent."""

    endpoint: str = _setting("http://127.0.0.1:4318", "OTLP/HTTP endpoint the agent sends to.", _http_url)
    interval: str = _setting("10s", "Base collection and export interval.", _duration)
    fast_interval: str = _setting(
        "1s", "Interval used while a signal changes quickly or a collector asks for it.", _duration
    )
    fast_hold: str = _setting("60s", "How long the fast interval lasts after the last request for it.", _duration)
    collectors: tuple[str, ...] = _setting(
        ("host", "gpu"),
        "Collectors to run (entry points in stethoscope.collectors); gpu picks the simulator, NVML, "
        "dcgm-exporter or nothing, in that order.",
    )
    service_name: str = _setting("stethoscope-agent", "service.name resource attribute.", _non_empty)
    spool_dir: str = _setting(
        "",
        "Durable spool directory; empty picks /var/lib/stethoscope/spool as root, else "
        "~/.local/state/stethoscope/spool; none sends without a spool.",
    )
    spool_max_bytes: int = _setting(
        256 * 1024 * 1024, "Spool size limit; when full the oldest data is dropped and counted.", _positive
    )
    cpu_budget: float = _setting(
        0.01, "Most of one core the agent may use before it backs off (0.01 = 1%); 0 turns the check off.", _non_negative
    )
    rss_budget_bytes: int = _setting(
        60 * 1024 * 1024, "Most resident memory the agent may use before it backs off; 0 turns the check off.", _non_negative
    )
    retry_max: str = _setting("30s", "Longest wait between delivery retries while the collector is down.", _duration)
    gzip: bool = _setting(False, "Compress OTLP requests with gzip.")
    dcgm_url: str = _setting("http://127.0.0.1:9400/metrics", "dcgm-exporter endpoint, used when NVML is absent.", _http_url)
    simulate_gpus: int = _setting(0, "Simulate this many GPUs instead of reading real ones (marked simulated).", _non_negative)
    scrape_targets: tuple[str, ...] = _setting(
        (), "Prometheus endpoints to scrape into the store (Triton, vLLM, Ray Serve ...)."
    )
    prometheus_host: str = _setting("127.0.0.1", "Address of the agent's own Prometheus /metrics.", _non_empty)
    prometheus_port: int = _setting(9464, "Port of the agent's Prometheus /metrics; 0 turns it off.", _non_negative)
    token_env: str = _setting(
        "STETHOSCOPE_AGENT_TOKEN",
        "Name of the environment variable holding the agent's bearer token (unset or empty: no token).",
    )
    ca_file: str = _setting("", "PEM CA bundle that verifies an https endpoint; empty uses the system CAs.")


@dataclass(frozen=True)
class AnalyticsConfig:
    """The drift scheduler inside ``up``, writing to the findings table."""

    enabled: bool = _setting(True, "Run drift checks on sampled model rows and write findings.")
    interval: str = _setting("5m", "How often the drift checks run.", _positive_duration)
    window: str = _setting("1h", "Length of the current window compared with the reference.", _positive_duration)
    reference: str = _setting(
        "previous",
        "Reference window: previous (the window before the current one) or first (the first window of "
        "each model version).",
        _reference,
    )
    min_rows: int = _setting(200, "Fewest rows per window for a check; fewer gives an insufficient-data finding.",
                             _at_least_two)
    alpha: float = _setting(0.05, "Significance level after multiple-testing correction.", _probability)
    correction: str = _setting("bh", "Correction across features: bh (Benjamini-Hochberg) or bonferroni.",
                               _correction)
    max_rows: int = _setting(
        100_000, "Most rows moved to Python per window (a pseudo-random subset chosen in SQL); larger windows also "
        "get ClickHouse's KS test over every row.", _at_least_two)
    min_labels: int = _setting(100, "Fewest labelled rows per window for an accuracy_drop finding.", _at_least_two)
    performance_metric: str = _setting(
        "auto", "Metric of the accuracy_drop check: auto (accuracy for classes, mae for numbers), accuracy, f1, "
        "f1_macro, roc_auc or mae.",
        lambda v: None if v in ("auto", "accuracy", "f1", "f1_macro", "roc_auc", "mae")
        else f"must be one of auto, accuracy, f1, f1_macro, roc_auc, mae, got {v!r}")
    max_performance_drop: float = _setting(
        0.05, "Relative drop of the performance metric against the reference that alerts (0.05 = 5%).", _probability)
    shadow_min_agreement: float = _setting(
        0.95, "Shadow versions agreeing with the primary on fewer of the same requests get a warning.", _probability)
    sketch_reference: str = _setting(
        "none", "Reference kept as sketches: none, rolling (previous window), version (first window of each model "
        "version) or fixed:NAME (a named snapshot).",
        lambda v: None if v in ("none", "rolling", "version") or (v.startswith("fixed:") and len(v) > 6)
        else f"must be none, rolling, version or fixed:NAME, got {v!r}")
    sketch_metrics: bool = _setting(
        True, "Also check drift on the SDK's exported per-feature exponential histograms (every request).")


def _gpu_prices(v: tuple[str, ...]) -> str | None:
    bad = []
    for e in v:
        name, sep, price = e.rpartition("=")
        try:
            ok = bool(sep and name.strip()) and math.isfinite(float(price)) and float(price) >= 0
        except ValueError:
            ok = False
        if not ok:
            bad.append(e)
    return f"expected MODEL=USD_PER_HOUR entries with a number >= 0, got {', '.join(map(repr, bad))}" if bad else None


def _model_slas(v: tuple[str, ...]) -> str | None:
    bad = []
    for e in v:
        name, sep, ms = e.rpartition("=")
        try:
            ok = bool(sep and name.strip()) and math.isfinite(float(ms)) and float(ms) > 0
        except ValueError:
            ok = False
        if not ok:
            bad.append(e)
    return f"expected MODEL=MILLISECONDS entries with a number > 0, got {', '.join(map(repr, bad))}" if bad else None


def _share(v: float) -> str | None:
    return None if 0 < v <= 1 else f"must be greater than 0 and at most 1, got {v}"


@dataclass(frozen=True)
class AnomalyConfig:
    """The fleet, serving and cost anomaly watches inside ``up`` (docs/anomaly-detectors.md)."""

    enabled: bool = _setting(True, "Run the GPU fleet, serving and cost anomaly detectors and write findings.")
    interval: str = _setting("2s", "How often the anomaly watches look at new telemetry (each run reads only what "
                             "arrived since the last).", _positive_duration)
    lookback: str = _setting("10m", "How far back the first run of each watch reads.", _positive_duration)
    gpu_prices: tuple[str, ...] = _setting(
        ("NVIDIA H100 80GB HBM3=3.0", "NVIDIA A100-SXM4-80GB=1.8", "default=2.0"),
        "GPU prices in USD per GPU-hour as MODEL=PRICE (the gpu.model attribute); default= covers the rest. "
        "The defaults are illustrative on-demand figures, not quotes: set your own.", _gpu_prices,
    )
    latency_sla_ms: float = _setting(250.0, "p99 latency SLA of every model, in ms.", _positive)
    model_slas: tuple[str, ...] = _setting((), "Per-model p99 SLAs as MODEL=MS, overriding latency_sla_ms.",
                                           _model_slas)
    temperature_c: float = _setting(85.0, "GPU temperature (deg C) above which a sustained reading is reported.",
                                    _positive)
    underutilized_below: float = _setting(0.3, "Mean GPU utilization (0..1) below which a GPU counts as "
                                          "under-used over 10 minutes.", _share)
    leak_horizon: str = _setting("30m", "Warn of a GPU memory leak when the forecast out-of-memory is this close.",
                                 _positive_duration)
    error_rate: float = _setting(0.01, "Error rate (errors per request) above which a model is reported.",
                                 _probability)
    replica_capacity_rps: float = _setting(
        0.0, "Requests per second one model replica can serve; above 80% of it the capacity detector asks to "
        "scale up. 0 turns the capacity detector off.", _non_negative)
    cost_bucket: str = _setting("5m", "Length of the buckets the fleet cost is counted in; cost spikes and idle "
                                "cost are judged per bucket.", _positive_duration)
    cost_warmup: int = _setting(6, "Buckets of fleet cost seen before a cost spike can be reported.", _positive)
    cost_idle_buckets: int = _setting(2, "Buckets in a row in which idle GPUs make up a quarter of the cost before "
                                      "idle cost is reported.", _positive)


@dataclass(frozen=True)
class AlertsConfig:
    """Alert rules evaluated over findings inside ``up``, and where notifications go."""

    enabled: bool = _setting(True, "Evaluate alert rules on new findings and send notifications.")
    interval: str = _setting("30s", "How often a full alert run happens (expr rules, Alertmanager re-post, snapshot "
                             "pruning); new findings are also picked up every poll_interval.", _positive_duration)
    rules: tuple[str, ...] = _setting(
        (), "Extra rule files or folders (their .yaml files); the default rule pack always loads."
    )
    alertmanager_url: str = _setting("", "Alertmanager base URL (API v2); empty sends nothing there.", _http_url)
    webhook_url: str = _setting("", "Signed generic webhook URL; empty sends nothing there.", _http_url)
    webhook_secret_env: str = _setting(
        "STETHOSCOPE_WEBHOOK_SECRET", "Name of the environment variable holding the webhook signing secret.", _env_name
    )
    pagerduty_routing_key_env: str = _setting(
        "", "Name of the environment variable holding the PagerDuty Events v2 routing key; empty turns PagerDuty off.",
        _env_name,
    )
    slack_webhook_url: str = _setting("", "Slack incoming webhook URL; empty sends nothing there.", _http_url)
    repeat_interval: str = _setting("4h", "How long before a still-firing alert is notified again.", _positive_duration)
    poll_interval: str = _setting(
        "1s", "Between full runs, how often to look for new findings, silence requests and due retries "
        "(a cheap query); 0 turns it off and new findings wait for the next full run.", _duration)
    resolve_after: str = _setting(
        "10m", "How long an alert stays active after its latest matching finding; at least the period of the "
        "detector feeding it (drift checks: analytics.interval), or its alerts resolve between two checks.",
        _positive_duration)
    outbox_max_age: str = _setting(
        "24h", "How long an undelivered notification is retried before it is recorded as expired.", _positive_duration)
    outbox_backoff: str = _setting("1s", "Delay before the first retry of a failed notification; doubles per attempt.",
                                   _positive_duration)
    outbox_backoff_max: str = _setting("5m", "Longest delay between two attempts of one notification.",
                                       _positive_duration)
    snapshot_retention: str = _setting(
        "1h", "How long old alert-state snapshots are kept in the alerts table (the newest is always kept).", _duration)
    silence_dir: str = _setting(
        "", "Folder where `stethoscope alerts silence` leaves requests for the running `up`; empty means "
        "silence-requests inside store.data_dir.")


@dataclass(frozen=True)
class AuthConfig:
    """Bearer tokens for the OTLP receiver, the sampling endpoint and the SQL endpoint (docs/security.md)."""

    tokens_file: str = _setting(
        "", "TOML or YAML file of tokens (SHA-256 hashes, names, permissions); empty leaves the listeners open."
    )
    allow_unauthenticated: bool = _setting(
        False, "Serve without tokens even on a non-loopback address (otherwise up refuses to start)."
    )


@dataclass(frozen=True)
class TlsConfig:
    """TLS for every listener of up (OTLP/HTTP and SQL); empty serves plain HTTP."""

    cert_file: str = _setting("", "PEM server certificate (chain) for every listener; set with key_file.")
    key_file: str = _setting("", "PEM private key of cert_file.")
    client_ca_file: str = _setting("", "PEM CA bundle: when set, clients must present a certificate it signed (mTLS).")


@dataclass(frozen=True)
class RemediationConfig:
    """Guarded remediation actions named in alert rules (retrain, scale, cordon, webhook); docs/remediation.md."""

    dry_run: bool = _setting(True, "Only record what each action would do; nothing is called until this is false.")
    max_per_hour: int = _setting(20, "Most actions taken in any hour, all actions together.", _positive)
    cooldown: str = _setting("10m", "Least time between two runs of one action on one target, unless a rule sets "
                             "its own cooldown.", _duration)
    approval_timeout: str = _setting("1h", "How long an action waits for approval before it is rejected as expired.",
                                     _positive_duration)
    kube_api_url: str = _setting(
        "", "Kubernetes API server URL; empty uses KUBERNETES_SERVICE_HOST/PORT (in a pod).", _http_url)
    kube_token_file: str = _setting("/var/run/secrets/kubernetes.io/serviceaccount/token",
                                    "File holding the bearer token for the Kubernetes API (read on every call).",
                                    _non_empty)
    kube_ca_file: str = _setting("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
                                 "CA bundle verifying the Kubernetes API server's certificate.")
    kube_timeout: str = _setting("10s", "Timeout of each call an action makes.", _positive_duration)
    api_host: str = _setting("127.0.0.1", "Address of the remediation API (approvals, KEDA values).", _non_empty)
    api_port: int = _setting(0, "Port of the remediation API serving approvals and the desired replica counts KEDA's "
                             "metrics-api scaler reads; 0 turns it off.", _non_negative)
    api_token_env: str = _setting(
        "STETHOSCOPE_REMEDIATION_TOKEN", "Name of the environment variable holding the bearer token the remediation "
        "API requires (needed beyond loopback).", _env_name)


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    store: StoreConfig = field(default_factory=StoreConfig)
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    sql: SqlConfig = field(default_factory=SqlConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    analytics: AnalyticsConfig = field(default_factory=AnalyticsConfig)
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    remediation: RemediationConfig = field(default_factory=RemediationConfig)
    log_level: str = _setting("INFO", "Logging level.", _log_level)


_SECTION_TYPES = {
    "store": StoreConfig,
    "collector": CollectorConfig,
    "sql": SqlConfig,
    "agent": AgentConfig,
    "analytics": AnalyticsConfig,
    "anomaly": AnomalyConfig,
    "alerts": AlertsConfig,
    "auth": AuthConfig,
    "tls": TlsConfig,
    "remediation": RemediationConfig,
}


def _convert(raw: Any, default: Any) -> Any:
    """Coerce ``raw`` (from TOML, env or flags) to the type of ``default``."""
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(raw, str) and raw.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected true or false, got {raw!r}")
    if isinstance(default, float):
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise ValueError(f"expected a number, got {raw!r}")
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
    if isinstance(default, int):
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise ValueError(f"expected an integer, got {raw!r}")
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
    if isinstance(default, tuple):
        if isinstance(raw, str):
            return tuple(x.strip() for x in raw.split(",") if x.strip())
        if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            return tuple(raw)
        raise ValueError(f"expected a list of names, got {raw!r}")
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return str(raw)
    if not isinstance(raw, str):
        raise ValueError(f"expected a string, got {raw!r}")
    return raw


def _read_file(path: str | os.PathLike[str], problems: list[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        problems.append(f"config file {path}: not found")
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"config file {path}: not valid TOML: {exc}")
    except OSError as exc:
        problems.append(f"config file {path}: cannot be read: {exc.strerror}")
    return {}


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build and validate the configuration.

    ``overrides`` maps ``"section.key"`` (or ``"log_level"``) to values from flags;
    ``None`` values are ignored so unset flags do not mask lower layers.
    """
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    layers: list[tuple[str, dict[str, Any]]] = []  # (where, {dotted key: raw})

    if path is not None:
        data = _read_file(path, problems)
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if key in _SECTION_TYPES and isinstance(value, dict):
                known = {f.name for f in dataclasses.fields(_SECTION_TYPES[key])}
                for sub, v in value.items():
                    if sub not in known:
                        problems.append(
                            f"config file {path}: unknown key {key}.{sub} (known: {', '.join(sorted(known))})"
                        )
                    else:
                        flat[f"{key}.{sub}"] = v
            elif key == "log_level":
                flat[key] = value
            else:
                problems.append(
                    f"config file {path}: unknown key {key!r} "
                    f"(sections: {', '.join(_SECTION_TYPES)}, or log_level)"
                )
        layers.append((f"config file {path}", flat))

    env_layer: dict[str, Any] = {}
    for section, cls in _SECTION_TYPES.items():
        for f in dataclasses.fields(cls):
            name = f"{ENV_PREFIX}{section}_{f.name}".upper()
            if name in environ:
                env_layer[f"{section}.{f.name}"] = environ[name]
    if f"{ENV_PREFIX}LOG_LEVEL" in environ:
        env_layer["log_level"] = environ[f"{ENV_PREFIX}LOG_LEVEL"]
    layers.append(("env", env_layer))
    layers.append(("flag", {k: v for k, v in (overrides or {}).items() if v is not None}))

    values: dict[str, dict[str, Any]] = {s: {} for s in _SECTION_TYPES}
    top: dict[str, Any] = {}
    for where, layer in layers:
        for key, raw in layer.items():
            section, _, name = key.rpartition(".")
            cls = _SECTION_TYPES.get(section) if section else Config
            fields_ = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
            if name not in fields_:
                problems.append(f"{key}: unknown setting")
                continue
            f = fields_[name]
            default = f.default if f.default is not dataclasses.MISSING else None
            src = where
            if where == "env":
                src = "env " + (f"{ENV_PREFIX}{section}_{name}".upper() if section else f"{ENV_PREFIX}LOG_LEVEL")
            try:
                value = _convert(raw, default)
            except ValueError as exc:
                problems.append(f"{key} ({src}): {exc}")
                continue
            check = f.metadata.get("check")
            msg = check(value) if check else None
            if msg:
                problems.append(f"{key} ({src}): {msg}")
                continue
            (values[section] if section else top)[name] = value

    if problems:
        raise ConfigError(problems)
    cfg = Config(**{s: _SECTION_TYPES[s](**values[s]) for s in _SECTION_TYPES}, **top)
    cross = _cross_checks(cfg)
    if cross:
        raise ConfigError(cross)
    return cfg


def _cross_checks(cfg: Config) -> list[str]:
    problems = []
    if cfg.collector.host == cfg.sql.host and cfg.collector.otlp_http_port == cfg.sql.port:
        problems.append(
            f"collector.otlp_http_port and sql.port are both {cfg.sql.port} on {cfg.sql.host}: pick two ports"
        )
    if bool(cfg.tls.cert_file) != bool(cfg.tls.key_file):
        problems.append("tls.cert_file and tls.key_file must be set together")
    if cfg.tls.client_ca_file and not cfg.tls.cert_file:
        problems.append("tls.client_ca_file needs tls.cert_file and tls.key_file: mutual TLS runs over TLS")
    if cfg.store.cluster and not cfg.store.clickhouse_url:
        problems.append("store.cluster needs store.clickhouse_url: the embedded store has no cluster")
    return problems


def describe() -> list[tuple[str, str, Any, str]]:
    """Every setting as ``(key, env var, default, help)``, for docs and ``--help``."""
    rows = []
    for section, cls in _SECTION_TYPES.items():
        for f in dataclasses.fields(cls):
            rows.append(
                (f"{section}.{f.name}", f"{ENV_PREFIX}{section}_{f.name}".upper(), f.default, f.metadata["help"])
            )
    rows.append(("log_level", f"{ENV_PREFIX}LOG_LEVEL", "INFO", "Logging level."))
    return rows


def reference_markdown() -> str:
    """The configuration reference as Markdown (docs/configuration.md is this text)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `stethoscope config list --markdown` from `stethoscope/config.py`; do not edit by hand.",
        "",
        "Each setting comes, lowest precedence first, from its default, the `--config` TOML file",
        "(key `name` in section `[section]`), the environment variable, then a command-line flag.",
        "Durations take `ms`, `s`, `m`, `h`, `d` or `w`; lists are TOML arrays or comma-separated in",
        "the environment.",
    ]
    current = None
    for key, env, default, help_ in describe():
        section = key.split(".", 1)[0] if "." in key else "top level"
        if section != current:
            current = section
            lines += ["", f"## {'`[' + section + ']`' if section != 'top level' else 'Top level'}", "",
                      "| setting | environment variable | default | meaning |", "|---|---|---|---|"]
        shown = ", ".join(default) if isinstance(default, tuple) else default
        shown = f"`{shown}`" if str(shown) != "" else "(empty)"
        lines.append(f"| `{key}` | `{env}` | {shown} | {help_} |")
    return "\n".join(lines) + "\n"


def data_path(cfg: Config) -> Path:
    """The embedded store's data directory as an absolute path."""
    return Path(cfg.store.data_dir).expanduser().resolve()
