"""``vision-client``: caption images and folders with a running vision-server from the shell.

Captions go to stdout, everything else (progress, summaries, errors) to stderr, so
``vision-client caption x.png > x.txt`` never puts an error message into a caption file.
Exit status: 0 success, 1 any image or request failed, 2 bad usage, 130 Ctrl+C, 143 SIGTERM; ``folder``
also says why a run stopped early, with the statuses of the folder scripts (3 unreachable, 5
busy, 6 key refused, 7 task refused, 2 HTTP 404: no such route or model, at any point).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from vision_server.bulk.outputs import output_problem
from vision_server.captionfiles import MODES, printable
from vision_server.client.api import (
    DEFAULT_TASK,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    AsyncVisionClient,
    task_token,
    unforeseen_failure,
)
from vision_server.client.errors import VisionClientError
from vision_server.client.folder import Failure, FolderSummary, ImageResult, caption_folder
from vision_server.client.option_order import ClientGroup
from vision_server.client.retry import DEFAULT_RETRIES
from vision_server.client.settle import settle
from vision_server.output_lock import LockNoRoom, OutputLockError

T = TypeVar("T")

TASK_HELP = "Task, with or without brackets and in any case: caption, DETAILED_CAPTION, <ANALYZE>, ..."


@click.group(
    cls=ClientGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}
)
@click.option(
    "--url",
    envvar="VISION_HOST",
    default=DEFAULT_URL,
    show_default=True,
    show_envvar=True,
    help="Server base URL (host:port also works). For https:// with a self-signed certificate or a "
    "private CA, set SSL_CERT_FILE to that certificate.",
)
@click.option(
    "--api-key",
    envvar="VISION_API_KEY",
    default=None,
    show_envvar=True,
    help="API key, sent as a Bearer token, for servers started with --api-key.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds to wait for one answer, queueing on the server included.",
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=DEFAULT_RETRIES,
    show_default=True,
    help="Retries when the server is busy (429/502/503) or unreachable, after its Retry-After (at "
    "most 120 s) or 0.5, 1, 2, 4... s (at most 30 s), each with a little jitter, as every client.",
)
@click.option(
    "--model",
    "-m",
    envvar="VISION_MODEL",
    default=None,
    show_envvar=True,
    help="Which of the server's models captions (and whose tasks 'prompts' lists); "
    "default: the server's default model.",
)
@click.version_option(package_name="vision-server", prog_name="vision-client")
@click.pass_context
def main(
    ctx: click.Context, url: str, api_key: str | None, timeout: float, retries: int, model: str | None
) -> None:
    """Caption images with a vision-server (Florence-2 / PromptGen v2.0)."""
    ctx.obj = {"base_url": url, "api_key": api_key, "timeout": timeout, "retries": retries, "model": model}


def _run(
    ctx: click.Context,
    work: Callable[[AsyncVisionClient], Awaitable[T]],
    interrupted: Callable[[], None] | None = None,
) -> T:
    """Run ``work`` with a client; a client error becomes a one-line message and exit 1, Ctrl+C
    exit 130 and SIGTERM exit 143, each after ``interrupted`` (which says what was done) or a
    bare "interrupted"."""

    async def runner() -> T:
        with _sigterm_cancels_this_task() as terminated:
            try:
                async with AsyncVisionClient(**ctx.obj) as client:
                    return await work(client)
            except asyncio.CancelledError:
                if terminated:
                    raise _Terminated from None
                raise

    try:
        return asyncio.run(runner())
    except (VisionClientError, OSError) as exc:  # e.g. server unreachable, JSONL path is a folder
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except (KeyboardInterrupt, _Terminated) as exc:
        if interrupted is None:
            click.echo("interrupted", err=True)
        else:
            interrupted()
        sys.exit(143 if isinstance(exc, _Terminated) else 130)


class _Terminated(Exception):
    """SIGTERM stopped the run."""


@contextlib.contextmanager
def _sigterm_cancels_this_task() -> Iterator[list[int]]:
    """While inside, SIGTERM (``kill``, ``timeout``, systemd, a job scheduler's stop) cancels the
    running task as Ctrl+C does, so an overnight run stopped that way still drops what is in
    flight, prints its summary and exits 143, instead of dying at once without a word. Yields a
    list that gets the signal number once it arrives. Not on Windows (no loop signal handlers),
    nor where SIGTERM was set to be ignored before the process started."""
    received: list[int] = []
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is None or sys.platform == "win32" or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield received
        return

    def stop() -> None:
        if not received:
            received.append(int(signal.SIGTERM))
            task.cancel()

    loop.add_signal_handler(signal.SIGTERM, stop)
    try:
        yield received
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--task", "-t", default=DEFAULT_TASK, show_default=True, help=TASK_HELP)
@click.option(
    "--concurrency",
    "-j",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Requests in flight at once.",
)
@click.pass_context
def caption(ctx: click.Context, images: tuple[Path, ...], task: str, concurrency: int) -> None:
    """Print the caption of each IMAGE (as "FILE: caption" when there are several).

    Images that fail are reported on stderr; the others are still captioned, and the exit
    status is 1.
    """
    several = len(images) > 1

    async def work(client: AsyncVisionClient) -> bool:
        gate = asyncio.Semaphore(concurrency)

        async def one(image: Path) -> str:
            async with gate:
                return await client.caption(image, task)

        pending = [asyncio.ensure_future(one(image)) for image in images]
        ok = True
        try:
            for image, future in zip(images, pending, strict=True):
                try:
                    text = await future
                except (VisionClientError, OSError) as exc:
                    ok = False
                    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                    click.echo(f"{image}: error: {reason}", err=True)  # not "[Errno 2] ...: 'image'" again
                    continue
                except Exception as exc:  # an answer nobody foresaw, or a bug: stop, in one line
                    raise _stopped_at(image, exc) from exc
                click.echo(f"{image}: {text}" if several else text)
        finally:
            # Stopped early (the error above, Ctrl+C, SIGTERM): the rest are this run's to end,
            # before its session closes; left to asyncio.run they retried on a new session and
            # their failures came out as "Task exception was never retrieved" tracebacks.
            await settle(pending)
        return ok

    if not _run(ctx, work):
        sys.exit(1)


def _stopped_at(image: Path, exc: Exception) -> VisionClientError:
    """The one line a run stopped by an unexpected failure ends with (``error: ...``, exit 1)."""
    return VisionClientError(
        f"{image}: unexpected failure ({unforeseen_failure(exc)}); stopped, the images after it not printed"
    )


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--task", "-t", default=DEFAULT_TASK, show_default=True, help=TASK_HELP)
@click.option(
    "--ext",
    default="txt",
    show_default=True,
    help="Caption file extension; the caption of cat.png goes to cat.<ext> beside it.",
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="skip",
    show_default=True,
    help="Existing captions: skip the image if it has a non-empty caption (resumes an "
    "interrupted run), overwrite it, or append/prepend the new caption to it.",
)
@click.option("--prefix", default="", help="Text put before every new caption, e.g. a trigger word and ', '.")
@click.option("--suffix", default="", help="Text put after every new caption.")
@click.option(
    "--separator",
    default=" ",
    show_default="one space",
    help="Between the old and the new caption in append/prepend mode.",
)
@click.option(
    "--concurrency",
    "-j",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Requests in flight at once, so the server can batch them on the GPU.",
)
@click.option(
    "--recursive/--no-recursive", default=True, show_default=True, help="Also caption images in subfolders."
)
@click.option(
    "--jsonl",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help='Append {"file","task","caption","model"} lines (file relative to FOLDER) to this file '
    "instead of writing caption files; its folder must exist. In skip mode, images already in it with this "
    "task are not redone; with --model, only lines of that model count (as the server names "
    "it: --model may be its source, such as a hub id). One run at a time writes the file: a "
    "second run given it (this command or vision-server caption) stops at once (exit 2).",
)
@click.option(
    "--wait-for-server",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    metavar="SECONDS",
    help="When the server cannot be reached (not up yet at the start, or gone mid-run: a restart, "
    "a deploy; behind a proxy, the proxy's own 502/503 without Retry-After once --retries are "
    "used up), pause all requests and wait up to SECONDS for it to answer, then send the images "
    "that were in flight again. After that the run stops early (exit status 3) and says how many "
    "images were not attempted (run it again to resume). 0: give up after --retries. A host name that does "
    "not resolve, TLS trouble and a 404 (no vision-server at --url, or an unknown --model, "
    "asked before the first image) stop the run at once.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Caption at most N images this run (skipped ones do not count; one tried that fails "
    "does); run again for the next N. Try a few before a long run.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="List what a run would do and send no image: one line per image on stdout, 'caption', "
    "'skip' or 'fail', a tab, the path, a tab, the task or the reason (as vision-server caption "
    "--dry-run). Only a --model is asked about. Exit 1 when an image would fail.",
)
@click.pass_context
def folder(
    ctx: click.Context,
    folder: Path,
    task: str,
    ext: str,
    mode: str,
    prefix: str,
    suffix: str,
    separator: str,
    concurrency: int,
    recursive: bool,
    jsonl: Path | None,
    wait_for_server: float,
    limit: int | None,
    dry_run: bool,
) -> None:
    """Caption every image (jpg jpeg png gif bmp tif tiff webp) in FOLDER.

    Hidden files and folders below FOLDER (a name starting with ".", e.g. .ipynb_checkpoints)
    are skipped; give a hidden folder as FOLDER to caption it.

    Caption files are written atomically, so an interrupted run leaves no half-written
    captions and can simply be started again. Failed images get no caption file; they are
    listed at the end and the exit status is 1. In caption files each line break of a caption
    becomes a space (trainers read them by lines); --jsonl keeps it. Images with the same stem
    (a.jpg and a.png) would share one caption file: none of them is captioned, each fails; so do
    b.jpg and B.png on a file system that folds case (macOS, Windows, a Samba share).
    Hidden .vision-caption.*.tmp files that a killed run left behind (older than 15 minutes) are
    deleted.

    Exit status (as the folder scripts): 0 every image captioned or skipped; 1 some image
    failed; 2 bad usage, also an address without a vision-server or a --model it does not serve
    (HTTP 404, before the first image or during the run, which then stops); the run stopped
    early (the summary says why and how many images were not attempted): 3 the server cannot
    be reached (after --wait-for-server; also a host name that does not resolve, TLS trouble),
    5 the server stays busy after --retries, 6 the API key is refused, 7 the task is refused;
    130 Ctrl+C, 143 SIGTERM (kill, timeout; after the summary: run the same command again to
    resume). Earlier versions
    exited 1 for all of these stops. A full disk (no space left for a caption file or --jsonl,
    or a quota) stops the run too, with exit status 1: free some space and run it again. So does a
    failure nothing foresaw (a bug), in one line naming the image: the requests in flight are
    dropped, nothing is half-written; run it again to resume.

    --url, --api-key, --timeout, --retries and --model are options of vision-client itself:
    they go before the command (vision-client --model blip --retries 8 folder DIR).
    """
    options: dict[str, Any] = {
        "task": task,
        "ext": ext,
        "mode": mode,
        "prefix": prefix,
        "suffix": suffix,
        "separator": separator,
        "concurrency": concurrency,
        "recursive": recursive,
        "jsonl": jsonl,
        "limit": limit,
    }
    if dry_run:
        _dry_run(ctx, folder, options)
        return
    if jsonl is not None:
        _check_jsonl_output(jsonl)
    report = _FolderProgress()
    try:
        summary = _run_folder(ctx, folder, options, wait_for_server, report)
    finally:
        report.close()
    _print_summary(summary, report.seconds())
    if not summary.ok:
        sys.exit(summary.exit_status)


def _run_folder(
    ctx: click.Context, folder: Path, options: dict[str, Any], wait_for_server: float, report: _FolderProgress
) -> FolderSummary:
    """Caption ``folder`` with a client made for long runs, showing its progress on ``report``;
    what ``caption_folder`` refuses before it starts is a usage error."""
    ctx.obj = {
        **ctx.obj,
        "client_id": f"folder-{os.getpid()}",  # folder runs on one host take turns
        "wait_for_server": wait_for_server,  # an overnight run outlives a server restart
        "on_server_wait": report.server_wait,
    }

    async def work(client: AsyncVisionClient) -> FolderSummary:
        return await caption_folder(
            client,
            folder,
            on_start=report.start,
            on_result=report.result,
            on_warning=report.warning,
            **options,
        )

    try:
        return _run(ctx, work, report.interrupted)
    except ValueError as exc:  # options caption_folder refuses, e.g. --ext png or --jsonl with append
        raise click.UsageError(str(exc)) from None
    except LockNoRoom as exc:  # a full disk: no mistake of the command (exit 1, as every full disk)
        raise click.ClickException(str(exc)) from None
    except OutputLockError as exc:  # another run writes the --jsonl file, or its lock is in the way
        raise click.UsageError(str(exc)) from None


def _check_jsonl_output(jsonl: Path) -> None:
    """Refuse a ``--jsonl`` file that cannot be written, before any request, in the words of
    ``vision-server caption`` (a missing folder is more often a typo than a wish)."""
    problem = output_problem(jsonl)
    if problem is not None:
        raise click.UsageError(f"cannot write the output: {problem}")


class _FolderProgress:
    """What a folder run shows on stderr while it goes: a progress bar, each failure as it
    happens, the server-wait and warning lines, and on Ctrl+C the summary of what was seen so far."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self.started = time.monotonic()
        self.bar = tqdm(unit="img", file=sys.stderr, dynamic_ncols=True, disable=None)
        self.so_far = FolderSummary()  # what a Ctrl+C summary reports: the results seen until then
        self.listed = False  # the images were counted (after the server answered about a --model)

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def start(self, total: int) -> None:
        self.listed = True
        self.so_far.total = total
        self.bar.reset(total)

    def result(self, result: ImageResult) -> None:
        if result.outcome == "failed":
            self.bar.write(f"failed: {printable(str(result.path))}: {result.reason}", file=sys.stderr)
            self.so_far.failed.append(Failure(result.path, result.reason or "unknown error"))
        elif result.outcome == "done":
            self.so_far.done += 1
        else:
            self.so_far.skipped += 1
        self.bar.update()

    def interrupted(self) -> None:
        self.bar.close()
        if not self.listed:  # waiting for the server to answer about --model: as the folder scripts say it
            click.echo(
                "0 captioned, 0 skipped, 0 failed (interrupted before the images were listed)", err=True
            )
            click.echo("interrupted: no image attempted yet; run the same command again to resume", err=True)
            return
        _print_summary(self.so_far, self.seconds())
        click.echo(
            f"interrupted: {self.so_far.not_attempted} images not captioned yet (the ones in flight "
            "were dropped; nothing is half-written); run the same command again to resume",
            err=True,
        )

    def server_wait(self, message: str) -> None:
        self.bar.write(f"vision-client: {message}", file=sys.stderr)

    def warning(self, message: str) -> None:
        self.bar.write(f"vision-client: warning: {message}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def _dry_run(ctx: click.Context, folder: Path, options: dict[str, Any]) -> None:
    """What a run with these options would do, image by image in path order; exit 1 if any fails."""
    lines: list[tuple[Path, str, str]] = []

    def note(result: ImageResult) -> None:
        word = "skip" if result.outcome == "skipped" else "fail"
        lines.append((result.path, word, result.reason or ""))

    async def plan(client: AsyncVisionClient) -> FolderSummary:
        return await caption_folder(client, folder, dry_run=True, on_result=note, **options)

    try:
        summary = _run(ctx, plan)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if summary.aborted:  # a --model the server lacks, or no server to ask
        click.echo(f"Error: {summary.aborted}", err=True)
        sys.exit(summary.exit_status)
    task = task_token(options["task"])
    lines += [(path, "caption", task) for path in summary.planned]
    for path, word, detail in sorted(lines):
        click.echo(f"{word}\t{printable(str(path))}\t{detail}")
    later = f", {summary.deferred} left for later runs (--limit)" if summary.deferred else ""
    click.echo(
        f"dry run: {len(summary.planned)} to caption, {summary.skipped} skipped, "
        f"{len(summary.failed)} failing{later}",
        err=True,
    )
    if summary.failed:
        sys.exit(1)


def _print_summary(summary: FolderSummary, seconds: float) -> None:
    rate = f", {seconds / summary.done:.2f} s/image" if summary.done else ""
    click.echo(
        f"{summary.done} captioned, {summary.skipped} skipped, {len(summary.failed)} failed "
        f"of {summary.total} images in {seconds:.1f} s{rate}",
        err=True,
    )
    if summary.deferred:
        left = summary.deferred
        click.echo(f"{left} more image{'s' if left != 1 else ''} left for a later run (--limit)", err=True)
    if summary.stale_temps_removed:
        click.echo(
            f"removed {summary.stale_temps_removed} leftover temporary caption file(s) of a killed run",
            err=True,
        )
    if summary.failed:
        click.echo("failed images:", err=True)
        for failure in summary.failed:
            click.echo(f"  {printable(str(failure.path))}: {failure.reason}", err=True)
    if summary.aborted:
        # The words of every folder captioner (the exit status says the cause, see folder --help).
        left = summary.not_attempted
        click.echo(f"Stopped early, {left} image(s) not attempted: {summary.aborted}", err=True)


@main.command()
@click.pass_context
def prompts(ctx: click.Context) -> None:
    """List the tasks the server's model (or --model's) understands, one per line."""
    for token in _run(ctx, lambda client: client.prompts()):
        click.echo(token)


@main.command()
@click.pass_context
def model(ctx: click.Context) -> None:
    """Print the server's default model."""
    click.echo(_run(ctx, lambda client: client.model()))


@main.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Print the server's status (model state, queue, devices) as JSON."""
    click.echo(json.dumps(_run(ctx, lambda client: client.status()), indent=2))
