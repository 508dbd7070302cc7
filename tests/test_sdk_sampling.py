"""Sampling math: consistency, unbiased estimates, the Jaeger update, budget allocation, uncertainty, overrides."""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter

from conftest import free_port, make_service
from stethoscope.agents.sdk import (
    AdaptiveSampler,
    InMemoryExporter,
    ModelMonitor,
    SamplingConfig,
    SamplingConfigPoller,
    StreamDemand,
    UncertaintyConfig,
    allocate,
)
from stethoscope.agents.sdk.consistent import (
    SPACE,
    adjusted_count,
    randomness,
    randomness_many,
    sampling_kernel,
    threshold_for,
    threshold_hex,
    thresholds,
)
from stethoscope.agents.sdk.remote import RemoteSampling, StreamOverride, parse_sampling_document
from stethoscope.agents.sdk.uncertainty import uncertainty_many
from stethoscope.errors import ConfigError
from test_auth import TOKENS, write_tokens
from test_tls import pki  # noqa: F401  (the module-scoped CA and certificates fixture)

N_EVENTS = 1_000_000
P = 0.01


# -- consistent sampling --------------------------------------------------------------------------


def test_scalar_and_vector_rules_agree_with_the_kernel():
    kernel = sampling_kernel()
    ps = np.concatenate([np.random.default_rng(3).random(20_000), [1.0, 0.5, 0.01, 1e-6, 2.0**-56]])
    vec = thresholds(ps)
    for i, p in enumerate(ps.tolist()):
        assert int(vec[i]) == threshold_for(p) == kernel.threshold_for(p)
    assert threshold_hex(threshold_for(0.01)) == kernel.threshold_hex(kernel.threshold_for(0.01))
    ids = [f"user-{i}" for i in range(2000)] + ["4bf92f3577b34da6a3ce929d0e0e4736", "", "Ünïcode"]
    assert [randomness(i) for i in ids] == kernel.randomness_from_ids(ids).tolist() == randomness_many(ids).tolist()


def test_same_request_same_decision_and_nested_keep_sets():
    ids = [f"order-{i}" for i in range(50_000)]
    r = randomness_many(ids)
    low, high = r >= threshold_for(0.05), r >= threshold_for(0.2)
    assert np.array_equal(low, randomness_many(ids) >= threshold_for(0.05))  # every hop agrees
    assert not np.any(low & ~high)  # a higher probability keeps a superset
    assert threshold_hex(threshold_for(1.0)) == "0" and adjusted_count(threshold_for(1.0)) == 1.0


def _estimates(kept: np.ndarray, adj: np.ndarray, x: np.ndarray, lo: float, hi: float) -> tuple[float, float, float]:
    w = adj[kept]
    xs = x[kept]
    count = float(w.sum())
    mean = float((w * xs).sum() / w.sum())
    share = float((w * ((xs > lo) & (xs <= hi))).sum() / w.sum())
    return count, mean, share


def test_estimates_within_two_percent_at_one_percent_sampling_over_a_million_events():
    """Count, mean and a histogram bucket share from a 1 % consistent sample of 10**6 events.

    The ids are distinct strings hashed by the kernel (well mixed); the feature
    comes from a fixed-seed generator independent of the ids. With fixed inputs
    the outcome is deterministic; the z-scores below say how far from the truth
    each estimate is in standard errors, so a reader can see the 2 % band is
    not luck at the edge (sd of the count is about 1 % here, of the mean about
    0.7 %, of the share about 0.7 %). The unbiasedness itself is tested, with a
    bound that fails with probability < 1e-4, in the next test.
    """
    rng = np.random.default_rng(20260520)
    x = rng.normal(3.0, 2.0, N_EVENTS)
    ids = [f"req-{i}" for i in range(N_EVENTS)]
    t = threshold_for(P)
    kept = randomness_many(ids) >= t
    adj = np.full(N_EVENTS, adjusted_count(t))
    # the bucket is mean +- 1 sd (share ~0.68): its relative sd at ~10**4 kept rows is ~0.7 %,
    # so the 2 % band is ~3 sd; a narrow bucket (share 0.38, sd ~1.3 %) would sit at ~1.5 sd
    count, mean, share = _estimates(kept, adj, x, 1.0, 5.0)
    true_share = float(((x > 1.0) & (x <= 5.0)).mean())
    k = int(kept.sum())
    z_count = (k - N_EVENTS * P) / math.sqrt(N_EVENTS * P * (1 - P))
    z_mean = (mean - x.mean()) / (x.std() / math.sqrt(k))
    z_share = (share - true_share) / math.sqrt(true_share * (1 - true_share) / k)
    report = (f"kept={k} count={count:.0f} mean={mean:.5f} (true {x.mean():.5f}) share={share:.5f} "
              f"(true {true_share:.5f}) z_count={z_count:+.2f} z_mean={z_mean:+.3f} z_share={z_share:+.2f}")
    print(report)
    assert abs(count / N_EVENTS - 1) < 0.02, report
    assert abs(mean / x.mean() - 1) < 0.02, report
    assert abs(share / true_share - 1) < 0.02, report
    assert max(abs(z_count), abs(z_mean), abs(z_share)) < 4, report


