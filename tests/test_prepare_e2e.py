"""The data stage end to end on the real MovieLens 100K: as a plain function and as `metarec prepare`."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.runtime.paths import prepared_dir
from tasks.data.prepare import prepare_data
from tasks.data.prepared import SPLIT_FILES, load_prepared
from tasks.runtime.settings import load_config


def test_prepare_data_on_ml100k(ml100k_dir: Path, artifacts: Path):
    config = load_config(data={"dataset": "ml-100k", "data_dir": str(ml100k_dir)})
    out = prepare_data(config)
    assert out == prepared_dir(config) and out.parent.parent == artifacts
    data = load_prepared(out)
    s = data.stats
    # Figures from the data set's SOURCE.md: 100,000 ratings, 943 users, 1,682 items, 82,520 ratings >= 3.
    assert (s["ratings_read"], s["users"], s["items"], s["positives"]) == (100_000, 943, 1682, 82_520)
    assert s["parts"]["new_users"]["users"] == len(range(0, 943, 10))  # fold 0: every 10th user of the seeded order
    assert len(data.history) + len(data.stream) + len(data.new_users) == 82_520
    assert len(data.candidates("new")) == 3 * s["new_users_evaluable"] > 0
    assert len(data.candidates("stream")) == len(data.stream)
    titles = pq.read_table(out / "items.parquet").column("title").to_pylist()
    assert titles[0] == "Toy Story (1995)" and None not in titles
    stamp = (out / "stats.json").stat().st_mtime_ns
    assert prepare_data(config) == out and (out / "stats.json").stat().st_mtime_ns == stamp  # reused, not redone


@pytest.mark.slow
def test_metarec_prepare_cli_runs_the_flow(prefect_harness, ml100k_dir: Path, artifacts: Path, tmp_path: Path):
    result = CliRunner().invoke(app, ["prepare", "--dataset", "ml-100k", "--data-dir", str(ml100k_dir)])
    assert result.exit_code == 0, result.output
    out = Path(result.output.strip().splitlines()[-1].removeprefix("prepared data in ").strip())
    assert all((out / f"{name}.parquet").is_file() for name in SPLIT_FILES)
    # The Prefect flow and the plain function write the same bytes.
    config = load_config(data={"dataset": "ml-100k", "data_dir": str(ml100k_dir)}, runtime={"artifacts_dir": str(tmp_path / "plain")})
    plain = prepare_data(config)
    for name in SPLIT_FILES:
        assert (out / f"{name}.parquet").read_bytes() == (plain / f"{name}.parquet").read_bytes(), name
