"""`chronolake scaling ...`: the rescaling simulator."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from chronolake.scaling_lambda.simulator import (
    CapacityModel,
    Result,
    Workload,
    compare,
    reference_config,
)

app = typer.Typer(help="Rescaling of the Managed Flink application.", no_args_is_help=True)


def _clock(value: str) -> int:
    try:
        hours, minutes = (int(p) for p in value.split(":"))
    except ValueError:
        raise typer.BadParameter(f"expected HH:MM, got {value!r}") from None
    if not (0 <= hours < 24 and 0 <= minutes < 60):
        raise typer.BadParameter(f"expected HH:MM, got {value!r}")
    return hours * 3600 + minutes * 60


def results_table(results: list[Result]) -> Table:
    table = Table(title="One simulated day (reference workload)")
    for column in ("strategy", "SLA met", "records within 15 min", "burst processed in", "worst lag (records)", "worst latency", "rescales", "KPU-hours"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for r in results:
        table.add_row(
            r.strategy,
            "yes" if r.sla_met else "no",
            f"{r.sla_compliance:.3%}",
            f"{r.burst_seconds:.0f} s",
            f"{r.worst_lag_records:,.0f}",
            f"{r.worst_latency_seconds:.0f} s",
            str(r.rescales),
            f"{r.kpu_hours:.1f}",
        )
    return table


@app.command()
def simulate(
    out: Path = typer.Option(Path("bench/out/scaling_day.png"), help="PNG plot of load, capacity and lag."),
    burst_at: str = typer.Option("21:30", help="UTC time the end-of-day burst arrives (HH:MM)."),
    peak_at: str = typer.Option("21:10", help="UTC time the peak schedule window opens (HH:MM)."),
    burst_records: float = typer.Option(150e6, help="Records in the end-of-day burst."),
    throughput_per_kpu: float = typer.Option(15_000.0, help="Records/s one KPU sustains."),
    state_gb: float = typer.Option(150.0, help="RocksDB state size in GB (sets the floor and restart time)."),
    plot: bool = typer.Option(True, help="Render the PNG."),
) -> None:
    """Replay a day: static peak size, static minimum size and the policy; print SLA and cost."""
    workload = dataclasses.replace(Workload(), burst_start_seconds=_clock(burst_at), burst_records=burst_records)
    model = CapacityModel(throughput_per_kpu=throughput_per_kpu, state_bytes=state_gb * 1e9)
    config = reference_config(model)
    results = compare(workload, model, config, peak_from=_clock(peak_at))
    console = Console(width=140)
    console.print(results_table(results))
    console.print(
        f"SLA: every record visible within {workload.sla_seconds // 60} min, and the burst processed within "
        f"{workload.burst_deadline_seconds // 60} min of its start. Restart outage at this state size: "
        f"{config.restart_seconds_base + model.state_bytes / 1024**3 * config.restart_seconds_per_gib:.0f} s."
    )
    if plot:
        from chronolake.scaling_lambda.plot import render

        console.print(f"plot: {render(results, workload, out)}")


@app.callback()
def main() -> None:
    """Rescaling of the Managed Flink application."""


if __name__ == "__main__":
    app()
