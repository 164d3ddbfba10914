"""The bitemporal job's Python work per event, outside Flink: where the time of `bench/stream.py` goes.

    PYTHONPATH=.cache/job-python .venv/job/bin/python bench/stream_stages.py [--events 300000] [--keys 50000]

Runs the job's pure stages (`chronolake.streaming.transactions`) over the events `bench/stream.py`
produces, in bundles as `RecordBundler` makes them, with a checkpoint (the changed key states'
entries handed over, the heap settled) every `--checkpoint-events`, and prints microseconds per
event for each step; the timeline step includes encoding the states it changes. What the
job spends beyond these figures is PyFlink's (calls into Python, rows handed back, state access).
Run by `.cache/job-python` on `PYTHONPATH` (what `scripts/setup` and any stream run create) so the
job's own interpreter and packages are measured.
"""

from __future__ import annotations

import argparse
import marshal
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stream  # noqa: E402

from chronolake.iceberg.algebra import KeyState  # noqa: E402
from chronolake.iceberg.dataset import DatasetSpec  # noqa: E402
from chronolake.streaming.job import BUNDLE_RECORDS, DECODED_KEYS, EVENT_ID_TTL_HOURS, KEY_BUCKETS, json_bundle, settle_heap  # noqa: E402
from chronolake.streaming.transactions import ClockStage, TimelineStage, Written  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--keys", type=int, default=50_000)
    parser.add_argument("--bundle", type=int, default=BUNDLE_RECORDS)
    parser.add_argument("--checkpoint-events", type=int, default=20_000)
    args = parser.parse_args()

    spec = DatasetSpec.from_declaration(stream.DATASET, {"key": stream.KEY, "columns": stream.COLUMNS})
    values = stream.events(args.events, args.keys, 7)
    clock = ClockStage({spec.name: spec}, "kafka:bench", 1 << 20, KEY_BUCKETS)
    timeline = TimelineStage({spec.name: spec}, EVENT_ID_TTL_HOURS * 3_600_000_000, DECODED_KEYS)
    spent: dict[str, float] = defaultdict(float)
    calls = 0
    last_t = None
    pending: set[int] = set()
    since_checkpoint = 0
    written = [0, 0]  # map-state entries put or removed, bytes put (at the checkpoints)
    log_ms = 1_700_000_000_000

    def timed(step: str, fn, *a):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        result = fn(*a)
        spent[step] += time.perf_counter() - started
        return result

    for start in range(0, len(values), args.bundle):
        bundle = [(str(start + i), log_ms + (start + i) // 10, v) for i, v in enumerate(values[start:start + args.bundle])]
        last_t, events, rows = timed("clock", clock.run, 0, last_t, bundle)
        blobs = timed("marshal events", lambda: {b: marshal.dumps(e, 4) for b, e in events.items()})
        for bucket, blob in blobs.items():
            calls += 1
            decoded = timed("unmarshal events", marshal.loads, blob)
            out = timed("timeline", timeline.run, bucket, decoded, lambda event: (KeyState(), {}, Written()))
            timed("rows to JSON", json_bundle, [r.values for r in out])
        pending.update(blobs)
        since_checkpoint += len(bundle)
        if since_checkpoint >= args.checkpoint_events:
            for bucket in sorted(pending):
                flushed = timed("state flush", timeline.flush, bucket)
                written[0] += len(flushed.puts) + len(flushed.removes)
                written[1] += sum(len(value) for value in flushed.puts.values())
            timed("settle heap", settle_heap)  # as the job does at its checkpoint marks
            pending.clear()
            since_checkpoint = 0
    total = sum(spent.values())
    print(f"{args.events:,} events, {args.keys:,} keys, bundles of {args.bundle}, "
          f"{calls:,} timeline calls ({args.events / calls:.0f} events each)")
    for step, seconds in spent.items():
        print(f"  {step:<18} {seconds / args.events * 1e6:7.2f} us/event")
    print(f"  {'total':<18} {total / args.events * 1e6:7.2f} us/event = {args.events / total:,.0f} events/s")
    print(f"  state written at the checkpoints: {written[0] / args.events:.2f} entries and "
          f"{written[1] / args.events:,.0f} bytes per event")


if __name__ == "__main__":
    main()
