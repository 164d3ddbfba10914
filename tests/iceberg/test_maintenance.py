"""Maintenance changes no answer: compaction, snapshot expiry and orphan removal on a real table."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pyarrow as pa

from chronolake.iceberg import maintenance
from chronolake.iceberg.dataset import ROW_KIND
from chronolake.lake import Dataset, Lake

HEADER = "isin,price,valid_from,valid_to,op,event_id\n"


def loaded(lake: Lake, tmp_path: Path) -> tuple[Dataset, list[int]]:
    dataset = lake.create_dataset("prices", key=["isin"], columns={"price": "decimal(10,2)"}, buckets=4)
    files = [
        HEADER + "A,1,2024-01-01,,,e1\nB,2,2024-01-01,,,\nC,3,2024-01-01,2024-02-01,,\n",
        HEADER + "A,1.5,2024-01-10,,,\nB,,2024-01-05,,delete,\nA,1,2024-01-01,,,e1\n",
        HEADER + "A,1.2,2024-01-03,2024-01-04,,\nC,4,2024-01-15,,,\nB,2.5,2024-01-20,,,\n",
    ]
    times = []
    for number, text in enumerate(files):
        path = tmp_path / f"f{number}.csv"
        path.write_text(text)
        report = dataset.load([path])
        assert report.system_time is not None
        times.append(report.system_time)
    return dataset, times


def answers(dataset: Dataset, times: list[int]) -> list[object]:
    out: list[object] = []
    for t in times:
        out.append(dataset.timeline(t).to_pylist())
        for day in ("2024-01-01", "2024-01-03", "2024-01-12", "2024-01-25"):
            out.append(dataset.as_of(day, t).to_pylist())
    out += [dataset.history(k).to_pylist() for k in ("A", "B", "C")]
    out.append(dataset.diff(times[0], times[-1]).to_pylist())
    return out


def test_compaction_changes_no_answer_and_drops_superseded_twins(lake: Lake, tmp_path: Path) -> None:
    dataset, times = loaded(lake, tmp_path)
    before = answers(dataset, times)
    stable = dataset.stable_system_time()
    report = maintenance.compact(dataset.table)
    assert report.rows_after < report.rows_before
    assert answers(dataset, times) == before
    assert dataset.stable_system_time() == stable
    rows = dataset.table.scan(None, ["isin", "valid_from", "system_from", ROW_KIND]).to_pylist()
    kinds: dict[tuple[object, ...], list[str]] = {}
    for row in rows:
        if row[ROW_KIND] in ("open", "closed"):
            kinds.setdefault((row["isin"], row["valid_from"], row["system_from"]), []).append(row[ROW_KIND])
    assert sorted(set(map(tuple, kinds.values()))) == [("closed",), ("open",)], "one row per version after compaction"
    # Loading after compaction continues from the compacted state.
    (tmp_path / "more.csv").write_text(HEADER + "A,9,2024-01-12,,,\n")
    dataset.load([tmp_path / "more.csv"])
    assert [r["price"] for r in dataset.as_of("2024-01-12").to_pylist() if r["isin"] == "A"] == [9]


def test_expiry_keeps_current_and_flink_snapshots_and_loses_no_history(lake: Lake, tmp_path: Path) -> None:
    dataset, times = loaded(lake, tmp_path)
    # A snapshot as the Iceberg Flink committer would write it (its summary names the checkpoint).
    table = dataset.table.table
    table.append(
        pa.Table.from_pylist([], schema=table.schema().as_arrow()),
        snapshot_properties={maintenance.FLINK_CHECKPOINT_PROPERTY: "42", "chronolake.stable-system-time": str(times[-1])},
    )
    dataset.table.refresh()
    flink_snapshot = dataset.table.table.current_snapshot()
    (tmp_path / "later.csv").write_text(HEADER + "D,1,2024-01-01,,,\n")
    dataset.load([tmp_path / "later.csv"])
    before = answers(dataset, times)
    expired = maintenance.expire_snapshots(dataset.table, maintenance.utc_now() + timedelta(seconds=1))
    dataset.table.refresh()
    remaining = {s.snapshot_id for s in dataset.table.table.metadata.snapshots}
    assert expired >= 3
    assert flink_snapshot is not None and flink_snapshot.snapshot_id in remaining
    assert dataset.table.table.current_snapshot().snapshot_id in remaining
    assert answers(dataset, times) == before


def test_orphan_removal_deletes_only_old_unreferenced_files(lake: Lake, tmp_path: Path) -> None:
    dataset, times = loaded(lake, tmp_path)
    maintenance.compact(dataset.table)
    maintenance.expire_snapshots(dataset.table, maintenance.utc_now() + timedelta(seconds=1))
    data_dir = Path(dataset.table.table.location().removeprefix("file://")) / "data"
    stray_old = data_dir / "stray-old.parquet"
    stray_new = data_dir / "stray-new.parquet"
    stray_old.write_bytes(b"not referenced")
    stray_new.write_bytes(b"not referenced, but maybe a writer's uncommitted file")
    an_hour_ago = time.time() - 3600
    os.utime(stray_old, (an_hour_ago, an_hour_ago))
    before = answers(dataset, times)
    dry = maintenance.remove_orphan_files(dataset.table, timedelta(minutes=30), dry_run=True)
    assert str(stray_old) in dry and stray_old.exists()
    # Files of expired snapshots are old enough only after the grace period: age them too.
    for path in data_dir.rglob("*.parquet"):
        os.utime(path, (an_hour_ago, an_hour_ago))
    os.utime(stray_new, None)
    removed = maintenance.remove_orphan_files(dataset.table, timedelta(minutes=30))
    assert str(stray_old) in removed and not stray_old.exists()
    assert stray_new.exists()
    assert answers(dataset, times) == before
