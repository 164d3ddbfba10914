"""Lake settings and dataset declaration files.

Catalog properties merge, later winning: the embedded default (SQLite catalog and a warehouse under
``CHRONOLAKE_HOME``), the ``catalog:`` section of ``$CHRONOLAKE_HOME/chronolake.yaml``, and
``CHRONOLAKE__CATALOG__<PROP>`` environment variables, where ``__`` inside ``<PROP>`` stands for a dot
and ``_`` for a dash (``CHRONOLAKE__CATALOG__S3__ACCESS_KEY_ID`` sets ``s3.access-key-id``), as pyiceberg
reads its own ``PYICEBERG_CATALOG__`` variables. A property with an underscore in its name is set in
the YAML file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from chronolake.iceberg.dataset import DatasetSpec
from chronolake.iceberg.exceptions import ConfigError

HOME_VARIABLE = "CHRONOLAKE_HOME"
ENV_PREFIX = "CHRONOLAKE__CATALOG__"
CATALOG_NAME = "chronolake"
DEFAULT_NAMESPACE = "chronolake"


@dataclass(frozen=True)
class LakeSettings:
    home: Path
    catalog_properties: dict[str, str] = field(default_factory=dict)
    namespace: str = DEFAULT_NAMESPACE

    @classmethod
    def from_environment(cls, home: str | Path | None = None, environ: Mapping[str, str] | None = None) -> LakeSettings:
        environ = os.environ if environ is None else environ
        home_path = Path(home or environ.get(HOME_VARIABLE) or Path.home() / ".chronolake").expanduser().resolve()
        properties = {
            "type": "sql",
            "uri": f"sqlite:///{home_path / 'catalog.db'}",
            "warehouse": (home_path / "warehouse").as_uri(),
        }
        namespace = DEFAULT_NAMESPACE
        config_file = home_path / "chronolake.yaml"
        if config_file.exists():
            document = _read_yaml(config_file)
            section = document.get("catalog") or {}
            if not isinstance(section, dict):
                raise ConfigError(f"{config_file}: 'catalog' must be a mapping of properties")
            properties.update({str(k): str(v) for k, v in section.items()})
            namespace = str(document.get("namespace", namespace))
        for name, value in environ.items():
            if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
                properties[name[len(ENV_PREFIX) :].lower().replace("__", ".").replace("_", "-")] = value
        if properties.get("type") == "sql" and str(properties.get("uri", "")).startswith("sqlite:///"):
            home_path.mkdir(parents=True, exist_ok=True)
        return cls(home=home_path, catalog_properties=properties, namespace=namespace)


def _read_yaml(path: Path) -> dict[str, object]:
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return document


def load_declarations(path: Path) -> list[DatasetSpec]:
    """Read a datasets file: ``datasets: {NAME: {key: [...], columns: {COL: TYPE}, partition: {buckets: N}}}``."""
    document = _read_yaml(path)
    datasets = document.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise ConfigError(f"{path}: expected a top-level 'datasets' mapping")
    return [DatasetSpec.from_declaration(str(name), decl) for name, decl in datasets.items()]
