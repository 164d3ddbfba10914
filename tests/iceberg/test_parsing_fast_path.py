"""`AssertionParser.parse` takes a fast path for plainly valid records; it must never decide
differently from the full checks (`parse_checked`), on any record."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from chronolake.iceberg.dataset import Column, DatasetSpec
from chronolake.iceberg.parsing import AssertionParser, InvalidAssertion

SPEC = DatasetSpec(
    "mixed",
    key=(Column("k", "string"),),
    columns=(
        Column("price", "decimal(18,6)"), Column("small", "decimal(5,2)"), Column("s", "string"),
        Column("day", "date"), Column("n", "long"), Column("x", "double"), Column("ts", "timestamp"),
    ),
)
LONG_KEY = DatasetSpec("ids", key=(Column("id", "long"),), columns=(Column("v", "string"),))

texts = st.sampled_from(["", " ", "a", " a ", "A1", "é", "1.5", "-0", "0.000", "NaN", "Infinity", "1_000", "1e3", "12345.67"])
decimal_texts = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.decimals(places=6, min_value=-10**13, max_value=10**13).map(str),
    st.decimals(places=2, min_value=-1000, max_value=1000).map(str),
    st.sampled_from(["1e-7", "1E+2", "-0.000000", " 2.5 ", "999.99", "1000.00", "1000", "-999.995", "sNaN"]),
)
times = st.sampled_from(
    ["2024-01-01", "2024-01-02", "2024-01-01T12:00:00Z", "9999-12-31", "infinity", "", " ", "2024-13-01", "yesterday"]
)
values = st.one_of(st.none(), texts, decimal_texts, times, st.integers(-2**64, 2**64), st.floats(), st.booleans(), st.just([1]))


def records(spec: DatasetSpec) -> st.SearchStrategy[dict[str, Any]]:
    names = [*spec.key_names, *spec.payload_names, "valid_from", "valid_to", "op", "event_id"]
    plain = {
        "k": st.one_of(texts, values), "id": values, "price": st.one_of(decimal_texts, values),
        "small": st.one_of(decimal_texts, values), "valid_from": st.one_of(times, values),
        "valid_to": st.one_of(st.none(), times, values), "op": st.sampled_from([None, "upsert", "delete", " Delete", "merge", ""]),
        "event_id": st.one_of(st.none(), texts, st.integers(0, 10)),
    }
    return st.fixed_dictionaries({}, optional={name: plain.get(name, values) for name in names})


def near_plain(spec: DatasetSpec) -> st.SearchStrategy[dict[str, Any]]:
    """Mostly valid records (the fast path's territory) with one field replaced by anything."""
    days = st.sampled_from(["2024-01-01", "2024-01-02", "2024-01-03", "9999-12-31", "2024-01-02T00:00:00Z"])
    base = st.fixed_dictionaries(
        {
            **({"k": st.sampled_from(["A", " b", "c "])} if spec is SPEC else {"id": st.integers(-5, 5)}),
            "valid_from": days,
        },
        optional={
            "valid_to": days, "op": st.sampled_from(["upsert", "delete"]), "event_id": st.sampled_from(["e1", " e2 ", "e3"]),
            **({"price": decimal_texts, "small": decimal_texts, "s": texts, "day": days, "n": st.integers(-9, 9),
                "x": st.floats(), "ts": days} if spec is SPEC else {"v": texts}),
        },
    )
    names = [*spec.key_names, *spec.payload_names, "valid_from", "valid_to", "op", "event_id"]
    return st.tuples(base, st.sampled_from(names), values).map(lambda c: {**c[0], c[1]: c[2]}) | base


def outcome(parse: Any, record: dict[str, Any]) -> Any:
    try:
        return parse(record)
    except InvalidAssertion as error:
        return ("invalid", str(error))
    except (OverflowError, ValueError) as error:
        return ("error", type(error).__name__)


@settings(max_examples=3000, deadline=None)
@given(
    st.sampled_from([SPEC, LONG_KEY]).flatmap(
        lambda spec: st.tuples(st.just(spec), st.lists(records(spec) | near_plain(spec), min_size=1, max_size=4))
    )
)
def test_the_fast_path_decides_exactly_as_the_full_checks(case: tuple[DatasetSpec, list[dict[str, Any]]]) -> None:
    spec, batch = case
    parser = AssertionParser(spec)
    for record in batch * 2:  # the second round finds the timestamps cached, as a long feed does
        checked = outcome(parser.parse_checked, record)
        fast = parser._parse_plain(record)
        if fast is not None:
            assert fast == checked
            assert [type(v) for v in fast.payload] == [type(v) for v in checked.payload]
        assert outcome(parser.parse, record) == checked


def test_the_fast_path_takes_plain_records() -> None:
    parser = AssertionParser(SPEC)
    record = {"k": "A", "price": "101.5", "small": "-0.00", "s": "x", "day": "2024-01-01", "n": 3, "x": 1.5,
              "ts": "2024-01-01T00:00:00Z", "valid_from": "2024-01-02", "valid_to": "2024-01-03", "event_id": " e1 "}
    first = parser.parse(record)  # parses and caches the timestamps
    fast = parser._parse_plain(record)
    assert fast == first and fast is not None
    assert fast.payload[0] == Decimal("101.500000") and str(fast.payload[1]) == "0.00" and fast.event_id == "e1"
    assert parser._parse_plain({**record, "price": "1.0000001"}) is None  # more decimal places than the column
    assert parser._parse_plain({**record, "small": "1000.00"}) is None  # does not fit decimal(5,2)
