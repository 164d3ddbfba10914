"""Parse and validate raw assertion records (file rows, stream events) into :class:`Assertion` s.

Pure Python (stdlib only): the batch loader and the Flink job validate with the same rules, so a record
is accepted or quarantined for the same reason whichever way it arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from chronolake.iceberg.algebra import OPS, UPSERT, Assertion, Key
from chronolake.iceberg.dataset import (
    EVENT_ID, VALID_FROM, VALID_TO, Column, DatasetSpec, coerce_decimal, decimal_precision_scale,
)
from chronolake.iceberg.temporal import INFINITY, SENTINEL, TimestampError, micros_from_date, to_micros

OP = "op"
_TRUE = frozenset({"true", "t", "1", "yes", "y"})
_FALSE = frozenset({"false", "f", "0", "no", "n"})
_CACHE_LIMIT = 200_000


class InvalidAssertion(ValueError):
    """A record that cannot become an assertion; its message is the quarantine reason."""


def range_problem(valid_from: int, valid_to: int | None, raw_from: Any, raw_to: Any) -> str | None:
    if valid_to is not None and valid_to <= valid_from:
        return f"valid_to {raw_to!s} is not after valid_from {raw_from!s}"
    return None


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


class AssertionParser:
    """Turns records (mappings of column name to raw value) into assertions of one dataset."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self._timestamps: dict[str, int] = {}
        self._key = [(c.name, self._converter(c)) for c in spec.key]
        self._payload = [(c.name, self._converter(c)) for c in spec.columns]
        # `_parse_plain`: which key columns are strings; the payload converters, with the quantum and
        # bound of each decimal column (`_decimal_shape`).
        self._plain_key = [(c.name, c.type == "string") for c in spec.key]
        self._plain_payload = [
            (name, convert, _decimal_shape(column)) for (name, convert), column in zip(self._payload, spec.columns)
        ]
        self.known_fields = frozenset(
            [*spec.key_names, *spec.payload_names, VALID_FROM, VALID_TO, OP, EVENT_ID]
        )

    def parse(self, record: Mapping[str, Any]) -> Assertion:
        """The assertion a record makes; raises :class:`InvalidAssertion` with the first problem found.

        Checks run in a fixed order (key, op, valid_from, valid_to, the range, payload columns in
        declaration order, event_id) so that every path reports the same reason for the same record.
        """
        fast = self._parse_plain(record)
        return self.parse_checked(record) if fast is None else fast

    def _parse_plain(self, record: Mapping[str, Any]) -> Assertion | None:
        """The assertion of a record whose every value has the plain, valid shape of most input
        (non-blank string keys, an upsert or delete, timestamps this parser has parsed before,
        decimals as text within the column's scale and precision...), in a few dictionary lookups;
        None for anything else, which `parse_checked` then decides. Never a different assertion
        (tests/iceberg/test_parsing_fast_path.py)."""
        get = record.get
        key = []
        for name, plain in self._plain_key:
            value = get(name)
            if type(value) is not str or not plain or not value.strip():
                return None
            key.append(value)
        op = get(OP)
        if op is None:
            op = UPSERT
        elif op not in OPS:
            return None
        cache = self._timestamps
        raw_from = get(VALID_FROM)
        valid_from = cache.get(raw_from) if type(raw_from) is str else None
        if valid_from is None or valid_from >= SENTINEL:
            return None
        raw_to = get(VALID_TO)
        if raw_to is None:
            valid_to = None
        else:
            valid_to = cache.get(raw_to) if type(raw_to) is str else None
            if valid_to is None or valid_to <= valid_from:
                return None
        payload: list[Any] = []
        for name, convert, decimal in self._plain_payload:
            value = get(name)
            if value is None:
                payload.append(None)
            elif decimal is not None:
                if type(value) is not str:
                    return None
                number = _plain_decimal(value, *decimal)
                if number is None:
                    return None
                payload.append(number)
            elif convert is _string:
                if type(value) is not str:
                    return None
                payload.append(value)
            else:
                try:
                    payload.append(convert(value, name))
                except InvalidAssertion:
                    return None
        event_id = get(EVENT_ID)
        if event_id is not None:
            if type(event_id) is not str:
                return None
            event_id = event_id.strip()
            if not event_id:
                return None
        return Assertion(tuple(key), op, valid_from, valid_to, tuple(payload), event_id)

    def parse_checked(self, record: Mapping[str, Any]) -> Assertion:
        """`parse` without its fast path: every check, in order."""
        key = self.parse_key(record)
        op = self.parse_op(record.get(OP))
        raw_from, raw_to = record.get(VALID_FROM), record.get(VALID_TO)
        valid_from = self.parse_valid_from(raw_from)
        valid_to = self.parse_valid_to(raw_to)
        problem = range_problem(valid_from, valid_to, raw_from, raw_to)
        if problem is not None:
            raise InvalidAssertion(problem)
        payload = tuple(convert(record.get(name), name) for name, convert in self._payload)
        event_id = self.parse_event_id(record.get(EVENT_ID))
        return Assertion(key, op, valid_from, valid_to, payload, event_id)

    def parse_key(self, record: Mapping[str, Any]) -> Key:
        return tuple(self.parse_key_part(record.get(name), name, convert) for name, convert in self._key)

    @staticmethod
    def parse_key_part(raw: Any, name: str, convert: Callable[[Any, str], Any]) -> Any:
        if _is_missing(raw):
            raise InvalidAssertion(f"missing key column {name}")
        return convert(raw, name)

    @property
    def key_converters(self) -> list[tuple[str, Callable[[Any, str], Any]]]:
        return list(self._key)

    @property
    def payload_converters(self) -> list[tuple[str, Callable[[Any, str], Any]]]:
        return list(self._payload)

    @staticmethod
    def parse_op(value: Any) -> str:
        if _is_missing(value):
            return UPSERT
        if isinstance(value, str) and value.strip().lower() in OPS:
            return value.strip().lower()
        raise InvalidAssertion(f"unknown op {value!r} (expected upsert or delete)")

    def parse_valid_from(self, value: Any) -> int:
        if _is_missing(value):
            raise InvalidAssertion("missing valid_from")
        valid_from = self.parse_time(value, VALID_FROM)
        if valid_from >= SENTINEL:
            raise InvalidAssertion(f"valid_from {value!s} is not before 9999-12-31")
        return valid_from

    def parse_valid_to(self, value: Any) -> int | None:
        """``None`` when not given, :data:`SENTINEL` for ``infinity``."""
        if _is_missing(value):
            return None
        if isinstance(value, str) and value.strip().lower() == INFINITY:
            return SENTINEL
        return self.parse_time(value, VALID_TO)

    @staticmethod
    def parse_event_id(value: Any) -> str | None:
        if _is_missing(value):
            return None
        if isinstance(value, str):
            return value.strip()
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise InvalidAssertion(f"event_id must be a string, got {value!r}")

    def parse_time(self, value: Any, name: str) -> int:
        return self._time(value, name)

    def _time(self, value: Any, name: str) -> int:
        if isinstance(value, str):
            cached = self._timestamps.get(value)
            if cached is not None:
                return cached
        try:
            micros = to_micros(value)
        except TimestampError:
            raise InvalidAssertion(f"{name}: unparsable timestamp {value!r}") from None
        except (OverflowError, ValueError):
            raise InvalidAssertion(f"{name}: timestamp out of range {value!r}") from None
        if isinstance(value, str):
            if len(self._timestamps) >= _CACHE_LIMIT:
                self._timestamps.clear()
            self._timestamps[value] = micros
        return micros

    def _converter(self, column: Column) -> Callable[[Any, str], Any]:
        kind = column.type
        if kind == "string":
            return _string
        if kind == "long":
            return _long
        if kind == "double":
            return _double
        if kind == "boolean":
            return _boolean
        if kind == "date":
            return _date
        if kind == "timestamp":
            return self._timestamp_payload
        return lambda value, name: _decimal(value, name, column)

    def _timestamp_payload(self, value: Any, name: str) -> int | None:
        if _is_missing(value):
            return None
        return self._time(value, name)


