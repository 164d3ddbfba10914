"""A dataset's Iceberg table: reading its state and committing transactions as single atomic appends."""

from __future__ import annotations

import itertools
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import CommitFailedException, NoSuchTableError, TableAlreadyExistsError
from pyiceberg.expressions import AlwaysTrue, And, BooleanExpression, EqualTo, In, LessThanOrEqual, NotNull
from pyiceberg.io.pyarrow import (
    _check_pyarrow_schema_compatible,
    _dataframe_to_data_files,
    bin_pack_arrow_table,
    pyarrow_to_schema,
    write_file,
)
from pyiceberg.manifest import DataFile, ManifestEntryStatus
from pyiceberg.partitioning import PartitionFieldValue, PartitionKey
from pyiceberg.table import Table, TableProperties, WriteTask
from pyiceberg.table.snapshots import Snapshot
from pyiceberg.utils.properties import property_as_int

from chronolake.iceberg.algebra import Key, KeyState, Segment
from chronolake.iceberg.config import LakeSettings
from chronolake.iceberg.dataset import (
    CLOSED,
    CONTROL,
    EVENT,
    EVENT_DIGEST,
    EVENT_ID,
    FILE,
    LEDGER_PREFIX,
    OPEN,
    QUARANTINE_SUFFIX,
    ROW_KIND,
    SPEC_PROPERTY,
    SYSTEM_FROM,
    VALID_FROM,
    VALID_TO,
    DatasetSpec,
)
from chronolake.iceberg.exceptions import CommitConflict, DatasetAlreadyExists, DatasetNotFound
from chronolake.iceberg.queries import only_keys
from chronolake.iceberg.rows import RowBuilder, python_columns
from chronolake.iceberg.schema import iceberg_schema, partition_spec, quarantine_schema, sort_order

STABLE_PROPERTY = "chronolake.stable-system-time"
OPERATION_PROPERTY = "chronolake.operation"
#: pyiceberg (and Java Iceberg) re-apply a failed append or overwrite on top of whatever was committed
#: meanwhile. For a batch transaction prepared from the snapshot it read, that would close versions
#: that are no longer current; for a compaction, it would drop rows appended meanwhile. So a conflict
#: must fail the commit: the writer prepares again from the new snapshot.
NO_COMMIT_RETRY = {"commit.retry.num-retries": "0"}
#: Up to this many keys a read pushes the key list into the scan (pyiceberg prunes buckets and row
#: groups with it); above, evaluating the literal set per data file costs more than it saves
#: (measured in bench/RESULTS.md: 2,000 keys took 3x longer than reading everything).
_KEY_PUSHDOWN_LIMIT = 64