def test_count_estimator_is_unbiased_over_independent_replications():
    """200 independent 1 % samples of 10**5 events: the mean relative error is 0 within 4 standard errors."""
    rng = np.random.default_rng(11)
    t = threshold_for(P)
    adj = adjusted_count(t)
    errs = []
    for _ in range(200):
        r = rng.integers(0, SPACE, size=100_000, dtype=np.uint64)
        errs.append((np.count_nonzero(r >= t) * adj) / 100_000 - 1)
    errs = np.asarray(errs)
    sd_theory = math.sqrt((1 - P) / (100_000 * P))
    z = errs.mean() / (sd_theory / math.sqrt(len(errs)))
    assert abs(z) < 4, z
    assert 0.7 < errs.std() / sd_theory < 1.4  # the spread is the binomial one: adjusted counts are honest


def test_hashed_sequential_ids_are_uniform():
    r = np.sort(randomness_many([f"req-{i}" for i in range(200_000)]).astype(np.float64) / SPACE)
    ecdf = np.arange(1, r.size + 1) / r.size
    d = float(np.max(np.abs(ecdf - r)))
    assert d * math.sqrt(r.size) < 2.2  # Kolmogorov: P(false alarm) ~ 1e-4


def test_monitor_rows_carry_honest_adjusted_counts():
    logs = InMemoryLogRecordExporter()
    n = 200_000
    mon = ModelMonitor("est", feature_names=1, start=False, metric_exporter=InMemoryExporter(), log_exporter=logs,
                       sampling=SamplingConfig(fixed_probability=P, remote=False), max_pending_rows=50_000)
    x = np.random.default_rng(5).normal(10.0, 1.0, n)
    ids = [f"id-{i}" for i in range(n)]
    for start in range(0, n, 10_000):
        mon.record_batch(x[start:start + 10_000, None], x[start:start + 10_000],
                         request_ids=ids[start:start + 10_000])
    assert mon.flush(timeout_s=10)
    rows = [r.log_record for r in logs.get_finished_logs()]
    mon.close()
    assert rows and all(r.event_name == "stethoscope.sample" for r in rows)
    adj = [r.attributes["stethoscope.adjusted_count"] for r in rows]
    assert set(adj) == {adjusted_count(threshold_for(P))}
    assert {r.attributes["stethoscope.sampling.threshold"] for r in rows} == {threshold_hex(threshold_for(P))}
    expected_ids = {ids[i] for i in np.flatnonzero(randomness_many(ids) >= threshold_for(P))}
    assert {r.attributes["stethoscope.request_id"] for r in rows} == expected_ids
    z = (len(rows) - n * P) / math.sqrt(n * P * (1 - P))
    assert abs(z) < 5


# -- uncertainty -------------------------------------------------------------------------------------


def test_uncertainty_oversampling_keeps_estimates_unbiased():
    rng = np.random.default_rng(9)
    n = 400_000
    conf = rng.random(n)
    unc = UncertaintyConfig(boost=10.0, min_uncertainty=0.2)
    _, u = uncertainty_many(conf)
    p_eff = np.minimum(1.0, P * unc.weights(u))
    t = thresholds(p_eff)
    r = rng.integers(0, SPACE, size=n, dtype=np.uint64)
    kept = r >= t
    adj = np.array([adjusted_count(int(v)) for v in t[kept]])
    est = adj.sum()
    var = float(((1 - p_eff) / p_eff).sum())  # Horvitz-Thompson variance of the count
    z = (est - n) / math.sqrt(var)
    assert abs(z) < 4, z
    # low confidence is over-represented among the kept rows, yet the weighted mean confidence is right
    assert conf[kept].mean() < conf.mean() - 0.1
    weighted = float((adj * conf[kept]).sum() / adj.sum())
    assert weighted == pytest.approx(conf.mean(), abs=0.02)


