"""The ``vision-server`` command: serve, caption (a dataset, offline), train, convert, make-test-model."""

from __future__ import annotations

import os
import sys
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from vision_server import __version__
from vision_server.settings import (
    FIELDS,
    Settings,
    SettingsError,
    default_config_path,
    env_name,
    field_type,
    flag_name,
    is_list,
    load_settings,
)
from vision_server.settings_reference import default_text

F = typing.TypeVar("F", bound=Callable[..., Any])


def settings_options(
    func: F, names: tuple[str, ...] | None = None, helps: Mapping[str, str] | None = None
) -> F:
    """One ``--flag`` per :class:`Settings` field (or per field in ``names``), with help (the
    field's own, or ``helps[name]`` where a command means it differently), default and env var
    in ``--help``."""
    for name in reversed([name for name in FIELDS if names is None or name in names]):
        kind = field_type(name)
        flag = flag_name(name)
        metadata = FIELDS[name].metadata
        meaning = (helps or {}).get(name, metadata["help"])
        help_text = f"{meaning} [default: {default_text(name)}; env: {env_name(name)}]"
        metavar = metadata.get("metavar")
        if kind is bool:
            decl = f"{flag}/--no-{flag[2:]}"
            func = click.option(decl, name, default=None, help=help_text)(func)
        elif is_list(name):
            repeatable = help_text + " (repeatable)"
            func = click.option(flag, name, multiple=True, metavar=metavar, help=repeatable)(func)
        else:
            click_type: Any = kind
            if kind is Path:
                click_type = click.Path(path_type=Path)
            elif metadata.get("byte_size"):
                click_type = str  # a size (20MiB) is text to click; coerce() turns it into bytes
            func = click.option(flag, name, type=click_type, default=None, metavar=metavar, help=help_text)(
                func
            )
    return func


def offline_settings_options(func: F) -> F:
    """Only the settings that mean something without a server: model, device, batching, generation,
    cache, logs (no host, port, keys, TLS, idle unload or request limits)."""
    from vision_server.bulk.command import OFFLINE_HELP, OFFLINE_SETTINGS

    return settings_options(func, OFFLINE_SETTINGS, OFFLINE_HELP)


def build_settings(config: Path | None, flags: dict[str, Any]) -> Settings:
    try:
        return load_settings(flags, environ=os.environ, config_path=config)
    except (SettingsError, OSError) as exc:
        raise click.UsageError(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="vision-server")
def main() -> None:
    """On-demand Florence-2 / PromptGen v2.0 captioning daemon (and BLIP, GIT, ViT+GPT-2, SmolVLM).

    The model loads on the first request and unloads after --idle-timeout seconds without
    work, so the GPU is free while nobody captions.
    """


# The real default path (where a newcomer looks for the file), not "the platformdirs config dir".
CONFIG_HELP = (
    "TOML config file (keys are the option names, with dashes or underscores). "
    f"[default: {default_config_path()} when present; env: {env_name('config')}]"
)


@main.command()
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help=CONFIG_HELP,
)
@settings_options
def serve(config: Path | None, **flags: Any) -> None:
    """Run the HTTP server. Precedence: defaults < config file < VISION_SERVER_* env < flags."""
    from vision_server.server import serve as run_server

    run_server(build_settings(config, flags))


