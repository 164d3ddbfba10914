"""Lambda settings from CHRONOLAKE__SCALING__<KEY> environment variables."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass

from chronolake.scaling_lambda.exceptions import InvalidSettingsError
from chronolake.scaling_lambda.metrics import LagSource, MetricQueries, lag_unit, queries_for
from chronolake.scaling_lambda.policy import PolicyConfig

PREFIX = "CHRONOLAKE__SCALING__"


@dataclass(frozen=True)
class Settings:
    policy: PolicyConfig
    lag_source: LagSource = LagSource.KAFKA
    state_metric: str = "lastCheckpointSize"
    msk_dimensions: Mapping[str, str] | None = None
    metrics_namespace: str = "Chronolake/Scaling"
    # When set, schedules naming any other application are rejected before any AWS call.
    applications: frozenset[str] | None = None

    def queries(self, application: str) -> MetricQueries:
        return queries_for(
            application, self.lag_source, state_metric=self.state_metric, msk_dimensions=self.msk_dimensions
        )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        def get(key: str) -> str | None:
            return environ.get(PREFIX + key)

        source_name = get("LAG_SOURCE") or LagSource.KAFKA.value
        try:
            source = LagSource(source_name)
        except ValueError:
            raise InvalidSettingsError(f"{PREFIX}LAG_SOURCE must be kafka, msk or kinesis, not {source_name!r}") from None

        overrides: dict[str, object] = {"lag_unit": lag_unit(source)}
        for f in dataclasses.fields(PolicyConfig):
            raw = get(f.name.upper())
            if raw is None or f.name == "lag_unit":
                continue
            # Numeric fields only; the default's type says which (throughput_per_kpu defaults to None).
            kind = int if isinstance(f.default, int) else float
            try:
                overrides[f.name] = kind(raw)
            except ValueError:
                raise InvalidSettingsError(f"{PREFIX}{f.name.upper()} must be {kind.__name__}, got {raw!r}") from None
        try:
            policy = PolicyConfig(**overrides)
        except ValueError as error:
            raise InvalidSettingsError(str(error)) from None

        msk_raw = get("MSK_DIMENSIONS")
        msk: dict[str, str] | None = None
        if msk_raw:
            try:
                loaded = json.loads(msk_raw)
            except json.JSONDecodeError:
                raise InvalidSettingsError(f"{PREFIX}MSK_DIMENSIONS must be a JSON object") from None
            if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
                raise InvalidSettingsError(f"{PREFIX}MSK_DIMENSIONS must be a JSON object of strings")
            msk = loaded
        if source is LagSource.MSK and not msk:
            raise InvalidSettingsError(f"{PREFIX}LAG_SOURCE=msk needs {PREFIX}MSK_DIMENSIONS")

        apps_raw = get("APPLICATIONS")
        apps = frozenset(a.strip() for a in apps_raw.split(",") if a.strip()) if apps_raw else None
        return cls(
            policy=policy,
            lag_source=source,
            state_metric=get("STATE_METRIC") or "lastCheckpointSize",
            msk_dimensions=msk,
            metrics_namespace=get("METRICS_NAMESPACE") or "Chronolake/Scaling",
            applications=apps,
        )
