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

from chronolake.iceberg.algebra import DELETE, UPSERT, Key, Payload
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


class ValidBatch(NamedTuple):
    """A validated batch as Arrow columns, one entry per row; rows with a reason are not assertions
    (their values are null or arbitrary). Key and payload columns have the table's types."""

    keys: list[pa.Array]
    deletes: pa.Array  # bool: op is delete
    valid_from: pa.Array  # int64 microseconds
    valid_to: pa.Array  # int64 microseconds, null = not given
    payloads: list[pa.Array]
    event_ids: pa.Array  # string, null = none
    reasons: list[str | None] | None  # None: every row is valid


_Converter = Callable[[Any], Any]
_Checked = tuple[pa.Array, "list[str | None] | None"]


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


def arrow_values(values: list[Any], target: pa.DataType) -> pa.Array:
    """Python values in the algebra's representation (timestamps as integer microseconds) as Arrow."""
    if pa.types.is_timestamp(target):
        return pa.array(values, pa.int64()).cast(target)
    return pa.array(values, target)


def _each_array(column: pa.Array, convert: _Converter, target: pa.DataType) -> _Checked:
    values, problems = _each(column.to_pylist(), convert)
    return arrow_values(values, target), problems


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


def _by_distinct_array(column: pa.Array, convert: _Converter, target: pa.DataType) -> _Checked:
    """:func:`by_distinct` with the values as an Arrow array (taken from the converted dictionary)."""
    encoded = column.dictionary_encode()
    converted, problems = _each(encoded.dictionary.to_pylist(), convert)
    values = arrow_values(converted, target).take(encoded.indices)
    null_problem: str | None = None
    if column.null_count:
        try:
            null_value = convert(None)
        except InvalidAssertion as error:
            null_problem = str(error)
        else:
            if null_value is not None:
                values = pc.fill_null(values, arrow_values([null_value], target)[0])
    if problems is None and null_problem is None:
        return values, None
    distinct_problems = problems or [None] * len(converted)
    return values, [null_problem if i is None else distinct_problems[i] for i in encoded.indices.to_pylist()]


def _by_cast(column: pa.Array, target: pa.DataType, convert: _Converter) -> _Checked:
    """Arrow's cast when it succeeds for the whole batch, else the parser's converter per value."""
    if column.type == target:
        return column, None
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            return pc.cast(column, target), None
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    return _each_array(column, convert, target)


def _payload_column(column: pa.Array, declared: Column, convert: _Converter) -> _Checked:
    kind = declared.type
    target = arrow_type(declared)
    if kind == "string":
        if pa.types.is_string(column.type):
            return column, None
        return _each_array(column, convert, target)
    if kind in ("timestamp", "date", "boolean"):
        return _by_distinct_array(column, convert, target)
    if kind == "double" and pa.types.is_string(column.type):
        # Arrow and Python differ on spellings like "inf" and "1_0": let Python decide those.
        if pc.any(pc.match_substring_regex(column, r"[^0-9eE.+\-]")).as_py():
            return _each_array(column, convert, target)
    if kind == "long" and pa.types.is_string(column.type):
        if pc.any(pc.match_substring_regex(column, r"[^0-9+\-]")).as_py():
            return _each_array(column, convert, target)
    return _by_cast(column, target, convert)


