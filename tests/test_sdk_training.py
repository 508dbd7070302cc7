"""TrainingMonitor: phase timing on a fake clock, derived values, non-finite handling, thinning, torch hooks."""

from __future__ import annotations

import importlib

import pytest

from stethoscope.agents.sdk import InMemoryExporter, TrainingMonitor
from stethoscope.errors import ConfigError, MissingExtraError


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeWall:
    def __init__(self) -> None:
        self.ns = 1_700_000_000_000_000_000

    def __call__(self) -> int:
        self.ns += 7_000_000  # 7 ms between readings: sub-second stamps
        return self.ns


@pytest.fixture
def clock():
    return FakeClock()


def _tm(clock, **kw) -> TrainingMonitor:
    kw.setdefault("max_steps_per_s", None)  # the fake clock stands still between steps: no thinning
    return TrainingMonitor("job", start=False, clock=clock, wall_clock=FakeWall(),
                           metric_exporter=InMemoryExporter(), **kw)


def _values(tm, name):
    return [p.value for p in tm.metric_exporter.points("stethoscope.train." + name)]


def test_configuration_problems_are_reported_together():
    with pytest.raises(ConfigError) as exc:
        TrainingMonitor("", rank=3, world_size=2, export_interval_s=0, max_steps_per_s=-1, start=False)
    assert len(exc.value.problems) == 4


def test_phases_are_timed_nested_and_summed(clock):
    tm = _tm(clock)
    with tm.phase("data"):
        clock.advance(0.5)
    for _ in range(2):  # gradient accumulation: the phase adds up
        with tm.phase("forward"):
            clock.advance(1.0)
            with tm.phase("attention"):  # nested: its own inclusive time
                clock.advance(0.25)
                with tm.phase("forward"):  # re-entered: only the outermost counts
                    clock.advance(0.125)
        with tm.phase("backward"):
            clock.advance(2.0)
    tm.step(loss=1.0)
    assert tm.flush()
    phases = {p.attributes["stethoscope.train.phase"]: p.value
              for p in tm.metric_exporter.points("stethoscope.train.phase.time")}
    assert phases == {"data": 0.5, "forward": 2.75, "attention": 0.75, "backward": 4.0}
    assert _values(tm, "data_wait") == [0.5]
    assert _values(tm, "step_time") == [0.5 + 2.75 + 4.0 + 0.75]  # first step: the sum of its phases
    tm.close()


def test_a_phase_that_raises_is_still_timed(clock):
    tm = _tm(clock)
    with pytest.raises(RuntimeError):
        with tm.phase("optimizer"):
            clock.advance(0.3)
            raise RuntimeError("boom")
    tm.step()
    tm.flush()
    assert [p.value for p in tm.metric_exporter.points("stethoscope.train.phase.time")] == [0.3]
    tm.close()


def test_step_time_is_time_since_the_previous_step_unless_given(clock):
    tm = _tm(clock)
    tm.step(loss=3.0)
    clock.advance(0.25)
    tm.step(loss=2.0)
    clock.advance(0.5)
    tm.step(loss=1.0, step_time=0.1, data_wait=0.05, grad_norm=2.0, lr=1e-4, tokens=2048, samples=8)
    tm.flush()
    assert _values(tm, "step_time") == [0.25, 0.1]
    assert _values(tm, "loss") == [3.0, 2.0, 1.0]
    assert _values(tm, "step") == [1, 2, 3]
    assert _values(tm, "tokens") == [2048] and _values(tm, "samples") == [8] and _values(tm, "lr") == [1e-4]
    assert [p.value for p in tm.metric_exporter.points("stethoscope.train.steps")] == [3]
    stamps = [p.time_unix_nano for p in tm.metric_exporter.points("stethoscope.train.loss")]
    assert stamps == sorted(stamps) and all(b - a < 10**9 for a, b in zip(stamps, stamps[1:]))
    tm.close()


def test_nonfinite_values_are_the_signal(clock):
    tm = _tm(clock)
    tm.step(loss=2.0, grad_norm=1.0)
    tm.step(loss=float("nan"), grad_norm=float("inf"))
    tm.step(loss=float("inf"))
    tm.step(loss=1.5)
    assert dict(tm.nonfinite) == {"loss": 2, "grad_norm": 1}
    tm.flush()
    assert _values(tm, "loss") == [2.0, 2.0, 2.0, 1.5]  # the gauge holds the last finite value
    assert {p.attributes["stethoscope.train.value"]: p.value
            for p in tm.metric_exporter.points("stethoscope.train.nonfinite")} == {"loss": 2, "grad_norm": 1}
    assert dict(tm.dropped) == {}
    tm.close()


