"""Every client waits the same way between retries, and retries as often by default.

The schedule (docs/clients/index.md#retries) lives in one place per language:
``vision_server/client/retry.py``, the ``RETRY_*`` constants of ``clients/vision-client.sh`` (the
bash folder script retries through it) and ``Get-VisionRetryDelay`` in
``clients/VisionClient.Common.ps1``. The behaviour tests run each client as a real process
against a stand-in that answers 503 and records when each request arrives; the bounds are wide
(a loaded machine only makes waits longer, and the upper bound leaves seconds of room), but an
earlier schedule (the bash scripts' 2, 4, 8 s) or retry default (0 or 3) falls outside them.
"""

from __future__ import annotations

import email.utils
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import paths
from tests.support.images import save as save_image
from tests.support.scripts import import_file
from tests.support.stand_in import StandIn
from vision_server.client import retry

PWSH = shutil.which("pwsh")
VISION_CLIENT = Path(sys.executable).with_name("vision-client")
BASH_CLIENT = paths.CLIENTS / "vision-client.sh"
BASH_FOLDER = paths.CLIENTS / "vision-caption-folder-images.sh"
PS_COMMON = paths.CLIENTS / "VisionClient.Common.ps1"
PS_CLIENT = paths.CLIENTS / "vision-client.ps1"
PS_FOLDER = paths.CLIENTS / "vision-caption-folder-images.ps1"

SINGLE = ("vision-client caption", "vision-client.sh", "vision-client.ps1")
FOLDER = ("vision-client folder", "vision-caption-folder-images.sh", "vision-caption-folder-images.ps1")
# A loaded machine starts each retry late, never early. The bound is not about speed: it tells
# the schedule apart from the bash clients' old 2 + 4 + 8 s (14 s against at most 3.5 s), with
# room for three slow process starts or curl calls on a CI machine shared with other tests.
SLACK = 8.0


def needs_pwsh(tool: str) -> None:
    if tool.endswith(".ps1") and PWSH is None:
        pytest.skip("pwsh (PowerShell 7) is not on PATH, so the .ps1 clients cannot be run here")


def command(tool: str, url: str, target: Path) -> list[str]:
    """``tool`` captioning ``target`` (an image, or a folder for the folder tools) with the
    CAPTION task and its default retries."""
    pwsh = [str(PWSH), "-NoLogo", "-NoProfile", "-NonInteractive", "-File"]
    client = [str(VISION_CLIENT), "--url", url]
    return {
        "vision-client caption": [*client, "caption", "--task", "CAPTION", str(target)],
        "vision-client.sh": ["bash", str(BASH_CLIENT), "--url", url, "CAPTION", str(target)],
        "vision-client.ps1": [*pwsh, str(PS_CLIENT), "CAPTION", str(target), "-Url", url],
        "vision-client folder": [*client, "folder", str(target), "--task", "CAPTION"],
        "vision-caption-folder-images.sh": [
            "bash",
            str(BASH_FOLDER),
            "--url",
            url,
            "CAPTION",
            "txt",
            str(target),
        ],
        "vision-caption-folder-images.ps1": [
            *pwsh,
            str(PS_FOLDER),
            "CAPTION",
            "txt",
            str(target),
            "-Url",
            url,
        ],
    }[tool]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("VISION_")}


def target_for(tool: str, tmp_path: Path) -> Path:
    """One image: alone for a single-image client, in a folder for a folder tool."""
    image = save_image(tmp_path / "data" / "a.png", 0)
    return image.parent if tool in FOLDER else image


def run_busy(
    tool: str, target: Path, busy_first: int, busy_retry_after: str | Callable[[], str] | None = "1"
) -> tuple[subprocess.CompletedProcess[str], list[float]]:
    """``tool`` run on ``target`` against a stand-in whose first ``busy_first`` answers are busy
    (with ``busy_retry_after`` as ``Retry-After``): the run and the times of the requests."""
    with StandIn(busy_first=busy_first, busy_retry_after=busy_retry_after) as stand_in:
        result = subprocess.run(
            command(tool, stand_in.url, target), capture_output=True, text=True, env=clean_env(), timeout=120
        )
        return result, stand_in.post_times()


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


