"""Batch loads: one transaction per load, quarantine with reasons, all-or-nothing on unreadable files,
idempotent reloads, and every supported file format."""

from __future__ import annotations

import gzip
import json
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chronolake.iceberg.exceptions import UnreadableFile
from chronolake.iceberg.temporal import SENTINEL, micros_from_datetime, parse_timestamp
from chronolake.lake import Dataset, Lake

HEADER = "isin,price,currency,valid_from,valid_to,op,event_id\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def prices(lake: Lake) -> Dataset:
    return lake.create_dataset(
        "prices", key=["isin"], columns={"price": "decimal(18,6)", "currency": "string"}
    )


def as_of_rows(dataset: Dataset, valid_at: str) -> list[tuple[str, Decimal | None]]:
    return [(r["isin"], r["price"]) for r in dataset.as_of(valid_at).to_pylist()]


def test_every_bad_input_class_is_quarantined_with_line_and_reason(prices: Dataset, tmp_path: Path) -> None:
    source = write(
        tmp_path / "mixed.csv",
        HEADER
        + "A,100.5,EUR,2024-01-02,,,\n"  # line 2: good
        + "B,abc,EUR,2024-01-02,,,\n"  # 3: wrong type
        + "C,1,EUR,yesterday,,,\n"  # 4: unparsable timestamp
        + "D,1,EUR,2024-01-05,2024-01-05,,\n"  # 5: valid_to == valid_from
        + ",1,EUR,2024-01-05,,,\n"  # 6: missing key
        + "E,1,EUR,2024-01-05,,merge,\n"  # 7: unknown op
        + "F,1,EUR,,,,\n"  # 8: missing valid_from
        + "G,1.1234567,EUR,2024-01-05,,,\n"  # 9: too many decimal places
        + "H,1,EUR,2024-01-05,,,\n"  # 10: good
        + "I,1,EUR,2024-01-05,,,x1\n"  # 11: good, uses event x1
        + "I,2,EUR,2024-01-05,,,x1\n"  # 12: same event id, different content
        + "J,1,EUR,2024-01-05\n",  # 13: too few fields
    )
    report = prices.load([source])
    assert (report.applied, report.quarantined) == (3, 9)
    quarantined = {r["line"]: r["reason"] for r in prices.quarantine().to_pylist()}
    assert sorted(quarantined) == [3, 4, 5, 6, 7, 8, 9, 12, 13]
    assert "price" in quarantined[3] and "decimal" in quarantined[3]
    assert "unparsable timestamp" in quarantined[4]
    assert "not after valid_from" in quarantined[5]
    assert "missing key" in quarantined[6]
    assert "unknown op" in quarantined[7]
    assert "missing valid_from" in quarantined[8]
    assert "decimal places" in quarantined[9]
    assert "already used with different content" in quarantined[12]
    assert "fields" in quarantined[13]
    assert as_of_rows(prices, "2024-01-06") == [("A", Decimal("100.5")), ("H", Decimal("1")), ("I", Decimal("1"))]


def test_quarantined_event_does_not_use_up_its_id(prices: Dataset, tmp_path: Path) -> None:
    prices.load([write(tmp_path / "a.csv", HEADER + "A,oops,EUR,2024-01-01,,,e7\nA,5,EUR,2024-01-01,,,e7\n")])
    assert as_of_rows(prices, "2024-01-01") == [("A", Decimal("5"))]


def test_replayed_event_changes_nothing(prices: Dataset, tmp_path: Path) -> None:
    prices.load([write(tmp_path / "a.csv", HEADER + "A,5,EUR,2024-01-01,,,e1\n")])
    before = prices.history("A")
    report = prices.load([write(tmp_path / "b.csv", HEADER + "A,5,EUR,2024-01-01,,,e1\nB,1,EUR,2024-01-01,,,\n")])
    assert report.duplicates == 1 and report.applied == 1
    assert prices.history("A").to_pylist() == before.to_pylist()


def test_loading_the_same_file_twice_changes_nothing(prices: Dataset, tmp_path: Path) -> None:
    source = write(tmp_path / "a.csv", HEADER + "A,5,EUR,2024-01-01,,,\nA,6,EUR,2024-01-03,,,\n")
    first = prices.load([source])
    snapshot = prices.table.table.current_snapshot()
    # The same bytes under another name, and gzip-compressed: the ledger knows them by content.
    copy = tmp_path / "copy.csv.gz"
    copy.write_bytes(gzip.compress(source.read_bytes()))
    second = prices.load([source, copy])
    assert [f.status for f in second.files] == ["already loaded", "already loaded"]
    assert second.system_time is None
    prices.table.refresh()
    assert prices.table.table.current_snapshot().snapshot_id == snapshot.snapshot_id
    assert first.files[0].sha256 == second.files[1].sha256


