"""docs/architecture.md stays true to the package: every module is on the page, and every module
the page names exists. A new module without a line there (or a renamed one) fails here."""

from __future__ import annotations

import re

from tests.support import paths

PACKAGE = paths.REPO / "vision_server"
PAGE = (paths.DOCS / "architecture.md").read_text(encoding="utf-8")
PARTS_TABLE = PAGE.split("## What each part may import")[0]


def _named_on_page(module: str) -> bool:
    """``api/native.py`` is named as such, or as ``native.py`` in the row of its folder ``api/``."""
    if f"`{module}`" in PARTS_TABLE:
        return True
    folder, _, name = module.rpartition("/")
    return any(row.startswith(f"| `{folder}/` |") and f"`{name}`" in row for row in PARTS_TABLE.splitlines())


def test_every_module_is_on_the_page() -> None:
    modules = [
        path.relative_to(PACKAGE).as_posix()
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "__init__.py"
    ]
    missing = [module for module in modules if not _named_on_page(module)]
    assert not missing, f"add these to the table in docs/architecture.md: {missing}"


def test_every_module_the_page_names_exists() -> None:
    """A path is looked up as written; a bare name in a folder's row in that folder, elsewhere
    anywhere in the package (``layout.py`` beside ``florence/convert.py``)."""
    gone = []
    for row in PARTS_TABLE.splitlines():
        folder = re.match(r"^\| `(\w+)/` \|", row)
        for name in re.findall(r"`((?:\w+/)*\w+\.py)`", row):
            if "/" in name or folder:
                exists = (PACKAGE / (name if "/" in name or not folder else f"{folder[1]}/{name}")).exists()
            else:
                exists = any(PACKAGE.rglob(name))
            if not exists:
                gone.append(name)
    assert not gone, f"docs/architecture.md names modules that do not exist: {gone}"
