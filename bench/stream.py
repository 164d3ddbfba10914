"""Streaming benchmark: the bitemporal job beside a pass-through job, Kafka to committed Iceberg rows.

    .venv/tools/bin/python bench/stream.py                       # 1M events over 50k keys
    .venv/tools/bin/python bench/stream.py --events 100000 --keys 5000 --freshness-seconds 10  # smoke (rates are warm-up)

One local KRaft broker; two topics of one partition each, filled with the same events before either
job starts (the generated end-of-day feed of bench/generate.py as JSON assertion events: about 10%
retroactive corrections and 1% deletes, every event with an `event_id`). Each job runs alone with
parallelism 1 (one task slot), from the earliest offset:

``passthrough``  bench/passthrough_job.py: the same source, runtime configuration and Iceberg sink,
                 one identity Python map, plain append
``bitemporal``   streaming/job.py: partition clock, validation, keyed timelines in RocksDB, twin
                 rows, stable time, one table per dataset and quarantine

Throughput is measured from the offsets each job commits to Kafka with its checkpoints (the same
moment its Iceberg commit happens): events / (time the last offset was committed - time the first
was), so job start-up is excluded and each rate is "events per second committed to Iceberg" per
slot. The ratio of the two is the cost of the bitemporal semantics on the same engine. Over the same
window, the CPU time of every thread of each job's processes (from /proc) is reported per event,
by kind of thread (`THREAD_KINDS`): where the cores go, side by side. Rate and CPU are reported
again over the second half of each job's events (from its first commit past half of them): how the
rate holds up as the JIT compilers' warm-up fades and the key state grows. That window is shorter,
so the wait for the checkpoint that commits the last events weighs more in it.

Freshness (bitemporal job, caught up): events are produced at ``--freshness-rate`` per second for
``--freshness-seconds``; each one is visible to ``as_of`` at the stable system time once that time
reaches the event's system time (its log append time). A poller reads the dataset's stable system
time continuously; an event's freshness is the first poll that covers it minus its send time.
Reported: p50 and p95 (the goal: within one checkpoint interval plus 5 s).
Results go to ``--json`` and are printed as a Markdown block for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import child  # noqa: E402
import generate  # noqa: E402

BENCH = Path(__file__).resolve().parent
DATASET = "prices"
#: The dataset's declaration (`Lake.create_dataset`); bench/stream_stages.py uses the same one.
KEY = ["instrument"]
COLUMNS = {"price": "decimal(18,6)", "currency": "string"}
TIMEOUT_S = 1800.0


def events(rows: int, keys: int, seed: int) -> list[bytes]:
    generated, _ = generate.generate(rows, keys, seed, event_ids=True)
    out = []
    for instrument, price, currency, valid_from, valid_to, op, event_id in generated:
        record = {"dataset": DATASET, "instrument": instrument, "price": price, "currency": currency,
                  "valid_from": valid_from, "event_id": event_id}
        if valid_to:
            record["valid_to"] = valid_to
        if op:
            record["op"] = op
        out.append(json.dumps(record, separators=(",", ":")).encode())
    return out


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=512 * 1024)
    for value in values:
        producer.send(topic, value=value)
    producer.flush()
    producer.close()


def committed(bootstrap: str, group: str) -> int:
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        offsets = admin.list_group_offsets({group: None}).get(group, {})
    except KafkaError:
        return 0
    finally:
        admin.close()
    return sum(max(o.offset, 0) for o in offsets.values())


def group_pids(pgid: int) -> Iterator[int]:
    """The processes of a process group (the job script and its JVM)."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getpgid(int(entry.name)) == pgid:
                yield int(entry.name)
        except ProcessLookupError:
            continue


def thread_stat(pid: int, tid: int) -> tuple[str, int]:
    """A thread's name (as /proc shows it: 15 characters) and CPU time so far (user + system, clock ticks)."""
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return stat[stat.index("(") + 1:stat.rindex(")")], int(fields[11]) + int(fields[12])


