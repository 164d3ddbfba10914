"""The same dataset life cycle on other storage: an S3 warehouse (real HTTP S3 endpoint) and a
Postgres-backed SQL catalog (real PostgreSQL server)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import boto3
import pytest
import sqlalchemy

from chronolake.iceberg.config import LakeSettings
from chronolake.lake import Lake

pytestmark = pytest.mark.integration

CSV = "isin,price,valid_from,valid_to\nA,1.5,2024-01-01,\nB,2,2024-01-01,2024-02-01\nA,1.7,2024-01-15,\n"
CORRECTION = "isin,price,valid_from,valid_to\nA,1.6,2024-01-01,2024-01-15\n"


def exercise(lake: Lake, tmp_path: Path) -> None:
    dataset = lake.create_dataset("prices", key=["isin"], columns={"price": "decimal(10,4)"})
    (tmp_path / "a.csv").write_text(CSV)
    (tmp_path / "b.csv").write_text(CORRECTION)
    first = dataset.load([tmp_path / "a.csv"])
    dataset.load([tmp_path / "b.csv"])
    assert dataset.load([tmp_path / "a.csv"]).files[0].status == "already loaded"
    reopened = Lake(settings=lake.settings).dataset("prices")
    now = [(r["isin"], r["price"]) for r in reopened.as_of("2024-01-10").to_pylist()]
    then = [(r["isin"], r["price"]) for r in reopened.as_of("2024-01-10", first.system_time).to_pylist()]
    assert now == [("A", Decimal("1.6")), ("B", Decimal("2"))]
    assert then == [("A", Decimal("1.5")), ("B", Decimal("2"))]


def test_s3_warehouse_on_a_real_s3_endpoint(s3_endpoint: str, tmp_path: Path) -> None:
    s3 = boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    s3.create_bucket(Bucket="lake")
    environ = {
        "CHRONOLAKE_HOME": str(tmp_path / "home"),
        "CHRONOLAKE__CATALOG__WAREHOUSE": "s3://lake/warehouse",
        "CHRONOLAKE__CATALOG__S3__ENDPOINT": s3_endpoint,
        "CHRONOLAKE__CATALOG__S3__ACCESS_KEY_ID": "testing",
        "CHRONOLAKE__CATALOG__S3__SECRET_ACCESS_KEY": "testing",
        "CHRONOLAKE__CATALOG__S3__REGION": "us-east-1",
    }
    settings = LakeSettings.from_environment(environ=environ)
    assert settings.catalog_properties["s3.access-key-id"] == "testing"
    exercise(Lake(settings=settings), tmp_path)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="lake", Prefix="warehouse/")["Contents"]]
    assert any(k.endswith(".parquet") and "/prices/data/" in k for k in keys)
    assert any(k.endswith(".metadata.json") for k in keys)
    assert not any((tmp_path / "home").rglob("*.parquet")), "data must live in S3, not on local disk"


def test_postgres_backed_sql_catalog(postgres_uri: str, tmp_path: Path) -> None:
    environ = {
        "CHRONOLAKE_HOME": str(tmp_path / "home"),
        "CHRONOLAKE__CATALOG__URI": postgres_uri,
    }
    exercise(Lake(settings=LakeSettings.from_environment(environ=environ)), tmp_path)
    engine = sqlalchemy.create_engine(postgres_uri)
    with engine.connect() as connection:
        names = connection.execute(sqlalchemy.text("select table_name from iceberg_tables")).scalars().all()
    assert "prices" in names
    assert not (tmp_path / "home" / "catalog.db").exists()
