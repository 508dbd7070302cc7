"""Alert rules as YAML: load them, or check them and report every problem with its file:line.

A rule file holds ``rules:``, a list of mappings. A rule either *matches findings*
(``match: {kind, subject, min_severity, drifted}``) or *evaluates SQL* over the store
(``expr`` returning one number, compared with ``threshold`` by ``op``). Line numbers
come from composing the YAML to nodes, so every message points at the offending key.

Examples
--------
>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "r.yaml").write_text('''
... rules:
...   - name: HotGpu
...     match: {kind: gpu_temperature, min_severity: warning}
...     for: 2m
...     severity: critical
...     annotations: {summary: "GPU too hot"}
... ''')
>>> [(r.name, r.for_s, r.severity) for r in load_rules([d / "r.yaml"])]
[('HotGpu', 120.0, 'critical')]
>>> _ = (d / "bad.yaml").write_text("rules:\\n  - name: X\\n    severity: loud\\n")
>>> for p in check([d / "bad.yaml"]): print(p.split("/")[-1])
bad.yaml:2: rule 'X': needs exactly one of 'match' or 'expr'
bad.yaml:3: rule 'X': severity must be one of info, warning, critical, got 'loud'
bad.yaml:2: rule 'X': annotations.summary is required

``actions`` lists notifier names and, beside them, remediation actions as mappings
(``{action: scale, target: "deployment/ns/web", replicas: "+1", max: 10}``); each is
checked by its plugin (see :mod:`.actions` and docs/remediation.md). A target or a
string parameter may use ``{{ labels.NAME }}``, ``{{ subject }}``, ``{{ subject.KEY }}``
(a ``KEY=value`` part of the subject), ``{{ rule }}``, ``{{ severity }}`` or ``{{ fingerprint }}``.

>>> _ = (d / "act.yaml").write_text('''
... rules:
...   - name: BadNode
...     match: {kind: gpu_xid}
...     annotations: {summary: "XID"}
...     actions: [pagerduty, {action: cordon, target: "{{ labels.node }}", approval: true}]
... ''')
>>> r = load_rules([d / "act.yaml"])[0]
>>> r.actions, [(a.action, a.target, a.approval) for a in r.remediations]
(('pagerduty',), [('cordon', '{{ labels.node }}', True)])
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._extras import require
from ..errors import ConfigError

if TYPE_CHECKING:
    import yaml

__all__ = [
    "SEVERITIES", "OPS", "Match", "Expr", "Rule", "ActionSpec", "load_rules", "check", "parse_duration", "rule_files",
    "render_template", "template_problems", "GUARD_KEYS",
]

SEVERITIES = ("info", "warning", "critical")
OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
}
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_RULE_KEYS = {"name", "match", "expr", "threshold", "op", "for", "labels", "annotations", "severity", "actions"}
_MATCH_KEYS = {"kind", "subject", "min_severity", "drifted"}
_ANNOTATION_KEYS = {"summary", "description", "runbook_url", "dashboard_url"}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Keys of an action mapping that every action takes (the guards); the rest go to the plugin.
GUARD_KEYS = ("action", "target", "cooldown", "max_per_hour", "approval", "dry_run")
_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_]+)(?:\.([A-Za-z0-9_.\-]+))?\s*\}\}")
_TEMPLATE_ROOTS = {"labels": True, "subject": None, "rule": False, "severity": False, "fingerprint": False}


def parse_duration(text: Any) -> float:
    """Seconds in ``"90s"``, ``"5m"``, ``"1h"``, ``"250ms"``, ``"1d"`` or a bare number of seconds.

    >>> parse_duration("5m"), parse_duration(0), parse_duration("250ms")
    (300.0, 0.0, 0.25)
    """
    if isinstance(text, bool):
        raise ValueError(f"not a duration: {text!r}")
    if isinstance(text, (int, float)):
        if text < 0 or not math.isfinite(text):
            raise ValueError(f"not a duration: {text!r}")
        return float(text)
    m = _DURATION.match(str(text).strip())
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 5m, 1h)")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class Match:
    """Selects findings: ``kind`` equal (one or several), ``subject`` regex (search), at least
    ``min_severity``, and ``drifted`` when set."""

    kinds: tuple[str, ...]
    subject: str = ""
    min_severity: str = "warning"
    drifted: bool | None = None

    def __call__(self, finding: Any) -> bool:
        if finding.kind not in self.kinds:
            return False
        if SEVERITIES.index(finding.severity) < SEVERITIES.index(self.min_severity):
            return False
        if self.drifted is not None and bool(finding.drifted) != self.drifted:
            return False
        return not self.subject or re.search(self.subject, finding.subject) is not None


@dataclass(frozen=True)
class Expr:
    """SQL returning one number; the condition holds when ``value <op> threshold``."""

    sql: str
    threshold: float
    op: str = ">"

    def holds(self, value: float | None) -> bool:
        return value is not None and math.isfinite(value) and OPS[self.op](value, self.threshold)


@dataclass(frozen=True)
class ActionSpec:
    """A remediation action a rule asks for: the plugin ``action``, its ``target`` (may be a
    template), the plugin's own ``params`` and the guard settings (``None``: the configured default)."""

    action: str
    target: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    cooldown_s: float | None = None
    max_per_hour: int | None = None
    approval: bool = False
    dry_run: bool | None = None
    source: str = ""  # "file:line" of the mapping


