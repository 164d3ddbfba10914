"""The lake's Iceberg catalog as the Flink jobs open it: pyiceberg's catalog properties (the lake's
settings, `chronolake.iceberg.config`) translated into Iceberg Java's (stdlib only: the job env runs
it too).

Supported: the SQL catalog on SQLite (the embedded default) or PostgreSQL, which Java opens as its
`JdbcCatalog`, with a warehouse on the local disk or in S3 (or an S3-compatible endpoint); and AWS
Glue with a warehouse in S3, whose Java client takes credentials from the AWS SDK's default chain.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit


class UnsupportedCatalog(ValueError):
    """The lake's catalog or warehouse is one the streaming job cannot open (yet)."""


#: pyiceberg's static credentials for its Glue client (`client.*` applies to every AWS client).
_GLUE_CREDENTIALS = (
    "glue.access-key-id", "glue.secret-access-key", "glue.session-token", "glue.profile-name",
    "client.access-key-id", "client.secret-access-key", "client.session-token", "client.profile-name",
)

#: pyiceberg's S3 properties that Iceberg's S3FileIO spells the same way.
_S3_SAME = ("s3.endpoint", "s3.access-key-id", "s3.secret-access-key", "s3.session-token")


def catalog_properties(lake: Mapping[str, str]) -> dict[str, str]:
    """Iceberg Java's catalog properties (as Flink SQL's `CREATE CATALOG` takes them) for the lake's
    pyiceberg catalog properties `lake`; raises `UnsupportedCatalog` with a one-line reason."""
    kind = lake.get("type", "sql")
    warehouse = lake.get("warehouse", "")
    if kind == "glue":
        return _glue(lake, warehouse)
    if kind != "sql":
        raise UnsupportedCatalog(
            f"the streaming job opens SQL catalogs (SQLite or PostgreSQL) and AWS Glue only, not a {kind!r} catalog"
        )
    uri = lake.get("uri", "")
    properties = {
        "type": "iceberg",
        "catalog-impl": "org.apache.iceberg.jdbc.JdbcCatalog",
        "warehouse": warehouse,
        # pyiceberg (0.12) creates `iceberg_tables` with the V1 column `iceberg_type`; in V1 mode
        # Java writes it too and treats NULL as a table, so either side can create tables the other sees.
        "jdbc.schema-version": "V1",
        # Iceberg 1.10's JdbcCatalog.initialize checks that its tables exist with
        # DatabaseMetaData.getTables(...).next() and never closes that result set: on SQLite the
        # pooled connection keeps a read transaction open for good, pinned to the snapshot of that
        # moment, and every later commit through it fails with SQLITE_BUSY / SQLITE_BUSY_SNAPSHOT as
        # soon as another connection has written (no busy timeout can wait that out). With several
        # committers per checkpoint that failed the job every few seconds. pyiceberg has created the
        # catalog tables before any job starts (the lake is opened first), so skip the check.
        # Measured: 3 threads x 100 concurrent commits, 200 failures with it, 0 without.
        "jdbc.init-catalog-tables": "false",
        **_connection(uri),
        **_file_io(warehouse, lake),
    }
    return properties


def _glue(lake: Mapping[str, str], warehouse: str) -> dict[str, str]:
    keys = [name for name in _GLUE_CREDENTIALS if lake.get(name)]
    if keys:
        # Iceberg Java's Glue client has no such properties: it takes the AWS SDK's default chain.
        raise UnsupportedCatalog(
            f"the streaming job's Glue client takes AWS credentials from the environment or its role "
            f"(AWS_ACCESS_KEY_ID, AWS_PROFILE, ...), not from {', '.join(keys)}"
        )
    if urlsplit(warehouse).scheme not in ("s3", "s3a"):
        raise UnsupportedCatalog(f"a Glue catalog's warehouse must be in S3 (s3://bucket/path), not {warehouse!r}")
    properties = {
        "type": "iceberg",
        "catalog-impl": "org.apache.iceberg.aws.glue.GlueCatalog",
        "warehouse": warehouse,
        # Iceberg Java allows only Hive-style names ([a-z0-9_]) unless told not to check; Glue's API
        # and pyiceberg take the job's `stream-unrouted__quarantine` (hyphen: no dataset can have it).
        "glue.skip-name-validation": "true",
        **{name: lake[name] for name in ("glue.endpoint", "glue.id", "glue.skip-archive") if lake.get(name)},
        **_file_io(warehouse, lake),
    }
    if lake.get("glue.region"):
        properties["client.region"] = lake["glue.region"]  # one region for Iceberg Java's AWS clients: the catalog's
    return properties


