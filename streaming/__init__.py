"""PyFlink jobs and their runtime: local Kafka broker, job launcher, plumbing job, bitemporal job.

Job scripts here (`plumbing_job.py`, `job.py`) run by path in `.venv/job`, where chronolake is not
installed: they import the standard library, PyFlink and, for the bitemporal job, only the pure
modules (`chronolake.iceberg` algebra/parsing/dataset/temporal, `chronolake.streaming.transactions`)
that `runtime.JobRuntime` puts on `PYTHONPATH`. The other modules belong to the tools env.
"""
