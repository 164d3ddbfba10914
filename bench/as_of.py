"""As-of query benchmark: chronolake's reads beside a plain pyiceberg scan of the same table.

    .venv/tools/bin/python bench/as_of.py                     # lake from 1M assertions over 100k keys
    .venv/tools/bin/python bench/as_of.py --rows 20000 --keys 2000   # smoke

The lake is built once (one ``load`` per arrival day of the generated file, so later days close
versions and the table holds closed twins) under ``bench/out/`` and reused by later runs. Every query
then runs in a fresh process (peak RSS per query, see ``bench/child.py``), ``--repeat`` times; the table
shows the first (cold: manifests and files not yet cached by the process) and the best time.
``stored rows/s`` is the table's row count divided by the best time (how fast the query gets through
the table); ``result rows`` is what it returns. Known-at is the stable system time (the latest load).

``scan``             baseline: ``Table.scan().to_arrow()`` of the whole table, no filter, no grouping
``as_of``            ``Dataset.as_of(valid_at)`` for every key
``as_of-1-key``      ``Dataset.as_of(valid_at, keys=[one])``
``as_of-1000-keys``  ``Dataset.as_of(valid_at, keys=[1000 keys])``
``timeline``         ``Dataset.timeline()``: every current version of every key
``duckdb-as_of``     the shipped DuckDB SQL ``as_of`` over ``iceberg_scan(metadata)``
``duckdb-timeline``  the shipped DuckDB SQL ``timeline``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import batch_load  # noqa: E402
import child  # noqa: E402
import generate  # noqa: E402

QUERIES = ("scan", "as_of", "as_of-1-key", "as_of-1000-keys", "timeline", "duckdb-as_of", "duckdb-timeline")
VALID_AT = "2024-01-05T12:00:00Z"


def _keys(count: int, keys: int) -> list[str]:
    step = max(1, keys // count)
    return [generate.instrument(i) for i in range(0, keys, step)][:count]


def run_query(name: str, home: Path, keys: int, repeat: int) -> dict[str, Any]:
    from chronolake.iceberg.sql import Dialect, duckdb_connection, duckdb_table_reference, render, run_duckdb
    from chronolake.lake import Lake, micros

    dataset = Lake(home).dataset(batch_load.DATASET)
    table = dataset.table.table
    snapshot = table.current_snapshot()
    stored = int(snapshot.summary.additional_properties.get("total-records", 0)) if snapshot and snapshot.summary else 0
    stable = dataset.stable_system_time()
    assert stable is not None
    connection = duckdb_connection() if name.startswith("duckdb") else None

    def once() -> Any:
        if name == "scan":
            return table.scan().to_arrow()
        if name == "as_of":
            return dataset.as_of(VALID_AT)
        if name == "as_of-1-key":
            return dataset.as_of(VALID_AT, keys=_keys(1, keys))
        if name == "as_of-1000-keys":
            return dataset.as_of(VALID_AT, keys=_keys(1000, keys))
        if name == "timeline":
            return dataset.timeline()
        query = name.removeprefix("duckdb-")
        location = dataset.table.table.metadata_location
        sql = render(
            query, dataset.spec, duckdb_table_reference(location), Dialect.duckdb,
            valid_at=micros(VALID_AT) if query == "as_of" else None, known_at=stable,
        )
        return run_duckdb(sql, connection)

    rss_before = child.rss_mb()
    times = []
    result = None
    for _ in range(repeat):
        started = time.perf_counter()
        result = once()
        times.append(time.perf_counter() - started)
    assert result is not None
    fingerprint = None
    if name != "scan":
        import pyarrow.compute as pc

        # Enough to see that the Python and SQL answers agree without printing them.
        fingerprint = [result.num_rows, str(pc.sum(result["price"]).as_py()), pc.count_distinct(result["instrument"]).as_py()]
    return {
        "case": name,
        "stored_rows": stored,
        "result_rows": result.num_rows,
        "first_seconds": times[0],
        "best_seconds": min(times),
        "rss_before_mb": round(rss_before, 1),
        "fingerprint": fingerprint,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--queries", default=",".join(QUERIES), help=f"comma-separated, from {', '.join(QUERIES)}")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--commit", help="benchmark this commit (git archive) instead of the working tree")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--file", action="append", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case == "setup":
        result = batch_load.case_chronolake([Path(p) for p in args.file], args.home, None)
        result["case"] = "setup"
        child.report(result)
        return
    if args.case:
        child.report(run_query(args.case, args.home, args.keys, args.repeat))
        return

    if args.commit:
        child.use_commit(args.commit)
    info = child.machine()
    home = child.OUT / f"asof_lake_{args.rows}_{args.keys}_s{args.seed}"
    if not (home / "catalog.db").exists():
        files, shape = generate.ensure_daily(args.rows, args.keys, args.seed)
        print(f"building {home.name}: {len(files)} daily loads of {shape.rows:,} assertions ...", flush=True)
        arguments = ["--case", "setup", "--home", str(home)] + [a for f in files for a in ("--file", str(f))]
        setup = child.run(Path(__file__), arguments)
        print(f"  {setup['seconds']:.1f} s, {setup['table_rows']:,} stored rows, {setup['data_files']} data files", flush=True)
    results = []
    for name in [q.strip() for q in args.queries.split(",") if q.strip()]:
        print(f"running {name} ...", flush=True)
        arguments = ["--case", name, "--home", str(home), "--keys", str(args.keys), "--repeat", str(args.repeat)]
        result = child.run(Path(__file__), arguments)
        result["stored_rows_per_second"] = result["stored_rows"] / result["best_seconds"]
        results.append(result)
        print(f"  {result['result_rows']:,} rows, best {result['best_seconds']:.3f} s, peak RSS {result['peak_rss_mb']:,.0f} MiB", flush=True)
    print()
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2))


def render(results: list[dict[str, Any]]) -> str:
    rows = [
        [
            r["case"],
            f"{r['stored_rows']:,}",
            f"{r['result_rows']:,}",
            f"{r['first_seconds']:.3f}",
            f"{r['best_seconds']:.3f}",
            f"{r['stored_rows_per_second']:,.0f}",
            f"{r['peak_rss_mb']:,.0f}",
        ]
        for r in results
    ]
    lines = [
        child.markdown_table(
            ["query", "stored rows", "result rows", "first s", "best s", "stored rows/s", "peak RSS MiB"], rows
        ),
        "",
    ]
    by_case = {r["case"]: r for r in results}
    scan = by_case.get("scan")
    if scan:
        for r in results:
            if r["case"] != "scan":
                lines.append(f"- {r['case']}: {r['best_seconds'] / scan['best_seconds']:.2f}x the time of a plain scan")
    for python, sql in (("as_of", "duckdb-as_of"), ("timeline", "duckdb-timeline")):
        if python in by_case and sql in by_case:
            same = by_case[python]["fingerprint"] == by_case[sql]["fingerprint"]
            lines.append(f"- {python} and {sql} agree (rows, sum of price, distinct keys): {same}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