def _connection(uri: str) -> dict[str, str]:
    if uri.startswith("sqlite:///"):
        return {
            # sqlite:///relative.db or sqlite:////absolute.db, as SQLAlchemy spells a file.
            "uri": "jdbc:sqlite:" + os.path.abspath(uri.removeprefix("sqlite:///")),
            # `jdbc.*` properties reach the driver as connection properties. WAL lets the tools
            # read the catalog while the committer writes it (with the default rollback journal a
            # reader's shared lock fails the commit with SQLITE_BUSY); busy_timeout makes two
            # writers wait for each other instead of failing after sqlite-jdbc's default 3 s.
            "jdbc.journal_mode": "WAL",
            "jdbc.busy_timeout": "30000",
        }
    parts = urlsplit(uri)
    dialect = parts.scheme.split("+")[0]
    if dialect in ("postgresql", "postgres"):
        if not parts.hostname:
            raise UnsupportedCatalog(f"the catalog URI {_redacted(uri)} names no PostgreSQL host")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        address = host if parts.port is None else f"{host}:{parts.port}"
        # The driver reads the same query parameters (sslmode=...) from its own URL.
        url = f"jdbc:postgresql://{address}{parts.path or '/'}" + (f"?{parts.query}" if parts.query else "")
        credentials = {}
        if parts.username:
            credentials["jdbc.user"] = unquote(parts.username)
        if parts.password is not None:
            credentials["jdbc.password"] = unquote(parts.password)
        return {"uri": url, **credentials}
    raise UnsupportedCatalog(
        f"the streaming job opens SQL catalogs on SQLite or PostgreSQL only, not {_redacted(uri) or 'an empty URI'}"
    )


def _file_io(warehouse: str, lake: Mapping[str, str]) -> dict[str, str]:
    scheme = urlsplit(warehouse).scheme
    if scheme == "file":
        # Local files through java.nio instead of Hadoop's local file system, which forks `chmod`
        # for every file it creates (streaming/java/io/chronolake/flink/LocalFileIO.java).
        return {"io-impl": "io.chronolake.flink.LocalFileIO"}
    if scheme in ("s3", "s3a"):
        io = {"io-impl": "org.apache.iceberg.aws.s3.S3FileIO"}
        io.update({name: lake[name] for name in _S3_SAME if lake.get(name)})
        region = lake.get("s3.region") or lake.get("client.region")
        if region:
            io["client.region"] = region
        if lake.get("s3.endpoint") and lake.get("s3.force-virtual-addressing", "false").lower() != "true":
            # As pyiceberg's Arrow file system addresses a custom endpoint: bucket in the path.
            io["s3.path-style-access"] = "true"
        return io
    raise UnsupportedCatalog(
        f"the streaming job writes to a warehouse on the local disk (file://) or in S3 (s3://), not {warehouse!r}"
    )


def _redacted(uri: str) -> str:
    """`uri` without its password, for messages."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return uri.replace(f":{parts.password}@", ":***@", 1)


def with_clause(props: dict[str, str]) -> str:
    """The body of a Flink SQL `WITH (...)` clause."""
    return ", ".join(f"'{_quoted(k)}' = '{_quoted(v)}'" for k, v in props.items())


def _quoted(text: str) -> str:
    return text.replace("'", "''")