def template_problems(text: str) -> list[str]:
    """What is wrong with the ``{{ ... }}`` placeholders in ``text`` (empty when fine).

    >>> template_problems("{{ labels.node }}-{{ subject.model }}"), template_problems("{{ node }}")
    ([], ["unknown placeholder '{{ node }}' (use labels.NAME, subject, subject.KEY, rule, severity, fingerprint)"])
    """
    out = []
    for m in _TEMPLATE.finditer(text):
        root, sub = m.group(1), m.group(2)
        need = _TEMPLATE_ROOTS.get(root, "unknown")
        if need == "unknown" or (need is True and not sub) or (need is False and sub):
            out.append(f"unknown placeholder {m.group(0)!r} (use labels.NAME, subject, subject.KEY, rule, severity, "
                       "fingerprint)")
    rest = _TEMPLATE.sub("", text)
    if "{{" in rest or "}}" in rest:
        out.append(f"unbalanced '{{{{' or '}}}}' in {text!r}")
    return out


def render_template(text: str, *, labels: Mapping[str, str], subject: str = "", rule: str = "", severity: str = "",
                    fingerprint: str = "") -> str:
    """``text`` with its placeholders filled; raises ``KeyError`` naming a label or subject part that is absent.

    >>> render_template("{{ labels.node }}/{{ subject.model }}", labels={"node": "n1"}, subject="model=m version=2")
    'n1/m'
    """
    parts = dict(p.split("=", 1) for p in subject.split() if "=" in p)

    def one(m: re.Match[str]) -> str:
        root, sub = m.group(1), m.group(2)
        if root == "labels":
            if sub not in labels:
                raise KeyError(f"label {sub!r}")
            return str(labels[sub])
        if root == "subject":
            if sub is None:
                return subject
            if sub not in parts:
                raise KeyError(f"subject part {sub!r}")
            return parts[sub]
        return {"rule": rule, "severity": severity, "fingerprint": fingerprint}[root]

    return _TEMPLATE.sub(one, text)


@dataclass(frozen=True)
class Rule:
    name: str
    severity: str
    match: Match | None = None
    expr: Expr | None = None
    for_s: float = 0.0
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    actions: tuple[str, ...] = ()  # notifier names
    source: str = ""  # "file:line" where the rule starts
    remediations: tuple[ActionSpec, ...] = ()  # the mappings in ``actions``


# --- loading ----------------------------------------------------------------------------


def rule_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named by ``paths``; a directory stands for its ``*.yaml``/``*.yml`` files, sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix in (".yaml", ".yml") and q.is_file())
        else:
            out.append(p)
    return out


def load_rules(paths: Iterable[str | Path], *, notifiers: Iterable[str] | None = None) -> list[Rule]:
    """Every rule in ``paths``; raises :class:`ConfigError` listing every problem (file:line)."""
    rules, problems = _load(paths, notifiers)
    if problems:
        raise ConfigError(problems)
    return rules


