"""The documentation stays true to the code: the architecture page names only what exists, the method's sections
the code cites exist, and nothing in README or the code sends a reader outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DOCS = PROJECT_ROOT / "docs"
CODE_FOLDERS = ("metarec", "tasks", "flows", "sql")
# Folders and files of the repository a page may name (a path starts with one of these).
PATH_ROOTS = ("metarec", "tasks", "flows", "sql", "docs", "tests", "benchmarks")
PATH = re.compile(rf"\b(?:{'|'.join(PATH_ROOTS)})/[\w./*<>-]*")
DOTTED = re.compile(r"\b(?:metarec|tasks|flows)(?:\.[a-z_]\w*)+")


def named_paths(text: str) -> set[str]:
    """Repository paths a page names (``tasks/data/prepare.py``, ``metarec/models/``); globs cut at their wildcard."""
    found = set()
    for match in PATH.findall(text):
        path = re.split(r"[*<]", match)[0].rstrip(".,")
        found.add(path)
    return found


def missing_paths(text: str, root: Path = PROJECT_ROOT) -> list[str]:
    return sorted(p for p in named_paths(text) if not (root / p).exists())


def missing_modules(text: str, root: Path = PROJECT_ROOT) -> list[str]:
    """Dotted names that are neither a module nor an attribute of one (the last part may be an attribute)."""
    def exists(name: str) -> bool:
        parts = name.split(".")
        for cut in (len(parts), len(parts) - 1):
            base = root.joinpath(*parts[:cut])
            if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
                return True
        return False

    return sorted(n for n in set(DOTTED.findall(text)) if not exists(n))


def test_the_architecture_page_names_only_what_exists():
    text = (DOCS / "architecture.md").read_text()
    assert len(named_paths(text)) > 30  # the page does name the code
    assert missing_paths(text) == [] and missing_modules(text) == []


def test_the_path_check_catches_a_moved_module(tmp_path: Path):
    (tmp_path / "tasks" / "data").mkdir(parents=True)
    (tmp_path / "tasks" / "data" / "prepare.py").write_text("")
    page = "prepare: `tasks/data/prepare.py`; old place: `tasks/prepare.py`; module `tasks.data.prepare.build_once`, `tasks.paths`"
    assert missing_paths(page, tmp_path) == ["tasks/prepare.py"]
    assert missing_modules(page, tmp_path) == ["tasks.paths"]


def _code_files() -> list[Path]:
    files = [PROJECT_ROOT / "README.md"]
    for folder in CODE_FOLDERS:
        files += sorted(p for p in (PROJECT_ROOT / folder).rglob("*") if p.suffix in (".py", ".sql", ".md", ".toml"))
    return files


def test_nothing_in_readme_or_the_code_points_outside_the_repository():
    outside = re.compile(r"shared/reference|\bMETHOD\.md|\bBASELINES\.md|responsive-meta-learning-paper")
    hits = [f"{p.relative_to(PROJECT_ROOT)}:{n}" for p in _code_files()
            for n, line in enumerate(p.read_text().splitlines(), 1) if outside.search(line)]
    assert hits == []


def test_readme_links_the_method_baselines_and_architecture_pages():
    readme = (PROJECT_ROOT / "README.md").read_text()
    for page in ("docs/method.md", "docs/baselines.md", "docs/architecture.md"):
        assert f"]({page})" in readme, page
        assert (PROJECT_ROOT / page).is_file()


def test_every_section_of_the_method_the_code_cites_exists():
    sections = set(re.findall(r"^## (\d+)\.", (DOCS / "method.md").read_text(), re.M))
    cited = set()
    for path in _code_files():
        for line in path.read_text().splitlines():
            if "method.md" in line:
                cited.update(re.findall(r"§(\d+)", line))
    assert cited, "the code cites docs/method.md by section"
    assert sorted(cited - sections, key=int) == []
