"""Where a running job's Python operator threads spend their time: on a CPU, runnable but not
running, waiting for the interpreter lock, or parked in the JVM, from the kernel's scheduler events.

    .venv/tools/bin/python bench/offcpu.py                 # while bench/stream.py runs the job

In thread mode every Python operator runs in its Flink task thread and all of them share one
interpreter lock (GIL). `flink_metrics.py` says which operator is busy; this says what a busy thread
is actually doing. Finds the process whose threads are named after the job's Python operators
(`--threads`), then records `sched:sched_switch` with `perf` for `--seconds`: once system-wide
(when each thread leaves and gets back a CPU, and what ran meanwhile) and once for those threads
with DWARF call stacks (why a thread left: `take_gil` = waiting for the GIL, `Unsafe_Park` =
parked in the JVM, waiting for input, for output buffers downstream or for a lock). Needs `perf`
and permission to trace the scheduler (root, or `kernel.perf_event_paranoid` <= -1).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stream import thread_stat  # noqa: E402

SWITCH = re.compile(
    r"\[(\d+)\]\s+([\d.]+):\s+prev_comm=.* prev_pid=(\d+) .*prev_state=(\S+) ==> next_comm=(.*) next_pid=(\d+)"
)
#: A switch-out of the per-thread recording matches the system-wide one within this many seconds
#: (each recording stamps its own copy of the event).
MATCH_S = 40e-6


def find_threads(names: list[str]) -> tuple[int, dict[int, str]]:
    """(pid, tid -> thread name) of the one process with threads named after `names`."""
    found: dict[int, dict[int, str]] = collections.defaultdict(dict)
    for comm in Path("/proc").glob("[0-9]*/task/[0-9]*/comm"):
        try:
            name = comm.read_text().strip()
        except OSError:
            continue
        if any(name.startswith(n) for n in names):
            found[int(comm.parts[2])][int(comm.parts[4])] = name
    if len(found) != 1:
        raise SystemExit(f"expected one process with threads named {', '.join(names)}; found {len(found)}")
    pid, named = next(iter(found.items()))
    # Task threads share their name's first 15 characters with helper threads: keep the busiest.
    busiest: dict[str, int] = {}
    for tid, name in named.items():
        key = next(n for n in names if name.startswith(n))
        if key not in busiest or _cpu_ticks(pid, tid) > _cpu_ticks(pid, busiest[key]):
            busiest[key] = tid
    return pid, {tid: named[tid] for tid in busiest.values()}


def _cpu_ticks(pid: int, tid: int) -> int:
    try:
        return thread_stat(pid, tid)[1]
    except OSError:
        return -1


def record(tids: dict[int, str], seconds: float, work: Path) -> tuple[Path, Path]:
    timing, stacks = work / "all.data", work / "stacks.data"
    thread_list = ",".join(str(t) for t in tids)
    runs = [
        ["perf", "record", "-q", "-e", "sched:sched_switch", "-a", "-o", str(timing), "--", "sleep", str(seconds)],
        ["perf", "record", "-q", "-e", "sched:sched_switch", "--call-graph", "dwarf,32768", "-t", thread_list,
         "-o", str(stacks), "--", "sleep", str(seconds)],
    ]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for cmd in runs]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"perf record failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    return timing, stacks


def reason(frames: list[str]) -> str:
    """Why a thread left its CPU, from the stack it left with (innermost frame first)."""
    stack = " ".join(frames)
    if "take_gil" in stack:
        for frame, what in (("decRef", "a reference drop"), ("PyIterator_next", "the next output"),
                            ("invokeMethod", "a call"), ("CallMethod", "a call")):
            if frame in stack:
                return f"waiting for the GIL ({what} from Java)"
        return "waiting for the GIL"
    if "drop_gil" in stack:
        return "handing the GIL over"
    if "Unsafe_Park" in stack or "Parker::park" in stack:
        return "parked in the JVM"
    if "ObjectMonitor" in stack:
        return "waiting for a Java lock"
    if "fdatasync" in stack or "fsync" in stack:
        return "fsync"
    known = [f for f in frames if f and f != "[unknown]"]
    return f"other (under {known[-1]})" if known else "other"


def reasons(stacks: Path) -> dict[int, tuple[list[float], list[str]]]:
    """tid -> (switch-out times, sorted; why each)."""
    text = subprocess.run(["perf", "script", "-i", str(stacks), "-F", "tid,time,ip,sym"],
                          capture_output=True, text=True, check=True).stdout
    out: dict[int, list[tuple[float, str]]] = collections.defaultdict(list)
    head: tuple[int, float] | None = None
    frames: list[str] = []
    for line in text.splitlines() + [""]:
        if line and not line[0].isspace():
            tid, stamp = line.split()[:2]
            head, frames = (int(tid), float(stamp.rstrip(":"))), []
        elif line.strip():
            parts = line.split(None, 1)
            frames.append(parts[1] if len(parts) > 1 else "")
        elif head is not None:
            out[head[0]].append((head[1], reason(frames)))
            head = None
    return {tid: ([t for t, _ in sorted(v)], [r for _, r in sorted(v)]) for tid, v in out.items()}


def account(timing: Path, why: dict[int, tuple[list[float], list[str]]], tids: dict[int, str]):
    """Per thread: seconds by state, and seconds per thread name that held a CPU while it was runnable."""
    text = subprocess.run(["perf", "script", "-i", str(timing), "-F", "cpu,time,trace"],
                          capture_output=True, text=True, check=True).stdout
    states = {tid: collections.Counter() for tid in tids}
    rivals = {tid: collections.Counter() for tid in tids}
    left: dict[int, tuple[float, str]] = {}
    running_since: dict[int, float] = {}
    on_cpu: dict[str, str] = {}
    first = last = None
    for line in text.splitlines():
        found = SWITCH.search(line)
        if not found:
            continue
        cpu, stamp, prev, prev_state, next_comm, nxt = found.groups()
        now, prev_tid, next_tid = float(stamp), int(prev), int(nxt)
        if last is not None:
            for tid, (_, state) in left.items():
                if state == "runnable, not running":
                    for name in on_cpu.values():
                        rivals[tid][name] += (now - last) / max(len(on_cpu), 1)
        first = now if first is None else first
        last = now
        if prev_tid in tids:
            if prev_tid in running_since:
                states[prev_tid]["on a CPU"] += now - running_since.pop(prev_tid)
            state = "runnable, not running" if prev_state.startswith("R") else _why(why, prev_tid, now)
            left[prev_tid] = (now, state)
        if next_tid in tids:
            if next_tid in left:
                since, state = left.pop(next_tid)
                states[next_tid][state] += now - since
            running_since[next_tid] = now
        on_cpu[cpu] = re.sub(r"\s*->.*|\s*\(.*", "", next_comm).strip()[:24]
    return (last or 0) - (first or 0), states, rivals


def _why(why: dict[int, tuple[list[float], list[str]]], tid: int, now: float) -> str:
    times, what = why.get(tid, ([], []))
    i = bisect.bisect_left(times, now)
    near = [j for j in (i - 1, i) if 0 <= j < len(times) and abs(times[j] - now) <= MATCH_S]
    return what[min(near, key=lambda j: abs(times[j] - now))] if near else "unmatched (no stack recorded)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="entity-timeline,partition-clock",
                        help="comma-separated prefixes of the task threads to follow")
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    pid, tids = find_threads(args.threads.split(","))
    print(f"process {pid}: " + ", ".join(f"{name} ({tid})" for tid, name in tids.items()), flush=True)
    with tempfile.TemporaryDirectory(prefix="chronolake-offcpu-") as work:
        timing, stacks = record(tids, args.seconds, Path(work))
        span, states, rivals = account(timing, reasons(stacks), tids)
    if span <= 0:
        sys.exit("no scheduler events recorded")
    for tid, name in tids.items():
        print(f"\n{name.split(' ')[0]} ({tid}), {span:.1f} s:")
        for state, seconds in states[tid].most_common():
            print(f"  {100 * seconds / span:5.1f}%  {state}")
        if rivals[tid]:
            top = ", ".join(f"{who} {100 * s / span:.1f}%" for who, s in rivals[tid].most_common(5))
            print(f"  while runnable, the CPUs ran: {top}")


if __name__ == "__main__":
    main()
