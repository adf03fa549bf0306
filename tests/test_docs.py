"""The README and docs/ stay short, say nothing of how they were written, and their tables are the aggregate's."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_short_and_links_every_doc_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for page in ROOT.glob("docs/*.md"):
        assert f"docs/{page.name}" in readme, page.name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_working_diary_or_machine_paths(page):
    text = page.read_text()
    found = re.findall(r"\bsession\b|\bthe issue\b|/root/|/work/|/tmp/\w", text, flags=re.I)
    assert not found, f"{page.name}: {sorted(set(found))}"


def test_table_blocks_name_tables_the_aggregate_writes(tmp_path):
    """Every <!-- table NAME ... --> block names a table the aggregate writes and rows that exist."""
    from lp.report.tables import fill_blocks

    tables = ROOT / "results" / "tables"
    for page in PAGES:
        text = page.read_text()
        assert fill_blocks(text, tables).count("<!-- /table -->") == text.count("<!-- /table -->")


def test_the_environment_is_the_lock():
    """Tests and committed numbers run on requirements.txt (uv pip compile; README): every package the lock pins
    for this platform is installed at that version, so a package left on a machine cannot hide a missing pin."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    wrong = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if not line or line[0] in "# ":
            continue
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            have = version(req.name)
        except PackageNotFoundError:
            have = None
        if have is None or have not in req.specifier:
            wrong.append(f"{req.name} {have} (lock: {req.specifier})")
    assert not wrong, (f"installed packages differ from requirements.txt: {wrong}; install the lock: "
                       f"pip install -r requirements.txt (README)")
