"""Shared fixtures: a fresh lake per test, the CLI, and real services (S3 endpoint, Postgres)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chronolake.lake import Lake


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def lake_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "lake"
    monkeypatch.setenv("CHRONOLAKE_HOME", str(home))
    for name in list(os.environ):
        if name.startswith("CHRONOLAKE__"):
            monkeypatch.delenv(name)
    return home


@pytest.fixture
def lake(lake_home: Path) -> Lake:
    return Lake(lake_home)


CHRONOLAKE = shutil.which("chronolake") or str(Path(__file__).parents[1] / ".venv/tools/bin/chronolake")


@pytest.fixture
def cli(lake_home: Path) -> Iterator[object]:
    """Runs the installed ``chronolake`` executable against the test's lake."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CHRONOLAKE, *args],
            capture_output=True,
            text=True,
            env={**os.environ, "CHRONOLAKE_HOME": str(lake_home)},
            timeout=300,
        )

    yield run


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible HTTP endpoint (moto's threaded server) on loopback."""
    from moto.server import ThreadedMotoServer

    # Arrow's AWS SDK sends aws-chunked uploads with checksum trailers, which moto stores verbatim
    # inside multipart parts; real S3 strips them. Ask the SDK for checksums only where required.
    os.environ["AWS_REQUEST_CHECKSUM_CALCULATION"] = "WHEN_REQUIRED"
    os.environ["AWS_RESPONSE_CHECKSUM_VALIDATION"] = "WHEN_REQUIRED"
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        yield endpoint
    finally:
        server.stop()


def _postgres_bindir() -> str | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(candidates[-1]) if candidates else None


@pytest.fixture(scope="session")
def postgres_uri() -> Iterator[str]:
    """A real PostgreSQL server started from the Debian binaries in a temporary data directory."""
    bindir = _postgres_bindir()
    if bindir is None:
        message = "PostgreSQL server binaries not installed (scripts/setup installs them when run as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    data = Path(tempfile.mkdtemp(prefix="chronolake-pg-", dir="/tmp"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        # initdb refuses to run as root; run the server as the package's postgres user.
        shutil.chown(data, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run(
        [*as_user, f"{bindir}/initdb", "-D", str(data / "db"), "-U", "chronolake", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *as_user, f"{bindir}/pg_ctl", "-D", str(data / "db"), "-l", str(data / "log"), "-w", "-t", "60",
            "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        yield f"postgresql+psycopg2://chronolake@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", str(data / "db"), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)
