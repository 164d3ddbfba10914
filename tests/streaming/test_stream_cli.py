"""`chronolake stream`, `load --via-stream` and the one-writer rule, as a user types them.

A real local broker (started by `chronolake stream` itself) and the real job on a Flink mini-cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

from tests.conftest import CHRONOLAKE

Run = Callable[..., Any]
TIMEOUT_S = 300.0  # readiness waits only


def _wait_for(path: Path, text: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while text not in path.read_text():
        assert process.poll() is None, path.read_text()
        assert time.monotonic() < deadline, path.read_text()
        time.sleep(0.5)


def test_stream_claims_the_dataset_and_load_via_stream_goes_through_the_job(cli: Run, lake_home: Path, tmp_path: Path) -> None:
    assert cli("dataset", "create", "prices", "--key", "id", "--column", "price:decimal(18,4)").returncode == 0
    source = tmp_path / "prices.csv"
    source.write_text(
        "id,price,valid_from,valid_to\n"
        "a,1.5,2024-01-01,\n"
        "b,2.5,2024-01-01,\n"
        "a,1.7,2024-02-01,\n"
        "c,oops,2024-01-01,\n"  # line 5: wrong type
        "d,1,2024-01-01,2023-01-01\n"  # line 6: empty range
        "e,1,2\n"  # line 7: malformed row
    )
    output = tmp_path / "stream.out"
    with output.open("wb") as out:
        stream = subprocess.Popen(
            [CHRONOLAKE, "stream", "prices", "--idle-partition-ms", "1000", "--checkpoint-interval-ms", "1000", "--every", "2"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "CHRONOLAKE_HOME": str(lake_home)},
            start_new_session=True,
        )
    try:
        _wait_for(output, "job started", stream)

        refused = cli("load", "prices", str(source))
        assert refused.returncode == 1
        assert refused.stderr.count("\n") == 1 and "written by the streaming job" in refused.stderr
        assert "--via-stream" in refused.stderr and "Traceback" not in refused.stderr

        published = cli("load", "prices", str(source), "--via-stream", "--json")
        assert published.returncode == 0, published.stderr
        outcome = json.loads(published.stdout)
        [file] = outcome["files"]
        assert (file["status"], file["rows"]) == ("published", 6)
        assert file["committed_at"] is not None, "the job committed the file's ledger rows"

        queried = cli("query", "prices", "--valid-at", "2024-03-01", "--known-at", file["committed_at"], "--format", "json")
        assert queried.returncode == 0, queried.stderr
        rows = {r["id"]: r["price"] for r in (json.loads(line, parse_float=Decimal) for line in queried.stdout.splitlines())}
        assert rows == {"a": Decimal("1.7"), "b": Decimal("2.5")}
        quarantined = cli("quarantine", "prices", "--format", "json")
        reasons = {r["line"]: r["reason"] for r in map(json.loads, quarantined.stdout.splitlines())}
        assert set(reasons) == {5, 6, 7}
        assert "expected decimal(18,4)" in reasons[5] and "is not after valid_from" in reasons[6]
        assert reasons[7].startswith("malformed CSV row")

        # The stable time read from the newest snapshots' files equals the full scan of control rows.
        from chronolake.iceberg.dataset import CONTROL, ROW_KIND, SYSTEM_FROM
        from chronolake.iceberg.rows import python_columns
        from chronolake.lake import Lake
        from pyiceberg.expressions import EqualTo

        table = Lake(lake_home).dataset("prices").table
        [controls] = python_columns(table.scan(EqualTo(ROW_KIND, CONTROL), [SYSTEM_FROM]), [SYSTEM_FROM])
        assert table.stable_system_time() == max(controls)

        again = cli("load", "prices", str(source), "--via-stream", "--json")
        assert json.loads(again.stdout)["files"][0]["status"] == "already loaded"
        _wait_for(output, "consumed", stream)
    finally:
        os.killpg(stream.pid, signal.SIGINT)
        stream.wait(timeout=120)
    log = output.read_text()
    assert stream.returncode == 0, log
    assert "stopped" in log and "Traceback" not in log

    # The claim outlives the job (it resumes from its checkpoints) until released.
    assert "written by the streaming job" in cli("load", "prices", str(source)).stderr
    released = cli("stream", "prices", "--release")
    assert released.returncode == 0 and "released" in released.stdout
    assert cli("load", "prices", str(source), "--json").returncode == 0


def test_produce_a_demo_feed_to_kafka_with_its_corrections(cli: Run, kafka_broker: Any) -> None:
    from kafka import KafkaConsumer

    kafka_broker.create_topic("demo-feed", partitions=2)
    assert cli("dataset", "create", "prices", "--key", "id", "--column", "price:double").returncode == 0
    wrong = cli("produce", "prices", "--demo-feed", "10", "--bootstrap-servers", kafka_broker.bootstrap_servers, "--topic", "demo-feed")
    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1 and "index levels" in wrong.stderr

    assert cli(
        "dataset", "create", "index_levels", "--key", "index_id", "--column", "level:decimal(18,2)", "--column", "currency:string"
    ).returncode == 0
    produced = cli(
        "produce", "index_levels", "--demo-feed", "3000", "--bootstrap-servers", kafka_broker.bootstrap_servers, "--topic", "demo-feed"
    )
    assert produced.returncode == 0, produced.stderr
    assert "3,000 demo-feed events to 'demo-feed'" in produced.stdout

    consumer = KafkaConsumer("demo-feed", bootstrap_servers=kafka_broker.bootstrap_servers, auto_offset_reset="earliest",
                             consumer_timeout_ms=5000)
    events = [json.loads(m.value) for m in consumer]
    consumer.close()
    assert len(events) == 3000
    assert {e["dataset"] for e in events} == {"index_levels"}
    kinds = {e["event_id"].split("-")[0] for e in events}
    assert {"fix", "restate"} <= kinds, "late corrections and restatements are in the feed"
    assert any("valid_to" in e for e in events) and any("valid_to" not in e for e in events)