def rss_mib(pgid: int) -> float:
    """Resident memory of a process group (the job script and its JVM), MiB."""
    total = 0
    for pid in group_pids(pgid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


#: Thread name prefixes (as /proc shows them: 15 characters) -> what they do, for the CPU table.
THREAD_KINDS = (
    ("entity-timeline", "entity timeline (Python)"),
    ("partition-clock", "partition clock (Python)"),
    ("rows-", "rows -> Iceberg writer"),
    ("Source", "Kafka source (pass-through: its whole chain)"),
    ("rocksdb:", "RocksDB flush and compaction"),
    ("Flink-RocksDB", "RocksDB flush and compaction"),
    ("C1 Compiler", "JIT compilers"),
    ("C2 Compiler", "JIT compilers"),
    ("GC Thread", "garbage collector"),
    ("G1 ", "garbage collector"),
)


def thread_cpu(pgid: int) -> dict[tuple[int, int], tuple[str, float]]:
    """CPU seconds so far of every thread of a process group (the job script and its JVM)."""
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[tuple[int, int], tuple[str, float]] = {}
    for pid in group_pids(pgid):
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                name, used = thread_stat(pid, int(task.name))
                found[(pid, int(task.name))] = (name, used / ticks)
        except OSError:
            continue
    return found


def cpu_per_event(
    before: dict[tuple[int, int], tuple[str, float]], after: dict[tuple[int, int], tuple[str, float]], events: int
) -> dict[str, float]:
    """Microseconds of CPU per event by kind of thread (THREAD_KINDS) between two `thread_cpu`s."""
    spent: dict[str, float] = {}
    for thread, (name, seconds) in after.items():
        kind = next((k for prefix, k in THREAD_KINDS if name.startswith(prefix)), "other")
        spent[kind] = spent.get(kind, 0.0) + seconds - before.get(thread, (name, 0.0))[1]
    return {kind: round(seconds / events * 1e6, 1) for kind, seconds in sorted(spent.items(), key=lambda x: -x[1])}


#: A moment of a job's run: (time.monotonic(), events committed, `thread_cpu`).
Mark = tuple[float, int, dict[tuple[int, int], tuple[str, float]]]


def measure(job: subprocess.Popen[bytes], bootstrap: str, group: str, total: int, log: Path) -> dict[str, Any]:
    """Poll committed offsets until all `total` events are committed. The rate and the job's CPU
    per event by thread between its first and its last commit, and again over the second half of
    the events only (from the first commit that passes half of them)."""
    started = time.monotonic()
    first: Mark | None = None
    half: Mark | None = None
    peak = 0.0
    while True:
        if job.poll() is not None:
            raise SystemExit(f"job exited with {job.returncode}; see {log}")
        done = committed(bootstrap, group)
        now = time.monotonic()
        peak = max(peak, rss_mib(job.pid))
        if first is None and done > 0:
            first = (now, done, thread_cpu(job.pid))
        if half is None and done * 2 >= total:
            half = first if first is not None and first[1] == done else (now, done, thread_cpu(job.pid))
        if done >= total:
            break
        if now - started > TIMEOUT_S:
            raise SystemExit(f"not done after {TIMEOUT_S}s ({done}/{total}); see {log}")
        time.sleep(0.25)
    assert first is not None and half is not None
    end: Mark = (now, total, thread_cpu(job.pid))
    return {
        "events": total,
        "first_commit_s": round(first[0] - started, 1),
        **_window(first, end),
        "peak_rss_mib": round(peak),
        "second_half": _window(half, end),
    }


def _ratio(bitemporal: dict[str, Any], passthrough: dict[str, Any]) -> float | None:
    """The bitemporal job's rate over the pass-through's, over the same kind of window."""
    over, under = bitemporal["events_per_s"], passthrough["events_per_s"]
    return round(over / under, 3) if over and under else None


def _window(start: Mark, end: Mark) -> dict[str, Any]:
    """Rate and CPU per event between two moments of a job's run."""
    seconds = end[0] - start[0]
    counted = end[1] - start[1]
    cpu = cpu_per_event(start[2], end[2], counted) if counted else {}
    return {
        "seconds": round(seconds, 2),
        "events_per_s": round(counted / seconds) if seconds > 0 and counted else None,
        "cpu_us_per_event": round(sum(cpu.values()), 1),
        "cores_busy": round(sum(cpu.values()) * counted / 1e6 / seconds, 2) if seconds > 0 else None,
        "cpu_by_thread_us_per_event": cpu,
    }


def stop(job: subprocess.Popen[bytes]) -> None:
    if job.poll() is None:
        os.killpg(job.pid, signal.SIGTERM)
        try:
            job.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def freshness(bootstrap: str, topic: str, home: Path, rate: int, seconds: float, keys: int) -> dict[str, Any]:
    from kafka import KafkaProducer

    from chronolake.lake import Lake

    dataset = Lake(home).dataset(DATASET)
    polls: list[tuple[float, int]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            stable = dataset.stable_system_time()
            polls.append((time.time(), stable or 0))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    sent: list[tuple[float, Any]] = []
    start = time.time()
    for n in range(int(rate * seconds)):
        due = start + n / rate
        if (lag := due - time.time()) > 0:
            time.sleep(lag)
        record = {"dataset": DATASET, "instrument": generate.instrument(n % keys), "price": f"{100 + n % 97}.5",
                  "currency": "USD", "valid_from": "2025-01-01", "event_id": f"fresh-{n}"}
        sent.append((time.time(), producer.send(topic, value=json.dumps(record).encode())))
    producer.flush()
    stamped = [(at, future.get(timeout=60).timestamp * 1000) for at, future in sent]  # log append time, us
    deadline = time.time() + 120
    while time.time() < deadline and (not polls or polls[-1][1] < max(t for _, t in stamped)):
        time.sleep(0.2)
    done.set()
    poller.join()
    latencies = []
    for at, t in stamped:
        seen = next((when for when, stable in polls if stable >= t and when >= at), None)
        if seen is not None:
            latencies.append(seen - at)
    latencies.sort()
    return {
        "events": len(stamped),
        "visible": len(latencies),
        "p50_s": round(statistics.median(latencies), 2) if latencies else None,
        "p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 2) if latencies else None,
        "stable_time_reads": len(polls),
        "mean_read_s": round((polls[-1][0] - polls[0][0]) / max(len(polls) - 1, 1), 3) if polls else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--checkpoint-interval-ms", type=int, default=2000)
    parser.add_argument("--freshness-rate", type=int, default=500, help="events/s while measuring freshness")
    parser.add_argument("--freshness-seconds", type=float, default=30.0)
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--bitemporal-only", action="store_true", help="skip the pass-through (a profiling run)")
    args = parser.parse_args()

    from chronolake.lake import Lake
    from chronolake.streaming.broker import BrokerSettings, LocalKafkaBroker
    from chronolake.streaming.catalog import catalog_properties
    from chronolake.streaming.runtime import JobRuntime, StreamJobSettings, launch_stream_job
    from chronolake.streaming.service import ensure_topic

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    work = child.OUT / f"stream-{stamp}"
    home = work / "lake"
    runtime = JobRuntime()
    values = events(args.events, args.keys, args.seed)
    results: dict[str, Any] = {"events": len(values), "keys": args.keys, "checkpoint_interval_ms": args.checkpoint_interval_ms}
    with LocalKafkaBroker(BrokerSettings(data_dir=work / "kafka")) as broker:
        bootstrap = broker.bootstrap_servers
        for topic in ("bench-bitemporal",) if args.bitemporal_only else ("bench-passthrough", "bench-bitemporal"):
            ensure_topic(bootstrap, topic, 1)
            produce(bootstrap, topic, values)
        print(f"produced {len(values):,} events to each topic", flush=True)

        lake = Lake(home)
        lake.create_dataset(DATASET, key=KEY, columns=COLUMNS)
        import pyarrow as pa

        lake.catalog.create_table(
            (lake.settings.namespace, "passthrough"),
            schema=pa.schema([("payload", pa.string()), ("source_partition", pa.int32()),
                              ("source_position", pa.string()), ("log_time_ms", pa.int64())]),
        )
        plan = work / "passthrough-plan.json"
        plan.write_text(json.dumps({"catalog": catalog_properties(lake.settings.catalog_properties),
                                   "namespace": lake.settings.namespace}))
        if not args.bitemporal_only:
            log = work / "passthrough.log"
            with log.open("ab") as out:
                job = subprocess.Popen(
                    runtime.command(BENCH / "passthrough_job.py", "--plan", str(plan), "--table", "passthrough",
                                    "--bootstrap-servers", bootstrap, "--topic", "bench-passthrough",
                                    "--checkpoint-dir", str(work / "passthrough-checkpoints"),
                                    "--checkpoint-interval-ms", str(args.checkpoint_interval_ms)),
                    env=runtime.environment(log_dir=work / "passthrough-flink-log"), stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                results["passthrough"] = measure(job, bootstrap, "chronolake-passthrough", len(values), log)
            finally:
                stop(job)
            print("passthrough", results["passthrough"], flush=True)

        settings = StreamJobSettings(
            home=home, datasets=[DATASET], work_dir=work / "bitemporal", bootstrap_servers=bootstrap,
            topic="bench-bitemporal", group_id="chronolake-bitemporal",
            checkpoint_interval_ms=args.checkpoint_interval_ms, idle_partition_ms=2000, restart_attempts=20,
        )
        log = work / "bitemporal.log"
        job = launch_stream_job(settings, log, runtime)
        try:
            results["bitemporal"] = measure(job, bootstrap, "chronolake-bitemporal", len(values), log)
            print("bitemporal", results["bitemporal"], flush=True)
            results["freshness"] = freshness(bootstrap, "bench-bitemporal", home, args.freshness_rate,
                                             args.freshness_seconds, args.keys)
            print("freshness", results["freshness"], flush=True)
            results["restarts"] = log.read_text().count("Job execution failed") + sum(
                p.read_text(errors="replace").count("Recovery is suppressed") for p in (work / "bitemporal" / "flink-log").glob("*.log")
            )
        finally:
            stop(job)
    if args.bitemporal_only:
        print(json.dumps(results, indent=2))
        return
    results["ratio"] = _ratio(results["bitemporal"], results["passthrough"])
    results["ratio_second_half"] = _ratio(results["bitemporal"]["second_half"], results["passthrough"]["second_half"])
    results["machine"] = {
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "load_average": os.getloadavg(), "code": child.code_version(),
    }
    text = render(results)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


def render(r: dict[str, Any]) -> str:
    p, b, f = r["passthrough"], r["bitemporal"], r["freshness"]
    lines = [
        f"Streaming, {r['events']:,} events over {r['keys']:,} keys, 1 partition, parallelism 1, "
        f"checkpoint every {r['checkpoint_interval_ms']} ms; {r['machine']['cpus']} cores, load average "
        f"{', '.join(f'{x:.2f}' for x in r['machine']['load_average'])}; {r['machine']['code']}",
        "",
        "| job | events/s per slot | second half of the events | first commit after | peak RSS (job + JVM) |",
        "|---|---:|---:|---:|---:|",
        f"| pass-through (identity map, append) | {_rate(p)} | {_rate(p['second_half'])} | {p['first_commit_s']} s | {p['peak_rss_mib']} MiB |",
        f"| bitemporal | {_rate(b)} | {_rate(b['second_half'])} | {b['first_commit_s']} s | {b['peak_rss_mib']} MiB |",
        "",
        f"Ratio bitemporal / pass-through: {r['ratio'] if r['ratio'] is not None else 'n/a'}; over the second "
        f"half of the events: {r['ratio_second_half'] if r['ratio_second_half'] is not None else 'n/a'}. Freshness at "
        f"{f['events']} events ({f['visible']} seen): p50 {f['p50_s']} s, p95 {f['p95_s']} s "
        f"(stable-time read every {f['mean_read_s']} s).",
    ]
    if p["events_per_s"] is None or b["events_per_s"] is None:
        lines += ["", "n/a: the job's first checkpoint committed every event, so there was no window to "
                      "measure a rate or the CPU per event in: run with more --events."]
        return "\n".join(lines)
    columns = [p, b, p["second_half"], b["second_half"]]
    kinds = sorted(
        {kind for job in columns for kind in job["cpu_by_thread_us_per_event"]},
        key=lambda kind: (-b["cpu_by_thread_us_per_event"].get(kind, 0.0), -p["cpu_by_thread_us_per_event"].get(kind, 0.0)),
    )
    return "\n".join([
        *lines,
        "",
        "CPU per event (us, all threads of the job's processes) between each job's first and last commit,",
        "and over the second half of the events:",
        "",
        "| threads | pass-through | bitemporal | pass-through, second half | bitemporal, second half |",
        "|---|---:|---:|---:|---:|",
        *[f"| {kind} | " + " | ".join(str(job["cpu_by_thread_us_per_event"].get(kind, 0.0)) for job in columns) + " |"
          for kind in kinds],
        "| **all** (cores busy) | " + " | ".join(f"**{job['cpu_us_per_event']}** ({job['cores_busy']})" for job in columns) + " |",
    ])


def _rate(job: dict[str, Any]) -> str:
    return "n/a" if job["events_per_s"] is None else f"{job['events_per_s']:,}"

if __name__ == "__main__":
    main()
