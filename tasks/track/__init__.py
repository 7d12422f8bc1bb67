"""What is recorded and published: MLflow runs, the Θ model and its registry, the champion, Prefect artifacts.

- ``tracking``: the MLflow store, parent and child runs, tags and parameters;
- ``theta_model``: Θ as an MLflow model from code (loaded, never unpickled);
  ``model_registry``: log, register and load Θ; ``champion``: one champion per data set and the guarded rule
  that moves it;
- ``publish``: the Prefect artifacts (Table 1, summary, curves) people open.

May import: ``metarec``, ``tasks.runtime``, ``tasks.data`` and ``track`` itself. One lazy exception:
``tracking.model_params`` reads a row's config sections from ``tasks.train.models`` (inside the function).
"""
