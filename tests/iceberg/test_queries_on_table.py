"""End to end on a real Iceberg table: random histories loaded as files, then the Python API and the
shipped DuckDB SQL are both compared with the reference model (and with each other)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from chronolake.iceberg import sql
from chronolake.iceberg.temporal import SENTINEL, format_micros, micros_from_datetime
from chronolake.lake import Dataset, Lake
from tests.iceberg.test_algebra_properties import H, KEYS, histories
from tests.reference_model import INFINITE, RefAssertion, ReferenceModel

DAY = 86_400_000_000
BASE = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z
EXAMPLES = int(os.environ.get("CHRONOLAKE_TABLE_EXAMPLES", "25"))


def day(g: int) -> str:
    return format_micros(BASE + g * DAY)


def write_transaction(path: Path, transaction: list[RefAssertion]) -> None:
    lines = ["k,x,valid_from,valid_to,op,event_id"]
    for a in transaction:
        valid_to = "" if a.valid_to is None else "infinity" if a.valid_to == INFINITE else day(int(a.valid_to))
        lines.append(f"{a.key},{a.payload},{day(a.valid_from)},{valid_to},{a.op},{a.event_id or ''}")
    path.write_text("\n".join(lines) + "\n")


_DUCKDB = sql.duckdb_connection()


def duckdb_answer(dataset: Dataset, query: str, **arguments: object) -> list[dict[str, object]]:
    reference = sql.duckdb_table_reference(dataset.table.table.metadata_location)
    text = sql.render(query, dataset.spec, reference, sql.Dialect.duckdb, **arguments)  # type: ignore[arg-type]
    return sql.run_duckdb(text, _DUCKDB).to_pylist()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_python_api_and_duckdb_sql_match_reference_on_a_real_table(history: list[list[RefAssertion]]) -> None:
    with tempfile.TemporaryDirectory() as home:
        lake = Lake(home)
        dataset = lake.create_dataset("prop", key=["k"], columns={"x": "long"})
        model = ReferenceModel(horizon=H)
        times = []
        for number, transaction in enumerate(history):
            path = Path(home) / f"t{number}.csv"
            write_transaction(path, transaction)
            report = dataset.load([path])
            if report.system_time is None:
                # The same bytes as an earlier transaction's file: the ledger skips it, as it should.
                assert report.files[0].status == "already loaded"
                continue
            times.append(report.system_time)
            model.apply(report.system_time, transaction)
        dataset.table.refresh()
        for t in times:
            for g in range(H + 2):
                valid_at = BASE + g * DAY
                api = dataset.as_of(valid_at, t).to_pylist()
                assert duckdb_answer(dataset, "as_of", valid_at=valid_at, known_at=t) == api
                got = {r["k"]: r for r in api}
                for key in KEYS:
                    expected = model.as_of(key, g, t)
                    if expected is None:
                        assert key not in got, (key, g, t)
                        continue
                    row = got[key]
                    payload, start, end, system_from = expected
                    assert row["x"] == payload
                    assert micros_from_datetime(row["valid_from"]) == BASE + start * DAY
                    assert micros_from_datetime(row["valid_to"]) == (SENTINEL if end is None else BASE + end * DAY)
                    assert micros_from_datetime(row["system_from"]) == system_from
                    assert micros_from_datetime(row["system_to"]) == SENTINEL
            assert duckdb_answer(dataset, "timeline", known_at=t) == dataset.timeline(t).to_pylist()
        for key in KEYS:
            python_history = dataset.history(key).to_pylist()
            duck_history = duckdb_answer(dataset, "history", known_at=times[-1], keys=[(key,)])
            assert duck_history == python_history
