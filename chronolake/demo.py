"""The main job on the embedded lake: market data with late corrections and a restatement, streamed.

Three waves arrive as an index provider's files would: the end-of-day levels and bond coupons for Q1
2024, then late corrections (a fat-finger level, a missing day delivered late), then a retroactive
restatement (a divisor error fixed from 1 March onwards, and a coupon reset re-fixed). By default
they go through the streaming path: a local Kafka broker and the bitemporal Flink job (local
mini-cluster) are started, each wave is published as assertion events (`chronolake.streaming.feed`)
and committed by the job, then both are stopped. With `stream=False` the same files are batch loads.

The demo prints what a report at the time the first wave was complete showed next to what is known
now, what changed between them, and one key's full history; then a backfill of real GDP vintages
(a batch load). Re-running it delivers nothing again (the file ledger) and prints the same report.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

from rich.console import Console
from rich.table import Table

from chronolake.batch_compat.load import LoadReport
from chronolake.batch_compat.readers import SourceFile
from chronolake.iceberg.exceptions import ChronolakeError
from chronolake.iceberg.temporal import format_micros
from chronolake.lake import Dataset, Lake
from chronolake.output import text
from chronolake.streaming.feed import KafkaPublisher, publish_files, wait_for_ledger
from chronolake.streaming.service import StreamOptions, StreamService

INDICES = {"STOXX50": Decimal("4521.65"), "SMI": Decimal("11137.79"), "NIKKEI225": Decimal("33464.17")}
BONDS = {
    "CH0224397213": ("1.500000", "2024-01-15"),
    "US91282CJL54": ("4.375000", "2024-02-15"),
    "DE0001102580": ("2.100000", "2024-03-15"),
}
REPORT_DAY = "2024-03-15"
GDP_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "gdp_vintages.csv.gz"

console = Console(width=None if sys.stdout.isatty() else 150)


def _trading_days(start: date, end: date) -> list[date]:
    days = []
    day = start
    while day <= end:
        if day.weekday() < 5:
            days.append(day)
        day += timedelta(days=1)
    return days


def _write_inputs(folder: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """Deterministic input files: (initial, corrections, restatement), each a list of files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(20240315)
    days = _trading_days(date(2024, 1, 2), date(2024, 3, 28))
    late_day = date(2024, 3, 15)  # this day's SMI level is missing from the first file
    levels: dict[tuple[str, date], Decimal] = {}
    rows = ["index_id,level,currency,valid_from,event_id"]
    for index, start in INDICES.items():
        level = start
        for day in days:
            level = (level * Decimal(1 + rng.gauss(0.0004, 0.009))).quantize(Decimal("0.01"))
            levels[(index, day)] = level
            if (index, day) == ("SMI", late_day):
                continue
            currency = {"STOXX50": "EUR", "SMI": "CHF", "NIKKEI225": "JPY"}[index]
            rows.append(f"{index},{level},{currency},{day},{index}-{day}")
    initial_levels = folder / "index_levels_2024Q1.csv"
    initial_levels.write_text("\n".join(rows) + "\n")

    coupons = ["isin,coupon_rate,payment_date,valid_from"]
    for isin, (rate, paid) in BONDS.items():
        coupons.append(f"{isin},{rate},{paid},2024-01-01")
    initial_coupons = folder / "bond_coupons_2024Q1.csv"
    initial_coupons.write_text("\n".join(coupons) + "\n")

    # Late corrections: a fat-finger level fixed for one day only, and the missing SMI day.
    fat_finger_day = date(2024, 3, 15)
    fixed = levels[("STOXX50", fat_finger_day)] - Decimal("10.00")
    corrections = folder / "index_levels_corrections.csv"
    corrections.write_text(
        "index_id,level,currency,valid_from,valid_to,event_id\n"
        f"STOXX50,{fixed},EUR,{fat_finger_day},{fat_finger_day + timedelta(days=1)},fix-STOXX50-{fat_finger_day}\n"
        f"SMI,{levels[('SMI', late_day)]},CHF,{late_day},{late_day + timedelta(days=1)},SMI-{late_day}\n"
    )

    # Restatement: NIKKEI225 levels from 1 March were computed with a stale divisor (0.4% too high).
    restated = ["index_id,level,currency,valid_from,valid_to,event_id"]
    for day in days:
        if day >= date(2024, 3, 1):
            value = (levels[("NIKKEI225", day)] / Decimal("1.004")).quantize(Decimal("0.01"))
            restated.append(f"NIKKEI225,{value},JPY,{day},{day + timedelta(days=1)},restate-NIKKEI225-{day}")
    restatement = folder / "index_levels_restatement.csv"
    restatement.write_text("\n".join(restated) + "\n")
    coupon_fix = folder / "bond_coupons_reset.csv"
    coupon_fix.write_text(
        "isin,coupon_rate,payment_date,valid_from\nDE0001102580,2.150000,2024-03-15,2024-03-01\n"
    )
    return [initial_levels, initial_coupons], [corrections], [restatement, coupon_fix]


