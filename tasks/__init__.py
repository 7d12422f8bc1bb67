"""I/O, logging and MLflow around the pure algorithms of ``metarec``, one sub-package per stage of the DAG.

Each module holds plain functions (callable without Prefect) and thin Prefect
task wrappers around them. The sub-packages, lowest first; a module imports
``metarec`` and its own or a lower package, never a higher one and never
``flows`` (tests/test_layering.py checks it, and docs/architecture.md draws it):

- ``runtime``: what every stage runs on: folders and cache keys, atomic writes,
  locks, logs, settings, SQL loading, file integrity;
- ``data``: the prepare stage: raw input to the prepared, sealed folder;
- ``track``: MLflow runs, the Θ model and the registry, the champion, Prefect artifacts;
- ``train``: task shards, meta-training, baseline fits, tuning and ablations;
- ``evaluate``: the evaluation fan-out, pooling over folds, Table 1 and the plots;
- ``serve``: a registered Θ loaded, re-scored and serving recommendations.
"""
