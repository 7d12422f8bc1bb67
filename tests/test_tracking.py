"""MLflow conventions: the run tree across threads, the params a model's run shows, the store's layout; and the
Prefect side: artifact keys, inline pictures, artifacts on the top flow run."""

from __future__ import annotations

import base64
import contextvars
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import pytest  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from metarec.config import Config  # noqa: E402
from tasks.evaluate.evaluation import log_child_run  # noqa: E402
from tasks.track.publish import artifact_key, png_data_uri, with_images  # noqa: E402
from tasks.track.tracking import (  # noqa: E402
    child_run, main_params, model_params, parent_run, setup_mlflow,
)


@pytest.fixture()
def config(artifacts: Path, monkeypatch) -> Config:
    return Config(runtime={"artifacts_dir": str(artifacts)}, data={"dataset": "ml-100k", "download": False},
                  tuned={"rkmf": {"baselines.lr": 0.1}, "spmf": {"baselines.lr": 0.01}})  # as a tuning record would set them


@pytest.fixture(autouse=True)
def _no_prepared_lookup(monkeypatch):
    """run_tags names the prepared data's folder; these tests have no data set, so name a fixed one."""
    monkeypatch.setattr("tasks.track.tracking.prepared_dir", lambda config: Path("artifacts/ml-100k/0123456789ab"))


def test_each_row_shows_the_values_it_runs_with_and_only_its_own_sections(config):
    rkmf, spmf, pop, ours = (model_params(config, name) for name in ("rkmf", "spmf", "pop", "responsive"))
    assert rkmf["baselines.lr"] == str(config.for_row("rkmf").baselines.lr) == "0.1"  # tuned, not the class default 0.05
    assert spmf["baselines.lr"] == "0.01" and rkmf["baselines.lr"] != spmf["baselines.lr"]
    assert not [key for key in ours if key.startswith("baselines.")] and ours["meta.lambda_ml"] == "1.0"
    assert {key.split(".")[0] for key in pop} == {"model", "data"}
    assert all(len(value) <= 6000 for value in rkmf.values())
    assert main_params(config)["data.dataset"] == "ml-100k" and main_params(config)["runtime.preset"] == "full"


def test_runs_opened_in_worker_threads_nest_under_the_open_parent_and_a_failure_marks_it_failed(config):
    setup_mlflow(config)

    def work(name: str) -> tuple[str, str]:
        with child_run(name, {"model": name}) as outer:
            mlflow.log_metric("x", 1.0)
            with child_run(f"{name} inner") as inner:  # nests under this thread's active run
                return outer, inner

    def opened_under(parent_id: str) -> str:
        with child_run("explicit", parent_run_id=parent_id) as run_id:
            return run_id

    with parent_run(config, "pipeline ml-100k", "pipeline") as parent:
        mlflow.log_params(main_params(config))
        with ThreadPoolExecutor(2) as pool:  # as Prefect's thread runner does: each task in a copy of the context
            ids = [future.result() for future in [pool.submit(contextvars.copy_context().run, work, name) for name in ("rkmf", "pop")]]
        with ThreadPoolExecutor(1) as pool:  # an explicit parent wins over the context's
            explicit = pool.submit(contextvars.copy_context().run, opened_under, ids[0][0]).result()
    client = MlflowClient()
    for outer, inner in ids:
        assert client.get_run(outer).data.tags["mlflow.parentRunId"] == parent
        assert client.get_run(inner).data.tags["mlflow.parentRunId"] == outer
    assert client.get_run(explicit).data.tags["mlflow.parentRunId"] == ids[0][0]
    assert client.get_run(parent).data.params["data.dataset"] == "ml-100k"
    assert mlflow.active_run() is None

    with pytest.raises(RuntimeError), parent_run(config, "nightly ml-100k", "nightly") as failing:
        with child_run("step"):
            pass
        raise RuntimeError("boom")
    failed = client.get_run(failing)
    assert failed.info.status == "FAILED" and "boom" in failed.data.tags["error"]
    with child_run("after") as after:  # the failed parent is closed: later runs are top level again
        pass
    assert "mlflow.parentRunId" not in client.get_run(after).data.tags


