"""The Iceberg and Arrow schemas, partition spec and sort order a dataset declaration implies."""

from __future__ import annotations

import re

import pyarrow as pa
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table.sorting import SortField, SortOrder
from pyiceberg.transforms import BucketTransform, IdentityTransform
from pyiceberg.types import (
    BooleanType,
    DateType,
    DecimalType,
    DoubleType,
    IcebergType,
    LongType,
    NestedField,
    StringType,
    TimestamptzType,
)

from chronolake.iceberg.dataset import QUARANTINE_COLUMNS, ROW_KIND, SYSTEM_FROM, VALID_FROM, Column, DatasetSpec

TIMESTAMP = pa.timestamp("us", tz="UTC")
_DECIMAL = re.compile(r"^decimal\((\d+),(\d+)\)$")

_ICEBERG_TYPES: dict[str, IcebergType] = {
    "string": StringType(),
    "long": LongType(),
    "double": DoubleType(),
    "date": DateType(),
    "timestamp": TimestamptzType(),
    "boolean": BooleanType(),
}
_ARROW_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "long": pa.int64(),
    "double": pa.float64(),
    "date": pa.date32(),
    "timestamp": TIMESTAMP,
    "boolean": pa.bool_(),
}


def iceberg_type(column: Column) -> IcebergType:
    if column.type in _ICEBERG_TYPES:
        return _ICEBERG_TYPES[column.type]
    match = _DECIMAL.match(column.type)
    assert match is not None, column.type
    return DecimalType(int(match[1]), int(match[2]))


def arrow_type(column: Column) -> pa.DataType:
    if column.type in _ARROW_TYPES:
        return _ARROW_TYPES[column.type]
    match = _DECIMAL.match(column.type)
    assert match is not None, column.type
    return pa.decimal128(int(match[1]), int(match[2]))


def iceberg_schema(spec: DatasetSpec) -> Schema:
    # Every column optional but row_kind: control and ledger rows carry no key, a null payload is a value.
    return Schema(
        *(
            NestedField(field_id, c.name, iceberg_type(c), required=c.name == ROW_KIND)
            for field_id, c in enumerate(spec.table_columns(), start=1)
        )
    )


def arrow_schema(spec: DatasetSpec) -> pa.Schema:
    return pa.schema([pa.field(c.name, arrow_type(c), nullable=c.name != ROW_KIND) for c in spec.table_columns()])


def quarantine_schema() -> pa.Schema:
    return pa.schema([pa.field(c.name, arrow_type(c)) for c in QUARANTINE_COLUMNS])


def partition_spec(spec: DatasetSpec) -> PartitionSpec:
    # Bucket the first key column: keys spread evenly and one key's versions stay in one bucket.
    # Never valid_to/system_to: the sentinel would pile every open version into one partition.
    return PartitionSpec(
        PartitionField(
            source_id=1, field_id=1000, transform=BucketTransform(spec.buckets), name=f"{spec.key[0].name}_bucket"
        )
    )


def sort_order(spec: DatasetSpec) -> SortOrder:
    schema = iceberg_schema(spec)
    names = [*spec.key_names, VALID_FROM, SYSTEM_FROM]
    return SortOrder(
        *[SortField(source_id=schema.find_field(name).field_id, transform=IdentityTransform()) for name in names]
    )
