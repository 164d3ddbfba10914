"""The rescaling policy: a pure function from (schedule intent, observation, config) to a decision.

It knows nothing of boto3 or CloudWatch, so the Lambda and the simulator run the same rules.
Capacity is counted in parallelism; a KPU runs `parallelism_per_kpu` subtasks.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from chronolake.scaling_lambda.schedule import Intent, ScheduleRequest

GIB = 1024**3


class LagUnit(enum.Enum):
    """Unit of the consumer-lag metric: Kafka offsets or Kinesis milliseconds behind latest."""

    RECORDS = "records"
    MILLIS = "millis"


class Action(enum.Enum):
    SCALE_UP = "scale_up"
    SCALE_DOWN = "scale_down"
    # Same parallelism, but the application is not in the CUSTOM / autoscaling-off shape we own.
    RECONFIGURE = "reconfigure"
    NO_OP = "no_op"


class Rule(enum.Enum):
    """The rule that settled a decision; logged and emitted as a metric dimension."""

    NOT_RUNNING = "not_running"
    ALREADY_APPLIED = "already_applied"
    AT_TARGET = "at_target"
    LAG_HIGH = "lag_high"
    LAG_UNKNOWN = "lag_unknown"
    STATE_UNKNOWN = "state_unknown"
    COOLDOWN = "cooldown"
    INTENT = "intent"
    LAG_GROWTH = "lag_growth"
    STATE_FLOOR = "state_floor"
    CLAMP = "clamp"


@dataclass(frozen=True)
class PolicyConfig:
    """Thresholds of the policy. Lag thresholds are in the lag metric's unit."""

    min_parallelism: int = 1
    max_parallelism: int = 64
    parallelism_per_kpu: int = 1
    peak_parallelism: int = 40
    off_peak_parallelism: int = 1
    # Running storage per KPU (50 GB on Managed Flink) and the share of it the state may fill:
    # RocksDB compaction and local snapshot copies need the rest.
    storage_per_kpu_bytes: int = 50 * 10**9
    state_fill_limit: float = 0.5
    lag_unit: LagUnit = LagUnit.RECORDS
    lag_threshold: float = 1_000_000.0
    # Horizon for "lag grows faster than capacity": act when lag would cross the threshold
    # within this many seconds, and size capacity to drain the backlog within it.
    lag_horizon_seconds: float = 300.0
    # Records per second one KPU processes; needed to size from a lag in records.
    throughput_per_kpu: float | None = None
    capacity_headroom: float = 0.2
    cooldown_seconds: float = 900.0
    # Rescale outage model (state-aware): fixed cost plus restore time per GiB of state.
    restart_seconds_base: float = 45.0
    restart_seconds_per_gib: float = 1.2
    target_cpu_percent: float = 60.0
    scale_up_cpu_percent: float = 80.0
    scale_down_cpu_percent: float = 25.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_parallelism <= self.max_parallelism:
            raise ValueError("need 1 <= min_parallelism <= max_parallelism")
        if self.parallelism_per_kpu < 1:
            raise ValueError("parallelism_per_kpu must be >= 1")
        if not 0 < self.state_fill_limit <= 1:
            raise ValueError("state_fill_limit must be in (0, 1]")
        if self.lag_unit is LagUnit.RECORDS and self.throughput_per_kpu is not None and self.throughput_per_kpu <= 0:
            raise ValueError("throughput_per_kpu must be > 0")
        if not self.scale_down_cpu_percent < self.target_cpu_percent < self.scale_up_cpu_percent:
            raise ValueError("need scale_down_cpu_percent < target_cpu_percent < scale_up_cpu_percent")

    def kpus(self, parallelism: int) -> int:
        return math.ceil(parallelism / self.parallelism_per_kpu)


@dataclass(frozen=True)
class Observation:
    """What the Lambda read about the application. None = metric unavailable."""

    now: datetime
    status: str
    parallelism: int
    parallelism_per_kpu: int
    autoscaling_enabled: bool
    configuration_type: str
    last_update_at: datetime | None = None
    state_bytes: float | None = None
    lag: float | None = None
    lag_growth_per_second: float | None = None
    cpu_percent: float | None = None