def test_uncertain_rows_are_flagged_queued_and_weighted():
    logs = InMemoryLogRecordExporter()
    mon = ModelMonitor("unc", feature_names=2, start=False, metric_exporter=InMemoryExporter(), log_exporter=logs,
                       sampling=SamplingConfig(fixed_probability=0.05, remote=False,
                                               uncertainty=UncertaintyConfig(boost=20.0, min_uncertainty=0.5,
                                                                             queue_size=10_000)))
    n = 20_000
    conf = np.where(np.arange(n) % 2 == 0, 0.95, 0.1)
    mon.record_batch(np.ones((n, 2)), np.zeros(n), confidences=conf, request_ids=[f"r{i}" for i in range(n)])
    for i in range(200):
        mon.record([1.0, 1.0], "yes", confidence=[0.5, 0.5], request_id=f"s{i}")  # entropy 1: u = 1
    mon.flush(timeout_s=10)
    rows = [r.log_record.attributes for r in logs.get_finished_logs()]
    mon.close()
    flagged = [a for a in rows if a.get("stethoscope.uncertainty")]
    plain = [a for a in rows if not a.get("stethoscope.uncertainty")]
    assert flagged and plain
    assert all(a["stethoscope.confidence"] < 0.6 for a in flagged)
    # u = 0.9 -> p_eff = 0.05 * (1 + 19 * 0.9) = 0.905
    assert {round(a["stethoscope.adjusted_count"], 3) for a in flagged if a["stethoscope.confidence"] == 0.1} == {
        round(adjusted_count(threshold_for(0.05 * (1 + 19 * 0.9))), 3)}
    assert {a["stethoscope.adjusted_count"] for a in flagged if a["stethoscope.confidence"] == 0.5} == {1.0}
    assert {a["stethoscope.adjusted_count"] for a in plain} == {adjusted_count(threshold_for(0.05))}
    queue = mon.labeling_queue.drain()
    assert len(queue) == len(flagged)
    assert all(c.uncertainty >= 0.5 for c in queue)
    assert mon.labeling_queue.drain() == []


def test_labeling_queue_is_bounded():
    mon = ModelMonitor("q", feature_names=1, start=False, metric_exporter=InMemoryExporter(),
                       log_exporter=InMemoryLogRecordExporter(),
                       sampling=SamplingConfig(fixed_probability=1.0, remote=False,
                                               uncertainty=UncertaintyConfig(queue_size=5)))
    for i in range(20):
        mon.record([1.0], 1.0, confidence=0.1)
    assert len(mon.labeling_queue) == 5 and mon.labeling_queue.evicted == 15
    mon.close()


# -- the Jaeger update -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _sampler(**kw):
    clock = FakeClock()
    s = AdaptiveSampler(SamplingConfig(**{"remote": False, **kw}), "m", clock=clock, wall=lambda: 1e9)
    return s, clock


def _window(s, clock, stream, events, seconds=10.0):
    st = s.stream(stream)
    s.account(st, events=events, expected=events * st.p)
    clock.now += seconds
    return s.adjust()[stream]


def test_decreases_apply_at_once_and_increases_are_capped():
    s, clock = _sampler(target_rows_per_s=5, global_budget_rows_per_s=1000, initial_probability=0.5)
    assert _window(s, clock, "default", 100_000) == pytest.approx(5 / 10_000)  # 10k/s -> p = 5e-4 at once
    p = 5 / 10_000
    for _ in range(5):  # traffic drops to 10/s: p wants 0.5 but climbs by at most 50 % a round
        new = _window(s, clock, "default", 100)
        assert new == pytest.approx(min(p * 1.5, 0.5))
        p = new
    assert s.stream("default").p <= 1.0


