"""References as sketches: KS bounds against exact SciPy results, merging, storage, and the scheduler's use."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
from conftest import make_service, otlp_url, sql
from scipy.stats import ks_2samp, norm
from stethoscope.analytics import references
from stethoscope.analytics.references import (
    ReferenceSketch,
    ReferenceStore,
    SketchDrift,
    aligned_counts,
    binned_distances,
    relative_width,
    sketch_ks,
    state_from_points,
)
from stethoscope.analytics.scheduler import DriftScheduler
from stethoscope.native.sketch import ExpHistogramState, exphist_update
from test_scheduler import HOUR, NOW, by_kind, put

from stethoscope.errors import ConfigError


def test_doctests():
    assert doctest.testmod(references).failed == 0


def _hist(values: np.ndarray, max_size: int) -> ExpHistogramState:
    st = ExpHistogramState(1, max_size=max_size)
    exphist_update(np.ascontiguousarray(values.reshape(-1, 1)), st)
    return st


def _draw(kind: str, rng: np.random.Generator, n: int, shift: float) -> np.ndarray:
    if kind == "normal":
        return rng.normal(shift, 1.0, n)
    if kind == "lognormal":
        return rng.lognormal(shift, 1.0, n)
    if kind == "signed_with_zeros":  # negatives, positives and a point mass at 0
        x = rng.standard_t(3, n) + shift
        x[rng.random(n) < 0.1] = 0.0
        return x
    if kind == "integers":  # heavy ties
        return rng.poisson(3.0 + shift, n).astype(np.float64)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["normal", "lognormal", "signed_with_zeros", "integers"])
@pytest.mark.parametrize("max_size", [40, 160, 1280])
@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_exact_ks_lies_between_the_sketch_bounds(kind, max_size, shift):
    rng = np.random.default_rng(hash((kind, max_size, shift)) % 2**32)
    x, y = _draw(kind, rng, 4000, 0.0), _draw(kind, rng, 3000, shift)
    r = sketch_ks(_hist(x, max_size).buckets(0), _hist(y, max_size).buckets(0))
    exact = ks_2samp(x, y).statistic
    assert r.statistic - 1e-12 <= exact <= r.statistic_high + 1e-12
    assert r.error_bound <= r.max_bucket_share + 1e-12  # D_hi - D_lo <= largest bucket share
    assert (r.n_reference, r.n_current) == (4000, 3000)


@pytest.mark.parametrize("max_size", [160, 320, 1280])
@pytest.mark.parametrize("mu", [0.0, 0.5, -2.0])
def test_error_bound_from_the_relative_bucket_width(max_size, mu):
    """Normal data: D_hi - D_lo <= g (1 + g) (phi(1) + |mu| phi(0)), up to the bucket shares' sampling noise."""
    rng = np.random.default_rng(int(max_size + 10 * mu) % 2**32)
    n = 20000
    x, y = rng.normal(mu, 1.0, n), rng.normal(mu, 1.0, n)
    r = sketch_ks(_hist(x, max_size).buckets(0), _hist(y, max_size).buckets(0))
    g = relative_width(r.scale)
    bound = g * (1 + g) * (norm.pdf(1.0) + abs(mu) * norm.pdf(0.0))
    noise = 4 * math.sqrt(bound / n)  # four standard deviations of a bucket share of that size
    assert r.error_bound <= bound + noise
    assert abs(r.statistic - ks_2samp(x, y).statistic) <= bound + noise


def test_finer_sketches_converge_to_the_exact_p_value():
    rng = np.random.default_rng(4)
    x, y = rng.normal(0, 1, 5000), rng.normal(0.06, 1, 5000)
    exact = ks_2samp(x, y, method="asymp")
    r = sketch_ks(_hist(x, 4096).buckets(0), _hist(y, 4096).buckets(0))
    assert r.scale >= 7 and r.error_bound < 2e-3
    # p of D_hi <= exact p <= p of D_lo, within the 1e-6 of ks_pvalues' expansion against kstwo
    assert r.p_value_low - 1e-6 <= exact.pvalue <= r.p_value + 1e-6