@pytest.mark.parametrize("tool", SINGLE + FOLDER)
def test_without_retry_after_every_client_backs_off_from_half_a_second_doubling(
    tool: str, tmp_path: Path
) -> None:
    """Three 503s without ``Retry-After``: the waits are 0.5, 1 and 2 s, each between half of
    that and all of it (jitter). The bash clients waited 2, 4 and 8 s (and the single-image
    bash client did not retry at all by default)."""
    needs_pwsh(tool)
    target = target_for(tool, tmp_path)
    result, times = run_busy(tool, target, busy_first=3, busy_retry_after=None)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(times) == 4, result.stderr[-3000:]
    schedule = [0.5, 1.0, 2.0]  # the documented back-off, as docs/clients/index.md#retries says it
    waited = gaps(times)
    assert all(gap >= full / 2 - 0.02 for gap, full in zip(waited, schedule, strict=True)), waited
    assert sum(waited) <= sum(schedule) + SLACK, waited


@pytest.mark.parametrize("tool", SINGLE)
def test_every_single_image_client_retries_five_times_by_default_after_retry_after(
    tool: str, tmp_path: Path
) -> None:
    """Five "queue full" answers with ``Retry-After: 1``: every single-image client rides them
    out by default, waiting at least the second asked each time. Their defaults were 5
    (vision-client), 0 (vision-client.sh) and 3 (vision-client.ps1)."""
    needs_pwsh(tool)
    image = target_for(tool, tmp_path)
    result, times = run_busy(tool, image, busy_first=5)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "stand-in caption"
    assert len(times) == 1 + 5
    assert all(gap >= 1.0 for gap in gaps(times)), gaps(times)


@pytest.mark.parametrize("hint", ["0", "-1"])
@pytest.mark.parametrize("tool", SINGLE + FOLDER)
def test_retry_after_zero_means_at_once_in_every_client(tool: str, hint: str, tmp_path: Path) -> None:
    """Five 503s with ``Retry-After: 0`` (or a negative number, which the Python client reads as
    0): each retry goes out at once (plus at most 50 ms of jitter). The bash clients read 0, and
    then -1, as "no hint" and backed off 0.5, 1, 2, 4, 8 s (at least 7.75 s in all, with
    jitter). The bound is no speed target: it tells the two apart, with room for five slow
    process starts or curl calls on a loaded CI machine."""
    needs_pwsh(tool)
    target = target_for(tool, tmp_path)
    result, times = run_busy(tool, target, busy_first=5, busy_retry_after=hint)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(times) == 1 + 5, result.stderr[-3000:]
    assert sum(gaps(times)) <= 6.0, gaps(times)


def http_date(when: float, form: str) -> str:
    """``when`` as an HTTP date in one of the three forms RFC 9110 has every recipient read."""
    moment = time.gmtime(when)
    if form == "IMF-fixdate":  # Sun, 06 Nov 1994 08:49:37 GMT
        return email.utils.formatdate(when, usegmt=True)
    if form == "RFC 850":  # Sunday, 06-Nov-94 08:49:37 GMT
        return time.strftime("%A, %d-%b-%y %H:%M:%S GMT", moment)
    return time.strftime("%a %b ", moment) + f"{moment.tm_mday:2d}" + time.strftime(" %H:%M:%S %Y", moment)


@pytest.mark.parametrize("form", ["IMF-fixdate", "RFC 850", "asctime"])
@pytest.mark.parametrize("tool", SINGLE + FOLDER)
def test_retry_after_as_an_http_date_is_waited_for_in_every_client(
    tool: str, form: str, tmp_path: Path
) -> None:
    """``Retry-After`` as an HTTP date six seconds ahead, in each of its three forms (RFC 850's
    "Sunday, 06-Nov-94 08:49:37 GMT" and asctime's "Sun Nov  6 08:49:37 1994" are obsolete, but
    recipients must read them): the retry waits for it (5 s or so, well over 2.5 s: the date has
    whole seconds and is made as the 503 is answered; made before the client started, a slow
    start on a loaded machine ate into it, once down to 1.9 s). The bash clients ignored a date
    and backed off 0.25 to 0.5 s, and then read only the IMF-fixdate."""
    needs_pwsh(tool)
    target = target_for(tool, tmp_path)
    sent: list[str] = []

    def six_seconds_ahead() -> str:
        sent.append(http_date(time.time() + 6, form))
        return sent[-1]

    result, times = run_busy(tool, target, busy_first=1, busy_retry_after=six_seconds_ahead)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(times) == 2, result.stderr[-3000:]
    assert gaps(times)[0] >= 2.5, (sent, gaps(times))