def test_probability_is_clamped_and_idle_streams_keep_theirs():
    s, clock = _sampler(target_rows_per_s=1e-9, global_budget_rows_per_s=10, initial_probability=0.01)
    assert _window(s, clock, "default", 10**9) == 1e-6
    s2, clock2 = _sampler(target_rows_per_s=1000, global_budget_rows_per_s=10_000, initial_probability=0.9)
    assert _window(s2, clock2, "default", 10) == 1.0
    assert _window(s2, clock2, "default", 0) == 1.0  # no events: no information, p stays


def test_tolerance_keeps_p_near_target_and_fixed_probability_never_moves():
    s, clock = _sampler(target_rows_per_s=10, initial_probability=0.1, tolerance=0.3)
    assert _window(s, clock, "default", 1200) == 0.1  # 12 rows/s vs 10: within 30 %
    f, fclock = _sampler(fixed_probability=0.02)
    assert _window(f, fclock, "default", 10**7) == 0.02


def test_invalid_configuration_lists_every_problem():
    with pytest.raises(ConfigError) as exc:
        SamplingConfig(target_rows_per_s=-1, min_probability=0, adjust_interval_s=0, fixed_probability=2.0,
                       uncertainty=UncertaintyConfig(boost=0.5, min_uncertainty=2)).validate()
    assert len(exc.value.problems) == 6


# -- allocation --------------------------------------------------------------------------------------


def test_targets_are_granted_when_they_fit():
    d = {"a": StreamDemand(target=5, rate=100), "b": StreamDemand(target=3, rate=1)}
    assert allocate(d, 100) == {"a": 5.0, "b": 1.0}


def test_over_budget_shares_favour_spread_and_drift_and_sum_to_budget():
    d = {
        "calm": StreamDemand(target=10, rate=1e4, sigma=1.0),
        "noisy": StreamDemand(target=10, rate=1e4, sigma=4.0),
        "drifting": StreamDemand(target=10, rate=1e4, sigma=1.0, drift=2.0),
    }
    out = allocate(d, 12)
    assert sum(out.values()) == pytest.approx(12)
    assert out["noisy"] > out["calm"] and out["drifting"] > out["calm"]
    assert out["drifting"] / out["calm"] == pytest.approx(3.0)  # (1 + drift)


def test_spread_tilt_is_bounded_and_small_streams_return_their_share():
    d = {"flat": StreamDemand(target=10, rate=1e4, sigma=0.0), "wild": StreamDemand(target=10, rate=1e4, sigma=1e9),
         "tiny": StreamDemand(target=10, rate=0.5)}
    out = allocate(d, 10)
    assert out["tiny"] == 0.5
    # mean sigma 5e8: wild is 2x the mean, flat (0) is clamped up to 0.25x
    assert out["flat"] > 0 and out["wild"] / out["flat"] == pytest.approx(8.0)
    assert sum(out.values()) == pytest.approx(10)


def test_sampler_allocates_the_global_budget_across_streams():
    s, clock = _sampler(target_rows_per_s=10, global_budget_rows_per_s=10, initial_probability=0.1)
    for name in ("a", "b"):
        st = s.stream(name)
        s.account(st, events=10_000, expected=1000.0)
    s.set_drift("b", 1.0)
    clock.now = 10.0
    s.adjust()
    assert s.allocations["b"] == pytest.approx(2 * s.allocations["a"])
    assert sum(s.allocations.values()) == pytest.approx(10)


# -- overrides ---------------------------------------------------------------------------------------


def test_overrides_boost_targets_until_they_expire():
    s, clock = _sampler(target_rows_per_s=1, global_budget_rows_per_s=1000, initial_probability=0.001)
    s.apply_remote(RemoteSampling(version=4, streams={
        "m/hot": StreamOverride(target_rows_per_s=20.0, boost=3.0, expires_at=2e9),
        "m/old": StreamOverride(target_rows_per_s=20.0, boost=3.0, expires_at=1.0),
        "other/hot": StreamOverride(target_rows_per_s=99.0)}, default_target_rows_per_s=2.0))
    for name in ("hot", "old", "cold"):
        s.account(s.stream(name), events=100_000, expected=100.0)
    clock.now = 10.0
    s.adjust()
    assert s.allocations == {"hot": 60.0, "old": 2.0, "cold": 2.0}
    assert s.remote_version == 4


