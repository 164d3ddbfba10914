"""Batch-load benchmark: chronolake ``load`` beside plain pyiceberg ``append`` and ``upsert`` of the same rows.

    .venv/tools/bin/python bench/batch_load.py                       # 1M assertions over 100k keys
    .venv/tools/bin/python bench/batch_load.py --rows 20000 --keys 2000 --upsert-composite-rows 2000   # smoke

Every case runs in a fresh process (see ``bench/child.py``) and is timed from "file on disk" to
"committed snapshot": reading and converting the rows is part of each case. The cases:

``chronolake``        one ``Dataset.load`` of the whole file into a fresh lake: one transaction.
``chronolake-daily``  the same rows as one file per arrival day, one ``load`` each (transactions after
                      the first read the keys' state back from the table and close versions).
``append``            pyarrow reads the CSV with the column types, one ``Table.append`` (no semantics).
``upsert``            ``Table.upsert`` keyed on ``(instrument, valid_from)``, in batches of
                      ``--upsert-batch`` rows in file order (pyiceberg refuses a batch that repeats a key,
                      so within a batch the last row of a key wins, as it would in the file); the join
                      key is one derived column ``instrument|valid_from`` because pyiceberg turns a
                      composite key into an ``Or`` of one ``And`` per row, which is far slower (next case).
``upsert-composite``  the same with ``join_cols=["instrument", "valid_from"]`` on the first
                      ``--upsert-composite-rows`` rows only (it does not finish on 1M rows here).

Upsert is not bitemporal (it overwrites, so nothing can be reproduced as of an earlier time); it is the
baseline issue 2 asks for. The baseline tables have chronolake's payload columns and zstd compression and
are unpartitioned unless ``--partitioned`` gives them chronolake's bucket(16) layout (upsert is then
several times slower).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import child  # noqa: E402
import generate  # noqa: E402

DATASET = "prices"
KEY = ["instrument"]
COLUMNS = {"price": "decimal(18,6)", "currency": "string"}


# -- the cases (run in the child process) ---------------------------------------------------------


def case_chronolake(paths: list[Path], home: Path, profile: Path | None, processes: int | None) -> dict[str, Any]:
    from chronolake.lake import Lake

    lake = Lake(home)
    dataset = lake.create_dataset(DATASET, key=KEY, columns=COLUMNS)
    rss_before = child.rss_mb()
    reports = []
    profiler = None
    if profile is not None:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    started = time.perf_counter()
    for path in paths:
        reports.append(dataset.load([path], processes=processes))
    seconds = time.perf_counter() - started
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(str(profile))
    snapshot = dataset.table.table.current_snapshot()
    summary = snapshot.summary.additional_properties if snapshot and snapshot.summary else {}
    return {
        "rows": sum(r.rows for r in reports),
        "applied": sum(r.applied for r in reports),
        "quarantined": sum(r.quarantined for r in reports),
        "transactions": len(reports),
        "versions_opened": sum(r.versions_opened for r in reports),
        "versions_closed": sum(r.versions_closed for r in reports),
        "table_rows": int(summary.get("total-records", 0)),
        "data_files": int(summary.get("total-data-files", 0)),
        "seconds": seconds,
        "rss_before_mb": round(rss_before, 1),
    }


def _plain_table(home: Path, extra_key: bool, partitioned: bool) -> Any:
    from pyiceberg.catalog.sql import SqlCatalog
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.schema import Schema
    from pyiceberg.transforms import BucketTransform
    from pyiceberg.types import DecimalType, NestedField, StringType, TimestamptzType

    catalog = SqlCatalog("bench", uri=f"sqlite:///{home / 'catalog.db'}", warehouse=(home / "warehouse").as_uri())
    catalog.create_namespace("bench")
    fields = [
        NestedField(1, "instrument", StringType(), required=False),
        NestedField(2, "price", DecimalType(18, 6), required=False),
        NestedField(3, "currency", StringType(), required=False),
        NestedField(4, "valid_from", TimestamptzType(), required=False),
        NestedField(5, "valid_to", TimestamptzType(), required=False),
        NestedField(6, "op", StringType(), required=False),
    ]
    if extra_key:
        fields.append(NestedField(7, "version_key", StringType(), required=False))
    # Unpartitioned by default: upsert is several times slower on chronolake's bucket(16) layout.
    partitioning = (
        PartitionSpec(PartitionField(1, 1000, BucketTransform(16), "instrument_bucket")) if partitioned else PartitionSpec()
    )
    return catalog.create_table(
        "bench.prices",
        schema=Schema(*fields),
        partition_spec=partitioning,
        properties={"format-version": "2", "write.parquet.compression-codec": "zstd"},
    )


def _read_typed(path: Path, extra_key: bool) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    utc = pa.timestamp("us", tz="UTC")
    raw = pacsv.read_csv(
        path,
        convert_options=pacsv.ConvertOptions(
            column_types={
                "instrument": pa.string(),
                "price": pa.decimal128(18, 6),
                "currency": pa.string(),
                "valid_from": pa.timestamp("us"),
                "valid_to": pa.timestamp("us"),
                "op": pa.string(),
            }
        ),
    )
    columns = {name: raw[name].cast(utc) if name.startswith("valid_") else raw[name] for name in raw.column_names}
    if extra_key:
        columns["version_key"] = pc.binary_join_element_wise(
            raw["instrument"], pc.cast(raw["valid_from"], pa.string()), "|"
        )
    return pa.table(columns)


def case_append(path: Path, home: Path, partitioned: bool) -> dict[str, Any]:
    table = _plain_table(home, extra_key=False, partitioned=partitioned)
    rss_before = child.rss_mb()
    started = time.perf_counter()
    rows = _read_typed(path, extra_key=False)
    table.append(rows)
    seconds = time.perf_counter() - started
    summary = table.current_snapshot().summary.additional_properties
    return {
        "rows": rows.num_rows,
        "table_rows": int(summary.get("total-records", 0)),
        "data_files": int(summary.get("total-data-files", 0)),
        "transactions": 1,
        "seconds": seconds,
        "rss_before_mb": round(rss_before, 1),
    }


def case_upsert(path: Path, home: Path, limit: int, batch: int, composite: bool, partitioned: bool) -> dict[str, Any]:
    import pyarrow as pa

    table = _plain_table(home, extra_key=not composite, partitioned=partitioned)
    join = ["instrument", "valid_from"] if composite else ["version_key"]
    rss_before = child.rss_mb()
    started = time.perf_counter()
    rows = _read_typed(path, extra_key=not composite)
    if limit:
        rows = rows.slice(0, limit)
    updated = inserted = batches = 0
    per_batch: list[float] = []
    for start in range(0, rows.num_rows, batch):
        chunk = rows.slice(start, batch)
        # The last row of a key in the batch wins, as it would applied in file order.
        numbered = chunk.append_column("__row", pa.array(range(chunk.num_rows), pa.int64()))
        last = numbered.group_by(join, use_threads=False).aggregate([("__row", "max")])["__row_max"]
        chunk = chunk.take(last.sort())
        batch_started = time.perf_counter()
        result = table.upsert(chunk, join_cols=join)
        per_batch.append(round(time.perf_counter() - batch_started, 2))
        updated += result.rows_updated
        inserted += result.rows_inserted
        batches += 1
    seconds = time.perf_counter() - started
    summary = table.current_snapshot().summary.additional_properties
    return {
        "rows": rows.num_rows,
        "rows_updated": updated,
        "rows_inserted": inserted,
        "table_rows": int(summary.get("total-records", 0)),
        "data_files": int(summary.get("total-data-files", 0)),
        "transactions": batches,
        "batch_seconds": per_batch,
        "seconds": seconds,
        "rss_before_mb": round(rss_before, 1),
    }


def run_case(args: argparse.Namespace) -> None:
    home = Path(tempfile.mkdtemp(prefix=f"bench-{args.case}-", dir=args.work))
    try:
        paths = [Path(p) for p in args.file]
        if args.case in ("chronolake", "chronolake-daily"):
            result = case_chronolake(paths, home, args.profile, args.processes)
        elif args.case == "append":
            result = case_append(paths[0], home, args.partitioned)
        else:
            composite = args.case == "upsert-composite"
            result = case_upsert(paths[0], home, args.limit, args.batch, composite, args.partitioned)
        result["case"] = args.case
        child.report(result)
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)


# -- the driver ------------------------------------------------------------------------------------

CASES = ("chronolake", "chronolake-daily", "append", "upsert", "upsert-composite")
NOTES = {
    "chronolake": "1 load = 1 transaction",
    "chronolake-daily": "1 load per arrival day",
    "append": "no semantics, 1 append",
    "upsert": "batches of {batch:,}, key instrument|valid_from",
    "upsert-composite": "first {composite:,} rows, batches of {composite_batch:,}, join_cols=[instrument, valid_from]",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--upsert-batch", type=int, default=100_000, help="rows per upsert call (upsert)")
    parser.add_argument("--upsert-rows", type=int, default=0, help="upsert only the first N rows (0 = all)")
    parser.add_argument("--upsert-composite-rows", type=int, default=10_000)
    parser.add_argument("--upsert-composite-batch", type=int, default=5_000)
    parser.add_argument("--partitioned", action="store_true", help="baseline tables bucket(16) on instrument, like chronolake's")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the chronolake case here")
    parser.add_argument("--processes", type=int, help="processes per chronolake load (default: the load's own choice)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--commit", help="benchmark this commit (git archive) instead of the working tree")
    parser.add_argument("--work", type=Path, default=child.OUT, help="where the cases' lakes live (deleted after)")
    # Child-process mode.
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--file", action="append", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.case:
        run_case(args)
        return

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if args.commit:
        child.use_commit(args.commit)
    info = child.machine()
    path, shape = generate.ensure(args.rows, args.keys, args.seed)
    daily, _ = generate.ensure_daily(args.rows, args.keys, args.seed) if "chronolake-daily" in cases else ([], shape)
    print(f"input: {path.name} ({path.stat().st_size / 2**20:.1f} MiB): {shape.rows:,} rows, {shape.keys:,} keys, "
          f"{shape.days} days, {shape.corrections:,} corrections ({shape.corrections_with_valid_to:,} with valid_to), "
          f"{shape.deletes:,} deletes", flush=True)
    results: list[dict[str, Any]] = []
    for case in cases:
        arguments = ["--case", case, "--work", str(args.work)]
        if case == "chronolake-daily":
            files = daily
        else:
            files = [path]
        for file in files:
            arguments += ["--file", str(file)]
        if case in ("append", "upsert", "upsert-composite") and args.partitioned:
            arguments.append("--partitioned")
        if case == "chronolake" and args.profile:
            arguments += ["--profile", str(args.profile)]
        if case.startswith("chronolake") and args.processes:
            arguments += ["--processes", str(args.processes)]
        if case == "upsert":
            arguments += ["--limit", str(args.upsert_rows), "--batch", str(args.upsert_batch)]
        if case == "upsert-composite":
            arguments += ["--limit", str(args.upsert_composite_rows), "--batch", str(args.upsert_composite_batch)]
        print(f"running {case} ...", flush=True)
        result = child.run(Path(__file__), arguments)
        result["rows_per_second"] = result["rows"] / result["seconds"]
        result["note"] = NOTES[case].format(
            batch=args.upsert_batch, composite=args.upsert_composite_rows, composite_batch=args.upsert_composite_batch
        )
        if case.startswith("chronolake") and args.processes:
            result["note"] += f", --processes {args.processes}"
        results.append(result)
        print(f"  {result['rows']:,} rows in {result['seconds']:.2f} s = {result['rows_per_second']:,.0f} rows/s, "
              f"peak RSS {result['peak_rss_mb']:,.0f} MiB", flush=True)

    print()
    print(render(info, shape, path, results))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "shape": shape.__dict__, "results": results}, indent=2, default=str))


def render(info: dict[str, str], shape: generate.Shape, path: Path, results: list[dict[str, Any]]) -> str:
    by_case = {r["case"]: r for r in results}
    rows = []
    for r in results:
        rows.append(
            [
                r["case"],
                f"{r['rows']:,}",
                f"{r['seconds']:.2f}",
                f"{r['rows_per_second']:,.0f}",
                f"{r['peak_rss_mb']:,.0f}" + (f" (+{r['peak_rss_children_mb']:,.0f} per load process)" if r.get("peak_rss_children_mb") else ""),
                f"{r['rss_before_mb']:,.0f}",
                f"{r.get('table_rows', 0):,}",
                r["note"],
            ]
        )
    table = child.markdown_table(
        ["case", "input rows", "seconds", "rows/s", "peak RSS MiB", "RSS before MiB", "rows in table", "what"], rows
    )
    lines = [table, ""]
    base = by_case.get("chronolake")
    if base:
        for other in ("append", "upsert", "upsert-composite", "chronolake-daily"):
            if other in by_case:
                ratio = base["rows_per_second"] / by_case[other]["rows_per_second"]
                lines.append(f"- chronolake rows/s ÷ {other} rows/s: {ratio:.2f}x")
        lines.append(
            f"- chronolake: {base['versions_opened']:,} versions opened, {base['versions_closed']:,} closed, "
            f"{base['quarantined']:,} quarantined"
        )
    daily = by_case.get("chronolake-daily")
    if daily:
        lines.append(
            f"- chronolake-daily: {daily['transactions']} transactions, {daily['versions_opened']:,} versions opened, "
            f"{daily['versions_closed']:,} closed"
        )
    for name in ("upsert", "upsert-composite"):
        if name in by_case:
            r = by_case[name]
            lines.append(
                f"- {name}: {r['rows_updated']:,} updated, {r['rows_inserted']:,} inserted; seconds per batch "
                f"{r['batch_seconds']}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
