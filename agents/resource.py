"""Resource attributes: who is reporting (host, process, Kubernetes pod).

Precedence, lowest first: detected attributes (host, OS, service, Kubernetes
Downward API variables), then ``OTEL_RESOURCE_ATTRIBUTES``, then
``OTEL_SERVICE_NAME`` for ``service.name`` (as the OpenTelemetry spec orders
them), then the caller's ``extra``. The environment is read only from the
mapping passed in, so tests and embedders control it completely.

Examples:
    >>> env = {"K8S_POD_NAME": "agent-x7", "OTEL_RESOURCE_ATTRIBUTES": "team=ml%2Cinfra,junk"}
    >>> attrs = build_resource(environ=env, extra={"deployment.environment.name": "prod"}).attributes
    >>> attrs["k8s.pod.name"], attrs["team"], attrs["service.name"]
    ('agent-x7', 'ml,infra', 'stethoscope-agent')
    >>> attrs["deployment.environment.name"]
    'prod'
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import sys
import uuid
from collections.abc import Mapping
from urllib.parse import unquote

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.version import __version__ as _sdk_version

import stethoscope

__all__ = ["build_resource", "parse_resource_attributes", "K8S_ENV"]

_log = logging.getLogger(__name__)

_INSTANCE_ID = str(uuid.uuid4())  # one per process, shared by every resource it builds

K8S_ENV: Mapping[str, tuple[str, ...]] = {
    "k8s.node.name": ("K8S_NODE_NAME", "NODE_NAME"),
    "k8s.pod.name": ("K8S_POD_NAME", "POD_NAME"),
    "k8s.namespace.name": ("K8S_NAMESPACE_NAME", "POD_NAMESPACE"),
    "k8s.pod.uid": ("K8S_POD_UID", "POD_UID"),
    "k8s.cluster.name": ("K8S_CLUSTER_NAME",),
}
"""Resource attribute -> environment variables that may carry it, first wins."""

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
         "i386": "x86", "i686": "x86", "ppc64le": "ppc64", "s390x": "s390x"}


def _os_type() -> str:
    if sys.platform.startswith("linux"):
        return "linux"
    if sys.platform == "darwin":
        return "darwin"
    if sys.platform in ("win32", "cygwin"):
        return "windows"
    return sys.platform.rstrip("0123456789")  # freebsd14 -> freebsd


def parse_resource_attributes(value: str) -> dict[str, str]:
    """Parse an ``OTEL_RESOURCE_ATTRIBUTES`` value: ``k=v`` pairs, comma-separated.

    Keys and values are percent-decoded and stripped; entries without ``=`` or
    with an empty key are skipped with a WARNING log.

    >>> parse_resource_attributes("a=1, b = x%20y ,=nokey,lonely,c=d=e")
    {'a': '1', 'b': 'x y', 'c': 'd=e'}
    """
    attrs: dict[str, str] = {}
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        key, sep, val = entry.partition("=")
        key = unquote(key.strip())
        if not sep or not key:
            _log.warning("OTEL_RESOURCE_ATTRIBUTES: ignoring malformed entry %r (want key=value)", entry)
            continue
        attrs[key] = unquote(val.strip())
    return attrs


def build_resource(
    service_name: str = "stethoscope-agent",
    extra: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Resource:
    """Build the agent's :class:`~opentelemetry.sdk.resources.Resource`.

    ``environ`` defaults to :data:`os.environ`; it is read, never written.
    """
    env = os.environ if environ is None else environ
    machine = platform.machine().lower()
    attrs: dict[str, str] = {
        "telemetry.sdk.language": "python",
        "telemetry.sdk.name": "opentelemetry",
        "telemetry.sdk.version": _sdk_version,
        "host.name": socket.gethostname(),
        "host.arch": _ARCH.get(machine, machine or "unknown"),
        "os.type": _os_type(),
        "service.name": service_name,
        "service.version": stethoscope.__version__,
        "service.instance.id": _INSTANCE_ID,
    }
    for key, names in K8S_ENV.items():
        found = next((env[n] for n in names if env.get(n)), None)
        if found:
            attrs[key] = found
    attrs.update(parse_resource_attributes(env.get("OTEL_RESOURCE_ATTRIBUTES", "")))
    if env.get("OTEL_SERVICE_NAME", "").strip():
        attrs["service.name"] = env["OTEL_SERVICE_NAME"].strip()
    attrs.update(extra or {})
    return Resource(attrs)
