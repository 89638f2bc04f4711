"""Every command line the docs show names options that exist, where the command takes them.

A reader copies ``vision-server ...``, ``vision-client ...`` and the scripts' command lines from
README.md, BENCHMARKS.md, the docs site, the clients' READMEs and the service files. Each one
found in a code block or an inline code span is walked the way the command parses it: the
subcommands through the click command objects, each ``--flag`` checked against the options of
the (sub)command it follows (``vision-client``'s ``--model`` goes before ``folder``, where click
looks for it, not after), the bash scripts' options against their own ``--help``, and the
PowerShell scripts' (clients and the NSSM installer) against their ``param(...)`` blocks.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from tests.support import paths
from vision_server.cli import main as server_main
from vision_server.client.cli import main as client_main

REPO = paths.REPO
SCRIPTS = ("vision-client.sh", "vision-caption-folder-images.sh")
POWERSHELL = {  # script: its file
    "vision-client.ps1": paths.CLIENTS / "vision-client.ps1",
    "vision-caption-folder-images.ps1": paths.CLIENTS / "vision-caption-folder-images.ps1",
    "install-nssm.ps1": paths.SERVICE / "install-nssm.ps1",
}
# What [CmdletBinding()] adds to every script's parameters.
COMMON_PARAMETERS = {"verbose", "debug", "erroraction", "warningaction", "informationaction", "errorvariable"}
CLICK_PROGRAMS: dict[str, click.Command] = {"vision-server": server_main, "vision-client": client_main}
# A program's name as a command word: at the start, after a space, a path ("/opt/.../bin/") or "(".
PROGRAM = re.compile(
    r"(?:^|(?<=[\s/(\\]))(vision-server|vision-client|vision-client\.sh|vision-caption-folder-images\.sh"
    r"|vision-client\.ps1|vision-caption-folder-images\.ps1|install-nssm\.ps1)(?:\.exe)?(?=\s|$)"
)
SHELL_BREAK = re.compile(r"^(?:\||\|\||&&|;|&|\)|[0-9]?>>?|<)")
FLAG = re.compile(r"^--?[A-Za-z][\w-]*")


def doc_files() -> list[Path]:
    """Where a reader finds command lines: the docs, the clients' and service's own files."""
    found = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").rglob("*.md"))]
    found += sorted((REPO / "clients").rglob("*.md"))
    found += sorted(path for path in paths.SERVICE.iterdir() if path.is_file())
    return found


def code_snippets(text: str, *, markdown: bool) -> Iterator[tuple[int, str]]:
    """(line number, code) of each fenced block's logical line (``\\`` continues it) and each
    inline code span; a file that is not Markdown is code, and its comments' indented lines."""
    in_fence = not markdown
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if markdown and line.lstrip().startswith("```"):
            in_fence, pending = not in_fence, ""
            continue
        if not markdown and line.lstrip().startswith("#"):
            example = re.match(r"\s*#\s{4,}(\S.*)", line)  # an indented example in a comment
            if example:
                yield number, example.group(1)
        elif in_fence:
            if line.endswith("\\"):
                pending, start = pending + line[:-1] + " ", start or number
                continue
            yield start or number, pending + line
            pending, start = "", 0
        elif markdown:
            for span in re.finditer(r"`([^`\n]+)`", line):
                yield number, span.group(1)


def words(code: str) -> list[str]:
    """The shell words of ``code`` up to a comment (plain splitting where the quotes are unbalanced)."""
    try:
        found = shlex.split(code, comments=True)
    except ValueError:
        found = code.split("#", 1)[0].split()
    return [word.removeprefix("[").removesuffix("]") for word in found]  # [--preset NAME]: optional