def _decimal_shape(column: Column) -> tuple[Decimal, Decimal] | None:
    """(the quantum, the bound) of a decimal column: values are multiples of the quantum (10^-scale)
    below the bound (10^(precision - scale)) in magnitude; None for other columns."""
    shape = decimal_precision_scale(column.type)
    if shape is None:
        return None
    precision, scale = shape
    return Decimal(1).scaleb(-scale), Decimal(1).scaleb(precision - scale)


def _plain_decimal(text: str, quantum: Decimal, bound: Decimal) -> Decimal | None:
    """`coerce_decimal` of a text that needs no rounding and fits, else None."""
    try:
        number = Decimal(text)
        quantized = number.quantize(quantum)
    except (InvalidOperation, ValueError):
        return None
    if quantized != number or not -bound < quantized < bound:
        return None
    return quantized.copy_abs() if quantized.is_zero() else quantized


def _wrong(name: str, expected: str, value: Any) -> InvalidAssertion:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return InvalidAssertion(f"{name}: expected {expected}, got {shown}")


def _string(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    raise _wrong(name, "a string", value)


def _long(value: Any, name: str) -> int | None:
    if _is_missing(value):
        return None
    if isinstance(value, bool):
        raise _wrong(name, "an integer", value)
    if isinstance(value, int):
        result = value
    elif isinstance(value, str):
        try:
            result = int(value.strip())
        except ValueError:
            raise _wrong(name, "an integer", value) from None
    else:
        raise _wrong(name, "an integer", value)
    if not -(2**63) <= result < 2**63:
        raise _wrong(name, "a 64-bit integer", value)
    return result


def _double(value: Any, name: str) -> float | None:
    if _is_missing(value):
        return None
    if isinstance(value, bool):
        raise _wrong(name, "a number", value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise _wrong(name, "a number", value) from None
    raise _wrong(name, "a number", value)


def _boolean(value: Any, name: str) -> bool | None:
    if _is_missing(value):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    raise _wrong(name, "true or false", value)


def _date(value: Any, name: str) -> date | None:
    if _is_missing(value):
        return None
    if isinstance(value, datetime):
        raise _wrong(name, "a date", value)
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            parsed = date.fromisoformat(value.strip())
        except ValueError:
            raise _wrong(name, "an ISO date", value) from None
        micros_from_date(parsed)
        return parsed
    raise _wrong(name, "an ISO date", value)


def _decimal(value: Any, name: str, column: Column) -> Decimal | None:
    if _is_missing(value):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float, Decimal)):
        raise _wrong(name, column.type, value)
    try:
        return coerce_decimal(value, column)
    except InvalidOperation:
        raise _wrong(name, column.type, value) from None
    except ValueError as error:
        raise InvalidAssertion(f"{name}: {error}") from None
