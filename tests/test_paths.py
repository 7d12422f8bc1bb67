"""Cached outputs are named by what made them: the config, the input files and the code."""

from __future__ import annotations

from pathlib import Path

import pytest

import tasks.paths as paths


@pytest.fixture()
def fake_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for folder in paths.CODE_FOLDERS:
        (tmp_path / folder).mkdir()
    (tmp_path / "metarec" / "model.py").write_text("ALPHA = 1\n")
    (tmp_path / "sql" / "split.sql").write_text("SELECT 1\n")
    monkeypatch.setattr(paths, "PROJECT_ROOT", tmp_path)
    paths.code_version.cache_clear()
    yield tmp_path
    paths.code_version.cache_clear()


def test_code_version_follows_python_and_sql_sources_only(fake_project: Path):
    before = paths.code_version()
    (fake_project / "metarec" / "notes.txt").write_text("not code")
    paths.code_version.cache_clear()
    assert paths.code_version() == before
    for source, text in (("metarec/model.py", "ALPHA = 2\n"), ("sql/split.sql", "SELECT 2\n")):
        (fake_project / source).write_text(text)
        paths.code_version.cache_clear()
        changed = paths.code_version()
        assert changed != before
        before = changed


def test_prepared_folder_changes_with_the_code(fake_project: Path, monkeypatch: pytest.MonkeyPatch):
    from metarec.config import Config

    monkeypatch.setattr(paths, "source_fingerprint", lambda config: "same files")
    config = Config()
    first = paths.prepared_dir(config)
    (fake_project / "tasks" / "prepare.py").write_text("# a fix\n")
    paths.code_version.cache_clear()
    assert paths.prepared_dir(config) != first
    assert paths.prepared_dir(config).parent == first.parent
