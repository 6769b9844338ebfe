"""The fleet simulation (tests/fleet_sim.py) in the suite, small: real agents on one broker take a paced model
update; a corrupted download fails cleanly on its own device; a rollout whose failures cross the abort
threshold is canceled before it reaches the rest. The figures are printed, not asserted (`make fleet-sim`
runs 100 agents)."""

from __future__ import annotations

import json

import pytest
from agent.settings import SHIPPED_BUNDLE
from broker import needs_mosquitto
from fleet_sim import SIM_ROLLOUT, simulate

pytestmark = [pytest.mark.broker, needs_mosquitto]


def test_a_small_fleet_takes_a_paced_update_and_the_corrupted_download_fails_on_its_own_device(tmp_path):
    report = simulate(devices=10, corrupt=1, fps=2.0, measure_s=3.0, timeout_s=240.0, folder=tmp_path)
    print(json.dumps(report, indent=2))
    assert report["problems"] == []
    assert report["updated"] == 9 and report["rollout"]["job_status"] == "COMPLETED"
    assert report["failed"] == {"sim-005": "SHA256_MISMATCH"}
    failure = report["failures"]["sim-005"]
    shipped = json.loads((SHIPPED_BUNDLE / "manifest.json").read_text())["version"]
    assert failure["serving"] == shipped and "the artifact was corrupted" in failure["message"]


def test_a_rollout_over_its_abort_threshold_is_canceled_before_it_reaches_the_rest(tmp_path):
    rollout = SIM_ROLLOUT.model_copy(update={"base_rate_per_minute": 12, "abort_threshold_percent": 50.0, "abort_min_devices": 3})
    report = simulate(devices=6, corrupt=3, fps=2.0, measure_s=1.0, timeout_s=240.0, folder=tmp_path, rollout=rollout)
    print(json.dumps(report, indent=2))
    assert report["problems"] == []  # every device serves what its execution (or its lack of one) says
    assert report["rollout"]["job_status"] == "CANCELED" and "executed things failed" in report["rollout"]["abort_reason"]
    assert report["rollout"]["notified"] < 6
    assert "sim-006" not in report["failures"] and report["status_table"][6].split()[0] == "sim-006"
