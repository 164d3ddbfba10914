"""A Flink session cluster as `chronolake stream --jobmanager HOST:PORT` sees it: its JobManager's
REST API (`/overview`, `/jobs/overview`, `/jobs/<id>`, `/jobs/<id>/exceptions`, `PATCH /jobs/<id>`).

Standard library only (`urllib`): the tools env talks to the cluster; the job venv submits to it.
"""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

#: The Flink line the job is built with (PyFlink 1.20.5): a job graph is not portable across lines.
FLINK_LINE = "1.20"
#: Job states after which the job runs nowhere any more.
TERMINAL_STATES = frozenset({"FINISHED", "CANCELED", "FAILED"})


class ClusterError(Exception):
    """The Flink cluster cannot be reached, is not a Flink 1.20 JobManager, or refused a request."""


@dataclass(frozen=True)
class Job:
    id: str
    name: str
    state: str

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class SessionCluster:
    host: str
    port: int
    timeout_s: float = 10.0

    @classmethod
    def parse(cls, address: str) -> SessionCluster:
        """`HOST:PORT` of the JobManager's REST endpoint (`rest.address`, `rest.port`, 8081 by default)."""
        match = re.fullmatch(r"(?:https?://)?(\[[0-9a-fA-F:]+\]|[^:/\s]+):(\d{1,5})/?", address.strip())
        if match is None or not 0 < int(match.group(2)) < 65536:
            raise ClusterError(f"--jobmanager {address!r} is not HOST:PORT (the JobManager's REST endpoint, e.g. localhost:8081)")
        return cls(match.group(1), int(match.group(2)))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def request(self, path: str, method: str = "GET") -> Any:
        request = urllib.request.Request(self.url + path, method=method, headers={"Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            raise ClusterError(f"Flink REST API at {self.address}: {method} {path}: HTTP {error.code}: {_rest_error(error)}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            reason = getattr(error, "reason", None) or error
            raise ClusterError(f"no Flink REST API at {self.address} ({reason}); is the JobManager's REST endpoint HOST:PORT?") from None
        try:
            return json.loads(body) if body else None
        except ValueError:
            raise ClusterError(f"{self.address} answered {path} with something that is not Flink's REST API") from None

    def check(self) -> str:
        """The cluster's Flink version, after checking it is a reachable Flink 1.20 JobManager."""
        overview = self.request("/overview")
        version = str(overview.get("flink-version", "")) if isinstance(overview, dict) else ""
        if not version:
            raise ClusterError(f"{self.address} answered /overview without a Flink version: not a Flink JobManager")
        if version != FLINK_LINE and not version.startswith(FLINK_LINE + "."):
            raise ClusterError(f"the cluster at {self.address} runs Flink {version}; the job is built for Flink {FLINK_LINE}")
        return version

    def jobs(self) -> list[Job]:
        return [Job(j["jid"], j["name"], j["state"]) for j in self.request("/jobs/overview")["jobs"]]

    def job(self, job_id: str) -> Job:
        found = self.request(f"/jobs/{job_id}")
        return Job(found["jid"], found["name"], found["state"])

    def failure(self, job_id: str) -> str | None:
        """The innermost cause of the job's last failure, as one line."""
        trace = self.request(f"/jobs/{job_id}/exceptions").get("root-exception") or ""
        causes = re.findall(r"^Caused by: (.+)$", trace, flags=re.MULTILINE)
        line = causes[-1] if causes else trace.strip().splitlines()[0] if trace.strip() else ""
        return line.strip() or None

    def cancel(self, job_id: str, timeout_s: float = 60.0) -> Job:
        """Cancel the job (its retained checkpoints stay) and wait until it has stopped everywhere."""
        if not self.job(job_id).finished:
            try:
                self.request(f"/jobs/{job_id}?mode=cancel", method="PATCH")
            except ClusterError:
                if not self.job(job_id).finished:  # it may have ended on its own meanwhile
                    raise
        deadline = time.monotonic() + timeout_s
        while not (job := self.job(job_id)).finished:
            if time.monotonic() > deadline:
                raise ClusterError(f"job {job_id} on {self.address} is still {job.state} {timeout_s:.0f}s after cancelling it")
            time.sleep(0.5)
        return job


def _rest_error(error: urllib.error.HTTPError) -> str:
    """The first line of the first message in Flink's `{"errors": [...]}` answer."""
    try:
        messages = json.loads(error.read()).get("errors") or []
    except (ValueError, AttributeError, OSError):
        messages = []
    text = str(messages[0]) if messages else str(error.reason)
    return text.strip().splitlines()[0] if text.strip() else str(error.code)
