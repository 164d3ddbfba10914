"""Table maintenance: compaction, snapshot expiry, orphan file removal.

History lives in rows, not in snapshots, so expiring snapshots loses no bitemporal answer. Two things
are kept on purpose: the snapshot a Flink Iceberg committer last wrote (it finds its last committed
checkpoint there on restart), and any file younger than the orphan grace period (a writer may have
written it and not committed yet; the period must exceed the longest checkpoint plus a restart).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import fs as pafs
from pyiceberg.exceptions import CommitFailedException

from chronolake.iceberg.dataset import CLOSED, OPEN, ROW_KIND, SYSTEM_FROM, VALID_FROM
from chronolake.iceberg.exceptions import CommitConflict, ConfigError
from chronolake.iceberg.table import OPERATION_PROPERTY, STABLE_PROPERTY, BitemporalTable

#: Summary key the Iceberg Flink committer writes; its newest snapshot must survive expiry.
FLINK_CHECKPOINT_PROPERTY = "flink.max-committed-checkpoint-id"
DEFAULT_ORPHAN_GRACE = timedelta(days=3)


@dataclass
class CompactionReport:
    rows_before: int
    rows_after: int
    files_before: int
    files_after: int


def compact(table: BitemporalTable) -> CompactionReport:
    """Rewrite the table sorted by (key, valid_from, system_from) in one atomic replace.

    Open twins whose closed twin exists are dropped (``system_to`` is then materialised in the closed
    row) and rows a replay duplicated collapse; every as-of, timeline and history answer is unchanged.
    """
    table.refresh()
    snapshot = table.table.current_snapshot()
    if snapshot is None:
        return CompactionReport(0, 0, 0, 0)
    stable = table.stable_system_time()
    table.ensure_no_commit_retry()
    files_before = len(list(table.table.scan().plan_files()))
    rows = table.scan()
    spec = table.spec
    identity = [*spec.key_names, VALID_FROM, SYSTEM_FROM]
    is_version = pc.is_in(rows[ROW_KIND], pa.array([OPEN, CLOSED]))
    versions = rows.filter(is_version)
    others = rows.filter(pc.invert(is_version))
    closed = versions.filter(pc.equal(versions[ROW_KIND], CLOSED))
    opened = versions.filter(pc.equal(versions[ROW_KIND], OPEN))
    still_open = opened.join(closed.select(identity), keys=identity, join_type="left anti") if closed.num_rows else opened
    pieces = [_distinct(closed, identity), _distinct(still_open, identity), others]
    kept = pa.concat_tables([p.select(rows.schema.names).cast(rows.schema) for p in pieces])
    kept = kept.sort_by([(n, "ascending") for n in identity])
    try:
        table.table.overwrite(
            kept,
            snapshot_properties={STABLE_PROPERTY: str(stable), OPERATION_PROPERTY: "compact"},
        )
    except CommitFailedException:
        raise CommitConflict(f"dataset {spec.name!r} changed during compaction; nothing was rewritten, run it again") from None
    table.refresh()
    files_after = len(list(table.table.scan().plan_files()))
    return CompactionReport(rows.num_rows, kept.num_rows, files_before, files_after)


def _distinct(rows: pa.Table, identity: list[str]) -> pa.Table:
    if rows.num_rows == 0:
        return rows
    rows = rows.append_column("__row", pa.array(range(rows.num_rows), pa.int64()))
    first = rows.group_by(identity, use_threads=False).aggregate([("__row", "min")])["__row_min"]
    return rows.take(first).drop_columns(["__row"])


def expire_snapshots(table: BitemporalTable, older_than: datetime) -> int:
    """Expire snapshots older than ``older_than``; keeps the current one and the Flink committer's last."""
    table.refresh()
    metadata = table.table.metadata
    current = table.table.current_snapshot()
    protected = {current.snapshot_id} if current else set()
    flink = [s for s in metadata.snapshots if s.summary is not None and s.summary.get(FLINK_CHECKPOINT_PROPERTY)]
    if flink:
        protected.add(max(flink, key=lambda s: s.sequence_number or 0).snapshot_id)
    cutoff = older_than.timestamp() * 1000
    expired = [s.snapshot_id for s in metadata.snapshots if s.timestamp_ms < cutoff and s.snapshot_id not in protected]
    if expired:
        table.table.maintenance.expire_snapshots().by_ids(expired).commit()
    return len(expired)


def remove_orphan_files(table: BitemporalTable, grace: timedelta = DEFAULT_ORPHAN_GRACE, *, dry_run: bool = False) -> list[str]:
    """Delete files under the table's location that no snapshot or metadata file references and that
    are older than ``grace``; returns their paths."""
    table.refresh()
    iceberg_table = table.table
    referenced: set[str] = {iceberg_table.metadata_location}
    referenced.update(entry.metadata_file for entry in iceberg_table.metadata.metadata_log)
    io = iceberg_table.io
    for snapshot in iceberg_table.metadata.snapshots:
        referenced.add(snapshot.manifest_list)
        for manifest in snapshot.manifests(io):
            referenced.add(manifest.manifest_path)
            for entry in manifest.fetch_manifest_entry(io, discard_deleted=False):
                referenced.add(entry.data_file.file_path)
    location = iceberg_table.location()
    filesystem, root = pafs.FileSystem.from_uri(location)
    cutoff = time.time() - grace.total_seconds()
    removed = []
    normalised = {_path_only(r) for r in referenced}
    for info in filesystem.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        modified = info.mtime.timestamp() if info.mtime else time.time()
        if info.path in normalised or modified > cutoff:
            continue
        removed.append(info.path)
        if not dry_run:
            filesystem.delete_file(info.path)
    return removed


def _path_only(uri: str) -> str:
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return parsed.path
    return f"{parsed.netloc}{parsed.path}"


def parse_age(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m`` or ``45s``."""
    units = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
    text = text.strip().lower()
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit():
        raise ConfigError(f"not an age: {text!r} (use e.g. 7d, 12h, 30m)")
    return timedelta(**{units[text[-1]]: int(text[:-1])})


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
