"""I/O, logging and MLflow around the pure algorithms of ``metarec``.

Each module holds plain functions (callable without Prefect) and thin Prefect
task wrappers around them.
"""
