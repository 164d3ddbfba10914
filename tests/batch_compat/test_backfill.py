"""Backfills of known history: system times given by the user, proven on real GDP vintages."""

from __future__ import annotations

import bisect
import csv
import gzip
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import pytest

from chronolake.iceberg.exceptions import SystemTimeError
from chronolake.iceberg.temporal import micros_from_datetime, parse_timestamp
from chronolake.lake import Dataset, Lake

GDP = Path(__file__).parents[2].parent / "shared" / "data" / "gdp_vintages.csv.gz"


@pytest.fixture(scope="module")
def gdp(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    lake = Lake(tmp_path_factory.mktemp("gdp"))
    dataset = lake.create_dataset("gdp", key=["country"], columns={"real_gdp": "decimal(20,6)"})
    report = dataset.load(
        [GDP], system_time_column="published", valid_from_column="quarter", period="quarter"
    )
    assert (report.applied, report.quarantined, report.transactions) == (47_980, 0, 89)
    return dataset


def read_vintages() -> dict[str, dict[tuple[str, str], Decimal]]:
    vintages: dict[str, dict[tuple[str, str], Decimal]] = defaultdict(dict)
    with gzip.open(GDP, "rt") as handle:
        for row in csv.DictReader(handle):
            vintages[row["published"]][(row["country"], row["quarter"])] = Decimal(row["real_gdp"])
    return vintages


def test_every_published_value_and_every_carried_value_is_answered(gdp: Dataset) -> None:
    vintages = read_vintages()
    known: dict[tuple[str, str], Decimal] = {}  # latest value published so far, per (country, quarter)
    checked_published = checked_carried = 0
    for published in sorted(vintages):
        known.update(vintages[published])
        timeline = gdp.timeline(published).to_pylist()
        starts: dict[str, list[int]] = defaultdict(list)
        rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in timeline:
            starts[row["country"]].append(micros_from_datetime(row["valid_from"]))
            rows[row["country"]].append(row)
        for (country, quarter), value in known.items():
            # as_of(valid_at=quarter, known_at=published): the version whose valid range covers it.
            v = parse_timestamp(quarter)
            index = bisect.bisect_right(starts[country], v) - 1
            assert index >= 0, (country, quarter, published)
            row = rows[country][index]
            assert micros_from_datetime(row["valid_from"]) <= v < micros_from_datetime(row["valid_to"])
            assert row["real_gdp"] == value, (country, quarter, published)
            if (country, quarter) in vintages[published]:
                checked_published += 1
            else:
                checked_carried += 1
    assert checked_published == 47_980
    assert checked_carried > 0


def test_as_of_answers_the_published_value_directly(gdp: Dataset) -> None:
    vintages = read_vintages()
    for published in ("2009-01-01", "2009-04-01", "2024-10-01"):
        for (country, quarter), value in list(vintages[published].items())[::250]:
            row = gdp.as_of(quarter, published, keys=[country]).to_pylist()
            assert [r["real_gdp"] for r in row] == [value]
    # "US GDP for 2008 Q4, as known in March 2009 versus today"
    then = gdp.as_of("2008-10-01", "2009-03-31", keys=["US"]).to_pylist()[0]["real_gdp"]
    assert then == vintages["2009-01-01"][("US", "2008-10-01")]
    now = gdp.as_of("2008-10-01", keys=["US"]).to_pylist()[0]["real_gdp"]
    assert now == vintages["2024-10-01"][("US", "2008-10-01")]


def test_revision_history_and_vintage_diff(gdp: Dataset) -> None:
    history = [r for r in gdp.history("US").to_pylist() if r["valid_from"].date().isoformat() == "2008-10-01"]
    vintages = read_vintages()
    published = sorted(p for p in vintages if ("US", "2008-10-01") in vintages[p])
    assert [r["system_from"].date().isoformat() for r in history] == published
    assert [r["real_gdp"] for r in history] == [vintages[p][("US", "2008-10-01")] for p in published]
    diff = gdp.diff("2009-01-01", "2009-04-01", keys=["US"]).to_pylist()
    changed = {r["valid_from"].date().isoformat(): (r["real_gdp_before"], r["real_gdp_after"]) for r in diff}
    assert changed["2009-01-01"] == (None, vintages["2009-04-01"][("US", "2009-01-01")])  # a new quarter
    assert all(r["change"] in ("added", "changed") for r in diff)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def rates(lake: Lake) -> Dataset:
    return lake.create_dataset("rates", key=["curve"], columns={"rate": "double"})


def snapshot_id(dataset: Dataset) -> int | None:
    dataset.table.refresh()
    snapshot = dataset.table.table.current_snapshot()
    return None if snapshot is None else snapshot.snapshot_id


def test_system_time_applies_the_load_at_that_time(rates: Dataset, tmp_path: Path) -> None:
    report = rates.load([write(tmp_path / "a.csv", "curve,rate,valid_from\nSOFR,5.3,2024-01-01\n")], system_time="2024-01-02T18:00:00Z")
    assert report.system_time == parse_timestamp("2024-01-02T18:00:00Z")
    assert rates.stable_system_time() == report.system_time
    assert rates.as_of("2024-01-01", "2024-01-02T17:59:59.999999Z").num_rows == 0
    assert rates.as_of("2024-01-01", "2024-01-02T18:00:00Z").num_rows == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"system_time": "2024-01-02T18:00:00Z"},  # equal to the latest
        {"system_time": "2023-12-31"},  # before it
        {"system_time_column": "known"},  # a column whose earliest value is before it
    ],
)
def test_backward_system_time_is_refused_and_nothing_written(
    rates: Dataset, tmp_path: Path, kwargs: dict[str, str]
) -> None:
    rates.load([write(tmp_path / "a.csv", "curve,rate,valid_from\nSOFR,5.3,2024-01-01\n")], system_time="2024-01-02T18:00:00Z")
    before = snapshot_id(rates)
    text = "curve,rate,valid_from\nSOFR,5.4,2024-01-01\n"
    if "system_time_column" in kwargs:
        text = "curve,rate,valid_from,known\nSOFR,5.4,2024-01-01,2024-01-01\nSOFR,5.5,2024-01-03,2024-01-05\n"
    with pytest.raises(SystemTimeError, match="never rewritten"):
        rates.load([write(tmp_path / "b.csv", text)], **kwargs)
    assert snapshot_id(rates) == before


