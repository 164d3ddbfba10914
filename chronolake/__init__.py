"""chronolake: a streaming bitemporal lakehouse on Apache Iceberg."""

__version__ = "0.1.0"
