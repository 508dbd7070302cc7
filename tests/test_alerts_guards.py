"""Remediation guards: unit tests, and property tests under random bursts and clocks (issue 10 item 5).

The properties run the real :class:`ActionRunner` against the loopback :class:`FakeApi`
(which counts every request) and check the audit afterwards: never above the hourly
maximum (global and per action), never outside the replica bounds or the step limit,
cooldowns respected, dry-run never calls out, and idempotency holding across a
restart rebuilt from the ``actions`` table of a real chDB store.
"""

from __future__ import annotations

import doctest

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_alerts_k8s import TOKEN, FakeApi

from stethoscope.alerts import guards
from stethoscope.alerts.actions import ActionContext, ActionRunner, StoreAudit
from stethoscope.alerts.guards import HOUR_S, TAKEN, Decision, Ledger, Limits, Request, bound_replicas, parse_change
from stethoscope.alerts.k8s import KubeClient
from stethoscope.alerts.rules import ActionSpec, Match, Rule
from stethoscope.alerts.state import Notification


def test_doctests():
    assert doctest.testmod(guards).failed == 0


def d(t, aid, decision, *, action="scale", target="T", key="", dry=False):
    return Decision(t, aid, action, target, "R", "fp", decision, "", dry, {}, {}, key)


def req(key="k", target="T", action="scale", **kw):
    return Request(action, target, "R", "fp", key, **{"dry_run": False, **kw})


def test_hourly_maximum_global_and_per_action():
    led = Ledger()
    for i in range(3):
        led.apply(d(i * 10.0, f"a{i}", "executed", target=f"t{i}", key=f"k{i}"))
    limits = Limits(max_per_hour=3, cooldown_s=0)
    assert led.check(req("new", "t9", action="cordon"), 100, limits).startswith("max_per_hour: 3 actions in the last hour (global")
    assert led.check(req("new", "t9", max_per_hour=2), 100, Limits(max_per_hour=9, cooldown_s=0)) \
        == "max_per_hour: 3 scale actions in the last hour (limit 2)"
    assert led.check(req("new", "t9", action="cordon"), 3600.0 + 0.1, limits) is None  # the first one left the window
    # Dry runs count in their own mode only.
    assert led.check(req("new", "t9", dry_run=True), 100, limits) is None


def test_cooldown_per_target_and_a_clock_that_goes_back():
    led = Ledger()
    led.apply(d(1000, "a", "failed", key="k1"))  # a failed attempt counts: it may have half-applied
    limits = Limits(cooldown_s=300)
    assert led.check(req("k2"), 1200, limits).startswith("cooldown")
    assert led.check(req("k2", target="other"), 1200, limits) is None
    assert led.check(req("k2"), 1300, limits) is None
    assert led.check(req("k2", cooldown_s=900), 1300, limits).startswith("cooldown")
    assert led.check(req("k2"), 500, limits).startswith("cooldown")  # clock went back: stricter, not looser
    led.apply(d(1100, "b", "skipped", key="k3"))  # a skip neither counts nor spends its key
    assert led.check(req("k3"), 1400, limits) is None


def test_idempotency_and_pending_and_rebuild_order():
    rows = [d(5, "a", "approved", key="k"), d(1, "a", "pending_approval", key="k"), d(5, "a", "executed", key="k")]
    # The same rows in any order rebuild the same state (ties ordered pending < approved < outcome by the runner).
    led = Ledger.rebuild(sorted(rows, key=lambda r: (r.time, {"pending_approval": 0, "approved": 1}.get(r.decision, 2))))
    assert led.pending == {} and led.approved == set() and led.keys["k"] == ("a", "pending_approval")
    assert led.check(req("k"), 10, Limits(cooldown_s=0)).startswith("duplicate")
    led.apply(d(20, "b", "pending_approval", target="U", key="k2"))
    assert led.check(req("k3", "U"), 21, Limits()).startswith("pending: scale on U already waits for approval as action b")
    assert led.check(req("k2", "U"), 21, Limits(), own_id="b") is None  # its own approval re-check
    assert [p.action_id for p in led.expired(20 + 3600, Limits())] == ["b"]


