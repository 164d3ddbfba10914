"""A standalone Flink 1.20 session cluster as local processes, installed the way an operator would.

The distribution is the one PyFlink ships (`site-packages/pyflink`: `bin/`, `lib/`, `opt/`, `conf/`).
Nothing inside it is changed: the cluster gets its own folders through the variables its scripts
read (`FLINK_CONF_DIR`, `FLINK_LIB_DIR`, `FLINK_LOG_DIR`, `FLINK_PID_DIR`):

- `lib/`: PyFlink's `lib/*.jar`, `opt/flink-python-*.jar` (Python jobs need it on the cluster's
  classpath; the client does not ship it) and the job's connector, Iceberg, Hadoop and JDBC jars
  (`.cache/jars`), all as symlinks: what `cp ... flink/lib/` does on a real installation.
- `conf/config.yaml`: PyFlink's own file (JVM options) with loopback addresses, free ports and
  enough task slots.

JobManager and TaskManager run in the foreground (`jobmanager.sh start-foreground`), each in its
own process group, so the fixture knows their pids and stops exactly them. Ready when the REST API's
`/overview` reports the TaskManager's slots.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from chronolake.streaming.cluster import ClusterError, SessionCluster
from chronolake.streaming.runtime import JobRuntime
from tests.conftest import free_port


class LocalFlinkCluster:
    def __init__(self, runtime: JobRuntime, folder: Path, slots: int = 4) -> None:
        self.runtime = runtime
        self.folder = folder
        self.slots = slots
        self.rest_port = free_port()
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def rest_address(self) -> str:
        return f"127.0.0.1:{self.rest_port}"

    @property
    def distribution(self) -> Path:
        return self.runtime.site_packages() / "pyflink"

    def _install(self) -> dict[str, str]:
        lib = self.folder / "lib"
        conf = self.folder / "conf"
        for folder in (lib, conf, self.folder / "log", self.folder / "tmp"):
            folder.mkdir(parents=True, exist_ok=True)
        jars = [*sorted((self.distribution / "lib").glob("*.jar")), *self.distribution.glob("opt/flink-python-*.jar")]
        for jar in [*jars, *self.runtime.jars()]:
            (lib / jar.name).symlink_to(jar)
        for name in ("log4j.properties", "log4j-console.properties"):
            (conf / name).symlink_to(self.distribution / "conf" / name)
        config = yaml.safe_load((self.distribution / "conf" / "config.yaml").read_text())
        config.update({
            "jobmanager": {
                "bind-host": "127.0.0.1",
                "rpc": {"address": "127.0.0.1", "port": free_port()},
                "memory": {"process": {"size": "1024m"}},
            },
            "taskmanager": {
                "bind-host": "127.0.0.1",
                "host": "127.0.0.1",
                "rpc": {"port": free_port()},
                "numberOfTaskSlots": self.slots,
                "memory": {"process": {"size": "2048m"}},
            },
            "rest": {"address": "127.0.0.1", "bind-address": "127.0.0.1", "port": self.rest_port},
            "blob": {"server": {"port": str(free_port())}},
            "io": {"tmp": {"dirs": str(self.folder / "tmp")}},
        })
        (conf / "config.yaml").write_text(yaml.safe_dump(config))
        env = dict(os.environ)
        for name in ("PYTHONPATH", "HADOOP_CLASSPATH", "VIRTUAL_ENV", "PYTHONHOME"):
            env.pop(name, None)
        env.update({
            "FLINK_CONF_DIR": str(conf),
            "FLINK_LIB_DIR": str(lib),
            "FLINK_LOG_DIR": str(self.folder / "log"),
            "FLINK_PID_DIR": str(self.folder),
        })
        return env

    @property
    def api(self) -> SessionCluster:
        return SessionCluster("127.0.0.1", self.rest_port)

    def jobs(self) -> dict[str, str]:
        """{job id: state} of every job the cluster knows."""
        return {job.id: job.state for job in self.api.jobs()}

    def taskmanager_log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.folder / "log").glob("flink-*-taskexecutor-*.log"))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted((self.folder / "log").glob("*")))

    def start(self, timeout_s: float = 180.0) -> None:
        env = self._install()
        bin_dir = self.distribution / "bin"
        for script in ("jobmanager.sh", "taskmanager.sh"):
            with (self.folder / "log" / f"{script}.out").open("ab") as out:
                self.processes.append(
                    subprocess.Popen(
                        ["bash", str(bin_dir / script), "start-foreground"],
                        env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    )
                )
        deadline = time.monotonic() + timeout_s
        while True:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"Flink process exited with {process.returncode}:\n{self.logs()}")
            try:
                if self.api.request("/overview").get("slots-total", 0) >= self.slots:
                    return
            except ClusterError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Flink cluster not ready in {timeout_s:.0f}s:\n{self.logs()}")
            time.sleep(1)

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes = []


@contextmanager
def local_flink_cluster(runtime: JobRuntime, folder: Path, slots: int = 4) -> Iterator[LocalFlinkCluster]:
    cluster = LocalFlinkCluster(runtime, folder, slots)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
