"""Property-based: generated requests of every family against a real server never get a 5xx.

The strategies and the sender live in ``benchmarks/fuzz.py``, which runs the same property with
thousands of examples (figures in BENCHMARKS.md); here a few hundred, derandomized so a failure
reproduces, against ``vision-server serve --model test:tiny`` with an API key and an admin key.
Afterwards the server must still caption a good image, and its log must hold no traceback.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from tests.support import paths
from tests.support.api import tiny_cache_dir
from tests.support.processes import ServerProcess, tiny_server
from tests.support.scripts import import_file

FUZZ = paths.BENCHMARKS / "fuzz.py"
EXAMPLES = 300


fuzz = import_file(FUZZ, "fuzz")


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("fuzz-server")
    keys = {"api_key": fuzz.API_KEY, "admin_key": fuzz.ADMIN_KEY}
    with tiny_server(tmp, tiny_cache_dir(tmp_path_factory), "--max-new-tokens", "16", **keys) as process:
        process.wait_listening(timeout=90)
        yield process
        process.stop()


def test_generated_requests_never_get_a_5xx(keyed_server: ServerProcess) -> None:
    url = keyed_server.wait_listening()
    statuses: Counter[int] = Counter()
    fuzz.fuzz(url, EXAMPLES, statuses)  # raises with a shrunk request at the first 5xx
    assert sum(statuses.values()) >= EXAMPLES
    assert max(statuses) < 500
    assert statuses[200] > 0 and statuses[400] > 0 and statuses[401] > 0  # the property saw all three
    assert fuzz.still_serves(url)
    log = keyed_server.log_text()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