@pytest.mark.parametrize("tool", SINGLE + FOLDER)
def test_a_fractional_retry_after_is_waited_for_whole_in_every_client(tool: str, tmp_path: Path) -> None:
    """``Retry-After: 1.9``: the retry waits the 1.9 s, never less. The bash clients dropped the
    fraction and sent it again after 1 to 1.15 s."""
    needs_pwsh(tool)
    target = target_for(tool, tmp_path)
    result, times = run_busy(tool, target, busy_first=1, busy_retry_after="1.9")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(times) == 2, result.stderr[-3000:]
    assert gaps(times)[0] >= 1.9, gaps(times)
    if tool == "vision-client.sh":  # its line about the retry says the wait, jitter included
        found = re.search(r"retry 1/5 in ([0-9.]+)s", result.stderr)
        assert found and 1.9 <= float(found.group(1)) <= 2.14, result.stderr


@pytest.mark.parametrize("tool", SINGLE + FOLDER)
def test_retry_after_in_exponent_form_is_no_hint_in_every_client(tool: str, tmp_path: Path) -> None:
    """``Retry-After: 1e3`` is no number of seconds (RFC 9110's delay-seconds are digits): every
    client backs off (0.25 to 0.5 s) as for a header it cannot read. The Python clients read it
    as 1000 s, waiting the 120 s cap, while the bash and PowerShell clients backed off."""
    needs_pwsh(tool)
    target = target_for(tool, tmp_path)
    with StandIn(busy_first=1, busy_retry_after="1e3") as stand_in:
        try:
            result = subprocess.run(
                command(tool, stand_in.url, target),
                capture_output=True,
                text=True,
                env=clean_env(),
                timeout=60,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{tool} still waited after 60 s: it read Retry-After: 1e3 as seconds")
        times = stand_in.post_times()
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(times) == 2, result.stderr[-3000:]
    assert gaps(times)[0] <= SLACK, gaps(times)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("5", 5.0),
        (" 2.5 ", 2.5),
        (".5", 0.5),
        ("5.", 5.0),
        ("+3", 3.0),
        ("-1", 0.0),
        ("1e3", None),
        ("1E3", None),
        ("inf", None),
        ("nan", None),
        ("1_000", None),
        ("\u0663", None),  # an Arabic-Indic three: float() reads it, no HTTP server writes it
        ("0x10", None),
        ("", None),
    ],
)
def test_python_and_the_comfyui_node_read_seconds_as_the_scripts_do(
    header: str, seconds: float | None
) -> None:
    """Digits, with a fraction or a sign, as vision-client.sh (``seconds_ms_into``) and
    VisionClient.Common.ps1 (``ConvertFrom-VisionRetryAfter``) read them; ``float()``'s other
    forms are no hint (they were up to 120 s of waiting in the Python clients)."""
    node = import_file(paths.CLIENTS / "comfyui" / "vision_caption_node.py", "retry_schedule_node_under_test")
    assert retry.parse_retry_after(header) == seconds
    assert node._retry_after_seconds(header) == seconds


def test_every_language_reads_seconds_by_one_grammar() -> None:
    """The PowerShell regex is Python's (and the ComfyUI node's, which may not import it)."""
    node = (paths.CLIENTS / "comfyui" / "vision_caption_node.py").read_text()
    pattern = retry._SECONDS.pattern
    assert f'_SECONDS = re.compile(r"{pattern}", re.ASCII)' in node
    assert f"$Text -cmatch '^{pattern}$'" in PS_COMMON.read_text()


def test_the_bash_client_says_a_fractional_retry_after_when_it_gives_up(tmp_path: Path) -> None:
    """Still busy after ``--retries 0``: exit status 5 and the server's ``Retry-After`` as it
    was meant (2.5 s, not 2)."""
    image = save_image(tmp_path / "a.png", 0)
    with StandIn(busy_first=1, busy_retry_after="2.5") as stand_in:
        result = subprocess.run(
            ["bash", str(BASH_CLIENT), "--url", stand_in.url, "--retries", "0", "CAPTION", str(image)],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=60,
        )
    assert result.returncode == 5, result.stderr
    assert "(retry after 2.5s)" in result.stderr, result.stderr


