"""The package's layers, read from its source with ``ast``: who may import whom.

- the API adapters reach the model only through the engine (no ``vision_server.florence``);
- the engine knows nothing of HTTP (no API modules, no aiohttp or other HTTP library);
- the model layer knows nothing of the engine or the APIs;
- the client stays light: no torch, no engine, no model layer.

Every import counts, also one inside a function or under ``TYPE_CHECKING``: a lazy import is
still a dependency. Only direct imports are read here; two subprocess checks at the end make
sure the client and the engine do not pull in torch or aiohttp indirectly either.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import vision_server

PACKAGE_DIR = Path(vision_server.__file__).parent
HTTP_LIBRARIES = ("aiohttp", "http", "httpx", "requests", "urllib3", "urllib.request", "yarl", "multidict")
APPLICATION = ("vision_server.api", "vision_server.app", "vision_server.server")


@dataclass(frozen=True)
class Rule:
    """Modules under ``layer`` (a sub-package) must not import any of ``forbidden`` (or below)."""

    layer: str
    forbidden: tuple[str, ...]
    why: str


RULES = (
    Rule(
        "api",
        ("vision_server.florence", "vision_server.generic", "vision_server.devices"),
        "API adapters reach the model only through the engine",
    ),
    Rule("engine", (*APPLICATION, *HTTP_LIBRARIES), "the engine knows nothing of HTTP"),
    Rule("florence", ("vision_server.engine", *APPLICATION), "the model layer knows no engine and no API"),
    Rule("generic", ("vision_server.engine", *APPLICATION), "the model layer knows no engine and no API"),
    Rule(
        "client",
        ("torch", "transformers", "vision_server.engine", "vision_server.florence", "vision_server.captioner",
         "vision_server.testing", "vision_server.devices"),
        "the client installs and starts without the model stack",
    ),
)  # fmt: skip


def module_name(path: Path, root: Path) -> str:
    """``root/api/native.py`` → ``<root name>.api.native``; a package's ``__init__`` is the package."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, dotted name) for every import in ``source``, relative ones resolved.

    ``from a import b`` yields both ``a`` and ``a.b``, since ``b`` may be a module.
    ``importlib.import_module("x")`` with a literal name counts as an import of ``x``.
    """
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and _is_dynamic_import(node):
            argument = node.args[0]
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                yield node.lineno, argument.value


def _is_dynamic_import(node: ast.Call) -> bool:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in ("import_module", "__import__") and bool(node.args)


def matches(name: str, prefixes: tuple[str, ...]) -> str | None:
    return next((p for p in prefixes if name == p or name.startswith(f"{p}.")), None)


def violations(root: Path, rule: Rule) -> list[str]:
    """``file:line imports name`` for every forbidden import under ``root/rule.layer``."""
    found = []
    for path in sorted((root / rule.layer).rglob("*.py")):
        module = module_name(path, root)
        source = path.read_text(encoding="utf-8")
        for line, name in imported_names(source, module, path.name == "__init__.py"):
            if matches(name, rule.forbidden):
                found.append(f"{path.relative_to(root.parent)}:{line} imports {name}")
    return sorted(set(found))


@pytest.mark.parametrize("rule", RULES, ids=[rule.layer for rule in RULES])
def test_layer_imports_only_what_it_may(rule: Rule) -> None:
    assert (PACKAGE_DIR / rule.layer).is_dir(), f"no layer {rule.layer!r}: update RULES"
    found = violations(PACKAGE_DIR, rule)
    assert not found, f"{rule.why}:\n" + "\n".join(found)


def test_the_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    """A throwaway package with one violation of each shape: every one is reported."""
    root = tmp_path / "vision_server"
    (root / "api").mkdir(parents=True)
    (root / "florence").mkdir()
    (root / "__init__.py").write_text("")
    (root / "api" / "__init__.py").write_text("")
    (root / "florence" / "__init__.py").write_text("")
    sources = {
        "plain": "import vision_server.florence.captioner\n",
        "from_": "from vision_server import florence\n",
        "relative": "from ..florence.prompts import tasks_for_model\n",
        "lazy": "def f():\n    from vision_server.florence import convert\n",
        "dynamic": "import importlib\nimportlib.import_module('vision_server.florence')\n",
        "fine": "from vision_server.tasks import normalize_task\nimport florence_lookalike\n",
    }
    for name, source in sources.items():
        (root / "api" / f"{name}.py").write_text(source)
    found = violations(root, RULES[0])
    assert sorted({line.split(":")[0] for line in found}) == [
        f"vision_server/api/{name}.py" for name in ("dynamic", "from_", "lazy", "plain", "relative")
    ]
    assert "imports vision_server.florence.prompts" in " ".join(found)


def test_relative_imports_resolve_against_the_package() -> None:
    names = [name for _, name in imported_names("from . import jobs\nfrom .. import api\n", "p.engine", True)]
    assert names == ["p.engine", "p.engine.jobs", "p", "p.api"]
    names = [name for _, name in imported_names("from .jobs import Job\n", "p.engine.scheduler", False)]
    assert names == ["p.engine.jobs", "p.engine.jobs.Job"]


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        ("vision_server.client.cli", ("torch", "transformers", "vision_server.engine")),
        ("vision_server.engine.scheduler", ("aiohttp", "vision_server.api")),
    ],
)
def test_importing_a_layer_does_not_load_what_it_must_not_know(module: str, absent: tuple[str, ...]) -> None:
    """Indirect imports too: import the module in a fresh interpreter and look at ``sys.modules``."""
    code = f"import sys, {module}; print(' '.join(m for m in {absent!r} if m in sys.modules))"
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == "", f"importing {module} loaded {result.stdout.strip()}"
