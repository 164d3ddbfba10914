"""The ``chronolake`` command line. Errors a user can cause print as one line, without a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

from chronolake.iceberg.exceptions import ChronolakeError
from chronolake.iceberg.sql import Dialect
from chronolake.iceberg.temporal import format_micros
from chronolake.output import Format, print_rows
from chronolake.scaling_lambda.cli import app as scaling_app
from chronolake.streaming.cli import produce, publish_files, stream

if TYPE_CHECKING:
    from chronolake.lake import Dataset, Lake

# pyiceberg, pyarrow and DuckDB take a second or more to import: commands import what they use, so
# `chronolake --help` and usage errors answer at once.


def _lake() -> Lake:
    from chronolake.lake import Lake

    return Lake()

app = typer.Typer(
    help="chronolake: a bitemporal lakehouse on Apache Iceberg.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
dataset_app = typer.Typer(help="Create and inspect datasets.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")

err = Console(stderr=True)

FormatOption = Annotated[Format, typer.Option("--format", "-f", help="Output format.")]
KeyOption = Annotated[
    Optional[list[str]],
    typer.Option("--key", "-k", help="Only this key (repeatable); a multi-column key as comma-separated parts."),
]
KnownAtOption = Annotated[
    Optional[str], typer.Option("--known-at", help="System time (ISO-8601); default: the stable system time.")
]
UnstableOption = Annotated[
    bool, typer.Option("--allow-unstable", help="Allow a known-at time after the stable system time.")
]


def _dataset(name: str) -> Dataset:
    return _lake().dataset(name)


def _keys(dataset: Dataset, keys: list[str] | None) -> list[object] | None:
    if keys is None or len(dataset.spec.key) == 1:
        return list(keys) if keys is not None else None
    return [tuple(part.strip() for part in key.split(",")) for key in keys]


def _show_stable(result_stable: bytes | None) -> None:
    if result_stable is not None:
        err.print(f"[dim]answered under stable system time {result_stable.decode()}[/dim]")


@dataset_app.command("create")
def dataset_create(
    name: Annotated[Optional[str], typer.Argument(help="Dataset name (omit with --file).")] = None,
    key: Annotated[Optional[list[str]], typer.Option("--key", help="Key column, COL or COL:TYPE (repeatable).")] = None,
    column: Annotated[
        Optional[list[str]],
        typer.Option("--column", help="Payload column COL:TYPE; TYPE: string, long, double, decimal(p,s), date, timestamp, boolean."),
    ] = None,
    buckets: Annotated[Optional[int], typer.Option(help="Key buckets of the partition spec (default 16).")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", help="Create every dataset declared in this YAML file.")] = None,
) -> None:
    """Create a dataset from flags, or every dataset in a declaration file."""
    lake = _lake()
    if file is not None:
        if name or key or column:
            raise ChronolakeError("give either --file or NAME with --key/--column, not both")
        for dataset, created in lake.create_from_file(file):
            typer.echo(f"{'created' if created else 'exists '} {dataset.name}")
        return
    if not name or not key:
        raise ChronolakeError("dataset create needs NAME and at least one --key (or --file)")
    existed = name in lake.datasets()
    dataset = lake.create_dataset(name, key=key, columns=column or [], buckets=buckets)
    typer.echo(f"{'exists ' if existed else 'created'} {dataset.name}")


@dataset_app.command("list")
def dataset_list() -> None:
    """List datasets with their stable system time."""
    lake = _lake()
    for name in lake.datasets():
        stable = lake.dataset(name).stable_system_time()
        typer.echo(f"{name}\t{format_micros(stable) if stable is not None else '-'}")


@dataset_app.command("show")
def dataset_show(name: str) -> None:
    """Show a dataset's declaration."""
    spec = _dataset(name).spec
    typer.echo(f"dataset {spec.name}")
    typer.echo("  key:     " + ", ".join(f"{c.name}:{c.type}" for c in spec.key))
    typer.echo("  columns: " + ", ".join(f"{c.name}:{c.type}" for c in spec.columns))
    typer.echo(f"  partition: bucket({spec.buckets}, {spec.key[0].name})")


