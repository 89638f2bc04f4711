"""The ``vision-server`` command: serve, caption (offline), convert, make-test-model."""

from __future__ import annotations

import asyncio
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from vision_server import __version__
from vision_server.settings import (
    FIELDS,
    Settings,
    SettingsError,
    env_name,
    field_type,
    flag_name,
    load_settings,
)

F = typing.TypeVar("F", bound=Callable[..., Any])


def _describe_default(name: str) -> str:
    default = FIELDS[name].default
    if default is None or default == ():
        return "unset"
    return str(default)


def settings_options(func: F) -> F:
    """One ``--flag`` per :class:`Settings` field, with help, default and env var in ``--help``."""
    for name in reversed(list(FIELDS)):
        kind = field_type(name)
        flag = flag_name(name)
        help_text = (
            f"{FIELDS[name].metadata['help']} [default: {_describe_default(name)}; env: {env_name(name)}]"
        )
        if kind is bool:
            decl = f"{flag}/--no-{flag[2:]}"
            func = click.option(decl, name, default=None, help=help_text)(func)
        elif typing.get_origin(kind) is tuple:
            func = click.option(flag, name, multiple=True, help=help_text + " (repeatable)")(func)
        else:
            click_type = click.Path(path_type=Path) if kind is Path else kind
            func = click.option(flag, name, type=click_type, default=None, help=help_text)(func)
    return func


def build_settings(config: Path | None, flags: dict[str, Any]) -> Settings:
    try:
        return load_settings(flags, environ=os.environ, config_path=config)
    except (SettingsError, OSError) as exc:
        raise click.UsageError(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="vision-server")
def main() -> None:
    """On-demand Florence-2 / PromptGen v2.0 captioning daemon.

    The model loads on the first request and unloads after --idle-timeout seconds without
    work, so the GPU is free while nobody captions.
    """


@main.command()
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="TOML config file (keys are the option names). [default: the platformdirs user config "
    f"dir's config.toml when present; env: {env_name('config')}]",
)
@settings_options
def serve(config: Path | None, **flags: Any) -> None:
    """Run the HTTP server. Precedence: defaults < config file < VISION_SERVER_* env < flags."""
    from vision_server.server import serve as run_server

    run_server(build_settings(config, flags))


@main.command()
@click.argument(
    "images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--task", default="<MORE_DETAILED_CAPTION>", show_default=True, help="Task token, e.g. CAPTION."
)
@click.option(
    "--config", type=click.Path(path_type=Path, dir_okay=False), default=None, help="TOML config file."
)
@settings_options
def caption(images: tuple[Path, ...], task: str, config: Path | None, **flags: Any) -> None:
    """Caption IMAGES in-process (no server), one line per image: "FILE<TAB>caption"."""
    from vision_server.offline import caption_files

    settings = build_settings(config, flags)
    failures = asyncio.run(caption_files(settings, list(images), task))
    sys.exit(1 if failures else 0)


@main.command("make-test-model")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--preset",
    type=click.Choice(["tiny", "base", "large"]),
    default="tiny",
    show_default=True,
    help="tiny: ~1 MB for tests. base/large: real Florence-2 shapes with random weights.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["native", "original"]),
    default="native",
    show_default=True,
    help="native: transformers 5 layout. original: PromptGen's remote-code layout (to test conversion).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, byte-identical files.")
def make_test_model(directory: Path, preset: str, fmt: str, seed: int) -> None:
    """Build a deterministic Florence-2 with random weights into DIRECTORY.

    Its captions are meaningless words; it exists to test and benchmark without a download.
    """
    from vision_server.testing.tiny_model import build_test_model

    if directory.exists() and any(directory.iterdir()):
        raise click.UsageError(f"{directory} exists and is not empty; pick a new directory.")
    path = build_test_model(directory, preset=preset, fmt=fmt, seed=seed)  # type: ignore[arg-type]
    click.echo(str(path))


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("destination", type=click.Path(path_type=Path))
def convert(source: Path, destination: Path) -> None:
    """Convert an original-layout Florence-2 checkpoint (PromptGen, microsoft/*) to the native layout.

    SOURCE is the downloaded model directory; DESTINATION must not exist yet. The server does
    this by itself on load (and caches the result); this command is for doing it ahead of time.
    """
    from vision_server.errors import ModelSourceError
    from vision_server.florence.convert import convert_checkpoint, detect_layout

    if destination.exists():
        raise click.UsageError(f"{destination} already exists; pick a new directory.")
    try:
        if detect_layout(source) == "native":
            raise click.UsageError(f"{source} is already in the native layout; nothing to convert.")
        click.echo(str(convert_checkpoint(source, destination)))
    except ModelSourceError as exc:
        raise click.ClickException(str(exc)) from None