def test_store_keeps_every_artifact_inside_artifacts(config, artifacts):
    setup_mlflow(config)
    client = MlflowClient()
    default = client.get_experiment("0")
    assert default.artifact_location.startswith((artifacts / "mlruns").resolve().as_uri())
    ours = client.get_experiment_by_name(config.runtime.experiment)
    assert ours.artifact_location.startswith((artifacts / "mlruns").resolve().as_uri())


def test_child_runs_span_their_work_and_differ_in_params(config):
    setup_mlflow(config)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(config.runtime.experiment).experiment_id
    parent = client.create_run(experiment)
    record = lambda name: {"model": name, "metrics": {"new_n5_ndcg10": {"mean": 0.5}}, "seconds": {"new_users": 1.0}}  # noqa: E731
    a = log_child_run(client, experiment, parent.info.run_id, record("rkmf"), {}, model_params(config, "rkmf"), started_ms=1_000_000, ended_ms=1_090_000)
    b = log_child_run(client, experiment, parent.info.run_id, record("srec"), {}, model_params(config, "srec"))
    run_a, run_b = client.get_run(a), client.get_run(b)
    assert (run_a.info.start_time, run_a.info.end_time) == (1_000_000, 1_090_000)
    differing = {k for k in run_a.data.params.keys() | run_b.data.params.keys() if run_a.data.params.get(k) != run_b.data.params.get(k)}
    assert {"model", "baselines.lr", "baselines.srec_negatives"} <= differing


def test_artifact_keys_name_the_data_set_in_prefects_alphabet():
    assert artifact_key("table1", "ml-100k") == "table1-ml-100k"
    assert artifact_key("table1", "/data/My Ratings_v2.csv") == "table1-my-ratings-v2"


def test_pictures_are_embedded_as_png_data_uris_scaled_to_a_page(tmp_path):
    from PIL import Image

    fig, ax = plt.subplots(figsize=(16, 4), dpi=100)
    ax.plot([0, 1], [0, 1])
    fig.savefig(tmp_path / "wide.png")
    plt.close(fig)
    markdown = with_images("| a |\n|---|\n| 1 |", {"The curve": tmp_path / "wide.png"})
    assert markdown.startswith("| a |") and "**The curve**" in markdown
    uri = png_data_uri(tmp_path / "wide.png")
    assert f"![The curve]({uri})" in markdown
    image = Image.open(io.BytesIO(base64.b64decode(uri.removeprefix("data:image/png;base64,"))))
    assert image.format == "PNG" and image.width == 1000 and image.height == 250


def test_artifacts_go_on_the_top_flow_run_and_each_flow_logs_its_mlflow_run(prefect_harness, config):
    from prefect import flow
    from prefect.context import get_run_context

    from tasks.track.publish import log_mlflow_run, publish_markdown

    @flow
    def inner() -> str:
        with parent_run(config, "pipeline ml-100k", "pipeline") as run_id:
            log_mlflow_run(config, run_id)
        return publish_markdown("table1", "ml-100k", "| model |\n|---|\n| ours |", "Table 1")

    @flow
    def outer() -> tuple[str, str]:
        return str(get_run_context().flow_run.id), inner()

    top, key = outer()
    import httpx
    from prefect.settings import PREFECT_API_URL

    # the UI's own REST API (this Prefect client's read_artifacts sends nulls the server rejects)
    body = {"artifacts": {"key": {"any_": [key, "mlflow-run-ml-100k"]}}, "sort": "CREATED_DESC", "limit": 50}
    artifacts = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", json=body, timeout=30).json()
    # other tests' runs publish under the same key to this server: the one that counts is the top flow run's
    found = [a for a in artifacts if a["key"] == key and a["flow_run_id"] == top]
    assert found and "| ours |" in found[0]["data"]
    links = [a for a in artifacts if a["key"] == "mlflow-run-ml-100k"]
    assert links and "/#/experiments/" in links[0]["data"] and links[0]["flow_run_id"] != top