def test_merged_sketches_bound_the_ks_of_the_pooled_rows():
    rng = np.random.default_rng(5)
    a1, a2, b = rng.normal(size=3000), rng.normal(size=2000), rng.normal(0.2, 1, 4000)
    merged = _hist(a1, 320)
    merged.merge(_hist(a2, 320))
    whole = _hist(np.concatenate([a1, a2]), 320)
    assert merged.buckets(0).count == 5000
    p, q, _ = aligned_counts(merged.buckets(0), whole.buckets(0))
    np.testing.assert_array_equal(p, q)  # merge is exact when the scales agree
    r = sketch_ks(merged.buckets(0), _hist(b, 320).buckets(0))
    assert r.statistic <= ks_2samp(np.concatenate([a1, a2]), b).statistic <= r.statistic_high


def test_binned_distances_are_zero_for_equal_and_grow_with_a_shift():
    rng = np.random.default_rng(6)
    x = rng.normal(size=5000)
    same = binned_distances(_hist(x, 160).buckets(0), _hist(x.copy(), 160).buckets(0))
    assert same == {"psi": 0.0, "js": 0.0, "hellinger": 0.0}
    small = binned_distances(_hist(x, 160).buckets(0), _hist(rng.normal(0.1, 1, 5000), 160).buckets(0))
    big = binned_distances(_hist(x, 160).buckets(0), _hist(rng.normal(1.0, 1, 5000), 160).buckets(0))
    assert all(big[k] > small[k] > 0 for k in ("psi", "js", "hellinger"))