def check(paths: Iterable[str | Path], *, notifiers: Iterable[str] | None = None) -> list[str]:
    """Every problem in ``paths`` as ``file:line: message``; empty when all rules are valid.

    When ``notifiers`` is given, ``actions`` must name only those.
    """
    return _load(paths, notifiers)[1]


def _load(paths: Iterable[str | Path], notifiers: Iterable[str] | None) -> tuple[list[Rule], list[str]]:
    known = None if notifiers is None else set(notifiers)
    rules: list[Rule] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    yaml = require("yaml", extra="server", feature="Alert rule files")
    for path in rule_files(paths):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            problems.append(f"{path}: cannot read: {exc.strerror or exc}")
            continue
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else 1
            problems.append(f"{path}:{line}: invalid YAML: {exc.problem or exc}")
            continue
        except yaml.YAMLError as exc:
            problems.append(f"{path}: invalid YAML: {exc}")
            continue
        _File(yaml, path, known, seen, rules, problems).top(root)
    return rules, problems


class _File:
    """Validates one composed file, appending rules and problems."""

    def __init__(self, y: Any, path: Path, known: set[str] | None, seen: dict[str, str], rules: list[Rule], problems: list[str]):
        self.y = y
        self.path, self.known, self.seen, self.rules, self.problems = path, known, seen, rules, problems

    def err(self, node: yaml.Node, msg: str) -> None:
        self.problems.append(f"{self.path}:{node.start_mark.line + 1}: {msg}")

    def top(self, root: yaml.Node | None) -> None:
        if root is None:
            self.problems.append(f"{self.path}:1: empty file; expected 'rules:' with a list of rules")
            return
        if isinstance(root, self.y.MappingNode):
            items = {k.value: (k, v) for k, v in root.value if isinstance(k, self.y.ScalarNode)}
            for k, _ in root.value:
                if k.value != "rules":
                    self.err(k, f"unknown top-level key {k.value!r} (expected 'rules')")
            if "rules" not in items:
                self.err(root, "missing 'rules:'")
                return
            seq = items["rules"][1]
        else:
            seq = root
        if not isinstance(seq, self.y.SequenceNode):
            self.err(seq, "'rules' must be a list of rules")
            return
        for node in seq.value:
            self.rule(node)

    def rule(self, node: yaml.Node) -> None:
        if not isinstance(node, self.y.MappingNode):
            self.err(node, "a rule must be a mapping")
            return
        n0 = len(self.problems)
        keys: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for k, v in node.value:
            if k.value in keys:
                self.err(k, f"duplicate key {k.value!r}")
            keys[k.value] = (k, v)
        name_node = keys.get("name", (node, None))[1]
        name = name_node.value if isinstance(name_node, self.y.ScalarNode) else ""
        label = f"rule {name!r}" if name else "rule"
        for k, _ in node.value:
            if k.value not in _RULE_KEYS:
                self.err(k, f"{label}: unknown key {k.value!r}")
        if not name:
            self.err(node, "rule: 'name' is required")
        elif not _NAME.match(name):
            self.err(name_node, f"{label}: name must match {_NAME.pattern}")
        elif name in self.seen:
            self.err(name_node, f"{label}: duplicate name (first at {self.seen[name]})")
        else:
            self.seen[name] = f"{self.path}:{node.start_mark.line + 1}"

        match = expr = None
        if ("match" in keys) == ("expr" in keys):
            self.err(node, f"{label}: needs exactly one of 'match' or 'expr'")
        elif "match" in keys:
            match = self.match(label, keys["match"][1])
            for k in ("threshold", "op"):
                if k in keys:
                    self.err(keys[k][0], f"{label}: {k!r} applies only to 'expr' rules")
        else:
            expr = self.expr(label, keys)

        severity = self.scalar(keys, "severity", label, "warning")
        if severity not in SEVERITIES:
            self.err(keys["severity"][1], f"{label}: severity must be one of {', '.join(SEVERITIES)}, got {severity!r}")
        for_s = 0.0
        if "for" in keys:
            try:
                for_s = parse_duration(self.plain(keys["for"][1]))
            except ValueError as exc:
                self.err(keys["for"][1], f"{label}: for: {exc}")
        labels = self.str_map(keys, "labels", label)
        for k in labels:
            if not _NAME.match(k):
                self.err(keys["labels"][1], f"{label}: label name {k!r} must match {_NAME.pattern}")
        annotations = self.str_map(keys, "annotations", label)
        if "annotations" in keys:
            for k, _ in keys["annotations"][1].value if isinstance(keys["annotations"][1], self.y.MappingNode) else ():
                if k.value not in _ANNOTATION_KEYS:
                    self.err(k, f"{label}: unknown annotation {k.value!r} (allowed: {', '.join(sorted(_ANNOTATION_KEYS))})")
        if not annotations.get("summary"):
            self.err(keys.get("annotations", (node, node))[1], f"{label}: annotations.summary is required")
        actions: list[str] = []
        remediations: list[ActionSpec] = []
        if "actions" in keys:
            v = keys["actions"][1]
            if not isinstance(v, self.y.SequenceNode):
                self.err(v, f"{label}: actions must be a list of notifier names or action mappings")
            else:
                for a_node in v.value:
                    a = self.plain(a_node) if isinstance(a_node, self.y.ScalarNode) else None
                    if isinstance(a_node, self.y.MappingNode):
                        spec = self.action_spec(label, a_node)
                        if spec is not None:
                            remediations.append(spec)
                    elif not isinstance(a, str) or not a:
                        self.err(a_node, f"{label}: actions entries must be notifier names or action mappings")
                    elif self.known is not None and a not in self.known:
                        self.err(a_node, f"{label}: unknown notifier {a!r} (configured: {', '.join(sorted(self.known)) or 'none'})")
                    else:
                        actions.append(a)
        if len(self.problems) == n0 and (match or expr):
            self.rules.append(Rule(
                name=name, severity=severity, match=match, expr=expr, for_s=for_s, labels=labels,
                annotations=annotations, actions=tuple(actions), source=f"{self.path}:{node.start_mark.line + 1}",
                remediations=tuple(remediations),
            ))

    def action_spec(self, label: str, node: yaml.Node) -> ActionSpec | None:
        """One ``{action: ..., ...}`` entry: guard keys checked here, the rest by the action's plugin."""
        from .actions import validate_action  # late: actions imports this module

        n0 = len(self.problems)
        keys = {k.value: (k, v) for k, v in node.value if isinstance(k, self.y.ScalarNode)}
        name = self.plain(keys["action"][1]) if "action" in keys else None
        if not isinstance(name, str) or not name:
            self.err(node, f"{label}: an action mapping needs 'action: NAME'")
            return None
        where = f"{label}: action {name!r}"
        target = ""
        if "target" in keys:
            t = self.plain(keys["target"][1])
            if not isinstance(t, str) or not t.strip():
                self.err(keys["target"][1], f"{where}: target must be a non-empty string")
            else:
                target = t.strip()
                for p in template_problems(target):
                    self.err(keys["target"][1], f"{where}: target: {p}")
        cooldown = None
        if "cooldown" in keys:
            try:
                cooldown = parse_duration(self.plain(keys["cooldown"][1]))
            except ValueError as exc:
                self.err(keys["cooldown"][1], f"{where}: cooldown: {exc}")
        mph = None
        if "max_per_hour" in keys:
            mph = self.plain(keys["max_per_hour"][1])
            if isinstance(mph, bool) or not isinstance(mph, int) or mph < 1:
                self.err(keys["max_per_hour"][1], f"{where}: max_per_hour must be an integer of 1 or more, got {mph!r}")
        flags: dict[str, bool | None] = {"approval": False, "dry_run": None}
        for k in flags:
            if k in keys:
                b = self.plain(keys[k][1])
                if not isinstance(b, bool):
                    self.err(keys[k][1], f"{where}: {k} must be true or false, got {b!r}")
                else:
                    flags[k] = b
        params: dict[str, Any] = {}
        for k, (_, vnode) in keys.items():
            if k not in GUARD_KEYS:
                params[k] = self.plain(vnode)
                for p in self._template_values(params[k]):
                    self.err(vnode, f"{where}: {k}: {p}")
        for key, msg in validate_action(name, target, params):
            anchor = keys[key][1] if key in keys else node
            self.err(anchor, f"{where}: {msg}")
        if len(self.problems) != n0:
            return None
        return ActionSpec(name, target, params, cooldown, mph if isinstance(mph, int) else None,
                          bool(flags["approval"]), flags["dry_run"], f"{self.path}:{node.start_mark.line + 1}")

    def _template_values(self, value: Any) -> list[str]:
        if isinstance(value, str):
            return template_problems(value)
        if isinstance(value, dict):
            return [p for v in value.values() for p in self._template_values(v)]
        if isinstance(value, list):
            return [p for v in value for p in self._template_values(v)]
        return []

    def match(self, label: str, node: yaml.Node) -> Match | None:
        if not isinstance(node, self.y.MappingNode):
            self.err(node, f"{label}: match must be a mapping with kind, subject, min_severity, drifted")
            return None
        n0 = len(self.problems)
        keys = {k.value: (k, v) for k, v in node.value}
        for k, _ in node.value:
            if k.value not in _MATCH_KEYS:
                self.err(k, f"{label}: match: unknown key {k.value!r}")
        kinds: tuple[str, ...] = ()
        if "kind" not in keys:
            self.err(node, f"{label}: match.kind is required")
        else:
            v = self.plain(keys["kind"][1])
            v = [v] if isinstance(v, str) else v
            if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
                self.err(keys["kind"][1], f"{label}: match.kind must be a finding kind or a list of them")
            else:
                kinds = tuple(v)
        subject = self.scalar(keys, "subject", label, "")
        if subject:
            try:
                re.compile(subject)
            except re.error as exc:
                self.err(keys["subject"][1], f"{label}: match.subject is not a valid regex: {exc}")
        sev = self.scalar(keys, "min_severity", label, "warning")
        if sev not in SEVERITIES:
            self.err(keys["min_severity"][1], f"{label}: match.min_severity must be one of {', '.join(SEVERITIES)}, got {sev!r}")
        drifted = None
        if "drifted" in keys:
            drifted = self.plain(keys["drifted"][1])
            if not isinstance(drifted, bool):
                self.err(keys["drifted"][1], f"{label}: match.drifted must be true or false")
        return Match(kinds, subject, sev, drifted) if len(self.problems) == n0 else None

    def expr(self, label: str, keys: dict[str, tuple[yaml.Node, yaml.Node]]) -> Expr | None:
        n0 = len(self.problems)
        sql = self.plain(keys["expr"][1])
        if not isinstance(sql, str) or not sql.strip():
            self.err(keys["expr"][1], f"{label}: expr must be a SQL query returning one number")
        threshold = math.nan
        if "threshold" not in keys:
            self.err(keys["expr"][0], f"{label}: an 'expr' rule needs 'threshold'")
        else:
            t = self.plain(keys["threshold"][1])
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
                self.err(keys["threshold"][1], f"{label}: threshold must be a finite number, got {t!r}")
            else:
                threshold = float(t)
        op = self.scalar(keys, "op", label, ">")
        if op not in OPS:
            self.err(keys["op"][1], f"{label}: op must be one of {' '.join(OPS)}, got {op!r}")
        return Expr(sql.strip(), threshold, op) if len(self.problems) == n0 else None

    # -- node helpers --

    def plain(self, node: yaml.Node) -> Any:
        try:
            return self.y.constructor.SafeConstructor().construct_document(node)
        except self.y.YAMLError:
            return None

    def scalar(self, keys: dict[str, tuple[yaml.Node, yaml.Node]], key: str, label: str, default: str) -> str:
        if key not in keys:
            return default
        v = keys[key][1]
        if not isinstance(v, self.y.ScalarNode):
            self.err(v, f"{label}: {key} must be a string")
            return default
        return str(v.value)

    def str_map(self, keys: dict[str, tuple[yaml.Node, yaml.Node]], key: str, label: str) -> dict[str, str]:
        if key not in keys:
            return {}
        v = keys[key][1]
        if not isinstance(v, self.y.MappingNode):
            self.err(v, f"{label}: {key} must be a mapping of strings")
            return {}
        out: dict[str, str] = {}
        for k, val in v.value:
            if not isinstance(val, self.y.ScalarNode) or val.tag == "tag:yaml.org,2002:null":
                self.err(val, f"{label}: {key}.{k.value} must be a string")
            else:
                out[str(k.value)] = str(val.value)
        return out