def test_wrong_types_are_counted_and_never_raise(clock):
    tm = _tm(clock)
    assert tm.step(loss="low", lr=object(), tokens=[1]) is True
    with tm.phase(""):
        pass
    tm.observe("x", "y")
    assert dict(tm.dropped) == {"wrong_type": 4, "bad_phase": 1}
    tm.close()
    assert tm.step(loss=1.0) is False
    assert tm.dropped["closed"] == 1


def test_fast_steps_are_thinned_but_nonfinite_ones_kept(clock):
    tm = _tm(clock, max_steps_per_s=10)
    for i in range(100):  # 1000 steps/s for 0.1 s
        clock.advance(0.001)
        tm.step(loss=float("nan") if i == 55 else 1.0)
    tm.flush()
    steps = _values(tm, "step")
    assert steps[0] == 1 and 56 in steps and len(steps) == 2
    assert [p.value for p in tm.metric_exporter.points("stethoscope.train.steps")] == [100]
    tm.close()


def test_identity_attributes(clock):
    tm = TrainingMonitor("job", rank=2, world_size=4, node="n1", gpu="GPU-abc", start=False, clock=clock,
                         metric_exporter=InMemoryExporter())
    tm.step(loss=1.0)
    tm.flush()
    (p,) = tm.metric_exporter.points("stethoscope.train.loss")
    assert dict(p.attributes) == {"stethoscope.train.job": "job", "stethoscope.train.rank": 2,
                                  "stethoscope.train.world_size": 4, "host.name": "n1", "gpu.uuid": "GPU-abc"}
    assert tm.metric_exporter.collections[0].resource_metrics[0].resource.attributes["service.name"] == "job"
    tm.close()


def test_step_hooks_supply_defaults_and_observations(clock):
    tm = _tm(clock)
    remove = tm.add_step_hook(lambda: {"grad_norm": 7.0})
    tm.add_step_hook(lambda: 1 / 0)
    tm.observe("custom", 3.0, layer="fc")
    tm.step(loss=1.0)
    tm.step(loss=1.0, grad_norm=2.0)
    remove()
    tm.step(loss=1.0)
    tm.flush()
    assert _values(tm, "grad_norm") == [7.0, 2.0]
    (custom,) = tm.metric_exporter.points("stethoscope.train.custom")
    assert custom.value == 3.0 and custom.attributes["layer"] == "fc"
    assert tm.dropped["hook_error"] == 3
    tm.close()


def test_watch_without_torch_names_the_extra(monkeypatch, clock):
    from stethoscope.agents.sdk import torch as sdk_torch

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "torch":
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(MissingExtraError, match=r"stethoscope\[torch\]"):
        sdk_torch.watch(object(), _tm(clock))


def test_torch_hooks_record_grad_norm_and_activations(clock):
    torch = pytest.importorskip("torch")
    from stethoscope.agents.sdk import watch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    tm = _tm(clock)
    handle = watch(model, tm, layer="1")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    expected_norms, expected_zero = [], []
    for _ in range(3):
        opt.zero_grad()
        out = model(x)
        expected_zero.append(float((model[1](model[0](x)) == 0).float().mean()))
        loss = torch.nn.functional.mse_loss(out, y)
        loss.backward()
        expected_norms.append(float(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))))
        opt.step()
        tm.step(loss=loss.item())
    handle.remove()
    model(x).sum().backward()
    tm.step(loss=0.0)
    tm.flush()
    assert _values(tm, "grad_norm") == pytest.approx(expected_norms, rel=1e-5)
    zero = tm.metric_exporter.points("stethoscope.train.activation.zero_fraction")
    assert [p.value for p in zero] == pytest.approx(expected_zero)
    assert {p.attributes["stethoscope.train.layer"] for p in zero} == {"1"}
    assert len(tm.metric_exporter.points("stethoscope.train.activation.abs_max")) == 3
    with pytest.raises(AttributeError):
        watch(model, tm, layer="nope")
    tm.close()