@dataclass(frozen=True)
class Decision:
    action: Action
    rule: Rule
    current_parallelism: int
    target_parallelism: int
    target_kpus: int
    reasons: tuple[str, ...] = field(default_factory=tuple)

    @property
    def changes_application(self) -> bool:
        return self.action is not Action.NO_OP

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action.value,
            "rule": self.rule.value,
            "current_parallelism": self.current_parallelism,
            "target_parallelism": self.target_parallelism,
            "target_kpus": self.target_kpus,
            "reasons": list(self.reasons),
        }


def state_floor_parallelism(state_bytes: float, config: PolicyConfig) -> int:
    """Smallest parallelism whose KPUs hold `state_bytes` within the fill limit."""
    usable_per_kpu = config.storage_per_kpu_bytes * config.state_fill_limit
    kpus = max(1, math.ceil(state_bytes / usable_per_kpu))
    return kpus * config.parallelism_per_kpu


def restart_seconds(state_bytes: float | None, config: PolicyConfig) -> float:
    """Expected processing outage of a rescale: snapshot, stop, restore at the new parallelism."""
    return config.restart_seconds_base + (state_bytes or 0.0) / GIB * config.restart_seconds_per_gib


def lag_parallelism(observation: Observation, config: PolicyConfig) -> int | None:
    """Parallelism that keeps up with the input and drains the backlog within the horizon.

    None when the lag is not projected to cross the threshold within the horizon, when the
    backlog drains sooner at the current size than through a restart at a larger one, or when
    it cannot be sized (no lag metric, or a lag in records without a throughput model).
    """
    lag, growth = observation.lag, observation.lag_growth_per_second
    if lag is None:
        return None
    growth = growth or 0.0
    horizon = config.lag_horizon_seconds
    if lag + max(growth, 0.0) * horizon <= config.lag_threshold:
        return None
    kpus = config.kpus(observation.parallelism)
    # Behind means saturated, so processing runs at capacity and input = capacity + lag growth.
    if config.lag_unit is LagUnit.RECORDS:
        if config.throughput_per_kpu is None:
            return None
        per_kpu = config.throughput_per_kpu
        capacity = kpus * per_kpu
        input_rate = capacity + growth
        backlog = lag
    else:
        # millisBehindLatest grows by g ms per second when input runs at (1 + g/1000) x capacity;
        # a lag of L ms is L/1000 seconds of input. Capacity is counted in KPUs here.
        per_kpu = 1.0
        capacity = float(kpus)
        input_rate = capacity * (1 + growth / 1000)
        backlog = input_rate * lag / 1000
    required = input_rate + backlog / horizon
    if required <= capacity:
        return None
    needed = math.ceil(required * (1 + config.capacity_headroom) / per_kpu)
    if input_rate < capacity:
        # Already draining: a rescale pauses processing for the restart, during which input piles up.
        outage = restart_seconds(observation.state_bytes, config)
        drain_now = backlog / (capacity - input_rate)
        drain_rescaled = outage + (backlog + input_rate * outage) / (needed * per_kpu - input_rate)
        if drain_now <= drain_rescaled:
            return None
    return needed * config.parallelism_per_kpu


def _cpu_parallelism(observation: Observation, config: PolicyConfig) -> tuple[int, str]:
    current, cpu = observation.parallelism, observation.cpu_percent
    if cpu is None:
        return current, "auto: no CPU metric, holding current parallelism"
    if config.scale_down_cpu_percent <= cpu <= config.scale_up_cpu_percent:
        return current, f"auto: CPU {cpu:.1f}% within [{config.scale_down_cpu_percent}, {config.scale_up_cpu_percent}]"
    kpus = max(1, math.ceil(config.kpus(current) * cpu / config.target_cpu_percent))
    return kpus * config.parallelism_per_kpu, f"auto: CPU {cpu:.1f}% -> size for {config.target_cpu_percent}%"


