"""PyFlink jobs and their runtime: local Kafka broker, job launcher, plumbing job.

Job scripts here run by path in `.venv/job` (no chronolake installed there), so they import only
the standard library and PyFlink; the other modules belong to the tools env.
"""