def test_future_system_time_is_refused(rates: Dataset, tmp_path: Path) -> None:
    with pytest.raises(SystemTimeError, match="in the future"):
        rates.load([write(tmp_path / "a.csv", "curve,rate,valid_from\nSOFR,5.3,2024-01-01\n")], system_time="2999-01-01")
    assert snapshot_id(rates) is None


def test_unparsable_system_time_column_is_refused_and_nothing_written(rates: Dataset, tmp_path: Path) -> None:
    source = write(
        tmp_path / "a.csv",
        "curve,rate,valid_from,known\nSOFR,5.3,2024-01-01,2024-01-02\nSOFR,5.4,2024-01-02,last tuesday\n",
    )
    with pytest.raises(SystemTimeError, match=r"a.csv:3: system-time column 'known'.*last tuesday"):
        rates.load([source], system_time_column="known")
    assert snapshot_id(rates) is None
    assert rates.quarantine().num_rows == 0


def test_each_system_time_is_one_transaction_in_ascending_order(rates: Dataset, tmp_path: Path) -> None:
    # Rows out of order in the file; within one system time, file order decides.
    source = write(
        tmp_path / "a.csv",
        "curve,rate,valid_from,valid_to,known\n"
        "SOFR,5.5,2024-01-01,,2024-01-10\n"
        "SOFR,5.3,2024-01-01,,2024-01-05\n"
        "SOFR,5.4,2024-01-01,,2024-01-10\n",
    )
    report = rates.load([source], system_time_column="known")
    assert report.transactions == 2
    history = rates.history("SOFR").to_pylist()
    assert [(r["rate"], r["system_from"].date().isoformat(), r["system_to"].date().isoformat()) for r in history] == [
        (5.3, "2024-01-05", "2024-01-10"),
        (5.4, "2024-01-10", "9999-12-31"),
    ]


def test_valid_to_column_maps_explicit_ranges(rates: Dataset, tmp_path: Path) -> None:
    source = write(tmp_path / "a.csv", "curve,rate,start,end\nSOFR,5.3,2024-01-01,2024-02-01\nSOFR,5.1,2024-03-01,\n")
    rates.load([source], valid_from_column="start", valid_to_column="end")
    ranges = [(r["valid_from"].date().isoformat(), r["valid_to"].date().isoformat()) for r in rates.timeline().to_pylist()]
    assert ranges == [("2024-01-01", "2024-02-01"), ("2024-03-01", "9999-12-31")]


def test_cli_backfill_refusal_is_one_line(cli: Callable[..., Any], tmp_path: Path) -> None:
    assert cli("dataset", "create", "rates", "--key", "curve", "--column", "rate:double").returncode == 0
    source = write(tmp_path / "a.csv", "curve,rate,valid_from,known\nSOFR,5.3,2024-01-01,soon\n")
    result = cli("load", "rates", str(source), "--system-time-column", "known")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "nothing was written" in result.stderr
