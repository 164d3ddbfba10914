"""The key-state lookup the streaming job asks when its RocksDB state lost a key (state TTL).

The table is the truth and the job's keyed state its cache. With `--state-ttl-hours`, Flink drops
a key's state after that long without a record for it; the next record of such a key needs the key's
current timeline and remembered event ids as the table has them. The job's Python runs in the job
virtualenv without pyiceberg, so it asks this small HTTP service, which runs in the tools env
beside it (the job script starts it and it dies with the job):

    POST /state   {"dataset": name, "record": <the event's JSON object>}
    -> 200, body: the key's state as `StateCodec` text ("" when the table has no row of the key)

The key is parsed from the record with the dataset's own `AssertionParser`, so it is exactly the key
the job keyed the record by. Each answer reads the table's newest snapshot: by the time a key's state
expires (hours without a record for it), its last change has long been committed.

    python -m chronolake.streaming.lookup --home LAKE --ready-file F     # prints nothing; F gets the port
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from chronolake.iceberg.parsing import AssertionParser, InvalidAssertion
from chronolake.lake import Lake
from chronolake.streaming.transactions import StateCodec


class KeyStates:
    def __init__(self, home: Path) -> None:
        self.lake = Lake(home)
        self.lock = threading.Lock()
        self.tables: dict[str, Any] = {}

    def state(self, dataset: str, record: dict[str, Any]) -> str:
        with self.lock:  # one catalog connection; lookups are rare (expired keys only)
            table = self.tables.get(dataset)
            if table is None:
                table = self.tables[dataset] = self.lake.dataset(dataset).table
            table.refresh()
            key = AssertionParser(table.spec).parse_key(record)
            state = table.load_state([key]).get(key)
            return "" if state is None else StateCodec(table.spec).encode_typed(state)


def serve(home: Path, ready_file: Path, port: int = 0) -> None:
    states = KeyStates(home)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                answer = states.state(str(body["dataset"]), dict(body["record"])).encode("ascii")
                self.send_response(200)
            except (KeyError, TypeError, ValueError, InvalidAssertion) as error:
                answer = f"bad lookup: {error}".encode()
                self.send_response(400)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            sys.stderr.write(f"lookup: {format % args}\n")

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    ready_file.write_text(str(server.server_address[1]))
    parent = os.getppid()

    def watch_parent() -> None:
        # The job script started this process; when it goes, so does the lookup.
        while os.getppid() == parent:
            threading.Event().wait(1.0)
        server.shutdown()

    threading.Thread(target=watch_parent, daemon=True).start()
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True, type=Path)
    parser.add_argument("--ready-file", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    serve(args.home, args.ready_file, args.port)


if __name__ == "__main__":
    main()