def _load(dataset: Dataset, files: list[Path]) -> int:
    report: LoadReport = dataset.load(files, show_progress=False)
    for file in report.files:
        when = format_micros(file.loaded_at) if file.loaded_at is not None else "-"
        detail = f"{file.applied} applied, {file.quarantined} quarantined" if file.status == "loaded" else file.status
        console.print(f"  {dataset.name:<13} {file.path.rsplit('/', 1)[-1]:<32} {detail:<28} system time {when}")
    times = [f.loaded_at for f in report.files if f.loaded_at is not None]
    return max(times)


class _Published:
    """Delivers the demo's files through the streaming job: publish, then wait for the ledger."""

    def __init__(self, service: StreamService) -> None:
        self.service = service

    def __call__(self, dataset: Dataset, files: list[Path]) -> int:
        with KafkaPublisher(self.service.bootstrap_servers, self.service.options.topic) as publisher:
            results = publish_files(dataset.spec, files, publisher, dataset.table.loaded_files)
        timeout_s = 300.0
        complete = wait_for_ledger(dataset, results, timeout_s)
        times = []
        for result in results:
            if result.status == "published":
                if result.sha256 not in complete:
                    raise ChronolakeError(f"the job did not commit {result.path.name} within {timeout_s:.0f}s; see {self.service.log}")
                at = complete[result.sha256]
                detail = f"{result.rows} events, committed by the job"
            else:
                at = dataset.table.loaded_files([result.sha256])[result.sha256]
                detail = result.status
            times.append(at)
            console.print(f"  {dataset.name:<13} {result.path.name:<32} {detail:<32} system time {format_micros(at)}")
        return max(times)


def _already_loaded(dataset: Dataset, files: list[Path]) -> int:
    times = []
    for file in files:
        sha256 = SourceFile.detect(file).sha256()
        at = dataset.table.loaded_files([sha256])[sha256]
        console.print(f"  {dataset.name:<13} {file.name:<32} {'already loaded':<32} system time {format_micros(at)}")
        times.append(at)
    return max(times)


def _deliver(waves: list[tuple[str, list[tuple[Dataset, list[Path]]]]], deliver: Callable[[Dataset, list[Path]], int]) -> tuple[int, int]:
    """Each wave's files in order; returns the system time the first wave is complete at, and the last's."""
    times = []
    for title, pairs in waves:
        console.print(f"\n[bold]{title}[/bold]")
        times.append(max(deliver(dataset, files) for dataset, files in pairs))
    return times[0], max(times)


def _all_loaded(datasets_files: list[tuple[Dataset, list[Path]]]) -> bool:
    for dataset, files in datasets_files:
        hashes = [SourceFile.detect(f).sha256() for f in files]
        dataset.table.refresh()
        if set(hashes) - set(dataset.table.loaded_files(hashes)):
            return False
    return True