@pytest.mark.parametrize("text", ["+", "1.5", "++1", "x", True, "-"])
def test_bad_changes(text):
    with pytest.raises(ValueError, match="replicas"):
        parse_change(text)


@given(current=st.integers(0, 60), op=st.sampled_from(["+", "-", ""]), n=st.integers(0, 40),
       lo=st.integers(0, 30), span=st.integers(0, 30), step=st.one_of(st.none(), st.integers(1, 10)))
def test_bound_replicas_properties(current, op, n, lo, span, step):
    hi = lo + span
    got, why = bound_replicas(current, f"{op}{n}", lo=lo, hi=hi, max_step=step)
    if got is None:
        assert why
        return
    assert lo <= got <= hi and got != current
    assert step is None or abs(got - current) <= step
    assert op != "+" or got > current
    assert op != "-" or got < current


# --- property tests of the whole runner ---------------------------------------------------------

SERVICES = ["api", "ranker", "batch"]
NODES = ["n1", "n2", "n3"]

event = st.tuples(
    st.one_of(st.floats(0, 900), st.floats(-400, 0)),  # clock step: mostly forward, sometimes back
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 5), st.sampled_from(SERVICES), st.sampled_from(NODES),
                       st.sampled_from(["new", "new", "repeat"])), min_size=0, max_size=6),
)
guard_settings = st.fixed_dictionaries({
    "global": st.integers(1, 8), "scale_mph": st.one_of(st.none(), st.integers(1, 4)),
    "cooldown": st.sampled_from([0.0, 60.0, 600.0, 1800.0]), "lo": st.integers(0, 3), "span": st.integers(0, 5),
    "step": st.one_of(st.none(), st.integers(1, 3)), "change": st.sampled_from(["+1", "+3", "-2", "4", "0"]),
    "initial": st.integers(0, 12),
})


def _rules(g):
    scale = ActionSpec("scale", "deployment/prod/{{ labels.svc }}",
                       {"replicas": g["change"], "min": g["lo"], "max": g["lo"] + g["span"],
                        **({"max_step": g["step"]} if g["step"] else {})},
                       cooldown_s=g["cooldown"], max_per_hour=g["scale_mph"])
    cordon = ActionSpec("cordon", "{{ labels.node }}", {}, cooldown_s=g["cooldown"])
    keda = ActionSpec("scale", "keda/{{ labels.svc }}", {"replicas": g["change"], "min": g["lo"], "max": g["lo"] + g["span"],
                                                         "via": "keda"}, cooldown_s=g["cooldown"])
    mk = lambda name, *a: Rule(name, "critical", match=Match(("x",)), annotations={"summary": "s"}, remediations=a)  # noqa: E731
    return [mk("R0", scale), mk("R1", cordon, scale), mk("R2", keda)]


def _burst(runner, events, t0=10_000.0):
    now, out = t0, []
    for step, notes in events:
        now += step
        batch = [Notification("firing", reason, f"fp{fp}", "", f"R{rule}", "critical", {"svc": svc, "node": node}, {}, "",
                              now - 30 * fp if reason == "new" else 0.0, None)
                 for rule, fp, svc, node, reason in notes]
        out += runner.handle(batch, now=now)
    return out


def _runner(api, g, *, dry_run, audit=None):
    ctx = ActionContext(kube_factory=lambda: KubeClient(api.url, token=TOKEN, timeout=5), timeout_s=5)
    return ActionRunner(_rules(g), ctx, dry_run=dry_run, audit=audit,
                        limits=Limits(max_per_hour=g["global"], cooldown_s=g["cooldown"]))