@app.command()
def load(
    name: str,
    files: Annotated[list[Path], typer.Argument(help="CSV, JSONL or Parquet files, optionally .gz, in order.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the outcome.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    system_time: Annotated[
        Optional[str], typer.Option("--system-time", help="Backfill: apply the load at this known past system time.")
    ] = None,
    system_time_column: Annotated[
        Optional[str],
        typer.Option("--system-time-column", help="Backfill: one transaction per distinct value of this column, ascending."),
    ] = None,
    valid_from_column: Annotated[
        Optional[str], typer.Option("--valid-from-column", help="The file's column holding valid_from.")
    ] = None,
    valid_to_column: Annotated[
        Optional[str], typer.Option("--valid-to-column", help="The file's column holding valid_to.")
    ] = None,
    period: Annotated[
        Optional[str],
        typer.Option("--period", help="Rows without valid_to cover one period: day, week, month, quarter or year."),
    ] = None,
    processes: Annotated[
        Optional[int], typer.Option("--processes", min=1, help="Processes for a large load (default: 2 on 2+ cores).")
    ] = None,
    via_stream: Annotated[
        bool, typer.Option("--via-stream", help="Publish to the streaming job that owns the dataset instead of loading.")
    ] = False,
) -> None:
    """Load assertion files into a dataset in one atomic commit (one transaction, or one per system time)."""
    if via_stream:
        if system_time or system_time_column or period or processes:
            raise ChronolakeError("--via-stream takes no --system-time, --system-time-column, --period or --processes: the job stamps system time")
        publish_files(name, files, as_json=as_json, valid_from_column=valid_from_column, valid_to_column=valid_to_column)
        return
    dataset = _dataset(name)
    report = dataset.load(
        files,
        system_time=system_time,
        system_time_column=system_time_column,
        valid_from_column=valid_from_column,
        valid_to_column=valid_to_column,
        period=period,
        processes=processes,
        show_progress=not quiet and sys.stderr.isatty(),
    )
    if as_json:
        typer.echo(json.dumps(report.to_json()))
        return
    for file in report.files:
        detail = (
            f"{file.rows} rows: {file.applied} applied, {file.quarantined} quarantined, {file.duplicates} duplicates"
            if file.status == "loaded"
            else file.status + (f" at {format_micros(file.loaded_at)}" if file.loaded_at else "")
        )
        typer.echo(f"{file.path}: {detail}")
    if report.system_time is None:
        typer.echo("nothing to load: every file is already in the ledger")
        return
    rate = report.rows / report.seconds if report.seconds else 0.0
    if report.transactions > 1 and report.first_system_time is not None:
        typer.echo(
            f"{report.transactions} transactions from {format_micros(report.first_system_time)} "
            f"to {format_micros(report.system_time)}"
        )
    typer.echo(
        f"committed at system time {format_micros(report.system_time)}: {report.versions_opened} versions opened, "
        f"{report.versions_closed} closed ({report.rows} rows in {report.seconds:.2f}s, {rate:,.0f} rows/s)"
    )
    if report.quarantined:
        typer.echo(f"{report.quarantined} rows quarantined: chronolake quarantine {name}")


@app.command()
def query(
    name: str,
    valid_at: Annotated[str, typer.Option("--valid-at", help="Valid time (ISO-8601).")],
    known_at: KnownAtOption = None,
    key: KeyOption = None,
    fmt: FormatOption = Format.table,
    allow_unstable: UnstableOption = False,
) -> None:
    """What was true at --valid-at, as known at --known-at."""
    dataset = _dataset(name)
    result = dataset.as_of(valid_at, known_at, keys=_keys(dataset, key), allow_unstable=allow_unstable)
    print_rows(result, fmt, title=f"{name} valid at {valid_at}, as known at {known_at or 'stable'}")
    if fmt is Format.table:
        _show_stable((result.schema.metadata or {}).get(b"chronolake.stable_system_time"))


@app.command()
def timeline(
    name: str,
    known_at: KnownAtOption = None,
    key: KeyOption = None,
    fmt: FormatOption = Format.table,
    allow_unstable: UnstableOption = False,
) -> None:
    """Every version current at --known-at (all valid times)."""
    dataset = _dataset(name)
    result = dataset.timeline(known_at, keys=_keys(dataset, key), allow_unstable=allow_unstable)
    print_rows(result, fmt, title=f"{name} as known at {known_at or 'stable'}")


@app.command()
def history(
    name: str,
    key: Annotated[list[str], typer.Argument(help="The key (one value per key column).")],
    known_at: KnownAtOption = None,
    fmt: FormatOption = Format.table,
    allow_unstable: UnstableOption = False,
) -> None:
    """Every version of one key with its four times."""
    result = _dataset(name).history(tuple(key), known_at, allow_unstable=allow_unstable)
    print_rows(result, fmt, title=f"history of {name} {' '.join(key)}")


@app.command()
def diff(
    name: str,
    since: Annotated[str, typer.Option("--from", help="The system time of the earlier report.")],
    until: Annotated[Optional[str], typer.Option("--to", help="The later system time (default: stable).")] = None,
    key: KeyOption = None,
    fmt: FormatOption = Format.table,
    allow_unstable: UnstableOption = False,
) -> None:
    """What changed between two system times: added, removed, changed, per key and valid range."""
    dataset = _dataset(name)
    result = dataset.diff(since, until, keys=_keys(dataset, key), allow_unstable=allow_unstable)
    print_rows(result, fmt, title=f"{name}: changes known between {since} and {until or 'stable'}")


@app.command()
def stable(name: str) -> None:
    """The dataset's stable system time: every transaction at or before it is committed."""
    value = _dataset(name).stable_system_time()
    typer.echo(format_micros(value) if value is not None else "-")


@app.command()
def quarantine(name: str, fmt: FormatOption = Format.table) -> None:
    """Quarantined rows of committed loads, with file, line and reason."""
    print_rows(_dataset(name).quarantine(), fmt, title=f"{name} quarantine")


@app.command("sql")
def sql_command(
    name: str,
    query_name: Annotated[str, typer.Option("--query", help="as_of, timeline, history or stable.")] = "as_of",
    dialect: Annotated[Dialect, typer.Option(help="SQL dialect.")] = Dialect.athena,
    valid_at: Annotated[Optional[str], typer.Option("--valid-at", help="Valid time (as_of).")] = None,
    known_at: KnownAtOption = None,
    key: KeyOption = None,
    table: Annotated[
        Optional[str], typer.Option(help="Table reference (default: database.table for Trino/Athena, iceberg_scan for DuckDB).")
    ] = None,
    run: Annotated[bool, typer.Option("--run", help="Run it with DuckDB and print the result.")] = False,
    fmt: FormatOption = Format.table,
) -> None:
    """Emit the shipped SQL for Athena/Trino or DuckDB (or run it with DuckDB)."""
    from chronolake.iceberg.sql import duckdb_table_reference, render, run_duckdb
    from chronolake.lake import micros

    dataset = _dataset(name)
    stable_time = dataset.stable_system_time() or 0
    t = micros(known_at, "known-at") if known_at else stable_time
    if query_name == "as_of" and valid_at is None:
        raise ChronolakeError("the as_of query needs --valid-at")
    if run:
        dialect = Dialect.duckdb
    reference = table or (
        duckdb_table_reference(dataset.table.table.metadata_location)
        if dialect is Dialect.duckdb
        else f'"{dataset.table.settings.namespace}"."{name}"'
    )
    text = render(
        query_name,
        dataset.spec,
        reference,
        dialect,
        valid_at=micros(valid_at, "valid-at") if valid_at else None,
        known_at=t,
        keys=dataset.normalise_keys(_keys(dataset, key)),
    )
    if run:
        print_rows(run_duckdb(text), fmt)
    else:
        typer.echo(text)


@app.command()
def maintain(
    name: str,
    compact_table: Annotated[bool, typer.Option("--compact/--no-compact", help="Rewrite sorted, dropping superseded open twins.")] = True,
    expire_older_than: Annotated[
        Optional[str], typer.Option("--expire-older-than", help="Expire snapshots older than this age (e.g. 7d).")
    ] = None,
    orphans_older_than: Annotated[
        Optional[str],
        typer.Option("--remove-orphans-older-than", help="Delete unreferenced files older than this age (e.g. 3d)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List orphan files without deleting them.")] = False,
) -> None:
    """Compaction, snapshot expiry and orphan removal (history lives in rows: nothing is lost)."""
    from chronolake.iceberg import maintenance

    dataset = _dataset(name)
    if compact_table:
        report = maintenance.compact(dataset.table)
        typer.echo(
            f"compacted {name}: {report.rows_before} -> {report.rows_after} rows, "
            f"{report.files_before} -> {report.files_after} data files"
        )
    if expire_older_than:
        cutoff = maintenance.utc_now() - maintenance.parse_age(expire_older_than)
        typer.echo(f"expired {maintenance.expire_snapshots(dataset.table, cutoff)} snapshots older than {expire_older_than}")
    if orphans_older_than:
        removed = maintenance.remove_orphan_files(dataset.table, maintenance.parse_age(orphans_older_than), dry_run=dry_run)
        for path in removed:
            typer.echo(f"{'would remove' if dry_run else 'removed'} {path}")
        typer.echo(f"{len(removed)} orphan files {'found' if dry_run else 'removed'}")


@app.command()
def demo(
    home: Annotated[Optional[Path], typer.Option(help="Lake directory (default: CHRONOLAKE_HOME).")] = None,
    batch: Annotated[bool, typer.Option("--batch", help="Batch loads instead of the local broker and streaming job.")] = False,
) -> None:
    """Stream a realistic market-data feed with late corrections and a restatement; compare reports."""
    from chronolake.demo import run_demo
    from chronolake.streaming.cli import user_errors

    with user_errors():
        run_demo(home, stream=not batch)


app.command()(stream)
app.command()(produce)
app.add_typer(scaling_app, name="scaling")


def main() -> None:
    try:
        app()
    except ChronolakeError as error:
        err.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted; nothing was committed by the interrupted step")
        raise SystemExit(130) from None