def decide(request: ScheduleRequest, observation: Observation, config: PolicyConfig) -> Decision:
    """Decide the target parallelism for one schedule invocation."""
    current = observation.parallelism

    def no_op(rule: Rule, *reasons: str, target: int = current) -> Decision:
        return Decision(Action.NO_OP, rule, current, target, config.kpus(target), tuple(reasons))

    if observation.status != "RUNNING":
        # Updating, autoscaling or stopped: its parallelism is in flux or meaningless.
        return no_op(Rule.NOT_RUNNING, f"application is {observation.status}, not RUNNING")
    if (
        request.scheduled_at is not None
        and observation.last_update_at is not None
        and observation.last_update_at >= request.scheduled_at
    ):
        return no_op(
            Rule.ALREADY_APPLIED,
            f"application updated at {observation.last_update_at.isoformat()}, not before this "
            f"schedule fired at {request.scheduled_at.isoformat()}: duplicate or superseded delivery",
        )

    reasons: list[str] = []
    rule = Rule.INTENT
    if request.intent is Intent.SCALE_TO:
        assert request.parallelism is not None  # guaranteed by parse_schedule
        target = request.parallelism
        reasons.append(f"scale_to {target}")
    elif request.intent is Intent.PEAK:
        target = config.peak_parallelism
        reasons.append(f"peak profile {target}")
    elif request.intent is Intent.OFF_PEAK:
        target = config.off_peak_parallelism
        reasons.append(f"off_peak profile {target}")
    else:
        target, why = _cpu_parallelism(observation, config)
        reasons.append(why)

    by_lag = lag_parallelism(observation, config)
    if by_lag is not None and by_lag > target:
        target, rule = by_lag, Rule.LAG_GROWTH
        reasons.append(
            f"lag {observation.lag:.0f} growing {observation.lag_growth_per_second or 0:.0f}/s would exceed "
            f"{config.lag_threshold:.0f} within {config.lag_horizon_seconds:.0f}s: scale up early to {by_lag}"
        )

    clamped = min(max(target, config.min_parallelism), config.max_parallelism)
    if clamped != target:
        reasons.append(f"clamped {target} to [{config.min_parallelism}, {config.max_parallelism}]")
        target, rule = clamped, Rule.CLAMP

    # The state floor comes after the clamp on purpose: max_parallelism is a cost limit, while
    # running below the state floor fills the KPUs' disks and fails the application.
    if observation.state_bytes is None:
        if target < current:
            return no_op(Rule.STATE_UNKNOWN, *reasons, "state size unknown: never scale down blind")
    else:
        floor = state_floor_parallelism(observation.state_bytes, config)
        if target < floor:
            reasons.append(
                f"state {observation.state_bytes / GIB:.1f} GiB needs {config.kpus(floor)} KPUs at "
                f"{config.state_fill_limit:.0%} of {config.storage_per_kpu_bytes / 10**9:.0f} GB each"
                + (" (above max_parallelism)" if floor > config.max_parallelism else "")
            )
            target, rule = floor, Rule.STATE_FLOOR

    if target < current:
        if observation.lag is None:
            return no_op(Rule.LAG_UNKNOWN, *reasons, "lag unknown: not scaling down")
        if observation.lag > config.lag_threshold:
            return no_op(
                Rule.LAG_HIGH, *reasons, f"lag {observation.lag:.0f} above {config.lag_threshold:.0f}: not scaling down"
            )
        if observation.last_update_at is not None:
            since = observation.now - observation.last_update_at
            if since < timedelta(seconds=config.cooldown_seconds):
                return no_op(
                    Rule.COOLDOWN,
                    *reasons,
                    f"last update {since.total_seconds():.0f}s ago, cooldown {config.cooldown_seconds:.0f}s: not scaling down",
                )

    owned_shape = (
        observation.configuration_type == "CUSTOM"
        and not observation.autoscaling_enabled
        and observation.parallelism_per_kpu == config.parallelism_per_kpu
    )
    if target == current:
        if owned_shape:
            return no_op(Rule.AT_TARGET, *reasons, f"already at parallelism {current}")
        reasons.append("parallelism matches; setting CUSTOM, parallelism per KPU and autoscaling off")
        return Decision(Action.RECONFIGURE, rule, current, target, config.kpus(target), tuple(reasons))
    action = Action.SCALE_UP if target > current else Action.SCALE_DOWN
    return Decision(action, rule, current, target, config.kpus(target), tuple(reasons))
