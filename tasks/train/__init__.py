"""Everything that fits a model: task shards, meta-training of ours, baseline fits, tuning and ablations.

- ``task_shards``: the meta-training tasks, streamed into Parquet shards;
- ``training``: meta-training with checkpoints and its MLflow run; ``parallel``: its worker processes;
- ``models``: fit a baseline, save and load any model without pickle;
- ``validation``: the validation split and one trial; ``tuning``: the Optuna search on it;
  ``ablations``: studies of our model on the same split (docs/ablations).

May import: ``metarec``, ``tasks.runtime``, ``tasks.data``, ``tasks.track`` and ``train`` itself.
"""
