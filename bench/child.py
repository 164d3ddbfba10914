"""Running one benchmark case in a fresh Python process and reading back what it measured.

Each case runs in its own process so that its peak memory is its own: the child reports its peak
resident set size (``/proc/self/status`` VmHWM, imports included), the largest peak of the load
processes it forked (``ru_maxrss`` of ``RUSAGE_CHILDREN``) and its resident size just before the
measured work started (VmRSS), as one JSON line on stdout.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MARK = "BENCH-RESULT "
BENCH = Path(__file__).resolve().parent
REPOSITORY = BENCH.parent
OUT = BENCH / "out"
#: Package folders of the distribution (pyproject.toml's package-dir).
SUBPACKAGES = ("iceberg", "streaming", "batch_compat", "scaling_lambda", "infra")
#: Set by :func:`use_commit`: children import chronolake from this folder instead of the working tree.
_source: Path | None = None
_commit: str | None = None


def use_commit(revision: str) -> str:
    """Benchmark a committed version: ``git archive`` it under ``bench/out/src-<commit>/`` and lay it out
    as an importable ``chronolake`` package that the children find first on ``PYTHONPATH`` (the editable
    install's finder comes after the path finder). Returns the full commit id."""
    global _source, _commit
    commit = subprocess.run(
        ["git", "-C", str(REPOSITORY), "rev-parse", "--verify", revision + "^{commit}"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    root = OUT / f"src-{commit[:12]}"
    package = root / "chronolake"
    if not package.exists():
        tree = root / "tree"
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPOSITORY), "archive", commit], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        shutil.copytree(tree / "chronolake", package)
        for name in SUBPACKAGES:
            if (tree / name).is_dir():
                (package / name).symlink_to(tree / name, target_is_directory=True)
    _source, _commit = root, commit
    return commit


def code_version() -> str:
    """Which chronolake the children run: a commit, or the working tree with its uncommitted core files."""
    if _commit is not None:
        return f"commit {_commit[:12]} (git archive, not the working tree)"
    head = subprocess.run(["git", "-C", str(REPOSITORY), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    status = subprocess.run(
        ["git", "-C", str(REPOSITORY), "status", "--porcelain", "--", "chronolake", *SUBPACKAGES],
        capture_output=True, text=True,
    )
    dirty = [line[3:] for line in status.stdout.splitlines()]
    return f"working tree at {head.stdout.strip()}" + (f" with uncommitted changes to {', '.join(dirty)}" if dirty else "")


def rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB: ``VmHWM``, the high-water mark of this
    process's own address space. (``ru_maxrss`` of ``RUSAGE_SELF`` survives ``execve`` on Linux, so in a
    fresh interpreter it is never below the RSS of the benchmark driver that started it.)"""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(result: dict[str, Any]) -> None:
    """Called by the child at the end of its case."""
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    # A large chronolake load forks load processes: their peak is reported beside the main one.
    result["peak_rss_children_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    module = sys.modules.get("chronolake")
    if module is not None:
        result["chronolake_from"] = str(Path(module.__file__ or "").parent)
    print(MARK + json.dumps(result), flush=True)


def run(script: Path, arguments: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``script`` with ``arguments`` in a fresh interpreter; returns the JSON line it reported."""
    command = [sys.executable, str(script), *arguments]
    environment = dict(os.environ)
    if _source is not None:
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_source), environment.get("PYTHONPATH")]))
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)
    for line in completed.stdout.splitlines():
        if line.startswith(MARK):
            return dict(json.loads(line[len(MARK) :]))
    sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
    raise RuntimeError(f"case {arguments} failed with exit code {completed.returncode}")


def machine() -> dict[str, str]:
    """The machine and versions a result was measured on."""
    import duckdb
    import pyarrow
    import pyiceberg

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "pyarrow": pyarrow.__version__,
        "pyiceberg": pyiceberg.__version__,
        "duckdb": duckdb.__version__,
        "chronolake": code_version(),
        "load average at start": load,
    }


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    return "\n".join(lines)
