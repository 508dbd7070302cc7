"""Remediation actions end to end: rule YAML -> ActionRunner -> the exact API calls -> the audit table.

Every backend is called on a loopback :class:`FakeApi` that accepts only the method,
path, headers and body the real API takes (Kubernetes, Argo Workflows, Kubeflow
Pipelines, a signed webhook). The audit goes to a real chDB store where it matters
(restart, approvals across a restart).
"""

from __future__ import annotations

import json
import textwrap
import urllib.error
import urllib.request
from importlib.metadata import entry_points

import pytest
from test_alerts_k8s import TOKEN, FakeApi

from stethoscope.alerts.actions import (
    ENTRY_POINT_GROUP, ActionContext, ActionRunner, MemoryAudit, RemediationApi, StoreAudit, action_runner_from_config,
)
from stethoscope.alerts.guards import Limits
from stethoscope.alerts.k8s import KubeClient
from stethoscope.alerts.rules import load_rules
from stethoscope.alerts.state import Notification
from stethoscope.cli import main as cli_main
from stethoscope.config import load_config
from stethoscope.errors import ConfigError
from stethoscope.exporters.schema import ACTIONS_TABLE

ENV = {"ARGO_TOKEN": "argo-tok", "KFP_TOKEN": "kfp-tok", "HOOK_SECRET": "whs"}


def note(rule, fp="fp1", labels=None, starts_at=100.0, subject="", status="firing", reason="new"):
    return Notification(status, reason, fp, "", rule, "critical", labels or {}, {"summary": "s"}, subject, starts_at,
                        None if status == "firing" else starts_at + 60)


def rules_from(tmp_path, body):
    p = tmp_path / "rules.yaml"
    p.write_text("rules:\n" + textwrap.indent(textwrap.dedent(body).strip("\n"), "  ") + "\n")
    return load_rules([p])


def runner_for(api, rules, *, dry_run=False, audit=None, limits=None):
    ctx = ActionContext(kube_factory=lambda: KubeClient(api.url, token=TOKEN, timeout=5), environ=ENV, timeout_s=5)
    return ActionRunner(rules, ctx, dry_run=dry_run, audit=audit, limits=limits or Limits(max_per_hour=50, cooldown_s=600))


@pytest.fixture
def api():
    srv = FakeApi()
    yield srv
    srv.close()