def test_parse_sampling_document_skips_bad_entries():
    doc = {"version": "x", "streams": {"m/a": {"boost": -1, "target_rows_per_s": "many"}, "m/b": 7},
           "global_budget_rows_per_s": float("inf"), "poll_interval_s": 0}
    parsed = parse_sampling_document(doc)
    assert parsed.version == 0 and set(parsed.streams) == {"m/a"}
    assert parsed.streams["m/a"] == StreamOverride()
    assert parsed.global_budget_rows_per_s is None and parsed.poll_interval_s is None
    with pytest.raises(ValueError):
        parse_sampling_document([1, 2])


class _ConfigServer:
    def __init__(self):
        self.status, self.body, self.etag, self.seen = 200, b"{}", '"v1"', []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.seen.append((self.path, self.headers.get("If-None-Match")))
                if outer.status == 200 and self.headers.get("If-None-Match") == outer.etag:
                    self.send_response(304)
                    self.end_headers()
                    return
                self.send_response(outer.status)
                self.send_header("ETag", outer.etag)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_poller_uses_etags_and_never_raises():
    srv = _ConfigServer()
    try:
        srv.body = json.dumps({"version": 3, "streams": {"m/x": {"boost": 2}}, "poll_interval_s": 5}).encode()
        poller = SamplingConfigPoller(srv.url, "svc one")
        first = poller.poll()
        assert first is not None and first.version == 3 and first.poll_interval_s == 5.0
        assert srv.seen[0][0] == "/v1/sampling?service=svc+one"
        assert poller.poll() is None and poller.not_modified == 1 and srv.seen[1][1] == '"v1"'
        srv.status = 404
        assert poller.poll() is None
        srv.status, srv.etag, srv.body = 200, '"v2"', b"not json"
        assert poller.poll() is None
    finally:
        srv.close()
    assert SamplingConfigPoller(f"http://127.0.0.1:{free_port()}", "svc", timeout_s=1).poll() is None
    assert SamplingConfigPoller("http://256.256.256.256:1", "svc", timeout_s=0.2).poll() is None


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl binary makes the test certificates")
def test_poller_reads_a_tls_and_token_collector(tmp_path, pki, caplog):
    """Against ``up`` with TLS and bearer tokens: the poller's own options, then the OTLP exporter's variables."""
    caplog.set_level(logging.INFO, logger="stethoscope.agents.sdk")
    svc = make_service(tmp_path, **{"tls.cert_file": pki["server.pem"], "tls.key_file": pki["server.key"],
                                    "auth.tokens_file": write_tokens(tmp_path / "tokens.toml")})
    try:
        endpoint = f"https://127.0.0.1:{svc.otlp.port}"
        agent_token = TOKENS["agent"][0]
        ok = SamplingConfigPoller(endpoint, "svc", token=agent_token, ca_file=pki["ca.pem"], environ={})
        doc = ok.poll()
        assert doc is not None and doc.version >= 0 and doc.default_target_rows_per_s is not None
        assert ok.poll() is None and ok.not_modified == 1 and ok.failures == 0  # the ETag works over TLS too

        no_token = SamplingConfigPoller(endpoint, "svc", ca_file=pki["ca.pem"], environ={})
        wrong_ca = SamplingConfigPoller(endpoint, "svc", token=agent_token, ca_file=pki["stranger.pem"], environ={})
        assert no_token.poll() is None and no_token.failures == 1
        assert wrong_ca.poll() is None and wrong_ca.failures == 1
        assert "HTTP 401" in caplog.text and "CERTIFICATE_VERIFY_FAILED" in caplog.text
        assert agent_token not in caplog.text

        env = {"OTEL_EXPORTER_OTLP_HEADERS": f"Authorization=Bearer%20{agent_token}",
               "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE": pki["ca.pem"]}
        assert SamplingConfigPoller(endpoint, "svc", environ=env).poll() is not None
        mon = ModelMonitor("polled", feature_names=1, endpoint=endpoint, start=False, environ=env,
                           metric_exporter=InMemoryExporter(), log_exporter=InMemoryLogRecordExporter())
        try:
            assert mon._poller is not None and mon._poller.poll() is not None  # the monitor's own poller
        finally:
            mon.close()
        with pytest.raises(ValueError, match="cannot load the CA file"):
            SamplingConfigPoller(endpoint, "svc", ca_file=str(tmp_path / "missing.pem"), environ={})
    finally:
        svc.stop()
