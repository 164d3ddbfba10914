"""The Python API: a lake of bitemporal datasets, mirroring the CLI and returning Arrow tables.

    lake = Lake()                                   # CHRONOLAKE_HOME, or ~/.chronolake
    prices = lake.create_dataset("prices", key=["isin"], columns={"price": "decimal(18,6)"})
    prices.load(["prices.csv"])
    prices.as_of("2024-03-01", known_at="2024-03-02T09:00:00Z")
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.catalog import Catalog
from pyiceberg.expressions import And, GreaterThan, LessThanOrEqual, Or

from chronolake.batch_compat.load import LoadOptions, LoadReport, load_files
from chronolake.batch_compat.readers import ColumnMapping
from chronolake.iceberg import queries
from chronolake.iceberg.catalog import open_catalog
from chronolake.iceberg.config import LakeSettings, load_declarations
from chronolake.iceberg.dataset import (
    QUARANTINE_SUFFIX,
    SYSTEM_FROM,
    SYSTEM_TO,
    VALID_FROM,
    VALID_TO,
    Column,
    DatasetSpec,
    parse_column,
)
from chronolake.iceberg.diff import diff_timelines
from chronolake.iceberg.exceptions import ConfigError, UnstableRead
from chronolake.iceberg.ownership import StreamOwner, refuse_direct_write, stream_owner
from chronolake.iceberg.rows import python_columns
from chronolake.iceberg.schema import TIMESTAMP, arrow_type
from chronolake.iceberg.table import BitemporalTable
from chronolake.iceberg.temporal import TimestampError, format_micros, to_micros

TimeLike = str | datetime | date | int


def micros(value: TimeLike, what: str = "time") -> int:
    """A time argument as UTC microseconds: ISO-8601 text, a datetime/date, or integer microseconds."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return to_micros(value)
    except TimestampError:
        raise ConfigError(f"{what}: not an ISO-8601 timestamp: {value!r}") from None


class Lake:
    """The datasets under one catalog and warehouse."""

    def __init__(self, home: str | Path | None = None, settings: LakeSettings | None = None) -> None:
        self.settings = settings or LakeSettings.from_environment(home)

    @cached_property
    def catalog(self) -> Catalog:
        return open_catalog(self.settings)

    def create_dataset(
        self,
        name: str,
        key: Sequence[str],
        columns: Mapping[str, str] | Sequence[str],
        buckets: int | None = None,
    ) -> Dataset:
        """Create a dataset (``key``: ``COL`` or ``COL:TYPE``; ``columns``: ``{COL: TYPE}`` or ``COL:TYPE``)."""
        payload = (
            tuple(parse_column(f"{n}:{t}") for n, t in columns.items())
            if isinstance(columns, Mapping)
            else tuple(parse_column(c) for c in columns)
        )
        spec = DatasetSpec(
            name=name,
            key=tuple(parse_column(k, default_type="string") for k in key),
            columns=payload,
            **({"buckets": buckets} if buckets else {}),
        )
        return self.create(spec)[0]

    def create(self, spec: DatasetSpec) -> tuple[Dataset, bool]:
        table, created = BitemporalTable.create(self.catalog, self.settings, spec)
        return Dataset(table), created

    def create_from_file(self, path: str | Path) -> list[tuple[Dataset, bool]]:
        """Create every dataset declared in a YAML file; existing identical ones are left as they are."""
        return [self.create(spec) for spec in load_declarations(Path(path))]

    def dataset(self, name: str) -> Dataset:
        return Dataset(BitemporalTable.open(self.catalog, self.settings, name))

    def datasets(self) -> list[str]:
        names = [ident[-1] for ident in self.catalog.list_tables(self.settings.namespace)]
        return sorted(n for n in names if not n.endswith(QUARANTINE_SUFFIX))


