"""Alerts: rule files, rule evaluation and alert state, notifiers.

* :mod:`.rules` - YAML rules (``match`` on findings or ``expr`` over the store), ``load_rules``/``check``.
* :mod:`.state` - the lifecycle engine (pending -> firing -> resolved, dedup, inhibition, silences).
* :mod:`.schema` - the ``alerts`` table DDL and row conversion for persisted state.
* :mod:`.signing` - HMAC-SHA256 webhook signatures and ``verify``.
* :mod:`.notifiers` - Alertmanager API v2, signed webhook, PagerDuty Events v2, Slack.

The default rule pack is ``alerts/rules/default.yaml`` (:data:`DEFAULT_RULES`).
"""

from pathlib import Path

from .notifiers import (
    AlertmanagerNotifier,
    Delivery,
    Notifier,
    PagerDutyNotifier,
    SlackNotifier,
    WebhookNotifier,
    dispatch,
)
from .rules import Expr, Match, Rule, check, load_rules
from .signing import ReplayCache, SignatureError, sign_headers, verify
from .state import AlertEngine, InhibitRule, Notification, Silence, fingerprint

#: The rule pack shipped with Stethoscope.
DEFAULT_RULES = Path(__file__).resolve().parent / "rules" / "default.yaml"

__all__ = [
    "DEFAULT_RULES",
    "Rule", "Match", "Expr", "load_rules", "check",
    "AlertEngine", "Notification", "Silence", "InhibitRule", "fingerprint",
    "Delivery", "Notifier", "AlertmanagerNotifier", "WebhookNotifier", "PagerDutyNotifier", "SlackNotifier", "dispatch",
    "SignatureError", "ReplayCache", "sign_headers", "verify",
]