def test_sketch_json_round_trip_and_points():
    rng = np.random.default_rng(7)
    x = np.column_stack([rng.normal(size=2000), rng.exponential(size=2000), -rng.exponential(size=2000)])
    x[::50, 0] = np.nan
    sk = ReferenceSketch.from_rows(x, ["a", "b", "c"], predictions=rng.choice(["y", "n"], 2000))
    back = ReferenceSketch.from_json(sk.to_json())
    for j in range(3):
        assert back.state.buckets(j) == sk.state.buckets(j)
    np.testing.assert_allclose(back.quantiles, sk.quantiles)
    assert sk.quantiles[0, 10] == pytest.approx(np.nanmedian(x[:, 0]))
    assert back.frequent == sk.frequent and sum(sk.frequent.values()) == 2000 and back.other == 0
    num = ReferenceSketch.from_rows(x[:, 1:2], ["b"], predictions=rng.random(2000))
    assert ReferenceSketch.from_json(num.to_json()).prediction.buckets(0) == num.prediction.buckets(0)
    # OTLP-style points of one column, narrower max_size than the data need: downscaled to fit
    p = sk.state.buckets(1)
    pt = {"scale": p.scale, "zero_count": p.zero_count, "positive_offset": p.pos_offset,
          "positive_counts": p.pos_counts, "negative_offset": 0, "negative_counts": [], "count": p.count,
          "sum": p.sum, "min": p.min, "max": p.max}
    small = state_from_points([(0, pt), (0, pt)], 1, max_size=16).buckets(0)
    assert small.count == 2 * p.count and sum(small.pos_counts) + small.zero_count == 2 * p.count
    assert len(small.pos_counts) <= 16 and small.scale < p.scale


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="n x 2"):
        ReferenceSketch.from_rows(np.zeros((5, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="not a reference sketch"):
        ReferenceSketch.from_json('{"version": 1, "names": ["a"]}')
    with pytest.raises(ValueError, match="version"):
        ReferenceSketch.from_json('{"version": 9}')
    with pytest.raises(ConfigError) as info:
        SketchDrift(alpha=2, min_effect=-1, correction="holm")
    assert len(info.value.problems) == 3
    empty = ExpHistogramState(1)
    with pytest.raises(ValueError, match="need values"):
        sketch_ks(empty.buckets(0), _hist(np.ones(3), 16).buckets(0))


def test_sketch_drift_flags_the_shifted_feature_only():
    rng = np.random.default_rng(8)
    ref = ReferenceSketch.from_rows(rng.normal(size=(5000, 4)), list("abcd"))
    cur_x = rng.normal(size=(5000, 4))
    cur_x[:, 2] += 0.5
    results = SketchDrift().compare(ref, ReferenceSketch.from_rows(cur_x, list("abcd")))
    assert [r.column for r in results if r.drifted] == ["c"]
    c = results[2]
    assert c.details["statistic_high"] >= c.statistic and c.details["ks_error_bound"] < 0.02
    assert c.details["p_adjusted"] < 1e-10 and c.details["psi"] > 0.1


def test_sketch_drift_null_false_alarms_are_rare():
    """On null data the per-dataset alarm rate stays near alpha (BH over 5 features), over 100 seeds."""
    alarms = 0
    for seed in range(100):
        rng = np.random.default_rng(1000 + seed)
        a = ReferenceSketch.from_rows(rng.normal(size=(1000, 5)), list("abcde"), max_size=160)
        b = ReferenceSketch.from_rows(rng.normal(size=(1000, 5)), list("abcde"), max_size=160)
        alarms += any(r.drifted for r in SketchDrift(min_effect=0.0).compare(a, b))
    assert alarms <= 10  # expected ~5 at alpha 0.05 (D_lo only lowers it); 10 is > 2 binomial sd above


def test_reference_store_round_trip(store):
    rng = np.random.default_rng(9)
    refs = ReferenceStore(store)
    first = ReferenceSketch.from_rows(rng.normal(size=(500, 2)), ["a", "b"])
    later = ReferenceSketch.from_rows(rng.normal(size=(700, 2)), ["a", "b"])
    refs.save("rolling", "fraud", "3", "default", first, window_start=0.0, window_end=3600.0)
    refs.save("rolling", "fraud", "3", "default", later, window_start=3600.0, window_end=7200.0)
    got, start, end = refs.load("rolling", "fraud", "3", "default")
    assert (got.n_rows, start, end) == (700, 3600.0, 7200.0)
    assert got.state.buckets(1) == later.state.buckets(1)
    assert refs.load("rolling", "fraud", "3", "default", ending_by=7199.0)[0].n_rows == 500
    assert refs.load("rolling", "fraud", "4", "default") is None
    assert refs.load("rolling", "fraud", None, "default")[0].n_rows == 700


def test_scheduler_rolling_sketch_reference(store):
    put(store, NOW - 2 * HOUR, NOW - HOUR, 600, seed=1)
    put(store, NOW - HOUR, NOW, 600, seed=2, shift=1.0)
    sched = DriftScheduler(store, sketch_reference="rolling")
    first = sched.run_once(NOW - HOUR)  # stores the sketch of the first hour; nothing to compare yet
    assert by_kind(first, "sketch_drift") == [] and len(by_kind(first, "reference_sketch")) == 1
    found = sched.run_once(NOW)
    drifts = by_kind(found, "sketch_drift")
    assert [f.feature for f in drifts] == ["amount", "age", "hour"]
    assert [f.feature for f in drifts if f.drifted] == ["age"]
    age = drifts[1]
    assert age.severity == "warning" and age.details["reference_end"] == NOW - HOUR
    assert age.labels == {"stream": "default", "reference": "rolling"}
    exact = next(f for f in by_kind(found, "feature_drift") if f.feature == "age")
    assert age.statistic <= exact.statistic <= age.details["statistic_high"]  # same rows, sketch vs exact KS
    (pred,) = by_kind(found, "sketch_prediction_drift")  # every prediction is 0: one class, no drift
    assert pred.method == "sketch_chi2" and not pred.drifted and pred.details["n_current"] == 600
    stored = sql_rows(store, "SELECT count() FROM findings WHERE Kind = 'reference_sketch'")
    assert stored == [["2"]]


def test_scheduler_version_and_fixed_references(store):
    put(store, NOW - 3 * HOUR, NOW - 2 * HOUR, 500, seed=1)
    put(store, NOW - 2 * HOUR, NOW - HOUR, 500, seed=3, shift=1.0)
    put(store, NOW - HOUR, NOW, 500, seed=2, shift=1.0)
    version = DriftScheduler(store, sketch_reference="version")
    version.run_once(NOW - 2 * HOUR)  # the first window of version 3 becomes its reference
    drifted = [f.feature for f in by_kind(version.run_once(NOW), "sketch_drift") if f.drifted]
    assert drifted == ["age"]  # against the first hour, though the previous hour looks the same
    fixed = DriftScheduler(store, sketch_reference="fixed:golden")
    fixed.snapshot("golden", "fraud", "3", "default", NOW - 2 * HOUR, NOW - HOUR)
    found = by_kind(fixed.run_once(NOW), "sketch_drift")
    assert found and not any(f.drifted for f in found) and found[0].labels["reference"] == "golden"
    with pytest.raises(ValueError, match="no rows"):
        fixed.snapshot("empty", "fraud", "9", "default", NOW - HOUR, NOW)
    with pytest.raises(ConfigError):
        DriftScheduler(store, sketch_reference="fixed:")


def sql_rows(store, query: str) -> list[list[str]]:
    return [line.split("\t") for line in store.query(query, "TabSeparated").data.decode().splitlines() if line]


def test_scheduler_uses_the_sdk_feature_sketches(tmp_path):
    """The SDK's exported per-feature histograms (every request, unsampled) give sketch_drift findings."""
    from stethoscope.agents.sdk import ModelMonitor, SamplingConfig

    svc = make_service(tmp_path)
    try:
        rng = np.random.default_rng(10)
        with ModelMonitor("churn", "7", endpoint=otlp_url(svc, ""), feature_names=["spend", "tenure"], start=False,
                          sampling=SamplingConfig(remote=False)) as mon:
            mon.record_batch(np.column_stack([rng.normal(100, 15, 3000), rng.exponential(2.0, 3000)]), rng.random(3000))
            assert mon.flush(timeout_s=10)
            times = _wait_times(svc, 2)
            mon.record_batch(np.column_stack([rng.normal(100, 15, 3000), rng.exponential(4.0, 3000)]), rng.random(3000))
            assert mon.flush(timeout_s=10)
            times = _wait_times(svc, 4)
        t1, t2 = times[0], times[-1]
        assert t2 > t1
        window = (t2 - t1)
        found = DriftScheduler(svc.store, window_s=window, sketch_metrics=True).run_once(t2 + window / 2)
        otel = [f for f in by_kind(found, "sketch_drift") if f.labels.get("source") == "otel"]
        assert sorted(f.feature for f in otel) == ["spend", "tenure"]
        by_feature = {f.feature: f for f in otel}
        assert by_feature["tenure"].drifted and not by_feature["spend"].drifted
        assert by_feature["tenure"].details["n_reference"] == 3000 and by_feature["tenure"].model == "churn"
    finally:
        svc.stop()


def _wait_times(svc, want: int) -> list[float]:
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body = sql(svc, "SELECT toUnixTimestamp64Milli(TimeUnix) FROM otel_metrics_exponential_histogram "
                        "WHERE MetricName = 'stethoscope.model.feature' ORDER BY TimeUnix").split()
        if len(body) >= want:
            return [int(t) / 1000 for t in body]
        time.sleep(0.05)
    raise AssertionError(f"fewer than {want} feature sketch points arrived")


def test_prediction_drift_from_frequent_items_and_histograms():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(3000, 1))

    def classes(p):
        return ReferenceSketch.from_rows(x, ["a"], predictions=rng.choice(["ok", "fraud", "review"], 3000, p=p))

    det = SketchDrift()
    same = det.compare_predictions(classes([0.8, 0.15, 0.05]), classes([0.8, 0.15, 0.05]))
    moved = det.compare_predictions(classes([0.8, 0.15, 0.05]), classes([0.6, 0.3, 0.1]))
    assert same.method == "sketch_chi2" and not same.drifted
    assert moved.drifted and moved.effect == pytest.approx(0.2, abs=0.03)
    # the same test as on rows when no label was dropped from the frequent items
    from stethoscope.analytics.categorical import Chi2
    a, b = rng.choice(["x", "y", "z"], 2000), rng.choice(["x", "y", "z"], 2000, p=[0.4, 0.3, 0.3])
    sk = det.compare_predictions(ReferenceSketch.from_rows(x[:2000], ["a"], predictions=a),
                                 ReferenceSketch.from_rows(x[:2000], ["a"], predictions=b))
    rows = Chi2().fit(a).score(b)
    assert sk.statistic == pytest.approx(rows.statistic, rel=1e-12) and sk.p_value == pytest.approx(rows.p_value)
    # top_k: rare labels go to "other"
    many = ReferenceSketch.from_rows(x[:500], ["a"], predictions=np.arange(500).astype(str), top_k=10)
    assert len(many.frequent) == 10 and many.other == 490
    num = det.compare_predictions(ReferenceSketch.from_rows(x, ["a"], predictions=rng.random(3000)),
                                  ReferenceSketch.from_rows(x, ["a"], predictions=rng.random(3000) ** 2))
    assert num.method == "sketch_ks" and num.drifted
    assert det.compare_predictions(ReferenceSketch.from_rows(x, ["a"]), ReferenceSketch.from_rows(x, ["a"])) is None
