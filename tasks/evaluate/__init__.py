"""The evaluation fan-out and what is made of its results: per-fold metrics, pooling, Table 1 and the plots.

- ``evaluation``: score one fitted model on a fold's new users and stream, write its cases;
- ``pooling``: pool the cases of every fold, paired differences; ``aggregate``: Table 1, the
  summary, the λ_ML curve and the plots.

May import: ``metarec``, ``tasks.runtime``, ``tasks.data``, ``tasks.track``, ``tasks.train`` and
``evaluate`` itself.
"""
