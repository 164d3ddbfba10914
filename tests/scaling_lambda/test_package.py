"""The Lambda zip: only the handler's modules, importable alone, and its handler runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from chronolake.scaling_lambda.package import build

# Runs in a fresh interpreter with the unzipped bundle first on sys.path, as the Lambda runtime does.
# The clients are stubbed with botocore's Stubber: nothing leaves the machine.
SCRIPT = r"""
import json, sys
from datetime import datetime, timezone
import boto3
from botocore.stub import Stubber
import chronolake.scaling_lambda.handler as h

assert h.__file__.startswith(sys.argv[1]), h.__file__
flink = boto3.client("kinesisanalyticsv2", region_name="eu-west-1")
cw = boto3.client("cloudwatch", region_name="eu-west-1")
detail = {
    "ApplicationARN": "arn:aws:kinesisanalytics:eu-west-1:123456789012:application/app",
    "ApplicationName": "app", "RuntimeEnvironment": "FLINK-1_20", "ApplicationStatus": "RUNNING",
    "ApplicationVersionId": 3, "ConditionalToken": "t3",
    "ApplicationConfigurationDescription": {"FlinkApplicationConfigurationDescription": {
        "ParallelismConfigurationDescription": {"ConfigurationType": "CUSTOM", "Parallelism": 4,
        "ParallelismPerKPU": 1, "CurrentParallelism": 4, "AutoScalingEnabled": False}}},
}
with Stubber(flink) as fs, Stubber(cw) as cs:
    fs.add_response("describe_application", {"ApplicationDetail": detail}, {"ApplicationName": "app"})
    cs.add_response("get_metric_data", {"MetricDataResults": []})
    fs.add_response("update_application", {"ApplicationDetail": dict(detail, ApplicationVersionId=4)})
    cs.add_response("put_metric_data", {})
    h._clients = h.Clients(flink=flink, cloudwatch=cw)
    result = h.handler({"application": "app", "intent": "scale_to", "parallelism": 8}, None)
heavy = sorted(m for m in ("typer", "rich", "matplotlib", "numpy", "pyarrow", "pyiceberg", "duckdb") if m in sys.modules)
print(json.dumps({"outcome": result["outcome"], "target": result["decision"]["target_parallelism"], "heavy": heavy}))
"""


def test_zip_holds_only_the_handler_modules(tmp_path: Path) -> None:
    names = set(zipfile.ZipFile(build(tmp_path / "fn.zip")).namelist())
    assert "chronolake/scaling_lambda/handler.py" in names
    assert not {n for n in names if n.endswith(("simulator.py", "plot.py", "cli.py", "package.py"))}
    assert not {n for n in names if not n.startswith("chronolake/")}


def test_zip_is_reproducible(tmp_path: Path) -> None:
    assert build(tmp_path / "a.zip").read_bytes() == build(tmp_path / "b.zip").read_bytes()


def test_zip_handler_runs_alone_with_stubbed_botocore_clients(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    zipfile.ZipFile(build(tmp_path / "fn.zip")).extractall(bundle)
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "eu-west-1",
        # -S skips .pth files, so the editable chronolake install is invisible; site-packages stays
        # on the path only for boto3/botocore, which the Lambda runtime provides.
        "PYTHONPATH": os.pathsep.join([str(bundle), sysconfig.get_paths()["purelib"]]),
    }
    done = subprocess.run(
        [sys.executable, "-S", "-c", SCRIPT, str(bundle)], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last == {"outcome": "updated", "target": 8, "heavy": []}
