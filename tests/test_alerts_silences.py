"""``stethoscope alerts silence``: requests picked up by a running ``up``, end to end."""

from __future__ import annotations

import doctest
import json
import time

import pytest
from conftest import free_port, make_service, sql
from stethoscope.alerts import silences
from stethoscope.analytics.findings import FindingsWriter
from test_alerts_runner import SECRET, hook, nan  # noqa: F401

from stethoscope.cli import main


def test_the_module_examples_run():
    res = doctest.testmod(silences)
    assert res.attempted > 0 and res.failed == 0


def _wait(cond, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def up(tmp_path, monkeypatch, hook):  # noqa: F811 - the fixture imported above
    url, h = hook
    monkeypatch.setenv("STETHOSCOPE_WEBHOOK_SECRET", SECRET)
    svc = make_service(tmp_path, **{"analytics.enabled": False, "alerts.webhook_url": url})
    conf = tmp_path / "cli.toml"
    conf.write_text(f'[store]\ndata_dir = "{tmp_path / "data"}"\n\n[sql]\nport = {svc.sql.port}\n')
    yield svc, str(conf), h
    svc.stop()


def test_silence_add_list_expire_against_a_running_up(up, capsys):
    svc, conf, h = up
    assert main(["alerts", "silence", "add", "--match", "alertname=TrainingNaN", "--match", "job=~ll.*",
                 "--for", "2h", "--comment", "known bad shard", "--by", "ana", "--config", conf]) == 0
    out = capsys.readouterr().out
    sid, status = out.split("\t")[:2]
    assert sid.startswith("s-") and status == "applied"
    # stored in the alerts table by up (so a restart keeps it)
    rows = sql(svc, "SELECT Fingerprint FROM alerts WHERE Kind = 'silence' AND Version = (SELECT max(Version) FROM alerts)")
    assert rows.split() == [sid]

    assert main(["alerts", "silence", "list", "--config", conf]) == 0
    listing = capsys.readouterr().out
    assert sid in listing and "alertname=TrainingNaN,job=~ll.*" in listing and "known bad shard" in listing

    # a matching alert fires but is muted: nothing is queued for the webhook
    FindingsWriter(svc.store).write([nan(time.time())])
    _wait(lambda: sql(svc, "SELECT count() FROM alerts WHERE Kind = 'alert' AND Rule = 'TrainingNaN' AND State = 'firing'"
                           " AND Version = (SELECT max(Version) FROM alerts)").strip() == "1", "the firing alert")
    assert sql(svc, "SELECT count() FROM notification_attempts").strip() == "0" and h.received == []

    # expiring it lets the still-firing alert through as a new notification
    assert main(["alerts", "silence", "expire", sid, "--config", conf]) == 0
    assert capsys.readouterr().out.split("\t")[1].strip() == "expired"
    _wait(lambda: h.received, "the webhook")
    assert [(m["rule"], m["reason"]) for m in h.received] == [("TrainingNaN", "new")]
    assert main(["alerts", "silence", "list", "--config", conf]) == 0
    assert sid not in capsys.readouterr().out


def test_silences_survive_a_restart_of_up(tmp_path, capsys):
    svc = make_service(tmp_path, **{"analytics.enabled": False})
    conf = tmp_path / "cli.toml"
    conf.write_text(f'[store]\ndata_dir = "{tmp_path / "data"}"\n\n[sql]\nport = {svc.sql.port}\n')
    try:
        assert main(["alerts", "silence", "add", "--match", "node=n7", "--for", "1h", "--comment", "rma",
                     "--config", str(conf)]) == 0
        sid = capsys.readouterr().out.split("\t")[0]
    finally:
        svc.stop()
    svc2 = make_service(tmp_path, **{"analytics.enabled": False, "sql.port": svc.sql.port})
    try:
        _wait(lambda: svc2.alerts._loaded, "the runner to load its state")
        assert set(svc2.alerts.engine.silences) == {sid}
    finally:
        svc2.stop()


def test_a_request_left_while_up_is_down_applies_when_it_starts(tmp_path, capsys):
    conf = tmp_path / "cli.toml"
    port = free_port()
    conf.write_text(f'[store]\ndata_dir = "{tmp_path / "data"}"\n\n[sql]\nport = {port}\n')
    assert main(["alerts", "silence", "add", "--match", "team=gpu", "--for", "30m", "--comment", "drill",
                 "--wait", "0", "--config", str(conf)]) == 0
    sid, status = capsys.readouterr().out.split("\t")[:2]
    assert status.startswith("queued")
    svc = make_service(tmp_path, **{"analytics.enabled": False, "sql.port": port})
    try:
        _wait(lambda: sid in svc.alerts.engine.silences, "the request to be applied")
        _wait(lambda: not list((tmp_path / "data" / "silence-requests").glob("*.json")), "the request file to go")
        silence = svc.alerts.engine.silences[sid]
        assert dict(silence.matchers) == {"team": "gpu"} and silence.comment == "drill"
    finally:
        svc.stop()


def test_bad_silence_commands_say_what_is_wrong(tmp_path, capsys):
    conf = tmp_path / "cli.toml"
    conf.write_text(f'[store]\ndata_dir = "{tmp_path / "data"}"\n\n[sql]\nport = {free_port()}\n')
    assert main(["alerts", "silence", "add", "--match", "nolabel", "--for", "1h", "--comment", "x",
                 "--config", str(conf)]) == 2
    assert "'nolabel': expected label=value" in capsys.readouterr().err
    assert main(["alerts", "silence", "add", "--match", "a=~(", "--for", "1h", "--comment", "x",
                 "--config", str(conf)]) == 2
    assert "not a valid regex" in capsys.readouterr().err
    assert main(["alerts", "silence", "add", "--match", "a=b", "--for", "soon", "--comment", "x",
                 "--config", str(conf)]) == 2
    assert "soon" in capsys.readouterr().err
    assert main(["alerts", "silence", "list", "--config", str(conf)]) == 2  # no up listening
    assert "cannot read silences" in capsys.readouterr().err
    assert main(["alerts", "silence", "expire", "bad id!", "--wait", "0", "--config", str(conf)]) == 2
    assert "not a silence id" in capsys.readouterr().err
    assert not list((tmp_path / "data" / "silence-requests").glob("*.json"))


def test_unknown_silence_ids_are_refused_while_up_runs(up, capsys):
    _svc, conf, _h = up
    assert main(["alerts", "silence", "expire", "s-000000000000", "--config", conf]) == 2
    assert "no active silence 's-000000000000'" in capsys.readouterr().err


def test_a_malformed_request_file_is_logged_and_removed(up, caplog):
    svc, _conf, _h = up
    folder = svc.alerts.silence_dir
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "00000000000000000001-add-x.json").write_text(json.dumps({"op": "add", "id": "x", "matchers": {}}))
    _wait(lambda: not list(folder.glob("*.json")), "the bad request to be dropped")
    assert svc.alerts.engine.silences == {}
    assert any("silence request 00000000000000000001-add-x.json ignored" in m for m in caplog.messages)
