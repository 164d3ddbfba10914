"""Where a running local Flink job waits: per operator busy / back-pressured / idle time, and each
checkpoint's phases per operator, from the mini-cluster's REST API.

    .venv/tools/bin/python bench/flink_metrics.py "bench/out/stream-<stamp>/bitemporal/flink-log/*.log"

Finds the REST port in the job's Flink log (`Rest endpoint listening at ...`), then every
`--interval` seconds prints, per job vertex (chained operators), the milliseconds per second it was
busy, back-pressured and idle (the maximum over its subtasks), and for each newly completed
checkpoint the sync, async and alignment milliseconds, the barrier's start delay and the state size
per vertex. Stops when the job ends or after `--seconds`.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import time
import urllib.request
from typing import Any

TIMES = "busyTimeMsPerSecond,backPressuredTimeMsPerSecond,idleTimeMsPerSecond"


def get(base: str, path: str) -> Any:
    with urllib.request.urlopen(base + path, timeout=5) as response:
        return json.load(response)


def rest_base(pattern: str, deadline: float) -> str:
    while time.monotonic() < deadline:
        for log in sorted(glob.glob(pattern)):
            found = re.search(r"Rest endpoint listening at (\S+):(\d+)", open(log, errors="replace").read())
            if found:
                return f"http://{found.group(1)}:{found.group(2)}"
        time.sleep(1)
    raise SystemExit(f"no Flink log matching {pattern} names a REST endpoint")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", help="glob of the job's Flink log files")
    parser.add_argument("--interval", type=float, default=4.0)
    parser.add_argument("--seconds", type=float, default=600.0)
    args = parser.parse_args()
    deadline = time.monotonic() + args.seconds
    base = rest_base(args.log, deadline)
    print(f"Flink REST at {base}", flush=True)
    reported: set[int] = set()
    running_seen = False
    while time.monotonic() < deadline:
        running = [j["id"] for j in get(base, "/jobs")["jobs"] if j["status"] == "RUNNING"]
        if not running:
            if running_seen:
                return
            time.sleep(1)
            continue
        running_seen = True
        job_id = running[0]
        vertices = get(base, f"/jobs/{job_id}")["vertices"]
        names = {v["id"]: v["name"] for v in vertices}
        print(time.strftime("%H:%M:%S"), flush=True)
        for vertex in vertices:
            metrics = get(base, f"/jobs/{job_id}/vertices/{vertex['id']}/subtasks/metrics?get={TIMES}&agg=max")
            ms = {m["id"].split("TimeMs")[0]: float(m.get("max", 0)) for m in metrics}
            print(f"  {vertex['name'][:40]:40} busy {ms.get('busy', 0):5.0f}  back-pressured "
                  f"{ms.get('backPressured', 0):5.0f}  idle {ms.get('idle', 0):5.0f}  ms/s", flush=True)
        for checkpoint in get(base, f"/jobs/{job_id}/checkpoints").get("history", []):
            if checkpoint["status"] != "COMPLETED" or checkpoint["id"] in reported:
                continue
            reported.add(checkpoint["id"])
            print(f"  checkpoint {checkpoint['id']}: {checkpoint['end_to_end_duration']} ms, "
                  f"{checkpoint['state_size'] / 1e6:.1f} MB", flush=True)
            details = get(base, f"/jobs/{job_id}/checkpoints/details/{checkpoint['id']}")
            for vertex_id in details["tasks"]:
                path = f"/jobs/{job_id}/checkpoints/details/{checkpoint['id']}/subtasks/{vertex_id}"
                for sub in get(base, path)["subtasks"]:
                    phases, alignment = sub.get("checkpoint", {}), sub.get("alignment", {})
                    print(f"    {names[vertex_id][:36]:36} sync {phases.get('sync')} async {phases.get('async')} "
                          f"alignment {alignment.get('duration')} start delay {sub.get('start_delay')} ms, "
                          f"state {sub.get('state_size', 0) / 1e3:.0f} kB", flush=True)
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
