"""Opening the lake's Iceberg catalog (embedded SQLite by default; Postgres, REST or Glue by properties)."""

from __future__ import annotations

from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.exceptions import NamespaceAlreadyExistsError

from chronolake.iceberg.config import CATALOG_NAME, LakeSettings
from chronolake.iceberg.exceptions import ConfigError


def open_catalog(settings: LakeSettings) -> Catalog:
    properties = dict(settings.catalog_properties)
    try:
        catalog = load_catalog(CATALOG_NAME, **properties)
    except Exception as error:  # pyiceberg raises driver-specific errors for an unreachable catalog
        raise ConfigError(f"cannot open catalog {properties.get('uri', properties.get('type'))}: {_first_line(error)}") from None
    try:
        catalog.create_namespace_if_not_exists(settings.namespace)
    except NamespaceAlreadyExistsError:
        pass
    except Exception as error:
        raise ConfigError(f"cannot use catalog {properties.get('uri', '')}: {_first_line(error)}") from None
    return catalog


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