class BitemporalTable:
    """One dataset: its declaration and its Iceberg table (plus the quarantine table beside it)."""

    def __init__(self, catalog: Catalog, settings: LakeSettings, spec: DatasetSpec, table: Table) -> None:
        self.catalog = catalog
        self.settings = settings
        self.spec = spec
        self.table = table

    # -- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def create(cls, catalog: Catalog, settings: LakeSettings, spec: DatasetSpec) -> tuple[BitemporalTable, bool]:
        """Create the dataset's tables; returns ``(table, created)``. Re-creating an identical one is a no-op."""
        identifier = (settings.namespace, spec.name)
        try:
            table = catalog.create_table(
                identifier,
                schema=iceberg_schema(spec),
                partition_spec=partition_spec(spec),
                sort_order=sort_order(spec),
                properties={
                    SPEC_PROPERTY: spec.to_json(),
                    "format-version": "2",
                    "write.parquet.compression-codec": "zstd",
                    **NO_COMMIT_RETRY,
                },
            )
            created = True
        except TableAlreadyExistsError:
            existing = cls.open(catalog, settings, spec.name)
            if existing.spec != spec:
                raise DatasetAlreadyExists(
                    f"dataset {spec.name!r} already exists with a different declaration: {existing.spec.to_json()}"
                ) from None
            return existing, False
        try:
            catalog.create_table(
                (settings.namespace, spec.name + QUARANTINE_SUFFIX), schema=quarantine_schema()
            )
        except TableAlreadyExistsError:
            pass
        return cls(catalog, settings, spec, table), created

    @classmethod
    def open(cls, catalog: Catalog, settings: LakeSettings, name: str) -> BitemporalTable:
        try:
            table = catalog.load_table((settings.namespace, name))
        except NoSuchTableError:
            raise DatasetNotFound(f"no dataset named {name!r} (create it with: chronolake dataset create)") from None
        declaration = table.properties.get(SPEC_PROPERTY)
        if declaration is None:
            raise DatasetNotFound(f"table {settings.namespace}.{name} is not a chronolake dataset")
        return cls(catalog, settings, DatasetSpec.from_json(name, declaration), table)

    def refresh(self) -> None:
        self.table = self.table.refresh()

    def ensure_no_commit_retry(self) -> None:
        """Make sure a conflicting commit fails instead of being re-applied (see :data:`NO_COMMIT_RETRY`).

        Tables chronolake creates carry the property; an older or foreign table gets it set here. A
        property change creates no snapshot, so what this writer prepared stays valid unless another
        writer committed a snapshot meanwhile, which is then reported as the conflict it is.
        """
        key, value = next(iter(NO_COMMIT_RETRY.items()))
        if self.table.properties.get(key) == value:
            return
        prepared = self.table.current_snapshot()
        with self.table.transaction() as transaction:
            transaction.set_properties(NO_COMMIT_RETRY)
        self.table = self.table.refresh()
        current = self.table.current_snapshot()
        if (prepared and prepared.snapshot_id) != (current and current.snapshot_id):
            raise CommitConflict(f"dataset {self.spec.name!r} changed while this transaction was prepared; run it again")

    # -- system time -----------------------------------------------------------------------------

    def stable_system_time(self) -> int | None:
        """Every transaction with ``t <=`` this is committed; ``None`` for a dataset with no commit yet."""
        snapshot = self.table.current_snapshot()
        if snapshot is None:
            return None
        value = snapshot.summary.get(STABLE_PROPERTY) if snapshot.summary else None
        if value is not None:
            return int(value)
        # A snapshot written by another engine (the streaming job, maintenance): the control rows
        # are the truth. They only grow from commit to commit, so the newest snapshot that added
        # any holds the maximum: read the files each snapshot added, newest first, and stop there.
        recent = self._latest_control_row(snapshot)
        if recent is not None:
            return recent
        controls = self.scan(EqualTo(ROW_KIND, CONTROL), [SYSTEM_FROM])
        if controls.num_rows == 0:
            return None
        return int(pc.max(controls[SYSTEM_FROM].cast(pa.int64())).as_py())

    def _latest_control_row(self, snapshot: Snapshot, max_snapshots: int = 20) -> int | None:
        """Max control-row `system_from` in the data files added by the newest snapshots that added
        any control row (up to `max_snapshots` back); None if none of them did."""
        io = self.table.io
        current: Snapshot | None = snapshot
        for _ in range(max_snapshots):
            if current is None:
                return None
            found: int | None = None
            for manifest in current.manifests(io):
                if manifest.added_snapshot_id != current.snapshot_id or not manifest.has_added_files():
                    continue
                for entry in manifest.fetch_manifest_entry(io, discard_deleted=True):
                    if entry.status != ManifestEntryStatus.ADDED:
                        continue
                    with io.new_input(entry.data_file.file_path).open() as stream:
                        rows = pq.read_table(stream, columns=[ROW_KIND, SYSTEM_FROM], filters=[(ROW_KIND, "=", CONTROL)])
                    if rows.num_rows:
                        value = int(pc.max(rows[SYSTEM_FROM].cast(pa.int64())).as_py())
                        found = value if found is None else max(found, value)
            if found is not None:
                return found
            parent = current.parent_snapshot_id
            current = self.table.snapshot_by_id(parent) if parent is not None else None
        return None

    @staticmethod
    def next_system_time(latest: int | None) -> int:
        """A batch transaction time: now, but later than ``latest``, the dataset's latest system time."""
        now = time.time_ns() // 1_000
        return now if latest is None else max(now, latest + 1)

    # -- reading ---------------------------------------------------------------------------------

    def scan(self, row_filter: BooleanExpression | None = None, columns: Sequence[str] | None = None) -> pa.Table:
        selected = tuple(columns) if columns else ("*",)
        return self.table.scan(row_filter=row_filter or AlwaysTrue(), selected_fields=selected).to_arrow()

    def version_rows(self, known_at: int | None = None, keys: Sequence[Key] | None = None, extra: BooleanExpression | None = None) -> pa.Table:
        """Version rows (open and closed twins), optionally up to a system time and for some keys."""
        clauses: list[BooleanExpression] = [In(ROW_KIND, {OPEN, CLOSED})]
        if known_at is not None:
            clauses.append(LessThanOrEqual(SYSTEM_FROM, known_at))
        if extra is not None:
            clauses.append(extra)
        key_names = self.spec.key_names
        if keys is not None and len(keys) <= _KEY_PUSHDOWN_LIMIT:
            if len(key_names) == 1:
                clauses.append(In(key_names[0], {k[0] for k in keys}))
            else:
                for position, name in enumerate(key_names):
                    clauses.append(In(name, {k[position] for k in keys}))
        row_filter = clauses[0] if len(clauses) == 1 else And(*clauses)
        rows = self.scan(row_filter)
        if keys is not None:
            rows = only_keys(rows, key_names, keys)
        return rows

    def load_state(self, keys: Sequence[Key]) -> dict[Key, KeyState]:
        """The algebra's view of ``keys``: current segments and seen event ids, rebuilt from the table."""
        if not keys or self.table.current_snapshot() is None:
            return {}
        key_names = self.spec.key_names
        key_clauses: list[BooleanExpression] = []
        if len(keys) <= _KEY_PUSHDOWN_LIMIT:
            key_clauses = [In(name, {k[position] for k in keys}) for position, name in enumerate(key_names)]

        def scan(*clauses: BooleanExpression, columns: Sequence[str] | None = None) -> pa.Table:
            every = [*clauses, *key_clauses]
            return only_keys(self.scan(And(*every) if len(every) > 1 else every[0], columns), key_names, keys)

        identity = [*key_names, VALID_FROM, SYSTEM_FROM]
        names = [*key_names, VALID_FROM, VALID_TO, SYSTEM_FROM, *self.spec.payload_names, EVENT_ID, EVENT_DIGEST]
        # Current = open twins whose closed twin does not exist (yet); closed twins are read for their
        # identity only, which is most of the table after many corrections.
        opened = scan(EqualTo(ROW_KIND, OPEN), columns=names)
        closed = scan(EqualTo(ROW_KIND, CLOSED), columns=identity)
        current = opened.join(closed, keys=identity, join_type="left anti") if closed.num_rows else opened
        current = current.sort_by([(n, "ascending") for n in identity])

        states: dict[Key, KeyState] = defaultdict(KeyState)
        width = len(key_names)
        payload_end = width + 3 + len(self.spec.payload_names)
        for values in zip(*python_columns(current, names)):
            segment = (values[width], values[width + 1], values[width + 2], values[width + 3 : payload_end], values[-2], values[-1])
            states[values[:width]].segments.append(tuple.__new__(Segment, segment))

        # Event ids seen by a key: on its versions and on marker rows (files without any are pruned by stats).
        events = scan(In(ROW_KIND, {OPEN, CLOSED, EVENT}), NotNull(EVENT_ID), columns=[*key_names, EVENT_ID, EVENT_DIGEST])
        for values in zip(*python_columns(events, [*key_names, EVENT_ID, EVENT_DIGEST])):
            states[values[:width]].events[values[width]] = values[width + 1]
        return dict(states)

    def ledger(self, hashes: Iterable[str] | None = None) -> pa.Table:
        """The file ledger (``sha256``, ``loaded_at``, ``entries``), optionally only for some hashes.

        A batch load writes one ledger row per file. A file published through the stream has one per
        partition, each behind the file's rows in its partition: the file is in the table once all
        are, at the latest of their times (``loaded_at``); ``entries`` counts them.
        """
        row_filter: BooleanExpression = EqualTo(ROW_KIND, FILE)
        if hashes is not None:
            row_filter = And(row_filter, In(EVENT_ID, {f"{LEDGER_PREFIX}{h}" for h in hashes}))
        rows = self.scan(row_filter, [EVENT_ID, SYSTEM_FROM])
        sha256 = pc.utf8_slice_codeunits(rows[EVENT_ID], len(LEDGER_PREFIX))
        grouped = pa.table({"sha256": sha256, "loaded_at": rows[SYSTEM_FROM]}).group_by("sha256", use_threads=False)
        ledger = grouped.aggregate([("loaded_at", "max"), ("loaded_at", "count")])
        return pa.table(
            {
                "sha256": ledger["sha256"],
                "loaded_at": ledger["loaded_at_max"],
                "entries": ledger["loaded_at_count"],
            }
        )

    def loaded_files(self, hashes: Iterable[str]) -> dict[str, int]:
        """Which of these file hashes are already in the ledger, with the system time they were loaded at."""
        wanted = list(hashes)
        if not wanted or self.table.current_snapshot() is None:
            return {}
        return dict(zip(*python_columns(self.ledger(wanted), ["sha256", "loaded_at"])))

    def quarantine_table(self) -> Table:
        return self.catalog.load_table((self.settings.namespace, self.spec.name + QUARANTINE_SUFFIX))

    # -- writing ---------------------------------------------------------------------------------

    def partition_values(self, data: pa.Table) -> list[pa.Array]:
        """The table's partition values of ``data``'s rows, one array per partition field."""
        metadata = self.table.metadata
        schema = metadata.schema()
        values = []
        for partition in metadata.spec().fields:
            source = schema.find_field(partition.source_id)
            column = data[source.name]
            if isinstance(column, pa.ChunkedArray):
                column = column.combine_chunks()
            values.append(partition.transform.pyarrow_transform(source.field_type)(column))
        return values

    def write(self, data: pa.Table, *, presorted: bool = False) -> list[DataFile]:
        """Write rows as data files of this table without committing them: one file per partition (or
        more when large), each in the declared sort order.

        ``presorted``: the rows are already in partition order and, within a partition, in the sort
        order. The files are invisible until :meth:`commit` names them; if that commit never happens
        they are orphans, which maintenance removes after its grace period (docs/storage.md). Load
        processes write their own files this way, so the commit only writes the manifest.
        """
        if data.num_rows == 0:
            return []
        metadata = self.table.metadata
        _check_pyarrow_schema_compatible(metadata.schema(), data.schema, format_version=metadata.format_version)
        write_uuid = uuid.uuid4()
        order = [(n, "ascending") for n in (*self.spec.key_names, VALID_FROM, SYSTEM_FROM)]
        spec = metadata.spec()
        if len(spec.fields) != 1:
            return list(_dataframe_to_data_files(metadata, data.sort_by(order), self.table.io, write_uuid=write_uuid))
        (values,) = self.partition_values(data)
        if not presorted:
            indices = pc.sort_indices(data.append_column("__partition", values), [("__partition", "ascending"), *order])
            data, values = data.take(indices), values.take(indices)
        # Rows of one partition are contiguous: slice instead of filtering the table once per partition.
        runs = pc.run_end_encode(values)
        ends = runs.run_ends.to_pylist()
        partition_values = runs.values.to_pylist()
        task_schema = pyarrow_to_schema(
            data.schema, name_mapping=metadata.schema().name_mapping, format_version=metadata.format_version
        )
        target = property_as_int(
            metadata.properties,
            TableProperties.WRITE_TARGET_FILE_SIZE_BYTES,
            TableProperties.WRITE_TARGET_FILE_SIZE_BYTES_DEFAULT,
        )
        counter = itertools.count()
        tasks = []
        start = 0
        for end, value in zip(ends, partition_values):
            key = PartitionKey(
                field_values=[PartitionFieldValue(field=spec.fields[0], value=value)],
                partition_spec=spec,
                schema=metadata.schema(),
            )
            part = data.slice(start, end - start).combine_chunks()
            for batches in bin_pack_arrow_table(part, target):
                tasks.append(
                    WriteTask(write_uuid=write_uuid, task_id=next(counter), record_batches=batches, partition_key=key, schema=task_schema)
                )
            start = end
        return list(write_file(self.table.io, metadata, iter(tasks)))

    def commit(
        self,
        builder: RowBuilder,
        t: int,
        operation: str,
        quarantine: pa.Table | None = None,
        data_files: Sequence[DataFile] = (),
    ) -> None:
        """One atomic append: the transaction's versions, its ledger rows and the new stable system time.

        ``data_files`` were written beforehand by :meth:`write` (e.g. by load processes); the builder's
        rows are written here. Quarantine records are appended first, to their own table; they are
        shown only once the data commit that names their file at the same system time exists, so a
        failed commit leaves none visible.
        """
        builder.add_control(t)
        files = [*data_files, *self.write(builder.to_arrow())]
        self.ensure_no_commit_retry()
        if quarantine is not None and quarantine.num_rows:
            self.quarantine_table().append(quarantine)
        properties = {STABLE_PROPERTY: str(t), OPERATION_PROPERTY: operation}
        try:
            with self.table.transaction() as transaction:
                with transaction.update_snapshot(snapshot_properties=properties).fast_append() as append:
                    for data_file in files:
                        append.append_data_file(data_file)
        except CommitFailedException:
            raise CommitConflict(
                f"dataset {self.spec.name!r} changed while this transaction was prepared "
                "(another writer committed first); nothing was written, run it again"
            ) from None
