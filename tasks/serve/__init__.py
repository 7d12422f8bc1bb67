"""The nightly deployment's end: a registered Θ loaded, re-scored on the current data, and serving recommendations.

- ``serving``: load a registered version (the champion by default), adapt it to a user,
  recommend; re-score a version on the current data for the champion comparison.
- ``candidate``: a run's serving candidate (Ours+, else Ours (paper); fold 0's Θ), its per-case
  scores, and its registration and champion decision as Prefect tasks of the pipeline flow.

May import: every other ``tasks`` package and ``metarec``.
"""