def click_options(command: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(param.opts, param.secondary_opts)
    return names


def powershell_parameters(script: Path) -> set[str]:
    """The ``-Name`` parameters a script's ``param(...)`` block declares, lower-case (as PowerShell
    matches them), with the common ones ``[CmdletBinding()]`` adds."""
    text = script.read_text(encoding="utf-8")
    block = text[text.index("param(") : text.index("$ErrorActionPreference")]
    return {f"-{name.lower()}" for name in re.findall(r"\]\s*\$(\w+)", block)} | {
        f"-{name}" for name in COMMON_PARAMETERS
    }


def script_options(script: str) -> set[str]:
    """The options a bash script's ``--help`` lists (``--mode MODE``, ``-j N``, ``-n, --no-newline``)."""
    shown = subprocess.run(
        ["bash", str(paths.CLIENTS / script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    heads = re.findall(r"(?m)^ {2}(-\S.*?)(?: {2,}|$)", shown)  # the part before the description
    return {name for head in heads for name in re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", head)}


def takes_a_value(command: click.Command, name: str) -> bool:
    """Whether ``name`` of ``command`` reads the next word as its value (not a flag)."""
    for param in command.params:
        if isinstance(param, click.Option) and name in (*param.opts, *param.secondary_opts):
            return not (param.is_flag or param.count)
    return False


@dataclass(frozen=True)
class Problem:
    where: str
    program: str  # "vision-client folder"
    word: str
    code: str

    def __str__(self) -> str:
        return f"{self.where}: `{self.program}` has no {self.word} there: {self.code.strip()[:160]}"


def starts_a_command(before: str) -> bool:
    """Whether a program name after ``before`` is the command word: first on the line, after a
    shell operator or ``ExecStart=``, or after ``VAR=value`` words (not an argument such as
    ``journalctl -u vision-server``, nor a name in a sentence)."""
    rest = re.sub(r"\S*[/\\]$", "", before).rstrip()  # the program's own folder (/opt/.../bin/)
    while True:
        shorter = re.sub(r"(?:^|\s)[A-Za-z_]\w*=\S*$", "", rest).rstrip()  # VISION_HOST=... before it
        if shorter == rest:
            break
        rest = shorter
    return rest == "" or re.search(r"(?:\||&&|;|\(|\$\(|^ExecStart=|^\$\w+ =|&)$", rest) is not None


def check_command_line(code: str, where: str, scripts: dict[str, set[str]]) -> list[Problem]:
    """Every option and subcommand after each program name in ``code`` that the program does not take."""
    problems = []
    for found in PROGRAM.finditer(code):
        if not starts_a_command(code[: found.start()]):
            continue
        program = found.group(1)
        command: click.Command | None = CLICK_PROGRAMS.get(program)
        known = click_options(command) if command is not None else scripts[program]
        path = [program]
        value_next = False
        for word in words(code[found.end() :]):
            if SHELL_BREAK.match(word):
                break
            if value_next:  # the value of the option before it (`--model blip folder`)
                value_next = False
                continue
            if isinstance(command, click.Group) and not word.startswith("-"):
                sub = command.commands.get(word)
                if sub is None:
                    if re.fullmatch(r"[a-z][a-z-]*", word):
                        problems.append(Problem(where, program, f"subcommand {word}", code))
                    break
                command, path, known = sub, [*path, word], click_options(sub)
                continue
            flag = FLAG.match(word)
            if flag and program.endswith(".ps1"):
                if flag.group(0).lower() not in known:
                    problems.append(Problem(where, program, f"parameter {flag.group(0)}", code))
            elif flag and flag.group(0) not in known:
                problems.append(Problem(where, " ".join(path), f"option {flag.group(0)}", code))
            elif flag and "=" not in word and command is not None:
                value_next = takes_a_value(command, flag.group(0))
    return problems


def problems_in(files: list[Path], scripts: dict[str, set[str]]) -> list[Problem]:
    problems = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        for line, code in code_snippets(text, markdown=path.suffix == ".md"):
            where = f"{path.relative_to(REPO).as_posix()}:{line}"
            problems += check_command_line(code, where, scripts)
    return problems


def command_lines(files: list[Path]) -> int:
    """How many command lines of the programs ``files`` show."""
    count = 0
    for path in files:
        for _, code in code_snippets(path.read_text(encoding="utf-8"), markdown=path.suffix == ".md"):
            count += sum(starts_a_command(code[: found.start()]) for found in PROGRAM.finditer(code))
    return count


@pytest.fixture(scope="module")
def scripts() -> dict[str, set[str]]:
    found = {name: script_options(name) for name in SCRIPTS}
    return found | {name: powershell_parameters(path) for name, path in POWERSHELL.items()}


def test_the_scripts_help_is_read_as_their_options(scripts: dict[str, set[str]]) -> None:
    assert {"--url", "--timeout", "--model", "--retries", "-n", "--no-newline"} <= scripts["vision-client.sh"]
    folder = scripts["vision-caption-folder-images.sh"]
    assert {"--mode", "--jobs", "-j", "--wait-for-server", "--no-recursive", "-q", "--quiet"} <= folder


def test_every_documented_command_line_names_real_options(scripts: dict[str, set[str]]) -> None:
    files = doc_files()
    assert len(files) > 30, files
    problems = problems_in(files, scripts)
    assert command_lines(files) > 100  # what it checks (a broken extraction would check nothing)
    assert not problems, "\n".join(map(str, problems))


@pytest.mark.parametrize(
    ("code", "wrong"),
    [
        ("vision-server serve --model test:tiny --no-such-flag 3", "option --no-such-flag"),
        ("vision-server caption dataset/ --task caption --tasks x", "option --tasks"),
        ("vision-server make-test-model DIR [--preset tiny] [--size 3]", "option --size"),
        ("vision-client folder dataset --model blip", "option --model"),  # a group option after folder
        ("vision-client --url http://h:1 folder d --retries 3", "option --retries"),
        ("/opt/vision-server/venv/bin/vision-server serv --preload", "subcommand serv"),
        ("clients/vision-client.sh --jobs 3 CAPTION photo.jpg", "option --jobs"),
        ("./clients/vision-caption-folder-images.sh --model x CAPTION txt dataset", "option --model"),
        (".\\clients\\vision-client.ps1 CAPTION .\\photo.jpg -Timeout 60", "parameter -Timeout"),
        (".\\service\\install-nssm.ps1 -VenvDir C:\\v -Host 0.0.0.0", "parameter -Host"),
    ],
)
def test_the_check_finds_an_option_a_command_does_not_take(
    code: str, wrong: str, scripts: dict[str, set[str]]
) -> None:
    problems = check_command_line(code, "example.md:1", scripts)
    assert [problem.word for problem in problems] == [wrong], problems


@pytest.mark.parametrize(
    "code",
    [
        "vision-client --model blip folder dataset --task DETAILED_CAPTION --ext txt -j 4",
        "vision-server serve --model test:tiny | tee log  # then --anything after a pipe is not its",
        "vision-server caption a/ \\\n  --dry-run",
        "vision-server --version",
        "clients/vision-caption-folder-images.sh -q --jobs 8 --wait-for-server 0 CAPTION txt d",
        "$caption = .\\clients\\vision-client.ps1 '<GENERATE_TAGS>' .\\photo.jpg -timeoutsec 5 -Verbose",
    ],
)
def test_the_check_passes_real_command_lines(code: str, scripts: dict[str, set[str]]) -> None:
    snippets = [snippet for _, snippet in code_snippets(f"```sh\n{code}\n```\n", markdown=True)]
    assert [problem for snippet in snippets for problem in check_command_line(snippet, "x", scripts)] == []


def every_command(command: click.Command, path: str) -> Iterator[tuple[str, click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from every_command(sub, f"{path} {name}")


@pytest.mark.parametrize(
    ("path", "command"),
    [found for program, main in CLICK_PROGRAMS.items() for found in every_command(main, program)],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_no_help_text_shows_a_blank_default(path: str, command: click.Command) -> None:
    """A default of spaces shows as ``[default:  ]`` unless the option names it in words."""
    with click.Context(command, info_name=path, terminal_width=200) as ctx:
        shown = command.get_help(ctx)
    assert not re.search(r"\[default:\s*[;\]]", shown), shown


# Other tools' options the docs name (pip, curl, docker, systemctl, Ray, pytest, mkdocs, hf,
# tensorboard). An option of ours missing from every command is a stale name; one of another
# tool goes here.
OTHER_TOOLS = {
    "--address", "--build-arg", "--cov", "--data-binary", "--detach", "--gpus", "--head",
    "--implementation", "--index-url", "--local-dir", "--logdir", "--no-build-isolation",
    "--no-deps", "--now", "--only-binary", "--platform", "--python-version", "--stop-timeout",
    "--strict",
}  # fmt: skip


def every_option_of_ours(scripts: dict[str, set[str]]) -> set[str]:
    """The long options of both click programs, the bash scripts, the benchmark scripts and
    ``python -m vision_server.settings_reference``."""
    found = {name for options in scripts.values() for name in options if name.startswith("--")}
    for program in CLICK_PROGRAMS.values():
        for _, command in every_command(program, ""):
            found |= {name for name in click_options(command) if name.startswith("--")}
    for script in sorted(paths.BENCHMARKS.glob("*.py")):
        found |= set(re.findall(r'add_argument\(\s*"(--[\w-]+)"', script.read_text(encoding="utf-8")))
    return found | {"--check"}


def test_every_long_option_the_docs_name_exists(scripts: dict[str, set[str]]) -> None:
    """Prose names options too (`--max-batch-size` (32 on CUDA)): each must still be some command's."""
    known = every_option_of_ours(scripts) | OTHER_TOOLS
    unknown = []
    for path in doc_files():
        if path.suffix != ".md":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for name in re.findall(r"(?<![\w-])--[a-z][\w-]*", line):
                if name not in known:
                    unknown.append(f"{path.relative_to(REPO).as_posix()}:{number}: {name}")
    message = "no command of ours has these (another tool's? add it to OTHER_TOOLS):\n"
    assert not unknown, message + "\n".join(unknown)