def _check_guards(decisions, g):
    taken: list[Decision] = []
    seen_keys: dict[str, str] = {}
    for x in decisions:
        if x.decision in ("executed", "failed", "dry_run", "pending_approval"):
            assert seen_keys.setdefault(x.idempotency_key, x.action_id) == x.action_id, "an alert instance acted twice"
        if x.decision not in TAKEN:
            continue
        now = x.time
        window = [y for y in taken if y.time > now - HOUR_S]
        assert len(window) < g["global"], "global hourly maximum exceeded"
        if g["scale_mph"] is not None and x.action == "scale" and not x.result.get("keda"):  # its spec has the limit
            assert sum(y.action == "scale" for y in window) < g["scale_mph"], "per-action hourly maximum exceeded"
        for y in taken:
            if (y.action, y.target) == (x.action, x.target):
                assert now - y.time >= g["cooldown"], "cooldown not respected"
        taken.append(x)
    return taken


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=guard_settings, events=st.lists(event, min_size=1, max_size=12))
def test_live_bursts_keep_every_guard(g, events):
    api = FakeApi()
    try:
        for s in SERVICES:
            api.scales[("deployments", "prod", s)] = g["initial"]
        for n in NODES:
            api.nodes[n] = {"unschedulable": False}
        runner = _runner(api, g, dry_run=False)
        decisions = _burst(runner, events)
        taken = _check_guards(decisions, g)
        lo, hi = g["lo"], g["lo"] + g["span"]
        last = {s: g["initial"] for s in SERVICES}
        for q in api.requests:
            if q["method"] == "PATCH" and "/scale" in q["path"]:
                svc, value = q["path"].split("/")[-2], q["body"]["spec"]["replicas"]
                assert lo <= value <= hi, f"scaled to {value} outside [{lo}, {hi}]"
                assert g["step"] is None or abs(value - last[svc]) <= g["step"]
                last[svc] = value
        assert all(lo <= v <= hi for v in runner.ctx.keda.items().values())
        # Exactly the executed Kubernetes actions reached the API as patches.
        patches = [q for q in api.requests if q["method"] == "PATCH"]
        assert len(patches) == sum(1 for x in taken if x.decision == "executed" and not x.result.get("keda"))
    finally:
        api.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=guard_settings, events=st.lists(event, min_size=1, max_size=12))
def test_dry_run_never_calls_out(g, events):
    api = FakeApi()
    try:
        runner = _runner(api, g, dry_run=True)
        decisions = _burst(runner, events)
        assert api.requests == [], "a dry run called an API"
        assert runner.ctx.keda.items() == {}
        assert all(x.dry_run and x.decision in ("dry_run", "skipped") for x in decisions)
        _check_guards(decisions, g)  # the dry run follows the same guards as going live would
    finally:
        api.close()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(g=guard_settings, events=st.lists(event, min_size=1, max_size=6), cut=st.integers(0, 6))
def test_idempotency_and_limits_survive_a_restart(store, g, events, cut):
    store.execute("TRUNCATE TABLE stethoscope.actions")
    api = FakeApi()
    try:
        for s in SERVICES:
            api.scales[("deployments", "prod", s)] = g["initial"]
        for n in NODES:
            api.nodes[n] = {"unschedulable": False}
        first = _runner(api, g, dry_run=False, audit=StoreAudit(store))
        before = _burst(first, events[:cut])
        end = 10_000.0 + sum(step for step, _ in events[:cut])
        # Restart: a new runner knows only the actions table ...
        second = _runner(api, g, dry_run=False, audit=StoreAudit(store))
        second.load(now=end)
        assert second.ctx.keda.items() == first.ctx.keda.items()
        assert set(second.ledger.keys) == set(first.ledger.keys)
        # ... and is handed the same notifications again (a crash before the alert state was saved).
        calls = len(api.requests)
        replay = _burst(second, events[:cut])
        spent = {y.idempotency_key for y in before if y.decision != "skipped"}
        assert all(x.decision == "skipped" for x in replay if x.idempotency_key in spent)
        assert len([q for q in api.requests[calls:] if q["method"] == "PATCH"]) == \
            sum(1 for x in replay if x.decision == "executed" and not x.result.get("keda"))
        after = _burst(second, events[cut:], t0=end)
        _check_guards(before + replay + after, g)
    finally:
        api.close()
