"""The simulator: the policy meets the SLA on the burst day for fewer KPU-hours than static peak."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chronolake.scaling_lambda.cli import app
from chronolake.scaling_lambda.simulator import CapacityModel, Result, Workload, compare, reference_config


@pytest.fixture(scope="module")
def reference_day() -> dict[str, Result]:
    model = CapacityModel()
    return {r.strategy: r for r in compare(Workload(), model, reference_config(model))}


def test_policy_meets_the_sla_for_fewer_kpu_hours_than_static_peak(reference_day: dict[str, Result]) -> None:
    policy, peak = reference_day["policy"], reference_day["static peak"]
    assert policy.sla_met and peak.sla_met
    assert policy.burst_seconds <= 300
    assert policy.worst_latency_seconds <= 900
    assert policy.kpu_hours < peak.kpu_hours / 4


def test_static_minimum_misses_the_burst_deadline(reference_day: dict[str, Result]) -> None:
    minimum = reference_day["static minimum"]
    assert not minimum.sla_met
    assert minimum.burst_seconds > 300
    assert minimum.rescales == 0


def test_duplicate_deliveries_do_not_add_rescales(reference_day: dict[str, Result]) -> None:
    # Every schedule fires twice; up before the burst and down after it are the only changes.
    assert reference_day["policy"].rescales == 2


def test_policy_never_runs_below_the_state_floor(reference_day: dict[str, Result]) -> None:
    model = CapacityModel()
    floor_capacity = 6 * model.throughput_per_kpu  # 150 GB at 25 GB usable per KPU
    running = [c for c in reference_day["policy"].capacity if c > 0]
    assert min(running) == floor_capacity


def test_unscheduled_burst_is_caught_by_the_lag_rule() -> None:
    model = CapacityModel()
    early = dataclasses.replace(Workload(), burst_start_seconds=19 * 3600)
    results = {r.strategy: r for r in compare(early, model, reference_config(model))}
    # Nobody scheduled a peak at 19:00: the lag rule scales up and beats the static minimum.
    assert results["policy"].rescales > 2
    assert results["policy"].burst_seconds < results["static minimum"].burst_seconds


def test_cli_simulate_prints_the_table_and_writes_the_plot(tmp_path: Path) -> None:
    out = tmp_path / "day.png"
    result = CliRunner().invoke(app, ["simulate", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "static peak" in result.output and "policy" in result.output
    assert out.read_bytes().startswith(b"\x89PNG")


def test_cli_rejects_a_bad_clock_time() -> None:
    result = CliRunner().invoke(app, ["simulate", "--burst-at", "25:00", "--no-plot"])
    assert result.exit_code != 0
    assert "HH:MM" in result.output
