"""The command line as a user types it: the interface the acceptance checks use, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

Run = Callable[..., Any]


def test_create_load_query_round_trip(cli: Run, tmp_path: Path) -> None:
    created = cli(
        "dataset", "create", "levels", "--key", "index_id",
        "--column", "level:decimal(18,4)", "--column", "constituents:long", "--column", "published:boolean",
        "--column", "as_of_date:date", "--column", "calc_time:timestamp", "--column", "ratio:double",
    )
    assert created.returncode == 0, created.stderr
    source = tmp_path / "levels.csv"
    source.write_text(
        "index_id,level,constituents,published,as_of_date,calc_time,ratio,valid_from,valid_to\n"
        "SPX,4769.8300,503,true,2023-12-29,2023-12-29T21:15:00,0.5,2023-12-29,\n"
        "SPX,4742.8300,503,true,2024-01-02,2024-01-02 21:15:00.1234567,0.25,2024-01-02T00:00:00Z,\n"
        "NDX,bad,100,true,2024-01-02,2024-01-02T21:15:00Z,1,2024-01-02,\n"
    )
    loaded = cli("load", "levels", str(source), "--json")
    assert loaded.returncode == 0, loaded.stderr
    outcome = json.loads(loaded.stdout)
    assert (outcome["applied"], outcome["quarantined"]) == (2, 1)
    system_time = outcome["system_time"]
    assert system_time.endswith("Z") and len(system_time.split(".")[1]) == 7  # six digits and the Z

    queried = cli("query", "levels", "--valid-at", "2024-01-01T12:00:00", "--known-at", system_time, "--format", "json")
    assert queried.returncode == 0, queried.stderr
    rows = [json.loads(line) for line in queried.stdout.splitlines()]
    assert rows == [
        {
            "index_id": "SPX",
            "level": 4769.83,
            "constituents": 503,
            "published": True,
            "as_of_date": "2023-12-29",
            "calc_time": "2023-12-29T21:15:00.000000Z",
            "ratio": 0.5,
            "valid_from": "2023-12-29T00:00:00.000000Z",
            "valid_to": "2024-01-02T00:00:00.000000Z",
            "system_from": system_time,
            "system_to": "9999-12-31T00:00:00.000000Z",
        }
    ]
    # Decimals print with their exact digits; finer-than-microsecond input is floored.
    assert '"level": 4769.8300' in queried.stdout
    later = cli("query", "levels", "--valid-at", "2024-01-03", "--known-at", system_time, "--format", "csv")
    assert "2024-01-02T21:15:00.123456Z" in later.stdout

    assert cli("stable", "levels").stdout.strip() == system_time
    history = cli("history", "levels", "SPX", "--format", "json")
    assert len(history.stdout.splitlines()) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (("query", "nope", "--valid-at", "2024-01-01"), "no dataset named 'nope'"),
        (("query", "levels", "--valid-at", "someday"), "valid-at: not an ISO-8601 timestamp"),
        (("query", "levels", "--valid-at", "2024-01-01", "--known-at", "2999-01-01"), "after the stable system time"),
        (("load", "levels", "missing.csv"), "missing.csv: no such file"),
        (("load", "levels", "notes.txt"), "unknown file type"),
        (("dataset", "create", "x", "--key", "id", "--column", "v:money"), "unknown column type 'money'"),
        (("dataset", "create", "y", "--key", "id", "--column", "valid_to:long"), "reserved"),
    ],
)
def test_user_mistakes_are_one_line_errors(cli: Run, tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    assert cli("dataset", "create", "levels", "--key", "id", "--column", "v:long").returncode == 0
    (tmp_path / "one.csv").write_text("id,v,valid_from\nA,1,2024-01-01\n")
    assert cli("load", "levels", str(tmp_path / "one.csv")).returncode == 0
    (tmp_path / "notes.txt").write_text("hello")
    result = cli(*[str(tmp_path / a) if a in ("missing.csv", "notes.txt") else a for a in args])
    assert result.returncode == 1
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_datasets_from_a_declaration_file(cli: Run, tmp_path: Path) -> None:
    declarations = tmp_path / "datasets.yaml"
    declarations.write_text(
        "datasets:\n"
        "  fx_rates:\n"
        "    key: [base, quote]\n"
        "    columns: {rate: 'decimal(18,8)'}\n"
        "    partition: {buckets: 4}\n"
    )
    first = cli("dataset", "create", "--file", str(declarations))
    assert first.returncode == 0 and "created fx_rates" in first.stdout
    again = cli("dataset", "create", "--file", str(declarations))
    assert again.returncode == 0 and "exists  fx_rates" in again.stdout
    shown = cli("dataset", "show", "fx_rates").stdout
    assert "base:string, quote:string" in shown and "bucket(4, base)" in shown


def test_multi_column_keys_on_the_command_line(cli: Run, tmp_path: Path) -> None:
    assert cli("dataset", "create", "fx", "--key", "base", "--key", "quote", "--column", "rate:double").returncode == 0
    source = tmp_path / "fx.csv"
    source.write_text("base,quote,rate,valid_from\nEUR,USD,1.1,2024-01-01\nEUR,CHF,0.95,2024-01-01\n")
    assert cli("load", "fx", str(source)).returncode == 0
    result = cli("query", "fx", "--valid-at", "2024-01-02", "-k", "EUR,CHF", "-f", "csv")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].startswith("EUR,CHF,0.95,")
    assert len(result.stdout.splitlines()) == 2
    history = cli("history", "fx", "EUR", "USD", "-f", "csv")
    assert history.stdout.splitlines()[1].startswith("EUR,USD,1.1,")


def test_querying_an_empty_dataset_says_so(cli: Run) -> None:
    assert cli("dataset", "create", "empty", "--key", "id", "--column", "v:long").returncode == 0
    result = cli("query", "empty", "--valid-at", "2024-01-01", "--known-at", "2024-01-02")
    assert result.returncode == 1 and "has no committed transaction yet" in result.stderr
    assert cli("query", "empty", "--valid-at", "2024-01-01", "-f", "json").stdout == ""