def run_demo(home: Path | None = None, stream: bool = True) -> None:
    """The main job. `stream`: deliver the feed through Kafka and the streaming job (a local broker and
    a Flink mini-cluster, started here and stopped at the end); otherwise as batch loads."""
    lake = Lake(home)
    console.print(f"[bold]chronolake demo[/bold]: lake at {lake.settings.home}")
    levels = _ensure(lake, "index_levels", ["index_id"], {"level": "decimal(18,2)", "currency": "string"})
    coupons = _ensure(lake, "bond_coupons", ["isin"], {"coupon_rate": "decimal(9,6)", "payment_date": "date"})
    initial, corrections, restatement = _write_inputs(lake.settings.home / "demo-input")
    waves = [
        ("1. End-of-day files for Q1 2024", [(levels, initial[:1]), (coupons, initial[1:])]),
        ("2. Late corrections", [(levels, corrections)]),
        ("3. Retroactive restatement", [(levels, restatement[:1]), (coupons, restatement[1:])]),
    ]
    if not stream:
        reported_at, _ = _deliver(waves, _load)
    elif _all_loaded([pair for _, wave in waves for pair in wave]):
        console.print("every demo file is already in the lake (the file ledger): not starting the streaming job")
        reported_at, _ = _deliver(waves, _already_loaded)
    else:
        options = StreamOptions(
            home=lake.settings.home,
            datasets=(levels.name, coupons.name),
            topic="chronolake-demo",
            checkpoint_interval_ms=1000,
            idle_partition_ms=1000,
        )
        with StreamService(options) as service:
            console.print(
                f"streaming job started on a local Flink mini-cluster, reading topic {options.topic!r} from a local "
                f"Kafka broker at {service.bootstrap_servers} (job log: {service.log})"
            )
            reported_at, latest = _deliver(waves, _Published(service))
            for dataset in (levels, coupons):
                service.wait_until_stable(dataset.name, latest)
            console.print("\nstopping the job and the broker (the tables keep everything)")

    console.print(f"\n[bold]What the {REPORT_DAY} report showed (known at {format_micros(reported_at)}) vs what is known now[/bold]")
    table = Table("index", "level as reported", "level now", "", "version now valid from", "recorded at")
    then = {r["index_id"]: r for r in levels.as_of(REPORT_DAY, reported_at).to_pylist()}
    now = {r["index_id"]: r for r in levels.as_of(REPORT_DAY).to_pylist()}
    for index in sorted(set(then) | set(now)):
        before, after = then.get(index), now.get(index)
        level_then = text(before["level"]) if before else "(none)"
        level_now = text(after["level"]) if after else "(none)"
        table.add_row(
            index,
            level_then,
            level_now,
            "[yellow]corrected[/yellow]" if level_then != level_now else "",
            text(after["valid_from"]) if after else "",
            text(after["system_from"]) if after else "",
        )
    for isin, row in {r["isin"]: r for r in coupons.as_of(REPORT_DAY).to_pylist()}.items():
        old = {r["isin"]: r for r in coupons.as_of(REPORT_DAY, reported_at).to_pylist()}.get(isin)
        changed = old is None or old["coupon_rate"] != row["coupon_rate"]
        table.add_row(
            isin,
            text(old["coupon_rate"]) if old else "(none)",
            text(row["coupon_rate"]),
            "[yellow]corrected[/yellow]" if changed else "",
            text(row["valid_from"]),
            text(row["system_from"]),
        )
    console.print(table)

    changes = levels.diff(reported_at)
    console.print(f"\n[bold]Index levels changed since the report:[/bold] {changes.num_rows} valid ranges")
    diff_table = Table("index", "valid from", "valid to", "change", "before", "after")
    for row in changes.to_pylist()[:8]:
        diff_table.add_row(
            row["index_id"], text(row["valid_from"])[:10], text(row["valid_to"])[:10], row["change"],
            text(row["level_before"]), text(row["level_after"]),
        )
    console.print(diff_table)
    if changes.num_rows > 8:
        console.print(f"  ... and {changes.num_rows - 8} more (chronolake diff index_levels --from {format_micros(reported_at)})")

    console.print("\n[bold]History of STOXX50 around the corrected day[/bold]")
    history = levels.history("STOXX50").to_pylist()
    history_table = Table("valid_from", "valid_to", "level", "system_from", "system_to")
    for row in history:
        if "2024-03-14" <= text(row["valid_from"])[:10] <= "2024-03-18":
            history_table.add_row(
                text(row["valid_from"]), text(row["valid_to"]), text(row["level"]),
                text(row["system_from"]), text(row["system_to"]),
            )
    console.print(history_table)
    if stream:
        console.print(
            "  (streamed, each event is its own transaction: a day's level, valid until further notice, was cut "
            "by the next day's event microseconds later; a batch load of the same file is one transaction)"
        )
    console.print(
        f"\nReproduce the report any time: chronolake query index_levels --valid-at {REPORT_DAY} "
        f"--known-at {format_micros(reported_at)}"
    )
    _gdp(lake)


def _gdp(lake: Lake) -> None:
    """Real bitemporal data: GDP vintages backfilled at their publication dates."""
    if not GDP_FILE.exists():
        console.print(f"\n(skipping the GDP vintages walkthrough: {GDP_FILE} not found)")
        return
    console.print("\n[bold]4. Real data: quarterly GDP vintages 2002-2024, backfilled at their publication dates[/bold]")
    gdp = _ensure(lake, "gdp", ["country"], {"real_gdp": "decimal(20,6)"})
    report = gdp.load([GDP_FILE], system_time_column="published", valid_from_column="quarter", period="quarter")
    file = report.files[0]
    if file.status == "loaded":
        console.print(f"  {file.rows} rows, {report.transactions} vintages, one atomic commit in {report.seconds:.2f}s")
    else:
        console.print(f"  {GDP_FILE.name}: {file.status}")
    then = gdp.as_of("2008-10-01", "2009-03-31", keys=["US"]).to_pylist()[0]
    now = gdp.as_of("2008-10-01", keys=["US"]).to_pylist()[0]
    console.print(
        f"  US real GDP for 2008 Q4 as known in March 2009: {text(then['real_gdp'])} "
        f"(vintage {text(then['system_from'])[:10]}); as known today: {text(now['real_gdp'])} "
        f"(vintage {text(now['system_from'])[:10]})"
    )
    revisions = [r for r in gdp.history("US").to_pylist() if text(r["valid_from"])[:10] == "2008-10-01"]
    values = [text(r["real_gdp"]) for r in revisions]
    distinct = [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]
    console.print(f"  2008 Q4 was published {len(revisions)} times with {len(distinct)} distinct values: {', '.join(distinct)}")
    console.print("  more: docs/backfill.md")


def _ensure(lake: Lake, name: str, key: list[str], columns: dict[str, str]) -> Dataset:
    if name in lake.datasets():
        return lake.dataset(name)
    return lake.create_dataset(name, key=key, columns=columns)
