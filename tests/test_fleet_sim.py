"""The fleet simulation (tests/fleet_sim.py) in the suite: 20 real agents on one broker take a model update,
2 corrupted downloads fail cleanly. About 40 s on 2 cores; the figures are printed, not asserted."""

from __future__ import annotations

import json

import pytest
from broker import needs_mosquitto
from fleet_sim import simulate


@pytest.mark.broker
@needs_mosquitto
def test_a_fleet_of_20_takes_an_update_and_the_2_corrupted_downloads_fail_cleanly(tmp_path):
    report = simulate(devices=20, corrupt=2, fps=30.0, measure_s=5.0, timeout_s=240.0, folder=tmp_path)
    print(json.dumps(report, indent=2))
    assert report["problems"] == []
    assert report["updated"] == 18
    assert report["failed"] == {"sim-19": "SHA256_MISMATCH", "sim-20": "SHA256_MISMATCH"}