@pytest.mark.parametrize(
    "content, message",
    [
        ("isin,price,currency,valid_from,colour\nA,1,EUR,2024-01-01,red\n", "unknown column(s) colour"),
        ("isin,currency,valid_from\nA,EUR,2024-01-01\n", "missing column(s) price"),
        ("", "empty file"),
    ],
)
def test_unreadable_file_fails_whole_load_and_writes_nothing(
    prices: Dataset, tmp_path: Path, content: str, message: str
) -> None:
    good = write(tmp_path / "good.csv", HEADER + "A,5,EUR,2024-01-01,,,\n")
    bad = write(tmp_path / "bad.csv", content)
    with pytest.raises(UnreadableFile, match=message.replace("(", r"\(").replace(")", r"\)")):
        prices.load([good, bad])
    prices.table.refresh()
    assert prices.table.table.current_snapshot() is None
    assert prices.quarantine().num_rows == 0


def test_corrupt_gzip_fails_with_one_line(prices: Dataset, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00not really gzip at all")
    with pytest.raises(UnreadableFile) as error:
        prices.load([bad])
    assert "\n" not in str(error.value) and "bad.csv.gz" in str(error.value)


def test_one_load_is_one_transaction_with_net_effect(prices: Dataset, tmp_path: Path) -> None:
    # Within one load the second row supersedes the first: only the net effect is stored.
    report = prices.load([write(tmp_path / "a.csv", HEADER + "A,1,EUR,2024-01-01,,,\nA,2,EUR,2024-01-01,,,\n")])
    history = prices.history("A").to_pylist()
    assert [h["price"] for h in history] == [Decimal("2")]
    assert micros_from_datetime(history[0]["system_from"]) == report.system_time
    assert prices.stable_system_time() == report.system_time


def test_jsonl_and_parquet_and_gzip_land_the_same(lake: Lake, tmp_path: Path) -> None:
    records = [
        {"isin": "A", "price": "10.5", "currency": "EUR", "valid_from": "2024-01-01"},
        {"isin": "A", "price": 11, "currency": None, "valid_from": "2024-01-02T00:00:00+01:00"},
        {"isin": "B", "price": "3", "currency": "USD", "valid_from": "2024-01-01", "valid_to": "infinity"},
        {"isin": "B", "op": "delete", "valid_from": "2024-02-01"},
    ]
    lines = "\n".join(json.dumps(r) for r in records) + "\n{broken\n[1,2]\n"
    jsonl = tmp_path / "a.jsonl.gz"
    jsonl.write_bytes(gzip.compress(lines.encode()))
    parquet = tmp_path / "a.parquet"
    pq.write_table(
        pa.table(
            {
                "isin": [r["isin"] for r in records],
                "price": [None if "price" not in r else str(r["price"]) for r in records],
                "currency": [r.get("currency") for r in records],
                "valid_from": [r["valid_from"] for r in records],
                "valid_to": [r.get("valid_to") for r in records],
                "op": [r.get("op") for r in records],
            }
        ),
        parquet,
    )
    results = []
    for name, source in (("from_jsonl", jsonl), ("from_parquet", parquet)):
        dataset = lake.create_dataset(name, key=["isin"], columns={"price": "decimal(18,6)", "currency": "string"})
        report = dataset.load([source])
        results.append([{k: v for k, v in r.items() if k not in ("system_from",)} for r in dataset.timeline().to_pylist()])
        if name == "from_jsonl":
            assert report.quarantined == 2
            reasons = sorted(r["reason"] for r in dataset.quarantine().to_pylist())
            assert reasons[0].startswith("broken JSON") and reasons[1] == "not a JSON object"
    assert results[0] == results[1]
    timeline = results[0]
    assert [(r["isin"], r["price"], r["currency"]) for r in timeline] == [
        ("A", Decimal("10.5"), "EUR"),
        ("A", Decimal("11"), None),
        ("B", Decimal("3"), "USD"),
    ]
    # 2024-01-02T00:00:00+01:00 is 2024-01-01T23:00Z, so A's first version ends there.
    assert micros_from_datetime(timeline[0]["valid_to"]) == parse_timestamp("2024-01-01T23:00:00Z")
    assert micros_from_datetime(timeline[2]["valid_to"]) == parse_timestamp("2024-02-01")
    assert micros_from_datetime(timeline[1]["valid_to"]) == SENTINEL


def test_reported_answer_is_reproducible_after_corrections(prices: Dataset, tmp_path: Path) -> None:
    first = prices.load([write(tmp_path / "a.csv", HEADER + "A,1,EUR,2024-01-01,,,\nB,2,EUR,2024-01-01,,,\n")])
    reported = prices.as_of("2024-01-05", first.system_time)
    prices.load([write(tmp_path / "b.csv", HEADER + "A,9,EUR,2024-01-03,,,\nB,,,2024-01-02,,delete,\n")])
    again = prices.as_of("2024-01-05", first.system_time)
    assert again.to_pylist() == reported.to_pylist()
    assert as_of_rows(prices, "2024-01-05") == [("A", Decimal("9"))]


def test_diff_reports_added_removed_and_changed(prices: Dataset, tmp_path: Path) -> None:
    first = prices.load([write(tmp_path / "a.csv", HEADER + "A,1,EUR,2024-01-01,,,\nB,2,EUR,2024-01-01,,,\n")])
    second = prices.load(
        [write(tmp_path / "b.csv", HEADER + "A,1.5,EUR,2024-01-03,2024-01-04,,\nB,,,2024-01-10,,delete,\nC,7,USD,2024-01-01,,,\n")]
    )
    changes = [
        (r["isin"], r["change"], r["valid_from"].date().isoformat(), r["price_before"], r["price_after"])
        for r in prices.diff(first.system_time, second.system_time).to_pylist()
    ]
    assert changes == [
        ("A", "changed", "2024-01-03", Decimal("1"), Decimal("1.5")),
        ("B", "removed", "2024-01-10", Decimal("2"), None),
        ("C", "added", "2024-01-01", None, Decimal("7")),
    ]


def test_two_column_keys_continue_from_stored_state(lake: Lake, tmp_path: Path) -> None:
    fx = lake.create_dataset("fx", key=["base", "quote"], columns={"rate": "decimal(18,8)"})
    rows = "".join(f"EUR,C{i:03d},1.{i:03d},2024-01-01\n" for i in range(100))
    fx.load([write(tmp_path / "a.csv", "base,quote,rate,valid_from\n" + rows + "USD,C000,9,2024-01-01\n")])
    fx.load([write(tmp_path / "b.csv", "base,quote,rate,valid_from\nEUR,C007,2,2024-01-05\nUSD,C000,8,2024-01-03\n")])
    now = {(r["base"], r["quote"]): r["rate"] for r in fx.as_of("2024-01-06").to_pylist()}
    assert now[("EUR", "C007")] == Decimal("2") and now[("USD", "C000")] == Decimal("8")
    assert now[("EUR", "C008")] == Decimal("1.008") and len(now) == 101
    history = fx.history(("EUR", "C007")).to_pylist()
    assert [(r["rate"], r["valid_to"].date().isoformat()) for r in history] == [
        (Decimal("1.007"), "9999-12-31"),  # as first recorded, now closed
        (Decimal("1.007"), "2024-01-05"),  # the leftover re-asserted by the correction
        (Decimal("2"), "9999-12-31"),
    ]


def _stored(dataset: Dataset) -> list[tuple[object, ...]]:
    rows = dataset.table.scan().to_pylist()
    times = sorted({r["system_from"] for r in rows if r["system_from"] is not None})
    rank = {t: i for i, t in enumerate(times)}  # the two datasets' system times differ; their order does not
    stored = [
        (
            r["isin"], r["price"], r["currency"], r["valid_from"], r["valid_to"], rank.get(r["system_from"]),
            None if r["system_to"] is None else rank.get(r["system_to"], "sentinel"), r["row_kind"], r["event_id"],
        )
        for r in rows
        if r["row_kind"] != "file"
    ]
    return sorted(stored, key=repr)


def test_a_load_split_over_processes_stores_exactly_what_one_process_stores(lake: Lake, tmp_path: Path) -> None:
    import random

    rng = random.Random(5)
    lines = [HEADER.strip()]
    for n in range(3000):
        key = f"K{rng.randrange(200)}"
        day = f"2024-01-{rng.randrange(1, 28):02d}"
        kind = rng.random()
        if kind < 0.05:
            lines.append(f"{key},,,{day},,delete,")
        elif kind < 0.1:
            lines.append(f"{key},{rng.randrange(100)},EUR,{day},2024-02-01,,e{rng.randrange(50)}")
        elif kind < 0.12:
            lines.append(f"{key},bad,EUR,{day},,,")
        else:
            lines.append(f"{key},{rng.randrange(100)}.5,USD,{day},,,")
    lines.insert(100, "broken,row")
    lines.insert(200, ",1,EUR,2024-01-05,,,")  # no key: quarantined once, whichever process sees it
    first = write(tmp_path / "first.csv", "\n".join(lines[:1500]) + "\n")
    second = write(tmp_path / "second.csv", "\n".join([lines[0], *lines[1500:]]) + "\n")
    # JSON lines in the same load as a CSV file: each key must land in the same process from both.
    jsonl = write(
        tmp_path / "third.jsonl",
        "".join(f'{{"isin": "K{n % 200}", "price": "{n}", "currency": "CHF", "valid_from": "2024-03-{n % 28 + 1:02d}"}}\n' for n in range(400))
        + '{"isin": "", "valid_from": "2024-03-01"}\n{broken\n',
    )
    results = []
    for processes in (1, 2):
        dataset = lake.create_dataset(f"p{processes}", key=["isin"], columns={"price": "decimal(18,6)", "currency": "string"})
        reports = [dataset.load([first], processes=processes), dataset.load([second, jsonl], processes=processes)]
        quarantine = [(r["line"], r["reason"]) for r in dataset.quarantine().to_pylist()]
        counts = [(f.rows, f.applied, f.quarantined, f.duplicates) for r in reports for f in r.files]
        results.append((_stored(dataset), quarantine, counts))
    assert results[0] == results[1]
    assert results[0][1], "the input has bad rows"


def test_concurrent_writer_conflict_writes_nothing_visible(prices: Dataset, lake: Lake, tmp_path: Path) -> None:
    from chronolake.batch_compat.load import load_files
    from chronolake.iceberg.exceptions import CommitConflict
    from chronolake.iceberg.table import BitemporalTable

    prices.load([write(tmp_path / "a.csv", HEADER + "A,1,EUR,2024-01-01,,,\n")])
    stale = BitemporalTable.open(lake.catalog, lake.settings, "prices")  # prepared before the other commit
    prices.load([write(tmp_path / "b.csv", HEADER + "A,2,EUR,2024-01-02,,,\n")])
    before = prices.timeline().to_pylist()
    with pytest.raises(CommitConflict, match="another writer"):
        load_files(stale, [write(tmp_path / "c.csv", HEADER + "A,3,EUR,2024-01-03,,,\nB,bad,EUR,2024-01-01,,,\n")])
    assert prices.timeline().to_pylist() == before
    assert prices.quarantine().num_rows == 0, "the failed load's quarantine records must stay invisible"
    # Run again, it lands.
    assert prices.load([tmp_path / "c.csv"]).quarantined == 1


def test_quarantine_shows_stream_records_and_only_committed_file_records(prices: Dataset, tmp_path: Path) -> None:
    from chronolake.iceberg.schema import quarantine_schema

    prices.load([write(tmp_path / "a.csv", HEADER + "A,x,EUR,2024-01-01,,,\n")])
    # A record the stream job quarantined (no file hash: committed with its checkpoint), and one of a
    # file load whose data commit never happened (no ledger row at its system time).
    schema = quarantine_schema()
    orphans = pa.Table.from_pylist(
        [
            {"source": "kafka:prices/0@7", "source_sha256": None, "line": 7, "reason": "r1", "raw": "{}", "system_time": None},
            {"source": "lost.csv", "source_sha256": "00" * 32, "line": 2, "reason": "r2", "raw": "", "system_time": None},
        ],
        schema=schema,
    )
    prices.table.quarantine_table().append(orphans)
    assert sorted(r["source"] for r in prices.quarantine().to_pylist()) == [str(tmp_path / "a.csv"), "kafka:prices/0@7"]
    assert [r["sha256"] for r in prices.loaded_files().to_pylist()] == [prices.load([tmp_path / "a.csv"]).files[0].sha256]


def test_a_table_without_the_no_retry_property_gets_it_and_still_refuses_a_stale_load(
    prices: Dataset, lake: Lake, tmp_path: Path
) -> None:
    from chronolake.batch_compat.load import load_files
    from chronolake.iceberg.exceptions import CommitConflict
    from chronolake.iceberg.table import NO_COMMIT_RETRY, BitemporalTable

    with prices.table.table.transaction() as transaction:
        transaction.remove_properties(*NO_COMMIT_RETRY)
    prices.load([write(tmp_path / "a.csv", HEADER + "A,1,EUR,2024-01-01,,,\n")])
    stale = BitemporalTable.open(lake.catalog, lake.settings, "prices")
    with stale.table.transaction() as transaction:
        transaction.remove_properties(*NO_COMMIT_RETRY)
    prices.load([write(tmp_path / "b.csv", HEADER + "A,2,EUR,2024-01-02,,,\n")])
    with pytest.raises(CommitConflict):
        load_files(stale, [write(tmp_path / "c.csv", HEADER + "A,3,EUR,2024-01-03,,,\n")])
    prices.table.refresh()
    assert prices.table.table.properties.get("commit.retry.num-retries") == "0"
    assert [r["price"] for r in prices.history("A").to_pylist() if r["system_to"].year == 9999] == [Decimal("1"), Decimal("2")]