class Dataset:
    """One bitemporal dataset. Every query result carries the stable system time it was answered under
    in its schema metadata (``chronolake.stable_system_time``)."""

    def __init__(self, table: BitemporalTable) -> None:
        self.table = table

    @property
    def spec(self) -> DatasetSpec:
        return self.table.spec

    @property
    def name(self) -> str:
        return self.spec.name

    # -- writing ---------------------------------------------------------------------------------

    def load(
        self,
        paths: Sequence[str | Path],
        *,
        system_time: TimeLike | None = None,
        system_time_column: str | None = None,
        valid_from_column: str | None = None,
        valid_to_column: str | None = None,
        period: str | None = None,
        processes: int | None = None,
        show_progress: bool = False,
    ) -> LoadReport:
        """Load assertion files in one atomic commit.

        By default the load is one transaction at the current time. ``system_time`` backdates it to a
        known time; ``system_time_column`` makes each distinct value of that column one transaction,
        in ascending order (a backfill of known history). Either must be later than the dataset's
        latest system time. ``valid_from_column``/``valid_to_column`` name the file's columns for the
        valid-time bounds; ``period`` (day, week, month, quarter, year) gives rows without a
        ``valid_to`` the range ``[valid_from, valid_from + period)``. ``processes`` splits a large load
        by key over that many processes (default: 2 for large CSV/Parquet loads on 2+ cores).
        """
        if valid_to_column is not None and period is not None:
            raise ConfigError("give either a valid-to column or a period, not both")
        mapping = ColumnMapping(
            valid_from=valid_from_column or VALID_FROM,
            valid_to=valid_to_column or VALID_TO,
            system_time=system_time_column,
        )
        options = LoadOptions(
            system_time=None if system_time is None else micros(system_time, "system time"),
            mapping=mapping,
            period=period,
            processes=processes,
        )
        self.table.refresh()
        refuse_direct_write(self.table.table)
        return load_files(self.table, paths, options=options, show_progress=show_progress)

    def stream_owner(self) -> StreamOwner | None:
        """The streaming job that writes this dataset, if one has claimed it (`chronolake.iceberg.ownership`)."""
        self.table.refresh()
        return stream_owner(self.table.table)

    # -- reading ---------------------------------------------------------------------------------

    def stable_system_time(self) -> int | None:
        self.table.refresh()
        return self.table.stable_system_time()

    def _known_at(self, known_at: TimeLike | None, allow_unstable: bool) -> tuple[int, int]:
        committed = self.stable_system_time()
        stable = 0 if committed is None else committed
        if known_at is None:
            return stable, stable
        t = micros(known_at, "known-at")
        if committed is None and not allow_unstable:
            raise UnstableRead(f"dataset {self.name!r} has no committed transaction yet")
        if t > stable and not allow_unstable:
            raise UnstableRead(
                f"known-at {format_micros(t)} is after the stable system time {format_micros(stable)} of "
                f"{self.name!r}: later transactions may still arrive (--allow-unstable / allow_unstable=True reads anyway)"
            )
        return t, stable

    def normalise_keys(self, keys: Sequence[Any] | None) -> list[tuple[Any, ...]] | None:
        if keys is None:
            return None
        width = len(self.spec.key)
        normalised = []
        for key in keys:
            parts = key if isinstance(key, tuple) else (key,)
            if len(parts) != width:
                raise ConfigError(f"a key of {self.name!r} has {width} part(s): {', '.join(self.spec.key_names)}")
            normalised.append(tuple(_key_value(c, p) for c, p in zip(self.spec.key, parts)))
        return normalised

    def as_of(
        self,
        valid_at: TimeLike,
        known_at: TimeLike | None = None,
        keys: Sequence[Any] | None = None,
        *,
        allow_unstable: bool = False,
    ) -> pa.Table:
        """Per key, the version true at ``valid_at`` as known at ``known_at`` (default: the stable time)."""
        t, stable = self._known_at(known_at, allow_unstable)
        v = micros(valid_at, "valid-at")
        rows = self.table.version_rows(
            t, self.normalise_keys(keys), extra=And(LessThanOrEqual(VALID_FROM, v), GreaterThan(VALID_TO, v))
        )
        return queries.with_metadata(queries.as_of(rows, self.spec, v, t), stable=stable, known_at=t)

    def timeline(
        self, known_at: TimeLike | None = None, keys: Sequence[Any] | None = None, *, allow_unstable: bool = False
    ) -> pa.Table:
        """Every version current at ``known_at``: the whole valid-time picture as then known."""
        t, stable = self._known_at(known_at, allow_unstable)
        rows = self.table.version_rows(t, self.normalise_keys(keys))
        return queries.with_metadata(queries.current(rows, self.spec, t), stable=stable, known_at=t)

    def history(self, key: Any, known_at: TimeLike | None = None, *, allow_unstable: bool = False) -> pa.Table:
        """Every version of one key with its four times (``system_to`` as of ``known_at``) and event id."""
        t, stable = self._known_at(known_at, allow_unstable)
        keys = self.normalise_keys([key])
        rows = self.table.version_rows(t, keys)
        result = queries.versions(rows, self.spec, t, with_event_id=True)
        result = result.sort_by([(VALID_FROM, "ascending"), (SYSTEM_FROM, "ascending")])
        return queries.with_metadata(result, stable=stable, known_at=t)

    def diff(
        self,
        known_at_1: TimeLike,
        known_at_2: TimeLike | None = None,
        keys: Sequence[Any] | None = None,
        *,
        allow_unstable: bool = False,
    ) -> pa.Table:
        """What a report at ``known_at_2`` shows differently from one at ``known_at_1``: per key and
        valid range, ``added``, ``removed`` or ``changed``, with the payload before and after."""
        t2, stable = self._known_at(known_at_2, allow_unstable)
        t1, _ = self._known_at(known_at_1, allow_unstable)
        if t1 > t2:
            t1, t2 = t2, t1
        touched = self.table.version_rows(
            t2,
            self.normalise_keys(keys),
            extra=Or(GreaterThan(SYSTEM_FROM, t1), And(GreaterThan(SYSTEM_TO, t1), LessThanOrEqual(SYSTEM_TO, t2))),
        )
        key_names = self.spec.key_names
        changed_keys = sorted(set(zip(*python_columns(touched, key_names))), key=repr) if touched.num_rows else []
        output = _DiffBuilder(self.spec)
        if changed_keys:
            rows = self.table.version_rows(t2, changed_keys)
            before = _pieces(queries.current(rows, self.spec, t1), self.spec)
            after = _pieces(queries.current(rows, self.spec, t2), self.spec)
            for key in changed_keys:
                for difference in diff_timelines(before.get(key, []), after.get(key, [])):
                    output.add(key, difference)
        result = output.to_arrow()
        metadata = {b"chronolake.known_at_1": format_micros(t1).encode()}
        return queries.with_metadata(result.replace_schema_metadata(metadata), stable=stable, known_at=t2)

    def quarantine(self) -> pa.Table:
        """Quarantined records (file, line, reason, raw) of committed loads."""
        self.table.refresh()
        rows = self.table.quarantine_table().scan().to_arrow()
        if rows.num_rows == 0:
            return rows
        # A file's records count once its load committed (its ledger row at the same system time);
        # a stream's records (no file hash) are committed with the checkpoint that wrote them.
        from_files = pc.is_valid(rows["source_sha256"])
        ledger = self.table.ledger().select(["sha256", "loaded_at"]).rename_columns(["source_sha256", "system_time"])
        committed = rows.filter(from_files).join(ledger, keys=["source_sha256", "system_time"], join_type="left semi")
        visible = pa.concat_tables([rows.filter(pc.invert(from_files)), committed.select(rows.column_names)])
        return visible.sort_by([("system_time", "ascending"), ("source", "ascending"), ("line", "ascending")])

    def loaded_files(self) -> pa.Table:
        """The file ledger: ``sha256`` of each loaded file and the system time it was loaded at."""
        self.table.refresh()
        return self.table.ledger()


