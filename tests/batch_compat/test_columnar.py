"""The columnar validation of file batches says exactly what the record parser says, row by row:
same assertion, or same quarantine reason, on random and hostile cell text."""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from chronolake.batch_compat.columnar import parse_batch
from chronolake.iceberg.dataset import Column, DatasetSpec
from chronolake.iceberg.parsing import AssertionParser, InvalidAssertion

SPEC = DatasetSpec(
    "c",
    key=(Column("id", "long"), Column("venue", "string")),
    columns=(
        Column("price", "decimal(9,3)"),
        Column("qty", "long"),
        Column("ratio", "double"),
        Column("flag", "boolean"),
        Column("day", "date"),
        Column("at", "timestamp"),
        Column("note", "string"),
    ),
)

numbers = st.sampled_from(["1", "-0", "007", "+5", "1_000", "1.5", "-2.25", "1e3", "1E-2", ".5", "5.", "1.2345", "inf",
                           "nan", "-", "", " 7 ", "99999999999999999999", "0.001", "12345678.9", "1e400", "x"])
times = st.sampled_from(["2024-01-01", "2024-01-01T10:00:00Z", "2024-01-01 10:00:00.1234567+02:00", "2024-02-30",
                         "infinity", "", "  ", "yesterday", "20240101", "2023-12-31T23:59:59.999999", "9999-12-31"])
flags = st.sampled_from(["true", "False", "1", "0", "yes", "maybe", "", "T"])
ops = st.sampled_from(["upsert", "delete", "DELETE", " upsert ", "merge", ""])
texts = st.one_of(st.none(), st.text(max_size=6), numbers, times)


@st.composite
def rows(draw: st.DrawFn) -> dict[str, str | None]:
    def cell(strategy: st.SearchStrategy[str]) -> str | None:
        value = draw(st.one_of(st.none(), strategy))
        return value if value != "" else None  # the CSV reader turns empty cells into nulls

    return {
        "id": cell(numbers),
        "venue": cell(st.one_of(st.sampled_from(["XNYS", " ", "XLON"]), st.text(max_size=3))),
        "valid_from": cell(times),
        "valid_to": cell(times),
        "op": cell(ops),
        "event_id": cell(st.sampled_from(["e1", " e2 ", "  "])),
        "price": cell(numbers),
        "qty": cell(numbers),
        "ratio": cell(numbers),
        "flag": cell(flags),
        "day": cell(times),
        "at": cell(times),
        "note": cell(st.text(max_size=4)),
    }


@settings(max_examples=400, deadline=None)
@given(st.lists(rows(), min_size=1, max_size=12))
def test_columnar_validation_agrees_with_the_record_parser(records: list[dict[str, str | None]]) -> None:
    parser = AssertionParser(SPEC)
    batch = pa.RecordBatch.from_pylist(records, schema=pa.schema([(name, pa.string()) for name in records[0]]))
    parsed = parse_batch(parser, batch)
    for index, record in enumerate(records):
        try:
            expected = parser.parse(record)
        except InvalidAssertion as error:
            assert parsed.reasons[index] == str(error), record
            continue
        assert parsed.reasons[index] is None, (record, parsed.reasons[index])
        got = (parsed.keys[index], parsed.ops[index], parsed.valid_from[index], parsed.valid_to[index],
               parsed.payloads[index], parsed.event_ids[index])
        # repr: equal values and equal fingerprints (and NaN, which is not equal to itself, compares).
        assert repr(got) == repr(tuple(expected[:6])), record
