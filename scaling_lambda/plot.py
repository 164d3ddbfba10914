"""PNG of load, capacity and lag over the simulated day (matplotlib; never part of the Lambda zip)."""

from __future__ import annotations

from pathlib import Path

from chronolake.scaling_lambda.simulator import Result, Workload


def render(results: list[Result], workload: Workload, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rate, ax_lag, zoom) = plt.subplots(3, 1, figsize=(12, 11), constrained_layout=True)
    first = results[0]
    ax_rate.plot(first.times, [v / 1e3 for v in first.load], color="black", linewidth=1, label="load (arrivals)")
    for r in results:
        ax_rate.step(r.times, [v / 1e3 for v in r.capacity], where="post", linewidth=1.2, label=f"capacity: {r.strategy}")
        ax_lag.plot(r.times, [v / 1e6 for v in r.lag], linewidth=1.2, label=f"lag: {r.strategy}")
    ax_rate.set_yscale("symlog", linthresh=10)
    ax_rate.set_ylabel("records/s (thousands, symlog)")
    ax_rate.set_title(
        f"One day: quiet load + {workload.burst_records / 1e6:.0f}M-record burst at "
        f"{workload.burst_start_seconds // 3600:02d}:{workload.burst_start_seconds % 3600 // 60:02d} UTC"
    )
    ax_rate.legend(loc="upper left", fontsize=8)
    ax_lag.set_ylabel("consumer lag (million records)")
    for ax in (ax_rate, ax_lag):
        ax.set_xlim(0, 24)
        ax.set_xticks(range(0, 25, 2))
    ax_lag.legend(loc="upper left", fontsize=8)
    for ax in (ax_rate, ax_lag):
        ax.grid(alpha=0.3)
    # The burst hour is where the strategies differ; the full-day panels compress it to a spike.
    for r in results:
        # Dashed so the policy stays visible where it matches static peak.
        zoom.plot(r.times, [v / 1e6 for v in r.lag], linewidth=1.4, linestyle="--" if r.strategy == "policy" else "-", label=f"lag: {r.strategy}")
    start = workload.burst_start_seconds / 3600
    zoom.set_xlim(start - 0.5, start + 0.75)
    zoom.set_title("burst hour: consumer lag", fontsize=10)
    zoom.set_ylabel("million records")
    zoom.set_xlabel("hour of day (UTC)")
    zoom.grid(alpha=0.3)
    zoom.legend(loc="upper right", fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
