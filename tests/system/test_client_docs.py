"""The client examples of the docs run as written, against a live ``vision-server`` (tiny model).

Every fenced block right after a ``<!-- tested -->`` line (or ``<!-- tested: NAME -->``, for a
block another test looks up by name) in README.md and the docs site's pages (in the order of
``mkdocs.yml``'s nav) is an example this module checks. ``bash`` and ``python`` blocks run in a
scratch folder that looks like a user's checkout (``clients/``, ``photo.jpg``, a ``dataset``
folder) with ``HOME`` and ``VISION_HOST`` pointing at temporary places; the docs' default URL is
swapped for the live server's. ``powershell`` blocks are parsed with the tree-sitter PowerShell
grammar and checked against the scripts' parameters everywhere, and run too where ``pwsh`` exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import paths
from tests.support.api import json_documents
from tests.support.scripts import import_file

REPO = paths.REPO
DEFAULT_URL = "http://127.0.0.1:54880"
MARK = re.compile(r"<!-- tested(?:: ([\w-]+))? -->")


def site_pages() -> list[Path]:
    """The docs site's pages in nav order (the order a reader meets them, and the examples run)."""
    nav = (REPO / "mkdocs.yml").read_text(encoding="utf-8").split("\nnav:", 1)[1]
    return [REPO / "docs" / page for page in re.findall(r":\s*([\w/.-]+\.md)\s*$", nav, re.M)]


DOCS = (REPO / "README.md", *site_pages())
PWSH = shutil.which("pwsh")
DATASET = ["cat.png", "Dog 2.JPG", "sub/bird.webp", "sub/fish.png"]


@dataclass(frozen=True)
class Example:
    source: str  # "README.md:42"
    lang: str
    code: str
    name: str | None = None  # from <!-- tested: NAME -->

    def __str__(self) -> str:
        return f"{self.source} ({self.lang})"


def find_tested_examples() -> list[Example]:
    """The marked blocks of every doc, in order; a block found twice (README and docs) counts once."""
    found: dict[tuple[str, str], Example] = {}
    block = re.compile(MARK.pattern + r"[ \t]*\n+```(\w+)[ \t]*\n(.*?)^```", re.S | re.M)
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in block.finditer(text):
            line = text.count("\n", 0, match.start(2)) + 1
            source = f"{doc.relative_to(REPO).as_posix()}:{line}"
            example = Example(source, match.group(2), match.group(3), match.group(1))
            found.setdefault((example.lang, example.code), example)
    return list(found.values())


EXAMPLES = find_tested_examples()


def test_every_client_has_tested_examples() -> None:
    code = "\n".join(example.code for example in EXAMPLES)
    for command in (
        "clients/vision-client.sh",
        "clients/vision-caption-folder-images.sh",
        r".\clients\vision-client.ps1",
        r".\clients\vision-caption-folder-images.ps1",
        "VisionClient(",
        "AsyncVisionClient(",
        "vision-client folder",
        "vision-client caption",
        "clients/comfyui",
    ):
        assert command in code, f"no tested example uses {command}"
    assert {example.lang for example in EXAMPLES} == {"bash", "python", "powershell"}


# ---------------------------------------------------------------------------------------------
# PowerShell examples: static checks everywhere


def declared_parameters(script: Path) -> set[str]:
    text = script.read_text(encoding="ascii")
    block = text[text.index("param(") : text.index("$ErrorActionPreference")]
    return {name.lower() for name in re.findall(r"\]\s*\$(\w+)", block)}


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.lang == "powershell"], ids=str)
def test_powershell_example_is_valid(example: Example) -> None:
    import tree_sitter
    import tree_sitter_powershell

    parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language()))
    tree = parser.parse(example.code.encode())
    assert not tree.root_node.has_error, f"{example} does not parse"
    for line in example.code.splitlines():
        for script, rest in re.findall(r"\.\\clients\\([\w.-]+\.ps1)(.*)", line):
            used = {name.lower() for name in re.findall(r"\s-(\w+)", rest)}
            unknown = used - declared_parameters(REPO / "clients" / script)
            assert not unknown, f"{example}: {script} has no parameter {sorted(unknown)}"


# ---------------------------------------------------------------------------------------------
# Running the examples


@pytest.fixture(scope="module")
def server(tiny_server_url: str) -> str:
    """The module's real ``vision-server serve --model test:tiny`` (see conftest)."""
    return tiny_server_url


@dataclass
class Sandbox:
    work: Path  # the "checkout" the examples run in
    home: Path
    env: dict[str, str]
    url: str


