"""axe-core, the accessibility rules engine, for the web page's browser tests.

axe-core is one JavaScript file (``axe.min.js``, about 650 kB) in its npm package. ``.ci/run``
fetches one pinned release with ``python -m tests.support.axe``, which asks ``npm pack`` for the
package (npm, as set up on the machine, reaches the registry) and checks the tarball against the
SHA-512 the registry publishes for it before keeping the file, so the rules do not change under
the tests. A developer runs the same command, or points
``$VISION_SERVER_TEST_AXE`` at an ``axe.min.js``; without one the axe test skips and says so.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.support.paths import REPO

if TYPE_CHECKING:
    from playwright.sync_api import Page

AXE_ENV = "VISION_SERVER_TEST_AXE"
AXE_VERSION = "4.14.1"
PACKAGE = f"axe-core@{AXE_VERSION}"
# `npm view axe-core@4.14.1 dist.integrity`: the registry's own hash of that tarball.
INTEGRITY = "sha512-FHfa+lmNjQZfJz1q8wKqIDwC6DExcHt/pkjNQb09a3NPjCKg2rhu5qb2S4r76ASyFNNtuFooJpZe37OgudVGtQ=="
FETCHED = REPO / ".ci-axe" / "axe.min.js"  # where the fetch puts it (git ignores .ci-axe/)
# WCAG 2.2 A and AA, and axe's best practices (landmarks, one h1, headings in order, ...).
TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa", "best-practice"]


def axe_path() -> Path | None:
    """``$VISION_SERVER_TEST_AXE``, else the fetched copy, else None."""
    configured = os.environ.get(AXE_ENV)
    if configured:
        return Path(configured)
    return FETCHED if FETCHED.is_file() else None


def fetch(dest: Path = FETCHED) -> Path:
    """Fetch the pinned tarball with ``npm pack``, refuse it unless its SHA-512 is the
    registry's, keep axe.min.js."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not on PATH: install Node.js and npm to fetch axe-core")
    with tempfile.TemporaryDirectory() as work:
        command = [npm, "pack", PACKAGE, "--pack-destination", work, "--silent"]
        subprocess.run(command, check=True, capture_output=True, timeout=300)
        tarball = next(Path(work).glob("*.tgz")).read_bytes()
    digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    if digest != INTEGRITY:
        raise RuntimeError(f"{PACKAGE} came as {digest}, not the published {INTEGRITY}")
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        member = archive.extractfile("package/axe.min.js")
        if member is None:
            raise RuntimeError(f"{PACKAGE} holds no package/axe.min.js")
        script = member.read()
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    partial.write_bytes(script)
    partial.replace(dest)  # a run cut short leaves no half file where the tests look
    return dest


def violations(page: Page, script: Path) -> list[str]:
    """axe's violations on the page as it stands, one line each (rule, impact, where).

    The page's Content-Security-Policy forbids injected scripts: the page's browser context
    must be made with ``bypass_csp=True``.
    """
    if not page.evaluate("() => typeof axe !== 'undefined'"):
        page.add_script_tag(path=str(script))
    result: dict[str, Any] = page.evaluate(
        "tags => axe.run(document, {runOnly: {type: 'tag', values: tags}, resultTypes: ['violations']})",
        TAGS,
    )
    return [
        f"{found['id']} ({found['impact']}): {found['help']} at {[node['target'] for node in found['nodes']]}"
        for found in result["violations"]
    ]


if __name__ == "__main__":
    print(f"axe-core {AXE_VERSION}: {fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else FETCHED)}")