def validate_batch(parser: AssertionParser, batch: pa.RecordBatch) -> ValidBatch:
    """Validate every row of ``batch`` (columns named as assertion fields), column by column."""
    rows = batch.num_rows
    names = batch.schema.names
    spec = parser.spec

    def column(name: str) -> pa.Array | None:
        return batch.column(names.index(name)) if name in names else None

    checks: list[list[str | None]] = []

    def note(problems: list[str | None] | None) -> None:
        if problems is not None:
            checks.append(problems)

    key_columns: list[pa.Array] = []
    for declared, (name, convert) in zip(spec.key, parser.key_converters):
        def key_part(value: Any, name: str = name, convert: Callable[[Any, str], Any] = convert) -> Any:
            return parser.parse_key_part(value, name, convert)

        source = column(name)
        assert source is not None, name
        values, problems = _key_column(source, declared, key_part)
        key_columns.append(values)
        note(problems)

    op_source = column(OP)
    if op_source is None:
        deletes = pa.nulls(rows, pa.bool_()).fill_null(False)
    else:
        ops, problems = _by_distinct_array(op_source, parser.parse_op, pa.string())
        deletes = pc.equal(ops, DELETE).fill_null(False)
        note(problems)

    from_source = column(VALID_FROM)
    assert from_source is not None
    valid_from, problems = _by_distinct_array(from_source, parser.parse_valid_from, pa.int64())
    note(problems)
    to_source = column(VALID_TO)
    if to_source is None:
        valid_to = pa.nulls(rows, pa.int64())
    else:
        valid_to, problems = _by_distinct_array(to_source, parser.parse_valid_to, pa.int64())
        note(problems)
        bounded = pc.indices_nonzero(pc.less_equal(valid_to, valid_from).fill_null(False)).to_pylist()
        if bounded:
            ranges: list[str | None] = [None] * rows
            for i in bounded:
                ranges[i] = range_problem(
                    valid_from[i].as_py(), valid_to[i].as_py(), from_source[i].as_py(), to_source[i].as_py()
                )
            checks.append(ranges)

    payload_columns: list[pa.Array] = []
    for declared, (name, convert) in zip(spec.columns, parser.payload_converters):
        source = column(name)
        if source is None:
            payload_columns.append(pa.nulls(rows, arrow_type(declared)))
            continue
        values, problems = _payload_column(source, declared, lambda v, n=name, c=convert: c(v, n))
        payload_columns.append(values)
        note(problems)

    event_source = column(EVENT_ID)
    if event_source is None or event_source.null_count == rows:
        event_ids = pa.nulls(rows, pa.string())
    else:
        event_ids, problems = _each_array(event_source, parser.parse_event_id, pa.string())
        note(problems)

    reasons: list[str | None] | None = None
    if checks:
        # The first failing check in the parser's order is the row's reason.
        reasons = [next((p for p in row if p is not None), None) for row in zip(*checks)]
    return ValidBatch(key_columns, deletes, valid_from, valid_to, payload_columns, event_ids, reasons)


def python_values(array: pa.Array) -> list[Any]:
    """An Arrow column in the algebra's representation (timestamps as integer microseconds)."""
    if pa.types.is_timestamp(array.type):
        array = array.cast(pa.int64())
    return array.to_pylist()  # type: ignore[no-any-return]


def parse_batch(parser: AssertionParser, batch: pa.RecordBatch) -> ParsedRows:
    """Validate every row of ``batch`` into parallel lists of Python values."""
    valid = validate_batch(parser, batch)
    rows = batch.num_rows
    keys: list[Key] = list(zip(*map(python_values, valid.keys)))
    ops = [DELETE if d else UPSERT for d in valid.deletes.to_pylist()]
    payloads: list[Payload] = list(zip(*map(python_values, valid.payloads))) if valid.payloads else [()] * rows
    reasons = valid.reasons if valid.reasons is not None else [None] * rows
    return ParsedRows(
        keys, ops, valid.valid_from.to_pylist(), valid.valid_to.to_pylist(), payloads, valid.event_ids.to_pylist(), reasons
    )


def parse_keys(parser: AssertionParser, batch: pa.RecordBatch) -> list[Key | None]:
    """Just the keys of a batch (``None`` where a key is missing or invalid)."""
    names = batch.schema.names
    columns = []
    problems_seen: list[list[str | None]] = []
    for declared, (name, convert) in zip(parser.spec.key, parser.key_converters):
        def key_part(value: Any, name: str = name, convert: Callable[[Any, str], Any] = convert) -> Any:
            return parser.parse_key_part(value, name, convert)

        values, problems = _key_column(batch.column(names.index(name)), declared, key_part)
        columns.append(python_values(values))
        if problems is not None:
            problems_seen.append(problems)
    keys: list[Key | None] = list(zip(*columns))
    for problems in problems_seen:
        keys = [None if p is not None else k for k, p in zip(keys, problems)]
    return keys


def _key_column(column: pa.Array, declared: Column, convert: _Converter) -> _Checked:
    if declared.type == "string" and pa.types.is_string(column.type) and column.null_count == 0:
        # Every key has a letter or digit, so none is missing (blank); else let the parser name the row.
        if pc.all(pc.match_substring_regex(column, "[0-9A-Za-z]")).as_py() is not False:
            return column, None
        return _each_array(column, convert, pa.string())
    if declared.type in ("timestamp", "date", "boolean"):
        return _by_distinct_array(column, convert, arrow_type(declared))
    if column.null_count == 0:
        return _payload_column(column, declared, convert)
    return _each_array(column, convert, arrow_type(declared))