@main.command(context_settings={"max_content_width": 110})
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--task",
    "tasks",
    multiple=True,
    help="Task, with or without brackets, any case (caption, DETAILED_CAPTION, <GENERATE_TAGS>). "
    "Repeat for several captions per image in one pass; sidecars are then STEM.<task>.<ext> "
    "(a run of one task writes STEM.<ext>; neither counts the other's files as done), and "
    "rows hold every task (an existing --jsonl/--parquet of one-task rows refuses that: run one "
    "task at a time into it). "
    "[default: <MORE_DETAILED_CAPTION>; <CAPTION> for models with that one task (BLIP, GIT ...)]",
)
@click.option("--recursive/--no-recursive", default=True, show_default=True, help="Descend into sub-folders.")
@click.option(
    "--jsonl",
    type=click.Path(path_type=Path),
    help="Also (or only) write one JSON row per image. One run at a time writes it: a second run "
    "given the same file stops at once (exit 2).",
)
@click.option(
    "--parquet",
    type=click.Path(path_type=Path),
    help="Also (or only) write a Parquet table. One run at a time writes it, as --jsonl.",
)
@click.option(
    "--sidecars/--no-sidecars",
    default=None,
    help="Write a caption file beside each image. [default: on, off when --jsonl or --parquet is given]",
)
@click.option("--ext", default="txt", show_default=True, help="Extension of the caption files.")
@click.option(
    "--mode",
    type=click.Choice(["skip", "overwrite", "append", "prepend"]),
    default="skip",
    show_default=True,
    help="When a caption file exists: skip the image, overwrite the file, or add the new caption "
    "after/before the old one. JSONL and Parquet outputs always skip what they already hold "
    "for this model (rows of another --model are captioned again; caption files do not say "
    "which model wrote them).",
)
@click.option("--prefix", default="", help="Text put before every caption, e.g. a trigger word and ', '.")
@click.option("--suffix", default="", help="Text put after every caption.")
@click.option(
    "--separator",
    default=" ",
    show_default="one space",
    help="Between old and new caption in append/prepend.",
)
@click.option("--image-column", help="Parquet: column of image bytes or paths. [default: found by type]")
@click.option("--key-column", help="Parquet: column that names each row. [default: __key__ or key, else row]")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    help="Caption at most N images (skipped ones do not count; one tried that fails does).",
)
@click.option("--dry-run", is_flag=True, help="List what would be captioned and why the rest is skipped.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Processes that decode and resize images. [default: CPU count, at most 8]",
)
@click.option(
    "--ray",
    "ray",
    is_flag=False,
    flag_value="local",
    default=None,
    metavar="[ADDRESS]",
    help="Run on Ray Data: alone, an embedded local Ray runtime; 'auto' or an address (host:6379, "
    'ray://host:10001) joins a running cluster. Needs pip install "vision-server[ray]".',
)
@click.option(
    "--ray-actors",
    type=click.IntRange(min=1),
    help="With --ray: captioning actors, each with its own model. [default: one per GPU in the "
    "cluster; one CPU actor per machine when there is no GPU]",
)
@click.option(
    "--progress-interval",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds between progress lines when stderr is not a terminal.",
)
@click.option("--config", type=click.Path(path_type=Path, dir_okay=False), default=None, help=CONFIG_HELP)
@offline_settings_options
def caption(inputs: tuple[Path, ...], config: Path | None, **params: Any) -> None:
    """Caption a dataset in-process (no server): images, folders, .txt/.jsonl lists of paths,
    Parquet files and WebDataset .tar shards.

    By default a caption file goes beside each image (cat.png -> cat.txt) and images that
    already have one are skipped, so an interrupted run resumes where it stopped. In a folder,
    hidden files and folders (a name starting with ".", e.g. .ipynb_checkpoints) are skipped;
    give a hidden folder as an input to caption it.

    Exit status: 0 all captioned or skipped, 1 some image failed (or the disk filled up: the
    run stops at once, naming the file), 2 bad usage; 130/143 when stopped by Ctrl+C/SIGTERM
    (cleanly: run it again to resume).
    """
    from vision_server.bulk.command import CaptionRequest, run_caption

    ray = params.get("ray")
    if (
        ray not in (None, "local", "auto") and Path(ray).exists()
    ):  # `--ray ./images`: an input, not an address
        inputs, params["ray"] = (Path(ray), *inputs), "local"
    if not inputs:
        raise click.UsageError(
            "Missing argument 'INPUTS...': images, folders, lists, Parquet files or shards."
        )
    flags = {name: params.pop(name) for name in list(params) if name in FIELDS}
    settings = build_settings(config, flags)
    sys.exit(run_caption(settings, CaptionRequest(inputs=inputs, **params)))


@main.command("make-test-model")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--family",
    type=click.Choice(["florence2", "blip", "git", "vision-encoder-decoder", "idefics3"]),
    default="florence2",
    show_default=True,
    help="Which architecture: Florence-2, or a tiny model of one of the generic backends "
    "(BLIP, GIT, ViT+GPT-2, Idefics3/SmolVLM).",
)
@click.option(
    "--preset",
    type=click.Choice(["tiny", "base", "large"]),
    default="tiny",
    show_default=True,
    help="tiny: ~1 MB for tests. base/large: real Florence-2 shapes with random weights (florence2 only).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["native", "original"]),
    default="native",
    show_default=True,
    help="native: transformers 5 layout. original: PromptGen's remote-code layout, to test "
    "conversion (florence2 only).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, byte-identical files.")
def make_test_model(directory: Path, family: str, preset: str, fmt: str, seed: int) -> None:
    """Build a deterministic model with random weights into DIRECTORY (tokenizer and processor
    included, so it loads with no download).

    Its captions are meaningless words; it exists to test and benchmark without a download.
    """
    if directory.exists() and any(directory.iterdir()):
        raise click.UsageError(f"{directory} exists and is not empty; pick a new directory.")
    if family != "florence2":
        if preset != "tiny" or fmt != "native":
            raise click.UsageError(f"--preset and --format apply to florence2 only; {family} is always tiny.")
        from vision_server.testing.tiny_generic import build_generic_model

        click.echo(str(build_generic_model(directory, family, seed=seed)))
        return
    from vision_server.testing.tiny_model import build_test_model

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


def _train_options(func: F) -> F:
    from vision_server.train.command import train_options

    return train_options(func)  # type: ignore[return-value]


@main.command(context_settings={"max_content_width": 110})
@_train_options
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help=CONFIG_HELP.replace("). [", "); train reads model, revision, device and cache_dir from it. [", 1),
)
def train(config: Path | None, **params: Any) -> None:
    """Fine-tune the model on your own captions: a LoRA adapter for serve/caption --adapter.

    The dataset is checked first (images without captions, captions without images, unreadable
    images, empty captions), then the adapter trains; OUTPUT gets the PEFT adapter and a
    training.json that the server shows in /model_info and /v1/status.

    Exit status: 0 trained (a warning names logs that could not be finished after the adapter
    was written), 1 unusable dataset or model, or the run stopped on a full disk or on an image
    that changed (the message says what was kept and how to go on), 2 bad usage, 130/143 stopped
    by Ctrl+C/SIGTERM after a checkpoint (continue with --resume OUTPUT).

    The model, its revision, the device and the cache dir come from the config file and the
    VISION_SERVER_* variables when not given, as for serve (flags > variables > config file).
    """
    from vision_server.train.command import run_command

    sys.exit(run_command(params, config))
