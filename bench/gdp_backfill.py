"""Load time of the real GDP vintages backfill (issue 5), beside a plain pyiceberg append of the file.

    .venv/tools/bin/python bench/gdp_backfill.py [--repeat 3]

Each run is a fresh process and a fresh lake: chronolake loads ``shared/data/gdp_vintages.csv.gz``
with ``--system-time-column published --valid-from-column quarter --period quarter`` (89 transactions
in one atomic commit); the baseline reads the same file with pyarrow and appends it unchanged.
Peak memory is ``ru_maxrss`` of the process.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GDP = Path(__file__).resolve().parents[2] / "shared" / "data" / "gdp_vintages.csv.gz"


def run_case(case: str) -> dict[str, float]:
    home = tempfile.mkdtemp(prefix="gdp-bench-")
    started = time.perf_counter()
    if case == "chronolake":
        from chronolake.lake import Lake

        dataset = Lake(home).create_dataset("gdp", key=["country"], columns={"real_gdp": "decimal(20,6)"})
        started = time.perf_counter()
        report = dataset.load([GDP], system_time_column="published", valid_from_column="quarter", period="quarter")
        rows, extra = report.rows, {"transactions": report.transactions, "versions": report.versions_opened + report.versions_closed}
    else:
        import pyarrow.csv as pacsv
        from pyiceberg.catalog import load_catalog

        catalog = load_catalog("b", type="sql", uri=f"sqlite:///{home}/c.db", warehouse=f"file://{home}/w")
        catalog.create_namespace("b")
        started = time.perf_counter()
        table = pacsv.read_csv(GDP)
        catalog.create_table("b.gdp", schema=table.schema).append(table)
        rows, extra = table.num_rows, {}
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": rows, "seconds": seconds, "peak_rss_mib": peak, **extra}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    for case in ("chronolake", "append"):
        results = []
        for _ in range(args.repeat):
            out = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        best = min(results, key=lambda r: r["seconds"])
        print(
            f"{case:<11} {best['rows']:>7,} rows  best {best['seconds']:.2f} s of {[round(r['seconds'], 2) for r in results]}"
            f"  {best['rows'] / best['seconds']:>10,.0f} rows/s  peak RSS {best['peak_rss_mib']:.0f} MiB"
            + (f"  ({best['transactions']:.0f} transactions, {best['versions']:,.0f} version rows)" if "transactions" in best else "")
        )


if __name__ == "__main__":
    main()
