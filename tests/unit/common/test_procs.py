"""services.common.procs: the ready-file protocol and start failures."""

from __future__ import annotations

import json
import os

import pytest

from services.common.procs import ServiceStartError, start_service, write_ready_file


def test_ready_file_is_written_atomically(tmp_path):
    path = tmp_path / "svc.ready.json"
    write_ready_file(str(path), "127.0.0.1:5", metrics_address="127.0.0.1:6")
    assert json.loads(path.read_text()) == {
        "address": "127.0.0.1:5",
        "pid": os.getpid(),
        "metrics_address": "127.0.0.1:6",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svc.ready.json"]


def test_a_service_that_exits_early_reports_its_log(tmp_path):
    proc = start_service("scheduler", ["--dispatch-policy", "nope"], log_dir=tmp_path)
    with pytest.raises(ServiceStartError) as info:
        proc.wait_ready(timeout_s=60)
    assert "exited with code 2" in str(info.value)
    assert "dispatch_policy='nope'" in str(info.value)
    assert not proc.is_alive()


def test_unknown_service_kind(tmp_path):
    with pytest.raises(ValueError, match="service kind 'db'"):
        start_service("db", [], log_dir=tmp_path)