def test_the_entry_points_load_and_the_table_matches():
    eps = {ep.name: ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert set(eps) == {"retrain", "scale", "cordon", "webhook"}
    for name, cls in eps.items():
        assert isinstance(cls, type) and cls.name == name
    from stethoscope.alerts.actions import COLUMNS

    assert ACTIONS_TABLE.column_names == COLUMNS


def test_scale_deployment_within_bounds_then_cooldown(api, tmp_path):
    api.scales[("deployments", "prod", "ranker")] = 3
    rules = rules_from(tmp_path, """
        - name: SlowRanker
          match: {kind: latency_sla}
          annotations: {summary: slow}
          actions: [{action: scale, target: "deployment/prod/{{ labels.service }}", replicas: "+2", min: 1, max: 4,
                     cooldown: 10m}]
    """)
    r = runner_for(api, rules)
    [d] = r.handle([note("SlowRanker", labels={"service": "ranker"})], now=1000)
    assert (d.decision, d.target, dict(d.result)) == ("executed", "deployment/prod/ranker", {"from": 3, "to": 4, "replicas": 4})
    assert [(q["method"], q["path"]) for q in api.requests] == [
        ("GET", "/apis/apps/v1/namespaces/prod/deployments/ranker/scale"),
        ("PATCH", "/apis/apps/v1/namespaces/prod/deployments/ranker/scale")]
    assert api.requests[1]["body"] == {"spec": {"replicas": 4}}  # +2 capped at max 4
    # Another alert on the same target inside the cooldown: skipped, nothing called.
    [d2] = r.handle([note("SlowRanker", fp="fp2", labels={"service": "ranker"})], now=1300)
    assert d2.decision == "skipped" and d2.reason.startswith("cooldown: scale on deployment/prod/ranker")
    assert len(api.requests) == 2
    # After the cooldown it runs again, finds the maximum and changes nothing.
    [d3] = r.handle([note("SlowRanker", fp="fp3", labels={"service": "ranker"})], now=1700)
    assert d3.decision == "skipped" and d3.reason.startswith("at the bound: 4 replicas")
    assert [q["method"] for q in api.requests] == ["GET", "PATCH", "GET"]
    # Resolved and repeat notifications never act.
    assert r.handle([note("SlowRanker", fp="fp4", status="resolved", reason="resolved"),
                     note("SlowRanker", fp="fp5", reason="repeat")], now=5000) == []


def test_cordon_from_a_label_and_hostile_labels(api, tmp_path):
    api.nodes["gpu-node-7"] = {"unschedulable": False}
    rules = rules_from(tmp_path, """
        - name: GpuXid
          match: {kind: gpu_xid}
          annotations: {summary: xid}
          actions: [pagerduty, {action: cordon, target: "{{ labels.node }}"}]
    """)
    r = runner_for(api, rules)
    [d] = r.handle([note("GpuXid", labels={"node": "gpu-node-7"})], now=10)
    assert d.decision == "executed" and api.nodes["gpu-node-7"]["unschedulable"] is True
    assert api.requests[0]["path"] == "/api/v1/nodes/gpu-node-7"
    [bad] = r.handle([note("GpuXid", fp="x", labels={"node": "../../apis/apps/v1/namespaces/kube-system"})], now=20)
    [missing] = r.handle([note("GpuXid", fp="y", labels={})], now=30)
    assert bad.decision == "skipped" and bad.reason.startswith("target: not a valid node name")
    assert missing.decision == "skipped" and missing.reason == "template: label 'node' is absent from the alert"
    assert len(api.requests) == 1


def test_retrain_argo_kubeflow_and_webhook_payloads(api, tmp_path):
    rules = rules_from(tmp_path, f"""
        - name: FeatureDrift
          match: {{kind: feature_drift}}
          annotations: {{summary: drift}}
          actions:
            - {{action: retrain, backend: argo, url: "{api.url}", namespace: ml, template: retrain-model,
                token_env: ARGO_TOKEN, parameters: {{model: "{{{{ subject.model }}}}", reason: "{{{{ rule }}}}"}}}}
            - {{action: retrain, backend: kubeflow, url: "{api.url}", pipeline_id: p-1, pipeline_version_id: v-9,
                experiment_id: e-3, token_env: KFP_TOKEN, parameters: {{model: "{{{{ subject.model }}}}", epochs: 3}}}}
            - {{action: retrain, backend: webhook, url: "{api.url}/hook/retrain", secret_env: HOOK_SECRET,
                parameters: {{model: "{{{{ subject.model }}}}"}}}}
            - {{action: webhook, url: "{api.url}/hook/plain", secret_env: HOOK_SECRET, payload: {{team: risk}}}}
    """)
    r = runner_for(api, rules)
    argo, kfp, hook, plain = r.handle([note("FeatureDrift", subject="model=fraud version=2 feature=amount")], now=50)
    assert [d.decision for d in (argo, kfp, hook, plain)] == ["executed"] * 4, [d.reason for d in (argo, kfp, hook, plain)]
    a, k, h, p = api.requests
    assert (a["method"], a["path"]) == ("POST", "/api/v1/workflows/ml/submit")
    assert a["headers"]["authorization"] == "Bearer argo-tok" and a["headers"]["content-type"] == "application/json"
    assert a["body"] == {"namespace": "ml", "resourceKind": "WorkflowTemplate", "resourceName": "retrain-model",
                         "submitOptions": {"parameters": ["model=fraud", "reason=FeatureDrift"],
                                           "generateName": "retrain-model-",
                                           "labels": f"stethoscope.io/action-id={argo.action_id}"}}
    assert argo.result["workflow"] == "retrain-model-x7k2p" and argo.target == "argo/ml/retrain-model"
    assert (k["method"], k["path"], k["headers"]["authorization"]) == ("POST", "/apis/v2beta1/runs", "Bearer kfp-tok")
    assert k["body"] == {"display_name": f"stethoscope FeatureDrift {kfp.action_id}", "experiment_id": "e-3",
                         "pipeline_version_reference": {"pipeline_id": "p-1", "pipeline_version_id": "v-9"},
                         "runtime_config": {"parameters": {"model": "fraud", "epochs": 3}}}
    assert kfp.result["run_id"] == "run-0001"
    # The webhooks were accepted by a receiver verifying the HMAC signature (see FakeApi.route).
    assert h["body"]["parameters"] == {"model": "fraud"} and h["body"]["action"] == "retrain"
    assert h["headers"]["idempotency-key"] == hook.idempotency_key and "authorization" not in h["headers"]
    assert p["body"]["payload"] == {"team": "risk"} and p["body"]["action_id"] == plain.action_id
    # Params in the audit hold the rendered values and no secret.
    assert argo.params["params"]["parameters"] == {"model": "fraud", "reason": "FeatureDrift"}
    assert "argo-tok" not in json.dumps(argo.row()) and "whs" not in json.dumps(hook.row())


def test_failures_are_audited_and_counted(api, tmp_path):
    api.scales[("deployments", "prod", "web")] = 2
    rules = rules_from(tmp_path, """
        - name: Hot
          match: {kind: latency_sla}
          annotations: {summary: s}
          actions: [{action: scale, target: deployment/prod/web, replicas: "+1", max: 5, cooldown: 1m},
                    {action: retrain, backend: argo, url: "http://127.0.0.1:9", namespace: ml, template: t,
                     token_env: MISSING_TOKEN}]
    """)
    r = runner_for(api, rules)
    api.fail_next = 1
    scale, argo = r.handle([note("Hot")], now=0)
    assert scale.decision == "failed" and "HTTP 500: injected failure" in scale.reason
    assert argo.decision == "failed" and "MISSING_TOKEN is empty or unset" in argo.reason
    [again] = r.handle([note("Hot", fp="fp9")], now=30)[:1]  # a failed attempt starts the cooldown too
    assert again.decision == "skipped" and again.reason.startswith("cooldown")


def test_dry_run_never_calls_out_and_records_the_plan(api, tmp_path):
    api.scales[("deployments", "prod", "web")] = 2
    api.nodes["n1"] = {"unschedulable": False}
    rules = rules_from(tmp_path, f"""
        - name: Everything
          match: {{kind: x}}
          annotations: {{summary: s}}
          actions:
            - {{action: scale, target: deployment/prod/web, replicas: "+1", max: 5}}
            - {{action: cordon, target: "{{{{ labels.node }}}}"}}
            - {{action: retrain, backend: argo, url: "{api.url}", namespace: ml, template: t}}
            - {{action: webhook, url: "{api.url}/hook", secret_env: HOOK_SECRET}}
            - {{action: scale, via: keda, target: web, replicas: "+1", max: 3}}
    """)
    r = runner_for(api, rules, dry_run=True)
    out = r.handle([note("Everything", labels={"node": "n1"})], now=0)
    assert [d.decision for d in out] == ["dry_run"] * 5 and all(d.dry_run for d in out)
    assert api.requests == [] and r.ctx.keda.items() == {}
    assert out[0].result["request"]["path"] == "/apis/apps/v1/namespaces/prod/deployments/web/scale"
    assert out[1].result["request"]["body"] == {"spec": {"unschedulable": True}}
    assert out[2].result["request"]["url"] == f"{api.url}/api/v1/workflows/ml/submit"
    assert out[4].result["would_publish"] == 2
    # A rule can force a dry run even when remediation is live, never the other way round.
    live = runner_for(api, rules_from(tmp_path, """
        - name: Careful
          match: {kind: x}
          annotations: {summary: s}
          actions: [{action: cordon, target: n1, dry_run: true}]
    """))
    assert [d.decision for d in live.handle([note("Careful")], now=0)] == ["dry_run"] and api.requests == []


def test_keda_value_is_served_with_a_token(tmp_path):
    rules = rules_from(tmp_path, """
        - name: Queue
          match: {kind: queue_time}
          annotations: {summary: s}
          actions: [{action: scale, via: keda, target: "serving/{{ labels.model }}", replicas: "+2", min: 1, max: 4,
                     cooldown: 0}]
    """)
    r = ActionRunner(rules, ActionContext(), dry_run=False)
    srv = RemediationApi(r, "127.0.0.1", 0, token="keda-secret")
    srv.start()
    try:
        assert [d.result["to"] for d in r.handle([note("Queue", labels={"model": "fraud"})], now=0)] == [3]
        assert [d.result["to"] for d in r.handle([note("Queue", fp="f2", labels={"model": "fraud"})], now=1)] == [4]
        [top] = r.handle([note("Queue", fp="f3", labels={"model": "fraud"})], now=2)
        assert top.decision == "skipped" and top.reason.startswith("at the bound: 4")
        url = f"http://127.0.0.1:{srv.port}/v1/keda/serving/fraud"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url, timeout=5)
        assert e.value.code == 401
        e.value.close()
        req = urllib.request.Request(url, headers={"Authorization": "Bearer keda-secret"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert json.loads(resp.read()) == {"target": "serving/fraud", "desiredReplicas": 4}
    finally:
        srv.close()
    with pytest.raises(ConfigError, match="needs a token"):
        RemediationApi(r, "0.0.0.0", 0)


def _runner_with_store(store, api, rules, **kw):
    return runner_for(api, rules, audit=StoreAudit(store), **kw)


def test_restart_keeps_idempotency_cooldowns_keda_and_pending_approvals(store, api, tmp_path):
    api.nodes["n1"] = {"unschedulable": False}
    api.scales[("deployments", "prod", "web")] = 1
    rules = rules_from(tmp_path, """
        - name: Bad
          match: {kind: x}
          annotations: {summary: s}
          actions:
            - {action: cordon, target: "{{ labels.node }}"}
            - {action: scale, target: deployment/prod/web, replicas: "+1", max: 5, approval: true}
            - {action: scale, via: keda, target: web, replicas: "+1", max: 5}
    """)
    first = _runner_with_store(store, api, rules)
    cordon, pending, keda = first.handle([note("Bad", labels={"node": "n1"})], now=1000)
    assert (cordon.decision, pending.decision, keda.decision) == ("executed", "pending_approval", "executed")
    assert len(api.requests) == 1 and first.ctx.keda.get("web") == 2

    second = _runner_with_store(store, api, rules)  # a restart: state only from the actions table
    again = second.handle([note("Bad", labels={"node": "n1"})], now=1010)  # the same firing instance re-sent
    assert [d.decision for d in again] == ["skipped"] * 3
    assert again[0].reason == f"duplicate: idempotency key {cordon.idempotency_key} already used by action " \
                              f"{cordon.action_id} (executed)"
    assert second.ctx.keda.get("web") == 2 and len(api.requests) == 1
    assert [p.action_id for p in second.pending()] == [pending.action_id]
    # A new firing instance of another node: cordon runs; scale still waits on the first approval.
    api.nodes["n2"] = {"unschedulable": False}
    out = second.handle([note("Bad", fp="fp2", labels={"node": "n2"}, starts_at=1005)], now=1020)
    assert [d.decision for d in out] == ["executed", "skipped", "skipped"]
    assert out[1].reason.startswith(f"pending: scale on deployment/prod/web already waits for approval as action {pending.action_id}")
    assert out[2].reason.startswith("cooldown")

    third = _runner_with_store(store, api, rules)
    approved, executed = third.approve(pending.action_id, by="alice", now=1030)
    assert (approved.decision, approved.reason, executed.decision) == ("approved", "approved by alice", "executed")
    assert api.scales[("deployments", "prod", "web")] == 2
    rows = store.query("SELECT Decision, count() FROM actions GROUP BY Decision ORDER BY Decision", "TabSeparated").data
    assert rows.decode().split("\n")[:-1] == ["approved\t1", "executed\t4", "pending_approval\t1", "skipped\t5"]
    with pytest.raises(Exception, match="no action .* is waiting for approval"):
        _runner_with_store(store, api, rules).approve(pending.action_id, now=1040)


def test_approval_through_the_cli_and_expiry(api, tmp_path, capsys):
    api.nodes["n1"] = {"unschedulable": False}
    api.nodes["n2"] = {"unschedulable": False}
    rules = rules_from(tmp_path, """
        - name: Bad
          match: {kind: x}
          annotations: {summary: s}
          actions: [{action: cordon, target: "{{ labels.node }}", approval: true}]
    """)
    r = runner_for(api, rules, limits=Limits(approval_timeout_s=600))
    r.clock = lambda: 5.0  # the API decides "now"; keep it inside the approval window
    srv = RemediationApi(r, "127.0.0.1", 0)
    srv.start()
    url = f"http://127.0.0.1:{srv.port}"
    try:
        [p1] = r.handle([note("Bad", labels={"node": "n1"})], now=0)
        [p2] = r.handle([note("Bad", fp="f2", labels={"node": "n2"})], now=1)
        assert cli_main(["alerts", "pending", "--url", url]) == 0
        listed = capsys.readouterr().out
        assert p1.action_id in listed and p2.action_id in listed
        assert cli_main(["alerts", "approve", p1.action_id, "--url", url, "--by", "bob"]) == 0
        assert "executed" in capsys.readouterr().out and api.nodes["n1"]["unschedulable"] is True
        assert cli_main(["alerts", "reject", p2.action_id, "--url", url, "--reason", "false alarm"]) == 0
        assert "rejected" in capsys.readouterr().out and api.nodes["n2"]["unschedulable"] is False
        assert cli_main(["alerts", "approve", p2.action_id, "--url", url]) == 1  # already decided
        assert "is waiting for approval" in capsys.readouterr().err
    finally:
        srv.close()
    [p3] = r.handle([note("Bad", fp="f3", labels={"node": "n2"}, starts_at=5)], now=10)
    expired = r.handle([], now=700)
    assert [(d.action_id, d.decision, d.reason) for d in expired] == [(p3.action_id, "rejected", "approval expired after 600s")]
    assert len(api.requests) == 1
    audit = [(d.action_id, d.decision) for d in r.audit.rows]
    assert (p2.action_id, "rejected") in audit and (p1.action_id, "approved") in audit


def test_action_runner_from_config(api, store, tmp_path):
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "r.yaml").write_text(textwrap.dedent("""
        rules:
          - name: NodeBad
            match: {kind: node_unhealthy_test}
            annotations: {summary: s}
            actions: [{action: cordon, target: "{{ labels.node }}"}]
    """))
    token = tmp_path / "token"
    token.write_text(TOKEN)
    api.nodes["n1"] = {"unschedulable": False}
    cfg = load_config(environ={}, overrides={"alerts.rules": [str(rules_dir)], "remediation.kube_api_url": api.url,
                                             "remediation.kube_token_file": str(token), "remediation.max_per_hour": 3})
    r = action_runner_from_config(cfg, store, environ={})
    assert r.dry_run is True and r.limits.max_per_hour == 3 and r.api is None
    assert [d.decision for d in r.handle([note("NodeBad", labels={"node": "n1"})], now=0)] == ["dry_run"]
    assert api.requests == []
    live = action_runner_from_config(load_config(environ={}, overrides={
        "alerts.rules": [str(rules_dir)], "remediation.kube_api_url": api.url, "remediation.kube_token_file": str(token),
        "remediation.dry_run": False}), store, environ={})
    assert [d.decision for d in live.handle([note("NodeBad", fp="z", labels={"node": "n1"})], now=10)] == ["executed"]
    assert api.nodes["n1"]["unschedulable"] is True


def test_memory_audit_round_trips_through_rows():
    from stethoscope.alerts.guards import Decision

    d = Decision(1.5, "a", "scale", "t", "R", "fp", "executed", "done", False, {"x": [1]}, {"to": 2}, "k")
    assert Decision.from_row(d.row()) == d
    m = MemoryAudit()
    m.write([d])
    assert m.read(1.0) == [d] and m.read(2.0) == []


def test_the_docs_examples_are_valid(tmp_path):
    import re
    from pathlib import Path

    import yaml

    from stethoscope.alerts.rules import check

    doc = (Path(__file__).resolve().parents[1] / "docs" / "remediation.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    rules = tmp_path / "doc.yaml"
    rules.write_text(next(b for b in blocks if b.startswith("rules:")))
    assert check([rules], notifiers=["pagerduty"]) == []
    rbac = list(yaml.safe_load_all(next(b for b in blocks if "kind: Role" in b)))
    grants = {(r["kind"], res, verb) for r in rbac if "rules" in r for rule in r["rules"]
              for res in rule["resources"] for verb in rule["verbs"]}
    assert grants == {("Role", "deployments/scale", "get"), ("Role", "deployments/scale", "patch"),
                      ("Role", "statefulsets/scale", "get"), ("Role", "statefulsets/scale", "patch"),
                      ("ClusterRole", "nodes", "patch")}
    import tomllib

    toml = next(b for b in re.findall(r"```toml\n(.*?)```", doc, re.S) if "[remediation]" in b)
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(toml)
    cfg = load_config(cfg_file, environ={})
    assert cfg.remediation.dry_run is False and tomllib.loads(toml)["remediation"]["api_port"] == cfg.remediation.api_port


def test_an_audit_that_cannot_be_written_is_retried_and_an_unreadable_one_blocks_actions(api, tmp_path):
    from stethoscope.errors import StoreUnavailable

    class Flaky(MemoryAudit):
        down = True

        def write(self, decisions):
            if self.down:
                raise StoreUnavailable("store is down")
            super().write(decisions)

        def read(self, since):
            if self.down:
                raise StoreUnavailable("store is down")
            return super().read(since)

    rules = rules_from(tmp_path, """
        - name: Bad
          match: {kind: x}
          annotations: {summary: s}
          actions: [{action: cordon, target: "{{ labels.node }}"}]
    """)
    audit = Flaky()
    r = runner_for(api, rules, audit=audit, dry_run=True)
    assert r.handle([note("Bad", labels={"node": "n1"})], now=0) == []  # no history: no action at all
    audit.down = False
    assert [d.decision for d in r.handle([note("Bad", labels={"node": "n1"})], now=1)] == ["dry_run"]
    audit.down = True
    assert [d.decision for d in r.handle([note("Bad", fp="f2", labels={"node": "n2"})], now=2)] == ["dry_run"]
    assert len(audit.rows) == 1 and len(r._unsaved) == 1  # kept in memory, the guards already know it
    audit.down = False
    assert r.flush() and [d.target for d in audit.rows] == ["n1", "n2"]


def test_a_broken_plugin_is_audited_and_the_others_still_run(api, tmp_path, caplog):
    from stethoscope.alerts.actions import CordonAction

    class Broken(CordonAction):
        def check_target(self, target, params):
            raise RuntimeError("plugin bug")

    api.nodes["n1"] = {"unschedulable": False}
    rules = rules_from(tmp_path, """
        - name: Bad
          match: {kind: x}
          annotations: {summary: s}
          actions: [{action: cordon, target: n1}, {action: webhook, url: "http://127.0.0.1:9/", secret_env: NOPE}]
    """)
    r = runner_for(api, rules)
    r.actions["cordon"] = Broken(r.ctx)
    with caplog.at_level("ERROR"):
        broken, hook = r.handle([note("Bad")], now=0)
    assert (broken.decision, broken.reason) == ("failed", "RuntimeError: plugin bug")
    assert hook.decision == "failed" and "NOPE is empty or unset" in hook.reason
    assert "failed before it ran" in caplog.text
