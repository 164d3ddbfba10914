"""iceberg"""
