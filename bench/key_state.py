"""What one correction in the middle of a key's timeline writes to the job's state, by timeline length.

    PYTHONPATH=.cache/job-python .venv/job/bin/python bench/key_state.py [--lengths 20,200,2000] [--corrections 300]

Builds a key's timeline of N daily versions (in order), then applies corrections of a quarter of a
day at random old days (each adds segments in the middle) and, after each, `StateCodec.write`
(what the entity-timeline stage does per event): prints the map-state entries and bytes it puts
per correction and the microseconds of the transaction with its write.
"""

from __future__ import annotations

import argparse
import random
import time

from chronolake.iceberg.algebra import Assertion, KeyState, KeyTransaction
from chronolake.iceberg.dataset import DatasetSpec
from chronolake.streaming.transactions import StateCodec, Written

DAY = 86_400_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="20,200,2000")
    parser.add_argument("--corrections", type=int, default=300)
    args = parser.parse_args()
    codec = StateCodec(DatasetSpec.from_declaration("prices", {"key": ["k"], "columns": {"x": "string"}}))
    rng = random.Random(1)
    for length in (int(n) for n in args.lengths.split(",")):
        state, seen, written, t = KeyState(), {}, Written(), 1
        for day in range(length):
            transaction = KeyTransaction(state, t)
            transaction.apply(Assertion(("k",), "upsert", day * DAY, None, (str(day),), None))
            transaction.finish()
            t += 1
        codec.write("k", state, seen, written)
        entries = size = 0
        started = time.perf_counter()
        for _ in range(args.corrections):
            day = rng.randrange(length - 1)
            transaction = KeyTransaction(state, t)
            transaction.apply(Assertion(("k",), "upsert", day * DAY + DAY // 2, day * DAY + DAY * 3 // 4, ("c",), None))
            transaction.finish()
            t += 1
            puts, removes = codec.write("k", state, seen, written, transaction.changed_from, transaction.unchanged_tail)
            entries += len(puts) + len(removes)
            size += sum(len(value) for value in puts.values())
        spent = (time.perf_counter() - started) / args.corrections
        print(f"{length:6,} days ({len(state.segments):,} segments at the end): per correction "
              f"{entries / args.corrections:6.1f} entries, {size / args.corrections:8,.0f} bytes, {spent * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
