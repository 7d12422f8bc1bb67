"""Pure algorithms of the responsive meta-learned recommender.

No Prefect, no MLflow, no file I/O here: those live in ``tasks/`` and ``flows/``.
"""
