"""Build the Lambda deployment zip: the handler's modules only (boto3 comes with the runtime).

    python -m chronolake.scaling_lambda.package --out dist/scaling_lambda.zip
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

HANDLER = "chronolake.scaling_lambda.handler.handler"
# Everything handler.py imports, transitively; the simulator, plot and CLI stay out.
MODULES = (
    "__init__.py",
    "application.py",
    "config.py",
    "decision_log.py",
    "exceptions.py",
    "handler.py",
    "metrics.py",
    "policy.py",
    "schedule.py",
)
# A fixed timestamp makes the zip byte-for-byte reproducible.
_EPOCH = (1980, 1, 1, 0, 0, 0)


def build(out: Path) -> Path:
    source = Path(__file__).resolve().parent
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        # An empty namespace parent: the real chronolake package imports the whole toolset.
        _write(archive, "chronolake/__init__.py", b'"""chronolake (rescaling Lambda only)."""\n')
        for name in MODULES:
            _write(archive, f"chronolake/scaling_lambda/{name}", (source / name).read_bytes())
    return out


def _write(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_EPOCH)
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the rescaling Lambda zip.")
    parser.add_argument("--out", type=Path, default=Path("dist/scaling_lambda.zip"))
    args = parser.parse_args(argv)
    path = build(args.out)
    print(f"{path} (handler: {HANDLER})")


if __name__ == "__main__":
    main()
