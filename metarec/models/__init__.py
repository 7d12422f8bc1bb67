"""Every row of Table 1, one module each, behind one interface (``metarec.interface.StreamingRecommender``).

- ``responsive``: ours, the meta-learned responsive MF (docs/method.md §3-7);
- ``rkmf``, ``srec``, ``spmf``: the paper's baselines (docs/baselines.md);
- ``mf_ft``, ``pop``: the ablation without the meta loss, and popularity;
- ``mf`` and ``common``: the shared MF/BPR pieces and the factor baselines' machinery;
- ``registry``: the table of rows (name, constructor, label, fixed options, search space);
  ``factory``: a row's model built from a config.
"""