def test_a_row_shows_only_the_fields_it_reads_and_a_pooled_run_no_fold(config):
    mf_ft, rkmf, srec, ours = (model_params(config, name, pooled=True) for name in ("mf_ft", "rkmf", "srec", "responsive"))
    assert "data.fold" not in rkmf and "data.fold" in model_params(config, "rkmf")
    assert not [k for k in rkmf if k.startswith(("baselines.srec_", "baselines.spmf_", "baselines.ft_", "baselines.tune_"))]
    assert "baselines.rkmf_kernel" in rkmf and "baselines.srec_obs_var" in srec and "baselines.lr" not in srec
    meta = sorted(k for k in mf_ft if k.startswith("meta."))  # MF-FT is our f without the meta loss: no inner loop, no λ_ML
    assert meta == ["meta.dim", "meta.init_std", "meta.lambda_p", "meta.lambda_q_neg", "meta.lambda_q_pos", "meta.new_row_std"]
    assert float(ours["meta.lambda_paper"]) == config.for_row("responsive").tasks.K * float(ours["meta.lambda_ml"])


def test_each_row_s_run_is_opened_before_its_work_and_closed_after_it(config):
    import time

    from tasks.track.tracking import close_model_run, open_model_runs, pooled_run_name

    setup_mlflow(config)
    client = MlflowClient()
    record = {"model": "pop", "metrics": {"new_n5_ndcg10": {"mean": 0.5}}, "seconds": {"new_users": 0.3}}
    with parent_run(config, "pipeline ml-100k F=1 full", "pipeline") as parent:
        with open_model_runs(config, parent, ["pop", "rkmf"]) as runs:
            time.sleep(0.3)  # the row's work
            close_model_run(client, runs["pop"], record, {}, model_params(config, "pop", pooled=True))
        with pytest.raises(RuntimeError), open_model_runs(config, parent, ["srec"]) as failing:
            raise RuntimeError("the fit failed")
    pop = client.get_run(runs["pop"])
    assert pop.info.run_name == pooled_run_name("pop") == "Pop · pooled" and pop.data.tags["mlflow.parentRunId"] == parent
    assert pop.info.end_time - pop.info.start_time >= 300 and pop.info.status == "FINISHED"
    assert pop.data.metrics["new_n5_ndcg10"] == 0.5 and "data.fold" not in pop.data.params
    assert client.get_run(failing["srec"]).info.status == "FAILED"
    assert pop.data.tags.get("mlflow.source.name") == client.get_run(parent).data.tags.get("mlflow.source.name")


def test_the_parent_description_explains_the_metric_names(config):
    from tasks.track.tracking import GLOSSARY, run_description

    text = run_description(config)
    assert GLOSSARY in text and all(word in GLOSSARY for word in ("**new**", "**full**", "**seen**", "**cold**", "hr10", "ndcg10", "auc", "ours_plus_"))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert all(word in readme for word in ("**new**", "**full**", "**seen**", "**cold**", "**hr10**", "**ndcg10**", "**auc**"))


def test_the_ui_link_follows_the_tracking_uri(config, monkeypatch):
    from tasks.track.tracking import ui_command, ui_url

    assert ui_command(config).startswith("mlflow ui --backend-store-uri sqlite:///") and ui_url(config) == "http://127.0.0.1:5000"
    served = config.model_copy(update={"runtime": config.runtime.model_copy(update={"mlflow_tracking_uri": "http://mlflow.internal:8080/"})})
    assert ui_url(served) == "http://mlflow.internal:8080" and ui_command(served) is None
