"""How the tools env launches a PyFlink job: which interpreter, which jars, which environment.

The job runs in its own virtualenv (`.venv/job`, PyFlink 1.20 pins pyarrow < 12) and starts a local
Flink mini-cluster inside the PyFlink gateway JVM. Two things must be handed to it from outside:

- the JVM jars (`.cache/jars`: Kafka connector, Iceberg Flink runtime, Hadoop client, JDBC
  drivers). They go on the gateway JVM's own classpath through `HADOOP_CLASSPATH`, the one hook
  `pyflink_gateway_server.py` adds to the classpath. Parent classpath rather than `pipeline.jars`
  because `java.sql.DriverManager` only sees JDBC drivers loaded by the system class loader, and
  Flink always loads `org.apache.hadoop.*` parent-first anyway.
- `PYTHONPATH` with the job venv's site-packages: in thread mode (`python.execution-mode: thread`)
  the Python functions run in an interpreter embedded in the JVM (PEMJA). That interpreter starts
  from the base Python installation, not from the venv, so it finds PyFlink and its dependencies
  only through `PYTHONPATH`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class JobRuntimeError(Exception):
    """The job virtualenv or the Flink jars are missing."""


def _default_venv() -> Path:
    return Path(os.environ.get("CHRONOLAKE_JOB_VENV", REPO_ROOT / ".venv" / "job"))


def _default_jars() -> Path:
    return Path(os.environ.get("CHRONOLAKE_FLINK_JARS", REPO_ROOT / ".cache" / "jars"))


@dataclass(frozen=True)
class JobRuntime:
    """The job virtualenv plus the Flink classpath, as made by `scripts/setup`."""

    venv: Path = field(default_factory=_default_venv)
    jars_dir: Path = field(default_factory=_default_jars)

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def site_packages(self) -> Path:
        found = sorted(self.venv.glob("lib/python3.*/site-packages"))
        if not found or not (found[0] / "pyflink").is_dir():
            raise JobRuntimeError(f"PyFlink is not installed in {self.venv}: run scripts/setup")
        return found[0]

    def jars(self) -> list[Path]:
        jars = sorted(self.jars_dir.glob("*.jar"))
        if not any(j.name.startswith("iceberg-flink-runtime") for j in jars):
            raise JobRuntimeError(f"no Flink jars in {self.jars_dir}: run scripts/setup")
        return jars

    def environment(self, log_dir: Path | None = None) -> dict[str, str]:
        """The process environment for `python <job script>` in the job venv."""
        env = dict(os.environ)
        # Replaced, not extended: anything from the tools env (pyarrow >= 18) would break PyFlink.
        env["PYTHONPATH"] = str(self.site_packages())
        env["HADOOP_CLASSPATH"] = os.pathsep.join(str(j) for j in self.jars())
        # Without this the gateway logs into the installed pyflink package (site-packages/pyflink/log).
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            env["FLINK_LOG_DIR"] = str(log_dir)
        env.pop("VIRTUAL_ENV", None)
        env.pop("PYTHONHOME", None)
        return env

    def command(self, script: Path, *args: str) -> list[str]:
        return [str(self.python), str(script), *args]