@pytest.fixture(scope="module")
def sandbox(server: str, tmp_path_factory: pytest.TempPathFactory) -> Sandbox:
    root = tmp_path_factory.mktemp("docs-sandbox")
    work, home = root / "checkout", root / "home"
    work.mkdir()
    (work / "clients").symlink_to(REPO / "clients", target_is_directory=True)
    (home / "ComfyUI" / "custom_nodes").mkdir(parents=True)
    rng = np.random.default_rng(7)
    for name in ["photo.jpg", *(f"dataset/{name}" for name in DATASET)]:
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISION_")}
    env.update(HOME=str(home), VISION_HOST=server)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # vision-client
    return Sandbox(work, home, env, server)


def run_example(example: Example, box: Sandbox) -> subprocess.CompletedProcess[str]:
    code = example.code.replace(DEFAULT_URL, box.url)
    if example.lang == "bash":
        command = ["bash", "-e", "-o", "pipefail", "-c", code]
    elif example.lang == "python":
        command = [sys.executable, "-c", code]
    else:  # powershell: stop at the first script that exits non-zero
        assert PWSH is not None
        lines = [f"{line}\nif ($LASTEXITCODE) {{ exit $LASTEXITCODE }}" for line in code.splitlines()]
        command = [
            PWSH,
            "-NoLogo",
            "-NoProfile",
            "-NonInteractive",
            "-Command",
            "$ErrorActionPreference = 'Stop'\n" + "\n".join(lines),
        ]
    return subprocess.run(
        command,
        cwd=box.work,
        env=box.env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
        check=False,
    )


def test_bash_and_python_examples(sandbox: Sandbox) -> None:
    """Each example in document order; then what they should have left behind."""
    examples = [e for e in EXAMPLES if e.lang in ("bash", "python")]
    for example in examples:
        result = run_example(example, sandbox)
        assert result.returncode == 0, f"{example} failed:\n{result.stdout}\n{result.stderr}"

    work = sandbox.work
    assert (work / "photo.txt").read_text(encoding="utf-8").strip()
    images = [work / "dataset" / name for name in DATASET]
    for image in images:
        for suffix in (".txt", ".tags"):
            assert image.with_suffix(suffix).read_text(encoding="utf-8").strip(), image.with_suffix(suffix)
        assert image.with_suffix(".caption").exists() == (image.parent.name == "dataset")  # --no-recursive
    jsonl = (work / "captions.jsonl").read_text(encoding="utf-8")
    records = [json.loads(line) for line in jsonl.splitlines()]
    assert sorted(record["file"] for record in records) == sorted(DATASET)
    assert not [p for p in work.rglob("*") if p.name.endswith(".tmp")]

    # The installed ComfyUI node loads the way ComfyUI loads it, and captions through the server.
    node_dir = sandbox.home / "ComfyUI" / "custom_nodes" / "vision-server-caption"
    try:
        package = import_file(node_dir / "__init__.py", "docs_installed_node", package=True)
        node = package.NODE_CLASS_MAPPINGS["VisionServerCaption"]()
        batch = np.random.default_rng(3).random((2, 32, 32, 3), dtype=np.float32)
        joined, captions = getattr(node, node.FUNCTION)(batch, "<CAPTION>", sandbox.url)
        assert len(captions) == 2 and all(captions) and joined == "\n".join(captions)
    finally:
        for name in [name for name in sys.modules if name.startswith("docs_installed_node")]:
            del sys.modules[name]


def test_readme_try_it_prints_what_the_readme_shows(sandbox: Sandbox) -> None:
    """The output the README pastes under "Try it without a download" is the tiny model's real output.

    The ids and lists must match exactly; a caption's words depend on the image, so for objects
    the keys must match and every value must be a non-empty string.
    """
    example = next(e for e in EXAMPLES if e.name == "try-it")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    after = readme[readme.index(example.code) + len(example.code) :]
    block = re.search(r"^```json\n(.*?)^```", after, re.S | re.M)
    assert block, "the README shows no output under its try-it example"
    shown = json_documents(block.group(1))
    result = run_example(example, sandbox)
    assert result.returncode == 0, result.stderr
    printed = json_documents(result.stdout)
    assert len(printed) == len(shown), result.stdout
    # Line for line as shown (curl adds no line break of its own after an answer).
    assert len(result.stdout.splitlines()) == len(block.group(1).splitlines()), result.stdout
    for got, expected in zip(printed, shown, strict=True):
        if isinstance(expected, dict):
            assert isinstance(got, dict) and got.keys() == expected.keys(), (got, expected)
            assert all(isinstance(value, str) and value for value in got.values()), got
        else:
            assert got == expected


@pytest.mark.skipif(PWSH is None, reason="pwsh is not on PATH: the PowerShell examples are only parsed")
def test_powershell_examples_run(sandbox: Sandbox) -> None:
    for example in (e for e in EXAMPLES if e.lang == "powershell"):
        result = run_example(example, sandbox)
        assert result.returncode == 0, f"{example} failed:\n{result.stdout}\n{result.stderr}"
