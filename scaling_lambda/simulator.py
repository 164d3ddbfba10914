"""Replay one day of load against a capacity model and a scaling strategy.

The policy strategy runs the Lambda's own `decide` on CloudWatch-like one-minute datapoints, with
every schedule firing delivered twice (EventBridge delivers at least once).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from chronolake.scaling_lambda.metrics import TREND_POINTS, trend_per_second
from chronolake.scaling_lambda.policy import PolicyConfig, Observation, decide, restart_seconds, state_floor_parallelism
from chronolake.scaling_lambda.schedule import Intent, ScheduleRequest

DAY = 24 * 3600
STEP = 10  # seconds
DAY_START = datetime(2025, 3, 14, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Workload:
    """A quiet trading day plus the end-of-day burst (150M records, processed within 5 minutes)."""

    night_rate: float = 3_000.0  # records/s
    market_rate: float = 12_000.0
    market_open_seconds: int = 13 * 3600 + 1800  # 13:30 UTC
    market_close_seconds: int = 20 * 3600  # 20:00 UTC
    burst_start_seconds: int = 21 * 3600 + 1800  # 21:30 UTC, end-of-day files
    burst_records: float = 150e6
    burst_arrival_seconds: int = 60
    burst_deadline_seconds: int = 300
    sla_seconds: int = 900

    def rate(self, t: float) -> float:
        base = self.market_rate if self.market_open_seconds <= t < self.market_close_seconds else self.night_rate
        if self.burst_start_seconds <= t < self.burst_start_seconds + self.burst_arrival_seconds:
            base += self.burst_records / self.burst_arrival_seconds
        return base


@dataclass(frozen=True)
class CapacityModel:
    throughput_per_kpu: float = 15_000.0  # records/s one KPU sustains
    state_bytes: float = 150e9
    # Records become visible in Iceberg at the next checkpoint commit.
    commit_latency_seconds: float = 60.0


@dataclass(frozen=True)
class Strategy:
    name: str
    initial_parallelism: int
    # (seconds after midnight, intent); empty = static sizing.
    schedules: tuple[tuple[int, Intent], ...] = ()
    duplicate_after_seconds: int = 30


@dataclass
class Result:
    strategy: str
    sla_compliance: float  # share of records visible within the SLA
    burst_seconds: float  # burst start until its last record is processed
    burst_met: bool
    worst_lag_records: float
    worst_latency_seconds: float
    rescales: int
    kpu_hours: float
    times: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    capacity: list[float] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)

    @property
    def sla_met(self) -> bool:
        return self.burst_met and self.sla_compliance >= 1.0


PEAK_FROM_SECONDS = 21 * 3600 + 600  # 21:10 UTC, 20 minutes before the expected burst
PEAK_HOLD_SECONDS = 2700


def policy_schedules(peak_from: int = PEAK_FROM_SECONDS, peak_hold: int = PEAK_HOLD_SECONDS) -> tuple[tuple[int, Intent], ...]:
    """`peak` every 5 minutes inside the peak window, `auto` every 5 minutes outside it."""
    peak_until = peak_from + peak_hold
    return tuple(
        (t, Intent.PEAK if peak_from <= t < peak_until else Intent.AUTO) for t in range(0, DAY, 300)
    )


def simulate(workload: Workload, model: CapacityModel, config: PolicyConfig, strategy: Strategy) -> Result:
    steps = DAY // STEP
    # Cumulative arrivals at step boundaries, to turn "processed so far" into record arrival times.
    arrived = [0.0]
    for i in range(steps):
        arrived.append(arrived[-1] + workload.rate(i * STEP) * STEP)

    def arrival_time(count: float) -> float:
        i = bisect.bisect_left(arrived, count)
        if i == 0:
            return 0.0
        lo, hi = arrived[i - 1], arrived[i]
        return (i - 1) * STEP + (STEP * (count - lo) / (hi - lo) if hi > lo else 0.0)

    def arrived_by(t: float) -> float:
        if t <= 0:
            return 0.0
        i = min(int(t // STEP), steps - 1)
        return arrived[i] + (arrived[i + 1] - arrived[i]) * (t - i * STEP) / STEP

    deliveries = sorted(
        [(t, intent, t) for t, intent in strategy.schedules]
        + [(t + strategy.duplicate_after_seconds, intent, t) for t, intent in strategy.schedules]
    )
    parallelism = strategy.initial_parallelism
    outage_until = -1.0
    previous_kpus = config.kpus(parallelism)
    last_update: float | None = None
    processed = 0.0
    late = 0.0
    rescales = 0
    kpu_seconds = 0.0
    burst_done: float | None = None
    burst_total = arrived_by(workload.burst_start_seconds + workload.burst_arrival_seconds)
    sla_arrival_gap = workload.sla_seconds - model.commit_latency_seconds
    lag_points: list[tuple[datetime, float]] = []
    cpu_last: float | None = None
    worst_lag = worst_latency = 0.0
    result = Result(strategy.name, 0.0, 0.0, False, 0.0, 0.0, 0, 0.0)
    next_delivery = 0

    for i in range(steps):
        t = i * STEP
        while next_delivery < len(deliveries) and deliveries[next_delivery][0] <= t:
            _, intent, fired = deliveries[next_delivery]
            next_delivery += 1
            observation = Observation(
                now=DAY_START + timedelta(seconds=t),
                status="UPDATING" if t < outage_until else "RUNNING",
                parallelism=parallelism,
                parallelism_per_kpu=config.parallelism_per_kpu,
                autoscaling_enabled=False,
                configuration_type="CUSTOM",
                last_update_at=None if last_update is None else DAY_START + timedelta(seconds=last_update),
                state_bytes=model.state_bytes,
                lag=lag_points[-1][1] if lag_points else None,
                lag_growth_per_second=trend_per_second(lag_points[-TREND_POINTS:]),
                cpu_percent=cpu_last,
            )
            request = ScheduleRequest("simulated", intent, scheduled_at=DAY_START + timedelta(seconds=fired))
            decision = decide(request, observation, config)
            if decision.changes_application and decision.target_parallelism != parallelism:
                outage_until = t + restart_seconds(model.state_bytes, config)
                last_update = t
                previous_kpus = config.kpus(parallelism)
                parallelism = decision.target_parallelism
                rescales += 1

        kpus = config.kpus(parallelism)
        # While restarting, bill the larger of the old and new sizes: a conservative cost.
        kpu_seconds += (max(kpus, previous_kpus) if t < outage_until else kpus) * STEP
        capacity = 0.0 if t < outage_until else kpus * model.throughput_per_kpu
        backlog_before = arrived[i] - processed
        done = min(arrived[i + 1] - processed, capacity * STEP)
        new_processed = processed + done
        # Records processed now that arrived before (now - SLA gap) miss the end-to-end SLA.
        late += max(0.0, min(new_processed, arrived_by(t + STEP - sla_arrival_gap)) - processed)
        if done > 0:
            worst_latency = max(worst_latency, t + STEP - arrival_time(processed) + model.commit_latency_seconds)
        processed = new_processed
        lag = arrived[i + 1] - processed
        worst_lag = max(worst_lag, lag)
        if burst_done is None and processed >= burst_total - 1e-6 and t >= workload.burst_start_seconds:
            burst_done = t + STEP
        if (t + STEP) % 60 == 0 and capacity > 0:
            # One-minute CloudWatch datapoints; Managed Flink publishes none while restarting.
            lag_points.append((DAY_START + timedelta(seconds=t + STEP), lag))
            cpu_last = min(100.0, 100.0 * done / (capacity * STEP)) if backlog_before < 1 else 100.0
        result.times.append(t / 3600)
        result.load.append(workload.rate(t))
        result.capacity.append(capacity)
        result.lag.append(lag)

    result.sla_compliance = 1.0 - late / arrived[-1]
    result.burst_seconds = math.inf if burst_done is None else burst_done - workload.burst_start_seconds
    result.burst_met = result.burst_seconds <= workload.burst_deadline_seconds
    result.worst_lag_records = worst_lag
    result.worst_latency_seconds = worst_latency
    result.rescales = rescales
    result.kpu_hours = kpu_seconds / 3600
    return result


def compare(
    workload: Workload, model: CapacityModel, config: PolicyConfig, peak_from: int = PEAK_FROM_SECONDS
) -> list[Result]:
    """Static peak size, static minimum (the state floor) and the policy, on the same day."""
    floor = max(config.min_parallelism, state_floor_parallelism(model.state_bytes, config))
    return [
        simulate(workload, model, config, Strategy("static peak", config.peak_parallelism)),
        simulate(workload, model, config, Strategy("static minimum", floor)),
        simulate(workload, model, config, Strategy("policy", floor, policy_schedules(peak_from))),
    ]


def reference_config(model: CapacityModel) -> PolicyConfig:
    """The policy settings for the reference workload (documented in docs/scaling.md)."""
    return PolicyConfig(
        min_parallelism=1,
        max_parallelism=64,
        parallelism_per_kpu=1,
        peak_parallelism=40,
        off_peak_parallelism=1,
        throughput_per_kpu=model.throughput_per_kpu,
        lag_threshold=1_000_000,
        lag_horizon_seconds=300,
        cooldown_seconds=900,
    )