def _key_value(column: Column, value: Any) -> Any:
    if column.type == "long" and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"key column {column.name} is a long; got {value!r}") from None
    return value


def _pieces(timeline: pa.Table, spec: DatasetSpec) -> dict[tuple[Any, ...], list[tuple[int, int, tuple[Any, ...]]]]:
    by_key: dict[tuple[Any, ...], list[tuple[int, int, tuple[Any, ...]]]] = defaultdict(list)
    width = len(spec.key_names)
    columns = python_columns(timeline, [*spec.key_names, VALID_FROM, VALID_TO, *spec.payload_names])
    for values in zip(*columns):
        by_key[tuple(values[:width])].append((values[width], values[width + 1], tuple(values[width + 2 :])))
    return by_key


class _DiffBuilder:
    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self.rows: list[tuple[Any, ...]] = []

    def add(self, key: tuple[Any, ...], difference: Any) -> None:
        empty = (None,) * len(self.spec.columns)
        self.rows.append(
            (*key, difference.valid_from, difference.valid_to, difference.change,
             *(difference.before or empty), *(difference.after or empty))
        )

    def to_arrow(self) -> pa.Table:
        spec = self.spec
        fields = [pa.field(c.name, arrow_type(c)) for c in spec.key]
        fields += [pa.field(VALID_FROM, TIMESTAMP), pa.field(VALID_TO, TIMESTAMP), pa.field("change", pa.string())]
        fields += [pa.field(f"{c.name}_before", arrow_type(c)) for c in spec.columns]
        fields += [pa.field(f"{c.name}_after", arrow_type(c)) for c in spec.columns]
        schema = pa.schema(fields)
        columns = [[row[i] for row in self.rows] for i in range(len(fields))]
        arrays = []
        for field, values in zip(fields, columns):
            if pa.types.is_timestamp(field.type):
                arrays.append(pa.array(list(values), pa.int64()).cast(field.type))
            else:
                arrays.append(pa.array(list(values), field.type))
        return pa.Table.from_arrays(arrays, schema=schema)

