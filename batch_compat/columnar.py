"""Validating a whole batch of file rows column by column.

The rules are :class:`~chronolake.iceberg.parsing.AssertionParser`'s, applied per *distinct* value
where columns repeat (timestamps, ops, dates, booleans) and through Arrow's vectorised casts where
they do not (numbers, decimals). Arrow is only an accelerator: whenever a cast fails for any value
of a batch, that column falls back to the parser's own converter, value by value, so a row is
accepted, rejected and explained exactly as :meth:`AssertionParser.parse` would.
(``tests/batch_compat/test_columnar.py`` checks the two paths agree on random input.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from chronolake.iceberg.algebra import UPSERT, Key, Payload
from chronolake.iceberg.dataset import EVENT_ID, VALID_FROM, VALID_TO, Column
from chronolake.iceberg.parsing import OP, AssertionParser, InvalidAssertion, range_problem
from chronolake.iceberg.schema import arrow_type


class ParsedRows(NamedTuple):
    """Parallel lists, one entry per row; rows with a reason are not assertions."""

    keys: list[Key]
    ops: list[str]
    valid_from: list[int]
    valid_to: list[int | None]
    payloads: list[Payload]
    event_ids: list[str | None]
    reasons: list[str | None]


_Converter = Callable[[Any], Any]


def _each(values: list[Any], convert: _Converter) -> tuple[list[Any], list[str | None] | None]:
    out: list[Any] = []
    errors: list[str | None] | None = None
    for index, value in enumerate(values):
        try:
            out.append(convert(value))
        except InvalidAssertion as error:
            out.append(None)
            if errors is None:
                errors = [None] * len(values)
            errors[index] = str(error)
    return out, errors


def by_distinct(column: pa.Array, convert: _Converter) -> tuple[list[Any], list[str | None] | None]:
    """Convert each distinct value once (timestamps and flags repeat a lot in real files)."""
    encoded = column.dictionary_encode()
    converted, problems = _each(encoded.dictionary.to_pylist(), convert)
    indices = encoded.indices.to_pylist()
    null_value: Any = None
    null_problem: str | None = None
    if column.null_count:
        try:
            null_value = convert(None)
        except InvalidAssertion as error:
            null_problem = str(error)
    values = [null_value if i is None else converted[i] for i in indices]
    if problems is None and null_problem is None:
        return values, None
    distinct_problems = problems or [None] * len(converted)
    return values, [null_problem if i is None else distinct_problems[i] for i in indices]


def _by_cast(column: pa.Array, target: pa.DataType, convert: _Converter) -> tuple[list[Any], list[str | None] | None]:
    """Arrow's cast when it succeeds for the whole batch, else the parser's converter per value."""
    if column.type == target:
        return column.to_pylist(), None
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            return pc.cast(column, target).to_pylist(), None
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    return _each(column.to_pylist(), convert)


def _payload_column(column: pa.Array, declared: Column, convert: _Converter) -> tuple[list[Any], list[str | None] | None]:
    kind = declared.type
    if kind == "string":
        if pa.types.is_string(column.type):
            return column.to_pylist(), None
        return _each(column.to_pylist(), convert)
    if kind in ("timestamp", "date", "boolean"):
        return by_distinct(column, convert)
    if kind == "double" and pa.types.is_string(column.type):
        # Arrow and Python differ on spellings like "inf" and "1_0": let Python decide those.
        if pc.any(pc.match_substring_regex(column, r"[^0-9eE.+\-]")).as_py():
            return _each(column.to_pylist(), convert)
    if kind == "long" and pa.types.is_string(column.type):
        if pc.any(pc.match_substring_regex(column, r"[^0-9+\-]")).as_py():
            return _each(column.to_pylist(), convert)
    return _by_cast(column, arrow_type(declared), convert)


def parse_batch(parser: AssertionParser, batch: pa.RecordBatch) -> ParsedRows:
    """Validate every row of ``batch`` (columns named as assertion fields) into parallel lists."""
    rows = batch.num_rows
    names = batch.schema.names
    spec = parser.spec

    def column(name: str) -> pa.Array | None:
        return batch.column(names.index(name)) if name in names else None

    checks: list[list[str | None]] = []

    def note(problems: list[str | None] | None) -> None:
        if problems is not None:
            checks.append(problems)

    key_columns: list[list[Any]] = []
    for declared, (name, convert) in zip(spec.key, parser.key_converters):
        def key_part(value: Any, name: str = name, convert: Callable[[Any, str], Any] = convert) -> Any:
            return parser.parse_key_part(value, name, convert)

        source = column(name)
        assert source is not None, name
        values, problems = _key_column(source, declared, key_part)
        key_columns.append(values)
        note(problems)
    keys: list[Key] = list(zip(*key_columns))

    op_source = column(OP)
    if op_source is None:
        ops: list[str] = [UPSERT] * rows
    else:
        ops, problems = by_distinct(op_source, parser.parse_op)
        note(problems)

    from_source = column(VALID_FROM)
    assert from_source is not None
    valid_from, problems = by_distinct(from_source, parser.parse_valid_from)
    note(problems)
    to_source = column(VALID_TO)
    if to_source is None:
        valid_to: list[int | None] = [None] * rows
    else:
        valid_to, problems = by_distinct(to_source, parser.parse_valid_to)
        note(problems)
        bounded = [i for i, (vf, vt) in enumerate(zip(valid_from, valid_to)) if vt is not None and vf is not None and vt <= vf]
        if bounded:
            ranges: list[str | None] = [None] * rows
            for i in bounded:
                ranges[i] = range_problem(valid_from[i], valid_to[i], from_source[i].as_py(), to_source[i].as_py())
            checks.append(ranges)

    payload_columns: list[list[Any]] = []
    for declared, (name, convert) in zip(spec.columns, parser.payload_converters):
        source = column(name)
        if source is None:
            payload_columns.append([None] * rows)
            continue
        values, problems = _payload_column(source, declared, lambda v, n=name, c=convert: c(v, n))
        payload_columns.append(values)
        note(problems)
    payloads: list[Payload] = list(zip(*payload_columns)) if payload_columns else [()] * rows

    event_source = column(EVENT_ID)
    if event_source is None:
        event_ids: list[str | None] = [None] * rows
    else:
        event_ids, problems = _each(event_source.to_pylist(), parser.parse_event_id)
        note(problems)

    if not checks:
        reasons: list[str | None] = [None] * rows
    else:
        # The first failing check in the parser's order is the row's reason.
        reasons = [next((p for p in row if p is not None), None) for row in zip(*checks)]
    return ParsedRows(keys, ops, valid_from, valid_to, payloads, event_ids, reasons)


def parse_keys(parser: AssertionParser, batch: pa.RecordBatch) -> list[Key | None]:
    """Just the keys of a batch (``None`` where a key is missing or invalid)."""
    names = batch.schema.names
    columns = []
    problems_seen: list[list[str | None]] = []
    for declared, (name, convert) in zip(parser.spec.key, parser.key_converters):
        def key_part(value: Any, name: str = name, convert: Callable[[Any, str], Any] = convert) -> Any:
            return parser.parse_key_part(value, name, convert)

        values, problems = _key_column(batch.column(names.index(name)), declared, key_part)
        columns.append(values)
        if problems is not None:
            problems_seen.append(problems)
    keys: list[Key | None] = list(zip(*columns))
    for problems in problems_seen:
        keys = [None if p is not None else k for k, p in zip(keys, problems)]
    return keys


def _key_column(column: pa.Array, declared: Column, convert: _Converter) -> tuple[list[Any], list[str | None] | None]:
    if declared.type == "string" and pa.types.is_string(column.type) and column.null_count == 0:
        values = column.to_pylist()
        if all(values) and not any(map(str.isspace, values)):  # else let the parser name the missing key
            return values, None
        return _each(values, convert)
    if declared.type in ("timestamp", "date", "boolean"):
        return by_distinct(column, convert)
    if column.null_count == 0:
        return _payload_column(column, declared, convert)
    return _each(column.to_pylist(), convert)

