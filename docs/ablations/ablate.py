"""Run one ablation study of docs/findings.md on a data set's validation split (fold 0's history, never test cases).

Usage (from the project root):
    .venv/bin/python docs/ablations/ablate.py DATASET STUDY [section.field=value ...] [max=EPOCHS]

STUDY names docs/ablations/studies/STUDY.py (a list of ``tasks.train.ablations.Variant``), or ``curve`` for the learning
curve of our row. Writes docs/ablations/results/out-<dataset>-<study>.json; ``docs/findings_plots.py`` renders its
table and picture. The results of the cold-start and item-bias studies (out-ml-100k-cold.json, -bias.json) came from
prototype models written against the code before the issue-10 fixes; they did not help and were not kept, so those
two studies cannot be re-run from here.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from tasks.train.ablations import Variant, learning_curve, run_study  # noqa: F401 (Variant: the studies' vocabulary)
from tasks.data.prepare import prepare_data
from tasks.data.prepared import load_prepared
from tasks.runtime.settings import load_config
from tasks.train.validation import validation_split

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> None:
    dataset, study = argv[0], argv[1]
    extra = [a for a in argv[2:] if not a.startswith("max=")]
    max_epochs = next((int(a.split("=")[1]) for a in argv[2:] if a.startswith("max=")), 30)
    torch.set_num_threads(1)
    config = load_config(overrides=["eval.bootstrap=500", *extra], data={"dataset": dataset})
    history = load_prepared(prepare_data(config)).history
    split = validation_split(history, config)
    print("train", len(split["train"]), "pseudo-new", split["pseudo_new_users"], flush=True)
    started = time.time()
    if study == "curve":
        result = learning_curve(config, split, max_epochs=max_epochs, every=2, patience=3)
    else:
        variants = eval((HERE / "studies" / f"{study}.py").read_text())  # a list literal of Variant(...)
        result = run_study(config, split, variants)
    result["seconds"] = time.time() - started
    out = HERE / "results" / f"out-{Path(dataset).name}-{study}.json"
    out.write_text(json.dumps(result, indent=1, default=str))
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
