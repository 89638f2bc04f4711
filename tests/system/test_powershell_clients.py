"""The PowerShell clients (clients/*.ps1).

The static checks run everywhere: every script must parse without an error or missing node
with the tree-sitter PowerShell grammar (PyPI ``tree-sitter-powershell``), stay loadable by
Windows PowerShell 5.1 (ASCII only, no PowerShell 7-only syntax), and document every parameter.

The behaviour tests run the scripts as real ``pwsh`` subprocesses against a real
``vision-server serve --model test:tiny`` started for the module, plus the stand-in of
``tests.support.stand_in`` for what the real server does not do on demand (hang, answer 503,
record what a client sent). They are skipped when ``pwsh`` is not on PATH.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import hidden_names, paths
from tests.support.images import save as save_image
from tests.support.leftovers import OLD, YOUNG, aged, caption_temp
from tests.support.meanwhile import folder_of_images, make_pipe, run_with_captions_written_meanwhile
from tests.support.processes import free_port, http_json
from tests.support.stand_in import PROMPTS, StandIn, interrupt_in_flight
from vision_server.captionfiles import NotACaptionFile, ReadOnlyCaption, printable
from vision_server.disk_full import no_space_reason

REPO = paths.REPO
CLIENTS = REPO / "clients"
CLIENT = CLIENTS / "vision-client.ps1"
FOLDER = CLIENTS / "vision-caption-folder-images.ps1"
COMMON = CLIENTS / "VisionClient.Common.ps1"
SCRIPTS = (CLIENT, FOLDER, COMMON)
PADDED = "  stand-in caption\n"  # what the stand-ins answer: the clients must trim it
PWSH = shutil.which("pwsh")
needs_pwsh = pytest.mark.skipif(
    PWSH is None, reason="pwsh (PowerShell 7) is not on PATH, so the .ps1 clients cannot be run here"
)


# ---------------------------------------------------------------------------------------------
# Static checks (no PowerShell needed)


def code_only(text: str) -> str:
    """The script without comments, comment blocks and string literals (roughly, for greps)."""
    text = re.sub(r"<#.*?#>", "", text, flags=re.S)
    text = re.sub(r"'[^'\n]*'", "''", text)
    text = re.sub(r'"[^"\n]*"', '""', text)
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_ascii_only(script: Path) -> None:
    # Windows PowerShell 5.1 reads a BOM-less script in the ANSI code page: one typographic
    # quote or dash and the script breaks or says something else.
    data = script.read_bytes()
    bad = [(n + 1, line) for n, line in enumerate(data.splitlines()) if any(b > 127 for b in line)]
    assert not bad, f"non-ASCII bytes in {script.name}: {bad[:3]}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_avoids_powershell7_only_syntax(script: Path) -> None:
    code = code_only(script.read_text(encoding="ascii"))
    for token in ("??", "?.", "&&", "||", "-Parallel", "-SkipHttpErrorCheck", "-AsHashtable", "-NoEnumerate"):
        assert token not in code, f"{script.name} uses {token!r}, which Windows PowerShell 5.1 lacks"
    # The ternary operator: "<condition> ? <a> : <b>" outside strings.
    assert not re.search(r"\s\?\s[^\n]*\s:\s", code), f"{script.name} seems to use the ternary operator"


@pytest.mark.parametrize("script", (CLIENT, FOLDER), ids=lambda p: p.name)
def test_help_documents_every_parameter(script: Path) -> None:
    text = script.read_text(encoding="ascii")
    param_block = text[text.index("param(") : text.index("$ErrorActionPreference")]
    declared = set(re.findall(r"\[(?:string|int|switch)\]\$(\w+)", param_block))
    documented = set(re.findall(r"^\.PARAMETER (\w+)", text, flags=re.M))
    assert declared == documented
    assert re.search(r"^\.SYNOPSIS$", text, flags=re.M) and re.search(r"^\.EXAMPLE$", text, flags=re.M)


# Every .ps1 file of the repository: the clients and service/install-nssm.ps1.
ALL_PS1 = sorted([*CLIENTS.glob("*.ps1"), *(REPO / "service").glob("*.ps1")])
# Cmdlets whose -Path takes wildcards: "C:\\data\\[raw]" would be a pattern (matching "r", "a" or
# "w"), so Test-Path says no and Get-Item finds nothing. -LiteralPath takes the path as written.
WILDCARD_PATH_CMDLETS = (
    "Test-Path", "Get-Item", "Get-ChildItem", "Remove-Item", "Resolve-Path", "Convert-Path",
    "Get-Content", "Set-Content", "Add-Content", "Copy-Item", "Move-Item", "Rename-Item",
    "Get-ItemProperty", "Out-File", "Set-Location", "Push-Location",
)  # fmt: skip


@pytest.mark.parametrize("script", ALL_PS1, ids=lambda p: p.name)
def test_path_cmdlets_take_the_path_literally(script: Path) -> None:
    """A dataset or virtualenv folder named with [ ] must work: every path cmdlet gets
    -LiteralPath (install-nssm.ps1 said a -VenvDir with brackets had no vision-server.exe)."""
    code = code_only(script.read_text(encoding="ascii"))
    pattern = re.compile(r"(?<![\w-])(" + "|".join(WILDCARD_PATH_CMDLETS) + r")\b([^|;\n]*)", re.I)
    wrong = [
        (match.group(1), match.group(2).strip())
        for match in pattern.finditer(code)
        if not re.search(r"-LiteralPath\b", match.group(2), re.I)
    ]
    assert not wrong, f"{script.name} passes a path without -LiteralPath: {wrong}"


def test_caption_files_are_utf8_without_bom_and_written_atomically() -> None:
    # Out-File/Set-Content -Encoding utf8 would add a BOM on 5.1; the helper writes the bytes itself.
    code = code_only(COMMON.read_text(encoding="ascii"))
    assert "[System.Text.UTF8Encoding]::new($false)" in code
    assert "Out-File" not in code and "Set-Content" not in code
    assert "[System.IO.File]::Replace(" in code and "[System.IO.File]::Move(" in code


def test_temp_caption_name_does_not_grow_with_the_caption_name() -> None:
    """A caption name near the 255-character limit must not fail because its temp name is longer."""
    code = code_only(COMMON.read_text(encoding="ascii"))
    body = code[code.index("function Write-VisionTextFile") :]
    body = body[: body.index("\nfunction ")]
    (temp_line,) = [line for line in body.splitlines() if "$temp =" in line]
    assert "$name" not in temp_line and "GetFileName" not in body
    assert "('' -f $suffix)" in temp_line  # one format string, of the random suffix alone
    assert "'.vision-caption.{0}.tmp' -f $suffix" in COMMON.read_text(encoding="ascii")


def test_a_read_only_caption_is_refused_in_the_words_of_the_python_tools() -> None:
    """The .ps1 folder script refuses to replace a read-only caption file with the message of
    ``captionfiles.ReadOnlyCaption``, word for word; it keeps a rewritten file's mode (Linux and
    macOS: File.Replace renames, so the temp file gets it first) and replaces a symlinked caption
    by a plain file (an overwriting move of the link itself, never File.Replace or a copy
    through it); it flushes the caption to the disk before it moves it. Where pwsh runs,
    test_folder_replaces_caption_files_by_the_rules_of_the_python_tools checks the behaviour."""
    text = COMMON.read_text(encoding="ascii")
    (words,) = re.findall(r"throw \('(\{0\} is read-only[^']*)' -f", text)
    assert words.format("kept.txt") == str(ReadOnlyCaption(Path("kept.txt")))
    code = code_only(text)
    body = code[code.index("function Write-VisionTextFile") :]
    body = body[: body.index("\nfunction ")]
    assert "Assert-VisionCaptionWritable" in body
    assert "[System.IO.File]::SetUnixFileMode($temp, $unixMode)" in body
    assert "Move-VisionFileOverLink" in body
    assert "[System.IO.File]::Move($Temp, $Path, $true)" in code
    assert "[System.IO.File]::Exists($Path)" not in body  # follows a link: Get-VisionCaptionEntry does not
    assert "$stream.Flush($true)" in body  # on the disk before the move, as write_atomic flushes it


def test_a_pipe_where_a_caption_goes_is_refused_in_the_words_of_the_python_tools() -> None:
    """One wording, ``captionfiles.NotACaptionFile``'s, for a pipe (or a folder) the folder
    script finds when it plans an image and for one made there later, which Write-VisionTextFile
    refuses (a pipe was read as a caption, hanging the worker; a folder failed in .NET's words);
    Read-VisionCaptionFile never opens a pipe."""
    text = COMMON.read_text(encoding="ascii")
    (words,) = re.findall(r"return \('(\{0\} is not a regular file[^']*)' -f", text)
    assert words.format("cat.txt") == str(NotACaptionFile(Path("cat.txt")))
    (words,) = re.findall(r"return \('(\{0\} is a directory[^']*)' -f", text)
    assert words.format("cat.txt") == str(NotACaptionFile(Path("cat.txt"), folder=True))
    code = code_only(text)
    for function in ("Write-VisionTextFile", "Read-VisionCaptionFile"):
        body = code[code.index(f"function {function}") :]
        body = body[: body.index("\nfunction ")]
        assert "Test-VisionSpecialFile -Path $Path" in body, function
    assert "throw (Get-VisionNotACaptionReason -Path $Path)" in code
    assert "throw (Get-VisionFolderNotACaptionReason -Path $Path)" in code
    assert "Error = (Get-VisionFolderNotACaptionReason -Path $captionPath)" in code_only(
        FOLDER.read_text(encoding="ascii")
    )
    assert "Error = (Get-VisionNotACaptionReason -Path $captionPath)" in code_only(
        FOLDER.read_text(encoding="ascii")
    )


def test_file_names_are_shown_escaped_by_the_table_of_the_python_tools() -> None:
    r"""``ConvertTo-VisionPrintable`` shows a line break or tab as ``\n``, ``\r``, ``\t`` and any
    other control character as ``\xNN``, as ``captionfiles.printable`` (and the bash scripts'
    ``printable_into``) do: its branches, read from the script, give Python's spelling of every
    ASCII character. Where pwsh runs, test_client_names_a_missing_image_on_one_line runs it."""
    code = COMMON.read_text(encoding="ascii")
    body = code[code.index("function ConvertTo-VisionPrintable") :]
    body = body[: body.index("\n}\n")]
    named = {
        int(n): text
        for n, text in re.findall(r"\$code -eq (\d+)\) \{ \[void\]\$shown\.Append\('([^']*)'\)", body)
    }
    assert sorted(named) == [9, 10, 13], named
    assert "elseif ($code -lt 32 -or $code -eq 127) { [void]$shown.Append(('\\x{0:x2}' -f $code)) }" in body
    assert "if ($Text -notmatch '[\\x00-\\x1f\\x7f]') { return $Text }" in body

    def shown(char: str) -> str:  # the branches above, in order
        code = ord(char)
        if code in named:
            return named[code]
        return f"\\x{code:02x}" if code < 32 or code == 127 else char

    for number in range(128):
        assert shown(chr(number)) == printable(chr(number)), number


def test_the_folder_script_shows_every_image_and_folder_name_escaped() -> None:
    """Each line the folder script writes about an image (ok, skipped, FAILED, the summary's
    list) or its folder passes the name through ConvertTo-VisionPrintable, as vision-client
    folder (``printable``) and the bash script (``show_into``) do: a raw name with a newline
    could pass for a line of its own in the summary. So do the single-image client's messages
    that name the image (not found, empty, a folder)."""
    names = re.compile(r"\$(result|failure|clash)\.Image\b|\$root\b|\.FullName\b")
    writes = re.compile(r"Write-Host|Write-FolderError|Exit-WithUsage|\$activity =")
    lines = [line for line in FOLDER.read_text(encoding="ascii").splitlines() if writes.search(line)]
    unescaped = [
        line.strip() for line in lines if names.search(line) and "ConvertTo-VisionPrintable" not in line
    ]
    assert not unescaped, unescaped
    assert sum("ConvertTo-VisionPrintable" in line for line in lines) >= 9
    common = COMMON.read_text(encoding="ascii")
    for words in ("Image file not found: {0}", "the file is empty (0 bytes): {0}"):
        assert f"throw ('{words}' -f (ConvertTo-VisionPrintable $Path))" in common, words
    assert "' -f (ConvertTo-VisionPrintable $path))" in CLIENT.read_text(encoding="ascii")


def test_a_full_disk_is_said_in_the_words_of_the_python_tools_and_never_copied_over() -> None:
    """The folder script stops on a full disk or quota with the reasons of
    ``disk_full.no_space_reason``, word for word, whether the write of the temporary file or the
    move into place met it (one catch around both); and the fallback for a File.Replace that a
    share refuses (a copy over the caption file) is not taken then: the copy would cut the
    caption file short."""
    code = COMMON.read_text(encoding="ascii")
    body = code[code.index("function Get-VisionNoSpaceReason") :]
    body = body[: body.index("\n}\n")]
    reasons = set(re.findall(r"return '([^']*)'", body))
    assert reasons == {
        no_space_reason(OSError(errno.ENOSPC, "No space left on device")),
        no_space_reason(OSError(errno.EDQUOT, "Disk quota exceeded")),
    }
    assert "$message = 'cannot write {0}: {1}' -f (ConvertTo-VisionPrintable $CaptionPath), $noSpace" in code
    write = code[code.index("function Write-VisionTextFile") :]
    write = write[: write.index("\nfunction ")]
    rethrow = write.index("if (Test-VisionDiskFull $_.Exception) { throw }")
    assert rethrow < write.index("[System.IO.File]::Copy($temp, $Path, $true)")


def powershell_syntax_errors(source: bytes) -> list[tuple[int, str]]:
    """(line, what) for every ERROR or MISSING node the tree-sitter PowerShell grammar finds.

    Needs the ``tree-sitter`` and ``tree-sitter-powershell`` packages of the test extra; the
    parse check is how these scripts are verified where no PowerShell runs, so it never skips.
    """
    import tree_sitter
    import tree_sitter_powershell

    parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language()))
    tree = parser.parse(source)
    found: list[tuple[int, str]] = []
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        if node.type == "ERROR":
            found.append((node.start_point[0] + 1, "syntax error"))
        elif node.is_missing:
            found.append((node.start_point[0] + 1, f"missing {node.type!r}"))
        stack.extend(node.children)
    assert found or not tree.root_node.has_error
    return sorted(found)


def test_grammar_catches_syntax_errors() -> None:
    # The check below is only worth something if the grammar rejects broken scripts.
    assert powershell_syntax_errors(b"function f { if ($x -eq 1) { 'a' }\n") == [(1, "missing '}'")]
    assert powershell_syntax_errors(b"$h = @{ a = 1; b = }\n")
    assert powershell_syntax_errors(b"$x = (1 + \n")
    assert powershell_syntax_errors(b"try { 1 } catch { 2 } finally { 3 }\n") == []


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script: Path) -> None:
    errors = powershell_syntax_errors(script.read_bytes())
    assert not errors, f"the PowerShell grammar finds errors in {script.name}: {errors}"


# ---------------------------------------------------------------------------------------------
# Servers


@pytest.fixture(scope="module")
def server(tiny_server_url: str) -> str:
    """The module's real ``vision-server serve --model test:tiny`` (see conftest)."""
    return tiny_server_url


# ---------------------------------------------------------------------------------------------
# Helpers


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISION_")}
    env.update(extra)
    return env


def ps(
    script: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    assert PWSH is not None
    return subprocess.run(
        [PWSH, "-NoLogo", "-NoProfile", "-NonInteractive", "-File", str(script), *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env or base_env(),
        timeout=timeout,
        cwd=cwd,
    )


def caption_direct(server: str, image: Path, prompt: str = "<CAPTION>") -> str:
    status, body = http_json(
        server + "/process_image", {"image": base64.b64encode(image.read_bytes()).decode(), "prompt": prompt}
    )
    assert status == 200, body
    assert isinstance(body, dict)
    return body["result"].strip()


def file_caption(text: str) -> str:
    """What the folder script stores for a caption: one line."""
    return text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")


def read_caption(path: Path) -> str:
    data = path.read_bytes()
    assert not data.startswith(b"\xef\xbb\xbf"), f"{path.name} has a BOM"
    assert not data.endswith(b"\n"), f"{path.name} ends with a newline"
    return data.decode("utf-8")


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# vision-client.ps1


@needs_pwsh
def test_client_names_a_missing_image_on_one_line(tmp_path: Path) -> None:
    r"""As vision-client.sh: the image is named with its line break, tab and other control
    characters made visible (``\n``, ``\t``, ``\xNN``); the name went out raw, a line of its own."""
    name = "photo\nvision-client.ps1: HTTP 200\t\x07.png"  # no [ ]: a wildcard to PowerShell
    shown = "photo\\nvision-client.ps1: HTTP 200\\t\\x07.png"
    missing = tmp_path / "missing" / name
    empty = tmp_path / "empty" / name
    empty.parent.mkdir()
    empty.touch()
    for path, said in ((missing, "Image file not found"), (empty, "the file is empty (0 bytes)")):
        result = ps(CLIENT, "CAPTION", str(path), "-Url", f"http://127.0.0.1:{free_port()}")
        assert result.returncode == 1, result.stderr
        assert result.stderr == f"vision-client.ps1: {said}: {path.parent}/{shown}\n", result.stderr


@needs_pwsh
@pytest.mark.parametrize("prompt", ["CAPTION", "<CAPTION>", "caption", "<Detailed_Caption>"])
def test_client_prints_only_the_caption(server: str, tmp_path: Path, prompt: str) -> None:
    image = save_image(tmp_path / "cat.png", 3)
    token = "<" + prompt.strip("<>").upper() + ">"
    result = ps(CLIENT, prompt, str(image), "-Url", server)
    assert result.returncode == 0, result.stderr
    assert result.stdout == caption_direct(server, image, token) + "\n"
    assert result.stderr == ""


@needs_pwsh
def test_client_sends_the_original_file_bytes(tmp_path: Path) -> None:
    image = save_image(tmp_path / "big.jpg", 5, size=(1500, 900))
    with StandIn(caption=PADDED) as stand_in:
        result = ps(CLIENT, "DETAILED_CAPTION", str(image), "-Url", stand_in.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "stand-in caption\n"
    (post,) = stand_in.posts()
    assert post["prompt"] == "<DETAILED_CAPTION>"
    assert base64.b64decode(post["image"], validate=True) == image.read_bytes()


@needs_pwsh
def test_client_reads_server_and_key_from_environment(tmp_path: Path) -> None:
    image = save_image(tmp_path / "a b [1].png", 2)
    with StandIn(caption=PADDED) as stand_in:
        env = base_env(VISION_HOST=stand_in.url + "/", VISION_API_KEY="sekrit")
        result = ps(CLIENT, "CAPTION", str(image), env=env)
    assert result.returncode == 0, result.stderr
    headers = stand_in.requests[-1].headers
    assert headers["Authorization"] == "Bearer sekrit"


@needs_pwsh
def test_client_relative_path_and_host_without_scheme(tmp_path: Path) -> None:
    save_image(tmp_path / "sub" / "dog.webp", 4)
    with StandIn(caption=PADDED) as stand_in:
        env = base_env(VISION_HOST=stand_in.url.removeprefix("http://"))
        result = ps(CLIENT, "CAPTION", os.path.join("sub", "dog.webp"), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert base64.b64decode(stand_in.posts()[0]["image"]) == (tmp_path / "sub" / "dog.webp").read_bytes()


@needs_pwsh
def test_client_names_the_model_in_captions_and_prompts(tmp_path: Path) -> None:
    image = save_image(tmp_path / "cat.png", 3)
    with StandIn(caption=PADDED) as stand_in:
        captioned = ps(CLIENT, "CAPTION", str(image), "-Url", stand_in.url, "-Model", "my style")
        listed = ps(CLIENT, "prompts", "-Url", stand_in.url, env=base_env(VISION_MODEL="blip"))
        plain = ps(CLIENT, "CAPTION", str(image), "-Url", stand_in.url)
    assert captioned.returncode == 0 and listed.returncode == 0 and plain.returncode == 0
    named, unnamed = stand_in.posts()
    assert named["model"] == "my style" and "model" not in unnamed
    assert [r.path for r in stand_in.requests if r.method == "GET"] == ["/prompts?model=blip"]


@needs_pwsh
def test_folder_passes_the_model_on(tmp_path: Path) -> None:
    save_image(tmp_path / "data" / "a.png", 1)
    with StandIn(caption=PADDED) as stand_in:
        result = ps(FOLDER, "CAPTION", "txt", str(tmp_path / "data"), "-Url", stand_in.url, "-Model", "blip")
    assert result.returncode == 0, result.stderr
    assert [post["model"] for post in stand_in.posts()] == ["blip"]
    assert [r.path for r in stand_in.requests if r.method == "GET"] == ["/prompts?model=blip"]


@needs_pwsh
def test_client_commands(server: str) -> None:
    prompts = ps(CLIENT, "prompts", "-Url", server)
    assert prompts.returncode == 0, prompts.stderr
    assert prompts.stdout.split() == [p.strip("<>") for p in PROMPTS]
    model = ps(CLIENT, "model", "-Url", server)
    assert (model.returncode, model.stdout) == (0, "test:tiny\n")
    status = ps(CLIENT, "status", "-Url", server)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["model"] == "test:tiny"


@needs_pwsh
def test_client_reports_the_servers_detail(server: str, tmp_path: Path) -> None:
    image = save_image(tmp_path / "x.png", 1)
    bad_prompt = ps(CLIENT, "NO_SUCH_TASK", str(image), "-Url", server)
    assert bad_prompt.returncode == 1
    assert bad_prompt.stdout == ""
    assert "400" in bad_prompt.stderr and "Invalid prompt" in bad_prompt.stderr
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    bad_image = ps(CLIENT, "CAPTION", str(junk), "-Url", server)
    assert bad_image.returncode == 1
    assert bad_image.stdout == ""
    assert "Invalid image data" in bad_image.stderr


@needs_pwsh
def test_client_file_problems(server: str, tmp_path: Path) -> None:
    missing = ps(CLIENT, "CAPTION", str(tmp_path / "nope.png"), "-Url", server)
    assert missing.returncode == 1 and "not found" in missing.stderr and missing.stdout == ""
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    result = ps(CLIENT, "CAPTION", str(empty), "-Url", server)
    assert result.returncode == 1 and "empty" in result.stderr
    usage = ps(CLIENT)
    assert usage.returncode == 2 and "Usage" in usage.stderr and usage.stdout == ""
    no_image = ps(CLIENT, "CAPTION")
    assert no_image.returncode == 2


@needs_pwsh
def test_client_connection_refused(tmp_path: Path) -> None:
    image = save_image(tmp_path / "x.png", 1)
    result = ps(CLIENT, "CAPTION", str(image), "-Url", f"http://127.0.0.1:{free_port()}", "-Retries", "0")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Cannot reach the server" in result.stderr


@needs_pwsh
def test_client_timeout(tmp_path: Path) -> None:
    image = save_image(tmp_path / "x.png", 1)
    with StandIn(caption=PADDED, hang=True) as stand_in:
        started = time.monotonic()
        result = ps(CLIENT, "CAPTION", str(image), "-Url", stand_in.url, "-TimeoutSec", "2")
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert "Timeout" in result.stderr
    assert elapsed < 30


@needs_pwsh
def test_client_retries_a_busy_server(tmp_path: Path) -> None:
    image = save_image(tmp_path / "x.png", 1)
    with StandIn(caption=PADDED, busy_first=1) as stand_in:
        result = ps(CLIENT, "CAPTION", str(image), "-Url", stand_in.url)
        assert len(stand_in.posts()) == 2
    assert (result.returncode, result.stdout) == (0, "stand-in caption\n")
    with StandIn(caption=PADDED, busy_first=5) as stand_in:
        result = ps(CLIENT, "CAPTION", str(image), "-Url", stand_in.url, "-Retries", "0")
    assert result.returncode == 1 and "503" in result.stderr and "Queue full" in result.stderr


@needs_pwsh
@pytest.mark.skipif(sys.platform == "win32", reason="System.Drawing works on Windows")
def test_client_max_size_needs_windows(tmp_path: Path) -> None:
    image = save_image(tmp_path / "x.png", 1)
    result = ps(CLIENT, "CAPTION", str(image), "-MaxSize", "512", "-Url", "http://127.0.0.1:9")
    assert result.returncode == 2
    assert "System.Drawing" in result.stderr and "Windows" in result.stderr


# ---------------------------------------------------------------------------------------------
# vision-caption-folder-images.ps1

WEIRD_NAMES = [
    "plain.jpg",
    "UPPER.JPG",
    "with space.png",
    "brackets [1].jpeg",
    "quote's.gif",
    "percent%20and&amp.bmp",
    "caf\u00e9 \u732b.tif",
    "dots.in.name.tiff",
    "sub/dir with space/deep.webp",
    "sub/-dash.PNG",
]


def make_folder(root: Path, names: list[str] = WEIRD_NAMES) -> list[Path]:
    return [save_image(root / name, seed) for seed, name in enumerate(names, start=1)]


@needs_pwsh
@pytest.mark.parametrize("jobs", ["1", "6"])
def test_folder_captions_every_image(server: str, tmp_path: Path, jobs: str) -> None:
    images = make_folder(tmp_path)
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "._plain.jpg").write_bytes(b"macOS resource fork")
    result = ps(FOLDER, "CAPTION", "txt", str(tmp_path), "-Url", server, "-Jobs", jobs)
    assert result.returncode == 0, result.stderr
    for image in images:
        assert read_caption(image.with_suffix(".txt")) == file_caption(caption_direct(server, image))
    assert not (tmp_path / "notes.txt").exists() and not (tmp_path / "._plain.txt").exists()
    assert leftovers(tmp_path) == []
    assert "10 captioned, 0 skipped, 0 failed" in result.stdout


@needs_pwsh
def test_folder_caption_name_near_name_max(server: str, tmp_path: Path) -> None:
    """A 248-byte stem: the caption name fits the file system, and so must its temp name."""
    (image,) = make_folder(tmp_path, ["a" * 248 + ".png"])
    result = ps(FOLDER, "CAPTION", "txt", str(tmp_path), "-Url", server)
    assert result.returncode == 0, result.stderr
    assert read_caption(image.with_suffix(".txt")) == file_caption(caption_direct(server, image))
    assert leftovers(tmp_path) == []


@needs_pwsh
def test_folder_caption_name_too_long_for_the_file_system_fails_that_image(tmp_path: Path) -> None:
    """``caption`` beside a 248-byte stem names a 256-byte caption file: that image fails before
    it is sent, in the words of the other folder captioners; the other image is captioned."""
    long_one, short = make_folder(tmp_path, ["a" * 248 + ".png", "b.png"])
    with StandIn() as stand_in:
        result = ps(FOLDER, "CAPTION", "caption", str(tmp_path), "-Url", stand_in.url)
        posts = len(stand_in.posts())
    assert result.returncode == 1, result.stderr
    assert (
        f"{long_one.name}: the name of its caption file (256 bytes) is too long for the file system; "
        "rename the image to a shorter name" in result.stderr
    )
    assert posts == 1 and read_caption(short.with_suffix(".caption")) == "stand-in caption"
    assert leftovers(tmp_path) == []


@needs_pwsh
@pytest.mark.skipif(sys.platform == "win32", reason="Unix modes and symlinks")
@pytest.mark.parametrize("mode", ["overwrite", "skip"])
def test_folder_replaces_caption_files_by_the_rules_of_the_python_tools(tmp_path: Path, mode: str) -> None:
    """As test_dataset_tools_agree's test of every tool: a read-only caption fails its image
    alone in the Python tools' words, a 0640 one keeps its mode, a symlinked one becomes a plain
    file of a new file's mode and the read-only file it points to stays as it was (needs
    PowerShell 7.3+ for the modes: .NET 7 tells them)."""
    root, store = tmp_path / "data", tmp_path / "store"
    make_folder(root, ["ro.png", "shared.png", "linked.png"])
    store.mkdir()
    old = "" if mode == "skip" else "old words"
    for path, bits in ((root / "ro.txt", 0o444), (root / "shared.txt", 0o640), (store / "linked.txt", 0o444)):
        path.write_text(old, encoding="utf-8")
        path.chmod(bits)
    (root / "linked.txt").symlink_to(store / "linked.txt")
    umask = os.umask(0o022)
    os.umask(umask)
    with StandIn() as stand_in:
        result = ps(FOLDER, "CAPTION", "txt", str(root), "-Url", stand_in.url, "-Mode", mode)
    assert result.returncode == 1, result.stderr
    assert "ro.png: ro.txt is read-only; make it writable (chmod u+w) to let it be replaced" in result.stderr
    assert (root / "ro.txt").read_text(encoding="utf-8") == old
    assert (root / "ro.txt").stat().st_mode & 0o777 == 0o444
    for name, bits in (("shared.txt", 0o640), ("linked.txt", 0o666 & ~umask)):
        assert not (root / name).is_symlink() and read_caption(root / name) == "stand-in caption", name
        assert (root / name).stat().st_mode & 0o777 == bits, name
    assert (store / "linked.txt").read_text(encoding="utf-8") == old
    assert leftovers(root) == []


@needs_pwsh
def test_folder_skip_mode_resumes(server: str, tmp_path: Path) -> None:
    done, empty, fresh = make_folder(tmp_path, ["done.png", "empty.png", "fresh.png"])
    done.with_suffix(".txt").write_text("keep me", encoding="utf-8")
    empty.with_suffix(".txt").write_text(" \n", encoding="utf-8")
    result = ps(FOLDER, "<caption>", ".txt", str(tmp_path), "-Url", server)
    assert result.returncode == 0, result.stderr
    assert done.with_suffix(".txt").read_text(encoding="utf-8") == "keep me"
    assert read_caption(empty.with_suffix(".txt")) == file_caption(caption_direct(server, empty))
    assert read_caption(fresh.with_suffix(".txt")) == file_caption(caption_direct(server, fresh))
    assert "2 captioned, 1 skipped, 0 failed" in result.stdout


@needs_pwsh
@pytest.mark.skipif(sys.platform == "win32", reason="pauses the run with SIGSTOP")
def test_folder_skip_mode_leaves_a_caption_written_while_it_runs(server: str, tmp_path: Path) -> None:
    # As vision-client folder and the bash script: a caption saved after the listing (in the
    # gallery, by another run) stays, for the images not sent yet and for those in flight.
    images = folder_of_images(tmp_path / "data", 12)
    assert PWSH is not None
    command = [PWSH, "-NoLogo", "-NoProfile", "-NonInteractive", "-File", str(FOLDER)]
    command += ["CAPTION", "txt", str(images[0].parent), "-Url", server, "-Jobs", "2"]
    returncode, out, err, hand = run_with_captions_written_meanwhile(command, base_env(), images)
    assert returncode == 0, err
    assert {target: target.read_text(encoding="utf-8") for target in hand} == hand
    assert f"{12 - len(hand)} captioned, {len(hand)} skipped, 0 failed" in out, out + err
    assert "written meanwhile" in out and leftovers(images[0].parent) == []


@needs_pwsh
@pytest.mark.skipif(sys.platform == "win32", reason="pauses the run with SIGSTOP; no pipes")
def test_folder_fails_an_image_whose_caption_place_became_a_pipe_while_it_ran(
    server: str, tmp_path: Path
) -> None:
    # As vision-client folder, vision-server caption and the bash script (test_two_runs): a pipe
    # made after the listing is no caption, and is not replaced; the image fails in the
    # planning's words. Reading it to see whether it held a caption hung the worker.
    images = folder_of_images(tmp_path / "data", 12)
    assert PWSH is not None
    command = [PWSH, "-NoLogo", "-NoProfile", "-NonInteractive", "-File", str(FOLDER)]
    command += ["CAPTION", "txt", str(images[0].parent), "-Url", server, "-Jobs", "2"]
    returncode, out, err, pipes = run_with_captions_written_meanwhile(
        command, base_env(), images, place=make_pipe
    )
    assert returncode == 1, out + err
    for pipe in pipes:
        assert stat.S_ISFIFO(pipe.lstat().st_mode), pipe
        reason = f"{pipe.name} is not a regular file (a pipe, socket or device), not a caption file"
        assert reason in out + err, out + err
    assert "written meanwhile" not in out + err and leftovers(images[0].parent) == []


@needs_pwsh
def test_folder_modes_prefix_suffix_separator(server: str, tmp_path: Path) -> None:
    (image,) = make_folder(tmp_path, ["one.jpg"])
    caption_file = image.with_suffix(".caption")
    new = file_caption(caption_direct(server, image, "<GENERATE_TAGS>"))
    # An old caption with a BOM (as Windows PowerShell 5.1 writes them): the BOM must not survive.
    caption_file.write_bytes(b"\xef\xbb\xbfold text")
    args = ["GENERATE_TAGS", "caption", str(tmp_path), "-Url", server]
    result = ps(FOLDER, *args, "-Mode", "append", "-Separator", ", ")
    assert result.returncode == 0, result.stderr
    assert read_caption(caption_file) == f"old text, {new}"
    caption_file.write_text("old text", encoding="utf-8")
    result = ps(FOLDER, *args, "-Mode", "prepend", "-Prefix", "ohwx, ", "-Suffix", " \u2728")
    assert result.returncode == 0, result.stderr
    assert read_caption(caption_file) == f"ohwx, {new} \u2728 old text"
    result = ps(FOLDER, *args, "-Mode", "overwrite", "-Prefix", "caf\u00e9 ")
    assert result.returncode == 0, result.stderr
    assert read_caption(caption_file) == f"caf\u00e9 {new}"


@needs_pwsh
def test_folder_no_recurse(server: str, tmp_path: Path) -> None:
    top, deep = make_folder(tmp_path, ["top.png", "sub/deep.png"])
    result = ps(FOLDER, "CAPTION", "txt", str(tmp_path), "-Url", server, "-NoRecurse")
    assert result.returncode == 0, result.stderr
    assert top.with_suffix(".txt").exists()
    assert not deep.with_suffix(".txt").exists()


@needs_pwsh
def test_folder_leaves_hidden_names_out_with_and_without_subfolders(tmp_path: Path) -> None:
    """As the bash script and the Python tools: no hidden file captioned, no hidden folder
    entered below the folder (on Windows a dot-name is no Hidden attribute), which may be
    hidden itself."""
    root = hidden_names.make_tree(tmp_path / ".data")
    before = hidden_names.files_below(root)
    with StandIn() as stand_in:
        flat = ps(FOLDER, "CAPTION", "txt", str(root), "-Url", stand_in.url, "-NoRecurse")
        assert flat.returncode == 0, flat.stderr
        assert hidden_names.files_below(root) == before | {"a.txt"}
        deep = ps(FOLDER, "CAPTION", "txt", str(root), "-Url", stand_in.url)
        assert deep.returncode == 0, deep.stderr
        assert len(stand_in.posts()) == 2  # a.png once, then sub/b.png: a.txt is skipped
    assert hidden_names.files_below(root) == before | {"a.txt", "sub/b.txt"}


@needs_pwsh
def test_folder_continues_after_a_bad_image(server: str, tmp_path: Path) -> None:
    good1, good2 = make_folder(tmp_path, ["a.png", "c.png"])
    bad = tmp_path / "b.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    bad.with_suffix(".txt").write_text("previous caption", encoding="utf-8")
    result = ps(FOLDER, "CAPTION", "txt", str(tmp_path), "-Url", server, "-Mode", "overwrite", "-Jobs", "1")
    assert result.returncode == 1
    assert read_caption(good1.with_suffix(".txt")) == file_caption(caption_direct(server, good1))
    assert read_caption(good2.with_suffix(".txt")) == file_caption(caption_direct(server, good2))
    # The failed image keeps its old caption untouched, and the failure is listed at the end.
    assert bad.with_suffix(".txt").read_text(encoding="utf-8") == "previous caption"
    assert "Invalid image data" in result.stderr and str(bad) in result.stderr
    assert "2 captioned, 0 skipped, 1 failed" in result.stdout
    assert leftovers(tmp_path) == []


@needs_pwsh
def test_folder_empty_file_and_empty_caption_fail_in_the_common_words(tmp_path: Path) -> None:
    """An image file of 0 bytes and a caption of whitespace only fail their image, in the words
    of the other folder captioners; no caption file is written for either."""
    make_folder(tmp_path, ["a.png"])
    (tmp_path / "empty.png").write_bytes(b"")
    with StandIn(caption="   ") as stand_in:
        result = ps(FOLDER, "CAPTION", "txt", str(tmp_path), "-Url", stand_in.url, "-Jobs", "1")
    assert result.returncode == 1, result.stderr
    assert "empty.png: the file is empty (0 bytes)" in result.stderr
    assert "a.png: the server returned an empty caption" in result.stderr
    assert list(tmp_path.glob("*.txt")) == [] and leftovers(tmp_path) == []


@needs_pwsh
def test_folder_two_images_one_caption_file(server: str, tmp_path: Path) -> None:
    # Neither is captioned (a trainer would pair same.txt with both), as in the other tools, and
    # an existing caption file does not make the clash a skip.
    first, second, _ = make_folder(tmp_path, ["same.jpg", "same.png", "other.png"])
    for attempt in ("first run", "rerun"):
        result = ps(FOLDER, "CAPTION", "txt", str(tmp_path), "-Url", server)
        assert result.returncode == 1, attempt
        assert not first.with_suffix(".txt").exists(), attempt
        reason = "shares its caption file same.txt with {}; neither is captioned, rename one of them"
        assert f"{first}: {reason.format(second.name)}" in result.stderr, attempt
        assert f"{second}: {reason.format(first.name)}" in result.stderr, attempt


@needs_pwsh
@pytest.mark.parametrize("mode", ["skip", "overwrite"])
def test_folder_caption_path_that_is_a_directory_fails_that_image(
    server: str, tmp_path: Path, mode: str
) -> None:
    """As the bash and Python clients: no mode skips it or writes into the folder."""
    boxed, fine = make_folder(tmp_path, ["boxed.png", "fine.png"])
    boxed.with_suffix(".txt").mkdir()
    result = ps(FOLDER, "CAPTION", "txt", str(tmp_path), "-Url", server, "-Mode", mode)
    assert result.returncode == 1
    assert "boxed.txt is a directory, not a caption file" in result.stderr
    assert list(boxed.with_suffix(".txt").iterdir()) == []
    assert read_caption(fine.with_suffix(".txt")) == file_caption(caption_direct(server, fine))


@needs_pwsh
def test_folder_argument_errors(server: str, tmp_path: Path) -> None:
    make_folder(tmp_path, ["a.png"])
    for args in (
        [],
        ["CAPTION", "txt"],
        ["CAPTION", "png", str(tmp_path)],
        ["CAPTION", "txt", str(tmp_path / "missing")],
    ):
        result = ps(FOLDER, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr
    # A prompt the server does not know: exit 7, as the other folder captioners (it was 2), and
    # in their words: the server's refusal of the first image, not a list check of the script's
    # own ("the server does not know the prompt <NO_SUCH_TASK>; it accepts ...").
    unknown = ps(FOLDER, "NO_SUCH_TASK", "txt", str(tmp_path), "-Url", server)
    assert unknown.returncode == 7, unknown.stderr
    stopped = (
        "Stopped early, 1 image(s) not attempted: the server refused the prompt (HTTP 400: Invalid prompt"
    )
    assert stopped in unknown.stderr, unknown.stderr
    assert "does not know the prompt" not in unknown.stderr
    bad_mode = ps(FOLDER, "CAPTION", "txt", str(tmp_path), "-Mode", "merge")
    assert bad_mode.returncode != 0
    assert not (tmp_path / "a.txt").exists()


@needs_pwsh
def test_folder_server_down(tmp_path: Path) -> None:
    make_folder(tmp_path, ["a.png", "b.png"])
    started = time.monotonic()
    url = f"http://127.0.0.1:{free_port()}"
    result = ps(
        FOLDER, "CAPTION", "txt", str(tmp_path), "-Url", url, "-Retries", "0", "-WaitForServerSec", "0"
    )
    assert result.returncode == 3, result.stderr  # as the other folder captioners (it was 1)
    assert "Cannot reach the server" in result.stderr and "waiting" not in result.stderr
    # The summary of every early stop, also at the first request (it ended with the message alone).
    stopped = "Stopped early, 2 image(s) not attempted: the server cannot be reached (Cannot reach the server"
    assert stopped in result.stderr and "0 captioned, 0 skipped, 0 failed" in result.stdout, result.stderr
    assert time.monotonic() - started < 60
    # As the bash script: a server not up yet at the start is waited for, up to -WaitForServerSec.
    result = ps(
        FOLDER, "CAPTION", "txt", str(tmp_path), "-Url", url, "-Retries", "0", "-WaitForServerSec", "2"
    )
    assert result.returncode == 3, result.stderr
    assert "server not answering yet" in result.stderr
    stopped = (
        "Stopped early, 2 image(s) not attempted: the server cannot be reached (still not after waiting 2 s: "
    )
    assert stopped + "Cannot reach the server" in result.stderr, result.stderr
    assert not list(tmp_path.glob("*.txt"))


@needs_pwsh
@pytest.mark.parametrize(
    "trouble", [{"prompts_status": 503}, {"prompts_status": 500}, {"prompts_delay": 6.0}], ids=str
)
def test_folder_first_request_trouble_is_a_warning_as_in_bash(tmp_path: Path, trouble: dict) -> None:
    """As vision-caption-folder-images.sh: a busy answer, a timeout or a 500 to the first request
    (GET /prompts, no retries) is a warning, "trying anyway", and the images are sent (the
    script stopped: exit code 5 when busy, 1 for a timeout or a 500)."""
    images = make_folder(tmp_path, ["a.png", "b.png"])
    with StandIn(**trouble) as stand_in:
        options = ["-Url", stand_in.url, "-TimeoutSec", "2", "-Retries", "1", "-Model", "stand-in-model"]
        result = ps(FOLDER, "CAPTION", "txt", str(tmp_path), *options)
        asked = [r.path for r in stand_in.requests if r.method == "GET"]
    assert result.returncode == 0, result.stderr
    assert asked == ["/prompts?model=stand-in-model"]  # once: no retries for it
    assert "warning: GET /prompts failed (" in result.stderr and "trying anyway" in result.stderr
    for image in images:
        assert read_caption(image.with_suffix(".txt")) == "stand-in caption"


@needs_pwsh
def test_folder_first_request_waits_at_most_30_s(tmp_path: Path) -> None:
    """As the bash script: the first request gets 30 s (not the -TimeoutSec of 300 s a caption
    gets); a server that does not answer it by then is tried with the images."""
    (image,) = make_folder(tmp_path, ["a.png"])
    with StandIn(prompts_delay=45.0) as stand_in:
        result = ps(FOLDER, "CAPTION", "txt", str(tmp_path), "-Url", stand_in.url, timeout=100)
    assert result.returncode == 0, result.stderr
    assert "within 30 s" in result.stderr and "trying anyway" in result.stderr
    assert read_caption(image.with_suffix(".txt")) == "stand-in caption"


@needs_pwsh
def test_folder_waits_at_the_start_while_a_proxy_has_no_server(tmp_path: Path) -> None:
    """As the bash script: the proxy's own 502/503 to the start-up probe are waited out."""
    images = make_folder(tmp_path, ["a.png", "b.png"])
    with StandIn(outage_after=0, outage_seconds=4) as proxy:
        result = ps(FOLDER, "CAPTION", "txt", str(tmp_path), "-Url", proxy.url, "-Retries", "0")
    assert result.returncode == 0, result.stderr
    assert "server not answering yet" in result.stderr and "server answers; going on" in result.stderr
    for image in images:
        assert read_caption(image.with_suffix(".txt")) == "stand-in caption"


@needs_pwsh
def test_folder_waits_while_a_proxy_has_no_server(tmp_path: Path) -> None:
    """As the bash script: bare 502/503 pages of a proxy pause the run; every image ends captioned."""
    images = make_folder(tmp_path, [f"img{i}.png" for i in range(6)])
    with StandIn(outage_after=2, outage_seconds=3) as proxy:
        result = ps(FOLDER, "CAPTION", "txt", str(tmp_path), "-Url", proxy.url, "-Jobs", "2", "-Retries", "1")
    assert result.returncode == 0, result.stderr
    assert proxy.outage_answers >= 2
    assert "server back; going on" in result.stderr
    for image in images:
        assert read_caption(image.with_suffix(".txt")) == "stand-in caption"


@needs_pwsh
def test_folder_stops_with_exit_2_when_a_restarted_server_lacks_the_model(tmp_path: Path) -> None:
    """As the other folder clients (test_dataset_tools_agree.py): a 404 during the run (the server
    restarted without -Model) stops it with exit code 2, the images left not attempted; the script
    failed each of them in turn."""
    make_folder(tmp_path, [f"img{i}.png" for i in range(5)])
    with StandIn(model_gone_after=2) as stand_in:
        result = ps(
            FOLDER, "CAPTION", "txt", str(tmp_path), "-Url", stand_in.url, "-Jobs", "1", "-Model", "gone"
        )
        posts = stand_in.posts()
    assert result.returncode == 2, result.stderr
    assert len(posts) == 3 and len(list(tmp_path.glob("*.txt"))) == 2
    stopped = (
        "Stopped early, 3 image(s) not attempted: HTTP 404: This server does not serve a model named 'gone'"
    )
    assert stopped in result.stderr and "check -Url" in result.stderr, result.stderr


@needs_pwsh
def test_folder_default_retries_ride_out_four_busy_answers(tmp_path: Path) -> None:
    """-Retries defaults to 5, as in the other folder clients (it was 3: four 503s stopped the
    run with exit code 5)."""
    (image,) = make_folder(tmp_path, ["a.png"])
    with StandIn(busy_first=4) as stand_in:
        result = ps(FOLDER, "CAPTION", "txt", str(tmp_path), "-Url", stand_in.url, "-Jobs", "1")
        posts = stand_in.posts()
    assert result.returncode == 0, result.stderr
    assert len(posts) == 5
    assert read_caption(image.with_suffix(".txt")) == "stand-in caption"


@needs_pwsh
def test_folder_stops_with_exit_5_on_a_servers_own_502(tmp_path: Path) -> None:
    """A 502 with a JSON body (not a proxy's bare page, which pauses the run) after -Retries
    stops the run as busy or unavailable, as in the other folder clients."""
    make_folder(tmp_path, ["a.png", "b.png"])
    with StandIn(busy_first=100, busy_status=502) as stand_in:
        result = ps(FOLDER, "CAPTION", "txt", str(tmp_path), "-Url", stand_in.url, "-Retries", "0")
    assert result.returncode == 5, result.stderr
    stopped = (
        "Stopped early, 2 image(s) not attempted: the server stays busy or unavailable (HTTP 502: Bad gateway"
    )
    assert stopped in result.stderr, result.stderr


@needs_pwsh
def test_folder_interrupted_exits_130(tmp_path: Path) -> None:
    """Ctrl+C (SIGINT) while requests are in flight: the summary, no caption or temporary file,
    and exit code 130, as the other folder clients (the shared exit table). ``pwsh -File``
    reports 0 for a script Ctrl+C stopped unless the script's own ``exit`` says otherwise."""
    images = make_folder(tmp_path, [f"img{i}.png" for i in range(6)])
    before = sorted(tmp_path.rglob("*"))
    assert PWSH is not None
    with StandIn(hang=True) as stand_in:
        command = [PWSH, "-NoLogo", "-NoProfile", "-NonInteractive", "-File", str(FOLDER), "CAPTION", "txt"]
        command += [str(tmp_path), "-Url", stand_in.url, "-Jobs", "3"]
        returncode, stderr = interrupt_in_flight(command, stand_in, 3, base_env(), wait=60, grace=30)
    assert returncode == 130, stderr
    assert "Interrupted: 6 image(s) not captioned yet" in stderr, stderr
    assert sorted(tmp_path.rglob("*")) == before
    assert not any(image.with_suffix(".txt").exists() for image in images)


@needs_pwsh
def test_folder_sends_original_bytes_in_parallel(tmp_path: Path) -> None:
    images = make_folder(tmp_path, [f"img{i:02d}.png" for i in range(12)])
    with StandIn(caption=PADDED, busy_first=2) as stand_in:
        env = base_env(VISION_API_KEY="k3y")
        result = ps(
            FOLDER, "MIXED_CAPTION", "txt", str(tmp_path), "-Url", stand_in.url, "-Jobs", "4", env=env
        )
        posts = stand_in.posts()
        headers = stand_in.post_headers()
    assert result.returncode == 0, result.stderr
    assert len(posts) == 14  # twelve images and two retries after 503
    assert {p["prompt"] for p in posts} == {"<MIXED_CAPTION>"}
    sent = {base64.b64decode(p["image"]) for p in posts}
    assert sent == {image.read_bytes() for image in images}
    assert {h["Authorization"] for h in headers} == {"Bearer k3y"}
    assert {h["X-Priority"] for h in headers} == {"bulk"}  # folder runs are bulk work
    for image in images:
        assert read_caption(image.with_suffix(".txt")) == "stand-in caption"


@needs_pwsh
def test_folder_sweep_skips_hidden_folders_below_the_root(tmp_path: Path) -> None:
    """As the bash script: .git or .cache are not walked (no part of the dataset); a hidden root is."""
    root = tmp_path / ".datasets" / "x"
    make_folder(root, ["a.png", "sub/b.png"])
    swept = [caption_temp(root, "0123456789abcdef", OLD), caption_temp(root / "sub", "0123456789abcdef", OLD)]
    kept = [
        caption_temp(root / ".git" / "objects", "0123456789abcdef", OLD),
        caption_temp(root / "sub" / ".cache", "0123456789abcdef", OLD),
    ]
    with StandIn(caption=PADDED) as stand_in:
        result = ps(FOLDER, "CAPTION", "txt", str(root), "-Url", stand_in.url)
    assert result.returncode == 0, result.stderr
    assert "Removed 2 leftover temporary caption file(s)" in result.stdout
    assert not any(path.exists() for path in swept) and all(path.exists() for path in kept)


@needs_pwsh
def test_folder_sweeps_a_killed_runs_temp_captions(tmp_path: Path) -> None:
    """As the bash script: stale .vision-caption.<16 hex>.tmp files go, young or foreign ones stay."""
    root = tmp_path / "data"
    images = make_folder(root, ["a.png", "sub/b.png"])
    stale = [caption_temp(root, "0123456789abcdef", OLD), caption_temp(root / "sub", "fedcba9876543210", OLD)]
    kept = [caption_temp(root, "00112233445566ff", YOUNG), aged(root / ".vision-caption.0123.tmp", OLD)]
    with StandIn(caption=PADDED) as stand_in:
        flat = ps(FOLDER, "CAPTION", "txt", str(root), "-Url", stand_in.url, "-NoRecurse")
        assert flat.returncode == 0, flat.stderr
        assert "Removed 1 leftover temporary caption file(s)" in flat.stdout
        assert [p.exists() for p in stale] == [False, True]
        deep = ps(FOLDER, "CAPTION", "txt", str(root), "-Url", stand_in.url)
    assert deep.returncode == 0, deep.stderr
    assert "Removed 1 leftover temporary caption file(s)" in deep.stdout
    assert not stale[1].exists() and all(p.exists() for p in kept)
    assert all(read_caption(image.with_suffix(".txt")) == "stand-in caption" for image in images)
