"""The main job: the demo loads, reports the corrections, and a re-run loads nothing new."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from chronolake.demo import REPORT_DAY, run_demo
from chronolake.lake import Lake


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "batch"])
def test_demo_reports_corrections_and_is_idempotent(lake_home: Path, capsys: pytest.CaptureFixture[str], stream: bool) -> None:
    """Streamed (the README's main command: a real local broker and the Flink job), and as batch loads."""
    run_demo(lake_home, stream=stream)
    first = capsys.readouterr().out
    levels = Lake(lake_home).dataset("index_levels")
    stable = levels.stable_system_time()
    if stream:
        assert "streaming job started" in first and "stopping the job" in first
        assert levels.stream_owner() is not None, "the job claimed its datasets"
        assert first.count("committed by the job") == 5
    run_demo(lake_home, stream=stream)
    second = capsys.readouterr().out
    assert levels.stable_system_time() == stable, "a re-run must not commit anything"
    assert second.count("already loaded") == 5 + 1  # five market-data files and the GDP vintages
    assert "corrected" in first

    # What the demo prints as "now" is what the API answers, and the report time reproduces.
    now = {r["index_id"]: r["level"] for r in levels.as_of(REPORT_DAY).to_pylist()}
    assert f"{now['STOXX50']}" in first
    loaded = levels.loaded_files().to_pylist()
    reported_at = min(r["loaded_at"] for r in loaded)
    then = {r["index_id"]: r["level"] for r in levels.as_of(REPORT_DAY, reported_at).to_pylist()}
    assert then["STOXX50"] - now["STOXX50"] == Decimal("10.00")
    assert then["NIKKEI225"] != now["NIKKEI225"] and then["SMI"] != now["SMI"]
