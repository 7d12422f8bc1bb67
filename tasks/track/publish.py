"""Prefect artifacts people open: markdown with its pictures inline, on the flow run they look at, keyed by data set.

- Keys name the data set (``table1-ml-100k``), so the artifact catalogue's latest ``table1`` of one data set is
  never another data set's.
- Pictures are embedded as ``data:image/png;base64`` images inside the markdown: the UI cannot open ``file://``
  links (browsers block local files), and it renders these (checked in a headless browser, see README).
- ``on_top=True`` puts an artifact on the top flow run (the nightly run around the pipeline, or the pipeline when
  it runs alone), the run a user opens, instead of a sub-flow one level down.

Outside a Prefect run nothing is published (tests and plain function calls).
"""

from __future__ import annotations

import base64
import io
import logging
import re
from pathlib import Path
from uuid import UUID

import mlflow
from prefect.artifacts import LinkArtifact, MarkdownArtifact
from prefect.context import get_run_context
from prefect.exceptions import MissingContextError

from metarec.config import Config
from tasks.runtime.logs import log_info
from tasks.runtime.paths import dataset_slug
from metarec.redaction import redact
from tasks.track.tracking import run_link, ui_command

logger = logging.getLogger(__name__)

MAX_IMAGE_WIDTH = 1000  # px: wider plots are scaled down before embedding (an artifact is stored in Prefect's database)


def artifact_key(kind: str, dataset: str) -> str:
    """``<kind>-<data set>``, in the only characters Prefect allows in a key (lowercase letters, digits, dashes)."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]+", "-", f"{kind}-{dataset_slug(dataset)}".lower())).strip("-")


def png_data_uri(path: Path, max_width: int = MAX_IMAGE_WIDTH) -> str:
    """The PNG as a ``data:`` URI, scaled down to ``max_width`` pixels if wider."""
    from PIL import Image  # matplotlib's own dependency

    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.width > max_width:
            image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
        buffer = io.BytesIO()
        # a plot has few colours: a 256-colour palette looks the same at a third of the bytes
        image.quantize(256).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def with_images(markdown: str, images: dict[str, Path] | None = None) -> str:
    """``markdown`` followed by each picture, captioned: ``{caption: png path}``."""
    parts = [markdown.rstrip()]
    for caption, path in (images or {}).items():
        parts.append(f"**{caption}**\n\n![{caption}]({png_data_uri(Path(path))})")
    return "\n\n".join(parts) + "\n"


def _current_flow_run_id() -> UUID | None:
    try:
        context = get_run_context()
    except MissingContextError:
        return None
    flow_run = getattr(context, "flow_run", None)
    if flow_run is not None:
        return flow_run.id
    task_run = getattr(context, "task_run", None)
    return task_run.flow_run_id if task_run is not None else None


def top_flow_run_id() -> UUID | None:
    """The outermost flow run around this code (a sub-flow's parent's parent ...), None outside any run."""
    flow_run_id = _current_flow_run_id()
    if flow_run_id is None:
        return None
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while True:
            parent_task = client.read_flow_run(flow_run_id).parent_task_run_id
            if parent_task is None:
                return flow_run_id
            flow_run_id = client.read_task_run(parent_task).flow_run_id


def publish_markdown(kind: str, dataset: str, markdown: str, description: str | None = None,
                     images: dict[str, Path] | None = None, on_top: bool = True) -> str | None:
    """A markdown artifact keyed ``<kind>-<data set>`` with ``images`` inline; returns the key (None outside Prefect)."""
    flow_run_id = top_flow_run_id() if on_top else _current_flow_run_id()
    if flow_run_id is None:
        logger.debug("not in a Prefect run: artifact %s not published", kind)
        return None
    key = artifact_key(kind, dataset)
    MarkdownArtifact(markdown=with_images(markdown, images), key=key, description=description, flow_run_id=flow_run_id).create()
    return key


def publish_run_report(files: dict[str, Path], dataset: str, on_top: bool = True) -> list[str]:
    """Table 1 (the stream AUC plot inline) and the summary with its verdicts (the forest plot inline) of a pipeline
    run, from ``write_report``'s files; keys ``table1-<data set>``, ``summary-<data set>``."""
    def pictures(**named: str) -> dict[str, Path]:
        return {caption: Path(files[name]) for caption, name in named.items() if name in files}

    keys = [
        publish_markdown("table1", dataset, Path(files["table1.md"]).read_text(), f"Table 1 on {dataset}",
                         images=pictures(**{"Stream AUC per batch": "stream_auc.png"}), on_top=on_top),
        publish_markdown("summary", dataset, Path(files["summary.md"]).read_text(), f"Summary and verdicts on {dataset}",
                         images=pictures(**{"Verdicts: paired differences with their 95% CIs": "forest.png"}), on_top=on_top),
    ]
    return [key for key in keys if key]


def log_mlflow_run(config: Config, run_id: str) -> str:
    """Log an MLflow run's id and UI link in the Prefect run (its log and a link artifact); returns the link. On a
    local store the link says which command starts the UI it points to (nothing listens until one is started)."""
    link = run_link(run_id, config)
    name = mlflow.get_run(run_id).info.run_name or run_id
    command = ui_command(config)
    how = f" (start the UI with `{command}`, then open)" if command else ""
    log_info(logger, "MLflow run %s (%s)%s: %s", name, run_id, how, link)
    if _current_flow_run_id() is not None:
        LinkArtifact(link=link, link_text=f"MLflow run {name}", key=artifact_key("mlflow-run", config.data.dataset),
                     description=f"This flow run's MLflow run; start the UI first with `{command}`" if command
                     else "This flow run's MLflow run on the tracking server").create()
    return link


def tag_flow_run(*tags: str) -> None:
    """Add ``tags`` (``dataset:ml-100k``, ``preset:full``, ``kind:pipeline``) to the current flow run, so the
    UI's flow run list can be filtered by them; nothing outside a Prefect run."""
    flow_run_id = _current_flow_run_id()
    if flow_run_id is None:
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        current = client.read_flow_run(flow_run_id).tags
        client.update_flow_run(flow_run_id, tags=sorted(set(current) | set(tags)))


def run_tags_of(config: Config, kind: str) -> tuple[str, ...]:
    """The flow run tags of a run of ``kind`` on ``config``'s data set and preset."""
    return (f"dataset:{dataset_slug(redact(config.data.dataset))}", f"preset:{config.runtime.preset}", f"kind:{kind}")