def test_the_bash_client_waits_at_most_120_seconds_whatever_retry_after_says(tmp_path: Path) -> None:
    """``Retry-After: 600`` is honoured up to 120 s (plus up to a tenth of jitter), as in
    vision-client and PowerShell; the bash client capped it at 60 s. Its line about the retry
    says how long it waits; the client is stopped (SIGTERM) once it has said so."""
    image = save_image(tmp_path / "a.png", 0)
    with StandIn(busy_first=1, busy_retry_after="600") as stand_in:
        proc = subprocess.Popen(
            command("vision-client.sh", stand_in.url, image),
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=clean_env(),
        )
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    found = re.search(r"retry 1/5 in ([0-9.]+)s", line)
    assert found, line
    assert 120.0 <= float(found.group(1)) <= 132.05, line


def test_python_client_waits_at_most_120_seconds_whatever_retry_after_says() -> None:
    """The Python clients' schedule, as the bash test above checks the script's."""
    policy = retry.RetryPolicy()
    waits = [policy.delay(0, 600.0) for _ in range(50)]
    assert all(120.0 <= wait <= 132.05 for wait in waits), waits
    assert all(15.0 <= policy.delay(attempt) <= 30.0 for attempt in (6, 7, 40)), "cap at 30 s"


def test_the_schedule_and_default_are_written_once_per_language_and_agree() -> None:
    """The bash and PowerShell constants say what ``vision_server.client.retry`` says, and each
    client's ``--retries`` default is its language's one default."""
    bash = BASH_CLIENT.read_text()
    constants = dict(re.findall(r"\b(RETRIES_DEFAULT|RETRY_[A-Z_]+)=([0-9]+)", bash))
    assert constants == {
        "RETRIES_DEFAULT": str(retry.DEFAULT_RETRIES),
        "RETRY_BASE_MS": str(int(retry.BASE_DELAY * 1000)),
        "RETRY_MAX_MS": str(int(retry.MAX_DELAY * 1000)),
        "RETRY_AFTER_MAX_S": str(int(retry.MAX_RETRY_AFTER)),
    }
    assert re.search(r"^retries=\$RETRIES_DEFAULT$", bash, flags=re.M)
    assert re.search(r"^retries=5 ", BASH_FOLDER.read_text(), flags=re.M)
    common = PS_COMMON.read_text()
    body = common[common.index("function Get-VisionRetryDelay") :]
    body = body[: body.index("\n}\n")]
    assert f"$baseSec = {retry.BASE_DELAY}" in body
    assert f"$maxSec = {retry.MAX_DELAY}" in body
    assert f"$maxRetryAfterSec = {retry.MAX_RETRY_AFTER}" in body
    for script in (PS_CLIENT, PS_FOLDER):
        assert f"[int]$Retries = {retry.DEFAULT_RETRIES}," in script.read_text(), script.name
    node = (paths.CLIENTS / "comfyui" / "vision_caption_node.py").read_text()  # imports no vision_server
    assert f"\nRETRIES = {retry.DEFAULT_RETRIES}\n" in node
    assert f"\nRETRY_BASE_DELAY = {retry.BASE_DELAY}\n" in node
    assert f"\nRETRY_MAX_DELAY = {retry.MAX_DELAY}\n" in node
    assert f"\nRETRY_AFTER_MAX = {retry.MAX_RETRY_AFTER}\n" in node


def test_the_retries_paragraph_states_the_schedule() -> None:
    """docs/clients/index.md says it once; the pages of the clients link to it."""
    index = (paths.DOCS / "clients" / "index.md").read_text()
    paragraph = index[index.index("\n## Retries\n") + 1 :]
    paragraph = paragraph[: paragraph.index("\n#", 1)]
    for fact in ("0.5 s", "30 s", "120 s", "5"):
        assert fact in paragraph, fact
    for page in ("bash.md", "powershell.md", "cli.md", "python.md", "comfyui.md"):
        assert "index.md#retries" in (paths.DOCS / "clients" / page).read_text(), page
