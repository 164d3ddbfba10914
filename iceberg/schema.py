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

from chronolake.iceberg.dataset import (
    EVENT_DIGEST,
    EVENT_ID,
    ROW_KIND,
    SYSTEM_FROM,
    TIME_COLUMNS,
    VALID_FROM,
    Column,
    DatasetSpec,
)

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
    # Every column is optional: control and ledger rows carry no key, and a null payload is a value.
    fields = [
        NestedField(field_id, column.name, iceberg_type(column), required=False)
        for field_id, column in enumerate((*spec.key, *spec.columns), start=1)
    ]
    for name in TIME_COLUMNS:
        fields.append(NestedField(len(fields) + 1, name, TimestamptzType(), required=False))
    fields.append(NestedField(len(fields) + 1, ROW_KIND, StringType(), required=True))
    fields.append(NestedField(len(fields) + 1, EVENT_ID, StringType(), required=False))
    fields.append(NestedField(len(fields) + 1, EVENT_DIGEST, StringType(), required=False))
    return Schema(*fields)


def arrow_schema(spec: DatasetSpec) -> pa.Schema:
    fields = [pa.field(c.name, arrow_type(c)) for c in (*spec.key, *spec.columns)]
    fields += [pa.field(name, TIMESTAMP) for name in TIME_COLUMNS]
    fields += [
        pa.field(ROW_KIND, pa.string(), nullable=False),
        pa.field(EVENT_ID, pa.string()),
        pa.field(EVENT_DIGEST, pa.string()),
    ]
    return pa.schema(fields)


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
