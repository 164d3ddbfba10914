"""The rescaling policy, rule by rule (pure function, no AWS)."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chronolake.scaling_lambda.policy import (
    Action,
    LagUnit,
    Observation,
    PolicyConfig,
    Rule,
    decide,
    lag_parallelism,
    state_floor_parallelism,
)
from chronolake.scaling_lambda.schedule import Intent, ScheduleRequest

NOW = datetime(2025, 3, 14, 21, 0, tzinfo=timezone.utc)
GB = 10**9

CONFIG = PolicyConfig(
    min_parallelism=2,
    max_parallelism=48,
    parallelism_per_kpu=1,
    peak_parallelism=40,
    off_peak_parallelism=2,
    lag_threshold=1_000_000,
    lag_horizon_seconds=300,
    throughput_per_kpu=15_000,
    capacity_headroom=0.2,
    cooldown_seconds=900,
)


def observe(**changes: object) -> Observation:
    base = Observation(
        now=NOW,
        status="RUNNING",
        parallelism=10,
        parallelism_per_kpu=1,
        autoscaling_enabled=False,
        configuration_type="CUSTOM",
        last_update_at=NOW - timedelta(hours=3),
        state_bytes=40 * GB,  # floor: 2 KPUs at 25 GB usable each
        lag=1_000.0,
        lag_growth_per_second=0.0,
        cpu_percent=40.0,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def request(intent: Intent, parallelism: int | None = None, scheduled_at: datetime | None = None) -> ScheduleRequest:
    return ScheduleRequest("chronolake-prod", intent, parallelism, scheduled_at)


def test_scale_to_sets_the_requested_parallelism() -> None:
    decision = decide(request(Intent.SCALE_TO, 16), observe(), CONFIG)
    assert (decision.action, decision.target_parallelism, decision.rule) == (Action.SCALE_UP, 16, Rule.INTENT)


def test_peak_and_off_peak_use_the_profiles() -> None:
    assert decide(request(Intent.PEAK), observe(), CONFIG).target_parallelism == 40
    off = decide(request(Intent.OFF_PEAK), observe(), CONFIG)
    assert (off.action, off.target_parallelism) == (Action.SCALE_DOWN, 2)


def test_never_below_the_kpus_that_hold_the_state() -> None:
    # 180 GB of state at 50% of 50 GB per KPU needs 8 KPUs, although off_peak asks for 2.
    decision = decide(request(Intent.OFF_PEAK), observe(state_bytes=180 * GB), CONFIG)
    assert (decision.action, decision.target_parallelism, decision.rule) == (Action.SCALE_DOWN, 8, Rule.STATE_FLOOR)
    assert any("needs 8 KPUs" in r for r in decision.reasons)


def test_state_floor_counts_kpus_not_subtasks() -> None:
    config = dataclasses.replace(CONFIG, parallelism_per_kpu=2)
    # 8 KPUs of storage = parallelism 16 when each KPU runs two subtasks.
    assert state_floor_parallelism(180 * GB, config) == 16


def test_state_floor_wins_over_max_parallelism() -> None:
    config = dataclasses.replace(CONFIG, max_parallelism=6)
    decision = decide(request(Intent.SCALE_TO, 4), observe(parallelism=6, state_bytes=180 * GB), config)
    assert (decision.action, decision.target_parallelism, decision.rule) == (Action.SCALE_UP, 8, Rule.STATE_FLOOR)
    assert any("above max_parallelism" in r for r in decision.reasons)


def test_unknown_state_size_blocks_scale_down_but_not_scale_up() -> None:
    down = decide(request(Intent.OFF_PEAK), observe(state_bytes=None), CONFIG)
    assert (down.action, down.rule, down.target_parallelism) == (Action.NO_OP, Rule.STATE_UNKNOWN, 10)
    up = decide(request(Intent.PEAK), observe(state_bytes=None), CONFIG)
    assert (up.action, up.target_parallelism) == (Action.SCALE_UP, 40)


def test_no_scale_down_while_lag_is_above_threshold() -> None:
    # Lag is high but shrinking fast enough to drain within the horizon: hold, do not scale up either.
    obs = observe(lag=2_000_000.0, lag_growth_per_second=-20_000.0)
    decision = decide(request(Intent.OFF_PEAK), obs, CONFIG)
    assert (decision.action, decision.rule) == (Action.NO_OP, Rule.LAG_HIGH)


def test_no_scale_down_while_lag_is_unknown() -> None:
    decision = decide(request(Intent.OFF_PEAK), observe(lag=None, lag_growth_per_second=None), CONFIG)
    assert (decision.action, decision.rule) == (Action.NO_OP, Rule.LAG_UNKNOWN)


def test_no_scale_down_within_cooldown() -> None:
    obs = observe(last_update_at=NOW - timedelta(minutes=10))
    decision = decide(request(Intent.OFF_PEAK), obs, CONFIG)
    assert (decision.action, decision.rule) == (Action.NO_OP, Rule.COOLDOWN)
    after = decide(request(Intent.OFF_PEAK), observe(last_update_at=NOW - timedelta(minutes=16)), CONFIG)
    assert after.action is Action.SCALE_DOWN


def test_cooldown_does_not_block_scale_up() -> None:
    decision = decide(request(Intent.PEAK), observe(last_update_at=NOW - timedelta(minutes=1)), CONFIG)
    assert decision.action is Action.SCALE_UP


def test_scale_up_early_when_lag_grows_faster_than_capacity() -> None:
    # Lag is still below the threshold, but at +5,000 records/s it crosses 1M within 300 s.
    obs = observe(lag=200_000.0, lag_growth_per_second=5_000.0)
    decision = decide(request(Intent.AUTO), obs, CONFIG)
    # capacity 150k/s; input 155k/s; drain 200k in 300 s: 155,667/s * 1.2 / 15k -> 13 KPUs.
    assert (decision.action, decision.rule, decision.target_parallelism) == (Action.SCALE_UP, Rule.LAG_GROWTH, 13)


def test_lag_growth_raises_a_scheduled_off_peak_target() -> None:
    obs = observe(lag=900_000.0, lag_growth_per_second=30_000.0)
    decision = decide(request(Intent.OFF_PEAK), obs, CONFIG)
    assert decision.action is Action.SCALE_UP
    assert decision.rule is Rule.LAG_GROWTH


def test_slow_lag_growth_below_threshold_does_not_scale() -> None:
    # +100 records/s for 300 s stays far below the threshold: noise, not a trend.
    assert lag_parallelism(observe(lag=5_000.0, lag_growth_per_second=100.0), CONFIG) is None


def test_lag_in_millis_scales_by_the_input_to_capacity_ratio() -> None:
    config = dataclasses.replace(CONFIG, lag_unit=LagUnit.MILLIS, lag_threshold=60_000, throughput_per_kpu=None)
    # millisBehindLatest grows 500 ms per second: input runs 1.5x capacity.
    obs = observe(lag=30_000.0, lag_growth_per_second=500.0)
    # 10 KPUs * 1.5 * (1 + 30 s / 300 s) * 1.2 = 19.8 -> 20
    assert lag_parallelism(obs, config) == 20


def test_clamps_to_min_and_max() -> None:
    high = decide(request(Intent.SCALE_TO, 100), observe(), CONFIG)
    assert (high.target_parallelism, high.rule) == (48, Rule.CLAMP)
    low = decide(request(Intent.SCALE_TO, 1), observe(state_bytes=1.0), CONFIG)
    assert (low.target_parallelism, low.rule) == (2, Rule.CLAMP)


def test_at_target_is_a_no_op_that_says_why() -> None:
    decision = decide(request(Intent.SCALE_TO, 10), observe(), CONFIG)
    assert (decision.action, decision.rule) == (Action.NO_OP, Rule.AT_TARGET)
    assert decision.reasons[-1] == "already at parallelism 10"


def test_at_target_but_autoscaling_on_is_reconfigured() -> None:
    decision = decide(request(Intent.SCALE_TO, 10), observe(autoscaling_enabled=True), CONFIG)
    assert (decision.action, decision.target_parallelism) == (Action.RECONFIGURE, 10)


@pytest.mark.parametrize("status", ["UPDATING", "AUTOSCALING", "STARTING", "READY", "ROLLING_BACK"])
def test_not_running_is_a_no_op(status: str) -> None:
    decision = decide(request(Intent.PEAK), observe(status=status), CONFIG)
    assert (decision.action, decision.rule) == (Action.NO_OP, Rule.NOT_RUNNING)
    assert status in decision.reasons[0]


def test_duplicate_delivery_after_the_update_is_a_no_op() -> None:
    fired = NOW - timedelta(minutes=2)
    first = decide(request(Intent.AUTO, scheduled_at=fired), observe(cpu_percent=95.0), CONFIG)
    assert first.action is Action.SCALE_UP
    # The first delivery updated the application at NOW - 1 min; the second finds it newer than the firing.
    again = observe(parallelism=first.target_parallelism, cpu_percent=95.0, last_update_at=NOW - timedelta(minutes=1))
    second = decide(request(Intent.AUTO, scheduled_at=fired), again, CONFIG)
    assert (second.action, second.rule) == (Action.NO_OP, Rule.ALREADY_APPLIED)


def test_auto_scales_by_cpu_and_holds_inside_the_band() -> None:
    assert decide(request(Intent.AUTO), observe(cpu_percent=90.0), CONFIG).target_parallelism == 15
    assert decide(request(Intent.AUTO), observe(cpu_percent=12.0), CONFIG).target_parallelism == 2
    held = decide(request(Intent.AUTO), observe(cpu_percent=50.0), CONFIG)
    assert (held.action, held.rule) == (Action.NO_OP, Rule.AT_TARGET)


def test_auto_without_cpu_metric_holds() -> None:
    decision = decide(request(Intent.AUTO), observe(cpu_percent=None), CONFIG)
    assert decision.action is Action.NO_OP


def test_config_rejects_inconsistent_limits() -> None:
    with pytest.raises(ValueError):
        PolicyConfig(min_parallelism=8, max_parallelism=4)
    with pytest.raises(ValueError):
        PolicyConfig(scale_down_cpu_percent=70, target_cpu_percent=60)


@given(
    intent=st.sampled_from(list(Intent)),
    requested=st.integers(1, 200),
    current=st.integers(1, 64),
    state_gb=st.one_of(st.none(), st.floats(0, 3_000)),
    lag=st.one_of(st.none(), st.floats(0, 1e9)),
    growth=st.one_of(st.none(), st.floats(-1e6, 1e6)),
    cpu=st.one_of(st.none(), st.floats(0, 100)),
    minutes_since_update=st.integers(0, 600),
)
def test_invariants_hold_for_any_input(
    intent: Intent,
    requested: int,
    current: int,
    state_gb: float | None,
    lag: float | None,
    growth: float | None,
    cpu: float | None,
    minutes_since_update: int,
) -> None:
    obs = observe(
        parallelism=current,
        state_bytes=None if state_gb is None else state_gb * GB,
        lag=lag,
        lag_growth_per_second=growth,
        cpu_percent=cpu,
        last_update_at=NOW - timedelta(minutes=minutes_since_update),
    )
    req = request(intent, requested if intent is Intent.SCALE_TO else None)
    decision = decide(req, obs, CONFIG)
    target = decision.target_parallelism
    if decision.action is Action.NO_OP:
        return
    # Never below the state floor, and never blind below the current size.
    if state_gb is None:
        assert target >= current
    else:
        assert target >= state_floor_parallelism(state_gb * GB, CONFIG)
        assert target <= max(CONFIG.max_parallelism, state_floor_parallelism(state_gb * GB, CONFIG))
    assert target >= CONFIG.min_parallelism
    if target < current:
        assert lag is not None and lag <= CONFIG.lag_threshold
        assert minutes_since_update * 60 >= CONFIG.cooldown_seconds


def test_draining_backlog_is_rescaled_only_when_the_restart_pays_off_for_this_state_size() -> None:
    # 3.6M behind, draining at 10k/s: done in 360 s at the current size; the horizon asks for 13 KPUs.
    behind = dict(lag=3_600_000.0, lag_growth_per_second=-10_000.0)
    # Small state: a 45 s restart, then 13 KPUs drain the backlog plus what arrived meanwhile in ~225 s.
    assert lag_parallelism(observe(**behind, state_bytes=0.0), CONFIG) == 13
    # 120 GiB of state: a ~189 s restart, and the larger size would finish later (~736 s) than staying.
    assert lag_parallelism(observe(**behind, state_bytes=120 * 1024**3), CONFIG) is None


def test_slowly_draining_backlog_is_rescaled_when_the_restart_pays_off() -> None:
    # 30M behind, draining at only 1k/s (8 hours): a restart to a larger size finishes far sooner.
    obs = observe(lag=30_000_000.0, lag_growth_per_second=-1_000.0, state_bytes=120 * 1024**3)
    needed = lag_parallelism(obs, CONFIG)
    assert needed is not None and needed > 10


def test_restart_cost_grows_with_state() -> None:
    from chronolake.scaling_lambda.policy import restart_seconds

    assert restart_seconds(200 * 1024**3, CONFIG) > restart_seconds(20 * 1024**3, CONFIG) > restart_seconds(None, CONFIG)
