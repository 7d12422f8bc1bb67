"""What every stage runs on: where it writes and under which key, and how it writes, locks, logs and reads settings.

- ``paths``: each stage's folder and cache key (the code each stage runs, ``STAGE_CODE``);
  ``stages``: the record of a finished run, so an unchanged ``metarec run`` starts nothing;
- ``atomic``: writes to a temporary path, then rename; ``locks``: first-time set-up under a file lock;
  ``integrity``: manifests, content hashes, quarantine of damaged caches;
- ``settings``: the TOML/--set/environment config; ``sqlfiles``: the ``sql/*.sql`` files and DuckDB;
  ``logs``: Prefect's run logger outside and inside a run; ``slots``: at most ``runtime.max_workers`` stages
  computing at once, however many task threads wait.

May import: ``metarec`` and ``runtime`` itself. One lazy exception: ``paths.source_fingerprint``
resolves and hashes the input files through ``tasks.data`` (inside the function).
"""
