"""Caption every image in a folder through a vision-server, the way dataset tools do it.

Several requests run at once (``concurrency``) so the server can batch them on the GPU. Images
whose caption already exists are skipped before any request is sent, which makes an interrupted
run resumable. One bad image never stops the run: it is reported at the end and gets no
caption file. The run stops early only on what every remaining image would meet too (see
``EXIT_*``: a server that stays unreachable, stays busy, refuses the key or the task, or has no
such model), or on a failure nothing foresaw (a bug), whose image it names; give the client
a ``wait_for_server`` window so a restart of the server only pauses the run (``vision-client
folder`` waits 300 s by default).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vision_server.bulk.outputs import output_problem
from vision_server.bulk.records import safe_text
from vision_server.captionfiles import (
    MODES,
    WRITTEN_MEANWHILE,
    CaseProbe,
    CaseRules,
    Mode,
    caption_path,
    caption_suffix,
    caption_target_problem,
    file_problem,
    folds_case,
    has_caption,
    list_images,
    merge_caption,
    one_line,
    printable,
    read_caption,
    shared_caption_reason,
    sharing_stems,
    sweep_stale_temps,
    write_atomic,
    write_new_caption,
)
from vision_server.client.api import DEFAULT_TASK, AsyncVisionClient, task_token, unforeseen_failure
from vision_server.client.errors import (
    EMPTY_FILE,
    AuthenticationError,
    EmptyImageFile,
    RequestRejected,
    ServerBusy,
    VisionClientError,
    VisionConnectionError,
    VisionHTTPError,
)
from vision_server.client.jsonl import JsonlWriter, captioned_files
from vision_server.client.settle import settle
from vision_server.disk_full import RERUN_ADVICE, DiskFull, as_disk_full
from vision_server.output_lock import holding

Outcome = Literal["done", "skipped", "failed"]

log = logging.getLogger("vision_server.client")

# The exit status of a folder run that stops early, by cause: the same in every folder captioner
# (vision-client folder, vision-caption-folder-images.sh and .ps1), where 1 is "some images
# failed" and 2 a usage error.
# HTTP 404: no vision-server at the URL, or no such --model, before the first image or later (a
# server restarted without the model, or replaced by one without the route): an option to fix
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3  # also a host name that does not resolve, and TLS trouble
EXIT_BUSY = 5  # still busy or unavailable (429/503, a 502 of its own) after the retries
EXIT_KEY_REFUSED = 6  # 401/403
EXIT_TASK_REFUSED = 7  # 400 "Invalid prompt"
# No space left on the disk (or quota) for a caption file or the JSONL file: 1, as for failed
# images, since the folder needs the user's hand; the summary says what to do.
EXIT_DISK_FULL = 1
# A failure nothing foresaw (a bug, or an answer no check knows): 1, as for failed images.
EXIT_UNFORESEEN = 1
# What the first request (the question about --model) may stop the run for, as the folder
# scripts' GET /prompts: any other trouble (busy, slow, a 500) is a warning, and the images try.
FIRST_REQUEST_STOPS = frozenset({EXIT_USAGE, EXIT_UNREACHABLE, EXIT_KEY_REFUSED})
FIRST_REQUEST_TIMEOUT = 30.0  # seconds for each try of that question (less with a shorter --timeout)


@dataclass(frozen=True)
class ImageResult:
    """What happened to one image; passed to the progress callback as soon as it is known."""

    path: Path
    outcome: Outcome
    caption: str | None = None
    reason: str | None = None
    model: str | None = None  # the served model that captioned it, when the server said


@dataclass(frozen=True)
class Failure:
    path: Path
    reason: str


@dataclass
class FolderSummary:
    """Counts for the run, and every failure with its reason."""

    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: list[Failure] = field(default_factory=list)
    # set when the run stopped early: why, and the exit status that says so (``EXIT_*``)
    aborted: str | None = None
    stop_status: int = 0
    stale_temps_removed: int = 0  # temp caption files a killed run had left, deleted by this one
    deferred: int = 0  # images to caption that ``limit`` left for a later run
    planned: list[Path] = field(default_factory=list)  # a dry run: the images a run would caption

    @property
    def not_attempted(self) -> int:
        """Images this run meant to caption but did not reach (a stop, a Ctrl+C)."""
        left = self.total - self.done - self.skipped - len(self.failed)
        return left - self.deferred - len(self.planned)

    @property
    def ok(self) -> bool:
        return not self.failed and self.aborted is None

    @property
    def usage_error(self) -> bool:
        """The stop is the user's to fix, like a wrong option (a 404: ``--url`` or ``--model``)."""
        return self.stop_status == EXIT_USAGE

    @property
    def exit_status(self) -> int:
        """0 all captioned or skipped, the stop's ``EXIT_*`` when the run stopped early, else 1."""
        if self.aborted is not None:
            return self.stop_status or 1
        return 1 if self.failed else 0


@dataclass(frozen=True)
class _Job:
    image: Path
    key: str  # path relative to the folder, as stored in the JSONL (non-UTF-8 bytes as \xNN)
    target: Path | None  # caption file; None when writing JSONL


async def caption_folder(
    client: AsyncVisionClient,
    folder: str | Path,
    *,
    task: str = DEFAULT_TASK,
    ext: str = "txt",
    mode: Mode = "skip",
    prefix: str = "",
    suffix: str = "",
    separator: str = " ",
    concurrency: int = 8,
    recursive: bool = True,
    jsonl: str | Path | None = None,
    limit: int | None = None,
    dry_run: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_result: Callable[[ImageResult], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    case_probe: CaseProbe = folds_case,
) -> FolderSummary:
    """Caption the images under ``folder``; see ``vision-client folder --help`` for the options.

    Captions go to a file beside each image (``ext``), or, when ``jsonl`` is given, to that JSON
    Lines file instead. ``mode`` decides what happens to an existing caption: ``skip`` (default)
    leaves images that already have one alone, ``overwrite`` replaces it, ``append``/``prepend``
    add the new caption after/before it with ``separator``. ``prefix``/``suffix`` wrap every new
    caption, e.g. a trigger word. Requests are marked ``bulk``, so a person's single requests to
    the same server go first. Images of one folder with the same stem (``a.jpg``, ``a.png``)
    would share a caption file: none of them is captioned, each is a failure; so would ``b.jpg``
    and ``B.png`` where ``case_probe`` says the folder's file system folds case (by default it
    asks the file system, once per folder where two stems differ in case alone). ``on_start`` gets
    the number of images found, then ``on_result`` one :class:`ImageResult` per image (skipped
    ones first), for progress bars; ``on_warning`` a line when the question about the model
    fails in a way the images may not meet (default: the ``vision_server.client`` logger).
    ``limit`` captions at most that many images (skipped ones do
    not count; the rest are ``deferred``). A ``dry_run`` sends no image and writes nothing: the
    images a run would caption are listed in ``planned`` (only a named model is asked about).
    A ``jsonl`` file whose folder is missing (or that is a folder, or cannot be opened) raises
    ``ValueError`` before anything is made or sent, as ``vision-client folder`` refuses it; a
    full disk that leaves no room to end a killed run's torn last line stops the run (``aborted``)
    before the first image. A ``jsonl`` file is locked for the whole run: while another run holds it,
    :class:`~vision_server.output_lock.OutputBusy` is raised before anything is sent (and
    :class:`~vision_server.output_lock.LockUnusable` when its lock file is in the way).
    An exception nothing foresaw while an image is captioned (a bug) stops the run too
    (``aborted`` names the image and the exception, ``stop_status`` 1; the traceback is logged
    at debug level): the requests in flight are cancelled and awaited, the outputs closed.
    """
    caption_ext = _checked_options(mode, ext, jsonl, concurrency, limit)
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    # One run at a time per JSONL file, for the whole run: two would caption every image twice.
    with holding(_outputs_to_lock(jsonl, dry_run)):
        run = _FolderRun(client, task_token(task), mode, prefix, suffix, separator, on_result, on_warning)
        listing = list_images(root, recursive=recursive)
        # A model the server lacks (or no server to ask) would fail every image: such a run stops
        # before the first image, its images still sorted into skipped, failing and to caption, so
        # the summary counts them apart, as the folder scripts do.
        going_on = await run.check_model()
        if going_on and jsonl is None and not dry_run:  # this run writes caption files: clear a killed one's
            run.summary.stale_temps_removed = sweep_stale_temps(root, recursive=recursive)
        if on_start is not None:
            on_start(len(listing.images) + len(listing.unlisted))
        run.report_unlisted(listing.unlisted)
        jobs = run.plan(root, listing.images, caption_ext, jsonl, CaseRules(case_probe))
        jobs = run.within_limit(jobs, limit)
        if going_on and dry_run:
            run.summary.planned = [job.image for job in jobs]
        elif going_on and jobs:
            await run.caption_into(jsonl, jobs, concurrency)
        run.summary.failed.sort(key=lambda failure: failure.path)
        return run.summary


def _outputs_to_lock(jsonl: str | Path | None, dry_run: bool) -> list[Path]:
    """The JSONL file a run writes (none for a dry run). One that cannot be written there (a
    missing folder, more often a typo than a wish; a folder in its place) is a ``ValueError`` in
    the words of ``vision-client folder``, before its lock file is made or anything is sent."""
    if jsonl is None or dry_run:
        return []
    problem = output_problem(Path(jsonl))
    if problem is not None:
        raise ValueError(f"cannot write the output: {problem}")
    return [Path(jsonl)]


def _checked_options(
    mode: Mode, ext: str, jsonl: str | Path | None, concurrency: int, limit: int | None
) -> str:
    """The caption files' suffix, once the options are known to go together: a ``ValueError``
    (the command's usage error) before anything is created, asked or sent."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if jsonl is not None and mode in ("append", "prepend"):
        raise ValueError("append and prepend edit caption files; with a JSONL output use skip or overwrite")
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if limit is not None and limit < 0:
        raise ValueError("limit must be 0 or more")
    return caption_suffix(ext)


class _FolderRun:
    """The state one folder run shares between its parallel workers."""

    def __init__(
        self,
        client: AsyncVisionClient,
        task: str,
        mode: Mode,
        prefix: str,
        suffix: str,
        separator: str,
        on_result: Callable[[ImageResult], None] | None,
        on_warning: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.task = task
        self.mode = mode
        self.prefix = prefix
        self.suffix = suffix
        self.separator = separator
        self.on_result = on_result
        self.on_warning = on_warning
        self.summary = FolderSummary()
        self.writer: JsonlWriter | None = None
        # The names a row of this run's model may carry: --model as given and the served name
        # it means (a source such as a hub id is answered as the model serving it).
        self.model_names: set[str] = set()

    async def check_model(self) -> bool:
        """Ask the server about a named model before any image; False (and ``aborted``) when
        the run cannot go on. Without ``--model`` the default model answers, as before.

        As the folder scripts' first request: a 404, a server that cannot be reached (after the
        wait) or a refused key stop the run; a busy, slow (``FIRST_REQUEST_TIMEOUT``) or failing
        answer is only a warning, and the run goes on with the name as given."""
        name = self.client.model_name
        if name is None:
            return True
        try:
            served = await self.client.served_name(timeout=FIRST_REQUEST_TIMEOUT)
        except (VisionClientError, OSError) as exc:
            stop = _stop_reason(exc, model_named=True)
            if stop is not None and stop[0] in FIRST_REQUEST_STOPS:
                self.stop(*stop)
                return False
            self.warn(f"GET /prompts?model={name} failed ({_describe(exc)}); trying anyway")
            served = None
        self.model_names = {name, served or name}
        return True

    def warn(self, message: str) -> None:
        if self.on_warning is not None:
            self.on_warning(message)
        else:
            log.warning("%s", message)

    def report_unlisted(self, unlisted: list[tuple[Path, str]]) -> None:
        """Folders that could not be listed, each a failure with its reason: their images cannot
        even be counted. They start the total, which :meth:`plan` adds the images to."""
        self.summary.total = len(unlisted)
        for folder, reason in unlisted:
            self.report(ImageResult(folder, "failed", reason=reason))

    def within_limit(self, jobs: list[_Job], limit: int | None) -> list[_Job]:
        """The first ``limit`` jobs; the rest are counted as ``deferred`` to a later run."""
        if limit is None:
            return jobs
        self.summary.deferred = max(0, len(jobs) - limit)
        return jobs[:limit]

    async def caption_into(self, jsonl: str | Path | None, jobs: list[_Job], concurrency: int) -> None:
        """Run the jobs, their rows appended to ``jsonl`` (caption files beside the images without)."""
        try:
            writer = JsonlWriter(Path(jsonl)) if jsonl is not None else None
        except DiskFull as exc:  # no room even to end a killed run's torn last line: no image can be stored
            self.stop(EXIT_DISK_FULL, _disk_full_reason(exc))
            return
        try:
            await self.execute(jobs, writer, concurrency)
        finally:
            if writer is not None:
                writer.close()

    def plan(
        self, root: Path, images: list[Path], suffix: str, jsonl: str | Path | None, case: CaseRules
    ) -> list[_Job]:
        """Decide per image: skip it, refuse it, or caption it; report skips and refusals now."""
        self.summary.total += len(images)
        # A run for a named model resumes from that model's rows only; the default model's run
        # from any row of the task, as before rows named their model.
        models = self.model_names or None
        recorded = captioned_files(Path(jsonl), self.task, models) if jsonl is not None else set()
        # Images of one folder with the same stem (a.jpg, a.png; b.jpg, B.png where the file
        # system folds case) share one caption file: none of them is captioned, as in
        # vision-server caption and the folder scripts (the checks come before skip, so an
        # existing a.txt does not hide the clash).
        folders: dict[Path, list[str]] = {}
        if jsonl is None:
            for image in images:
                folders.setdefault(image.parent, []).append(image.name)
        sharing = {folder: sharing_stems(names, folder, case) for folder, names in folders.items()}
        jobs: list[_Job] = []
        for image in images:
            unreadable = file_problem(image)  # a broken symlink, a loop, a FIFO: never opened
            if unreadable is not None:
                self.report(ImageResult(image, "failed", reason=unreadable))
                continue
            key = safe_text(image.relative_to(root).as_posix())  # as vision-server caption spells it
            target = None if jsonl is not None else caption_path(image, suffix)
            others = (
                [name for name in sharing[image.parent](image.name) if name != image.name] if sharing else []
            )
            if target is not None and others:
                reason = shared_caption_reason([target.name], others)
                self.report(ImageResult(image, "failed", reason=reason))
                continue
            problem = caption_target_problem(target) if target is not None else None
            if problem is not None:  # a folder there, or a name too long to create
                self.report(ImageResult(image, "failed", reason=problem))
                continue
            if self.mode == "skip" and (key in recorded if target is None else has_caption(target)):
                reason = "already captioned" if target is not None else f"already in {Path(str(jsonl)).name}"
                self.report(ImageResult(image, "skipped", reason=reason))
                continue
            jobs.append(_Job(image, key, target))
        return jobs

    async def execute(self, jobs: list[_Job], writer: JsonlWriter | None, concurrency: int) -> None:
        """Run the jobs with ``concurrency`` requests in flight. A worker that meets a failure
        nothing foresaw stops the run (:meth:`worker`); the others' requests are cancelled and
        awaited here, as on Ctrl+C, before the outputs are closed: left to ``asyncio.run`` they
        went on against a closed session and their failures came out as tracebacks."""
        self.writer = writer
        queue = iter(jobs)  # shared by all workers; safe because next() never awaits
        workers = [asyncio.ensure_future(self.worker(queue)) for _ in range(min(concurrency, len(jobs)))]
        try:
            await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            await settle(workers)  # a caption is stored without an await between: none half-written

    async def worker(self, queue: Iterator[_Job]) -> None:
        for job in queue:
            if self.summary.aborted is not None:
                return
            try:
                result = await self.caption_one(job)
                if result is not None:
                    self.report(result)
            except Exception as exc:  # a bug, or an answer nothing foresaw: the run stops here
                log.debug("unexpected failure at %s", job.image, exc_info=True)
                self.stop(EXIT_UNFORESEEN, _unforeseen(job.image, exc))
                raise  # ends execute's wait, which cancels the other workers' requests

    def _written_meanwhile(self, job: _Job) -> bool:
        """In ``skip`` mode, whether ``job``'s caption file has appeared since the run planned it
        (another run over the folder, a caption saved in the gallery): the run was planned at its
        start, maybe hours ago, and must not replace a caption it was told to leave alone."""
        return self.mode == "skip" and job.target is not None and has_caption(job.target)

    async def caption_one(self, job: _Job) -> ImageResult | None:
        """Caption and store one image; every expected failure becomes a result, not an exception.
        None when the answer stops the run: nothing is wrong with this image, which is counted
        as not attempted (as the folder scripts count it), to be captioned by the next run."""
        if self._written_meanwhile(job):  # by another run, or saved in the gallery: not sent
            return ImageResult(job.image, "skipped", reason=WRITTEN_MEANWHILE)
        try:
            answer = await self.client.caption_result(job.image, self.task, priority="bulk")
            text = answer.text
            if not text.strip():  # a prefix alone is no caption, and an empty file reads as "to do"
                return ImageResult(job.image, "failed", reason="the server returned an empty caption")
            if job.target is None:  # a JSONL row keeps the caption verbatim
                caption = f"{self.prefix}{text}{self.suffix}"
                assert self.writer is not None
                self.writer.write(job.key, self.task, caption, answer.model)
            else:  # a caption file holds it on one line, as every folder captioner writes it
                caption = f"{self.prefix}{one_line(text)}{self.suffix}"
                if self.mode == "skip":  # one saved while the server captioned it stays
                    if not write_new_caption(job.target, caption):
                        return ImageResult(job.image, "skipped", reason=WRITTEN_MEANWHILE)
                else:
                    existing = read_caption(job.target) if self.mode in ("append", "prepend") else None
                    write_atomic(job.target, merge_caption(existing, caption, self.mode, self.separator))
        except (VisionClientError, OSError, UnicodeError) as exc:
            # A full disk names the caption file, not its temporary file.
            cause = as_disk_full(job.target, exc) if job.target is not None else exc
            stop = _stop_reason(cause, model_named=self.client.model_name is not None)
            if stop is None:
                return ImageResult(job.image, "failed", reason=_describe(cause))
            self.stop(*stop)
            return None
        return ImageResult(job.image, "done", caption=caption, model=answer.model)

    def stop(self, status: int, reason: str) -> None:
        """Stop the run: no new image starts. The first reason is kept (the requests in flight
        meet the same trouble)."""
        if self.summary.aborted is None:
            self.summary.aborted = reason
            self.summary.stop_status = status

    def report(self, result: ImageResult) -> None:
        if result.outcome == "done":
            self.summary.done += 1
        elif result.outcome == "skipped":
            self.summary.skipped += 1
        else:
            self.summary.failed.append(Failure(result.path, result.reason or "unknown error"))
        if self.on_result is not None:
            self.on_result(result)


def _disk_full_reason(exc: DiskFull) -> str:
    """Why a run stopped on a full disk: the file it could not write, and what to do."""
    return f"{exc}; {RERUN_ADVICE}"


def _unforeseen(image: Path, exc: Exception) -> str:
    """Why a run stopped on a failure nothing foresaw, on one line: the image, the exception,
    and that a rerun resumes (that image and those in flight count as not attempted)."""
    return (
        f"unexpected failure at {printable(str(image))} ({unforeseen_failure(exc)}); the requests "
        "in flight were dropped, nothing is half-written: run the same command again to resume"
    )


def _stop_reason(exc: BaseException, *, model_named: bool) -> tuple[int, str] | None:
    """The exit status and the reason when the run must stop, for an answer every other image
    would get too (in the words of the folder scripts); None to go on. A 404 points to
    ``--model`` only when the run named one (``model_named``): else only ``--url`` can be wrong."""
    if isinstance(exc, DiskFull):  # every image after it would fail the same way
        return EXIT_DISK_FULL, _disk_full_reason(exc)
    if isinstance(exc, VisionConnectionError):
        return EXIT_UNREACHABLE, f"the server cannot be reached ({exc})"
    if isinstance(exc, VisionHTTPError) and exc.gateway_outage:  # a proxy with no server behind it
        return (
            EXIT_UNREACHABLE,
            f"the server cannot be reached (no server behind the proxy: {_describe(exc)})",
        )
    if isinstance(exc, AuthenticationError):
        return EXIT_KEY_REFUSED, f"the server refused the API key ({_describe(exc)})"
    if isinstance(exc, ServerBusy):  # still busy after the retries: so is every other image
        return EXIT_BUSY, f"the server stays busy or unavailable ({_describe(exc)})"
    if isinstance(exc, RequestRejected):
        if exc.status == 404:  # no vision-server at this address (any more), or no such model
            said = _describe(exc).rstrip(".")
            also = " and --model" if model_named else ""
            return EXIT_USAGE, f"{said}: check --url (the server's base address){also}"
        if exc.status == 400 and exc.detail.startswith("Invalid prompt"):
            return EXIT_TASK_REFUSED, f"the server refused the task ({_describe(exc)})"
    return None


def _describe(exc: BaseException) -> str:
    """The server's own message for HTTP errors ("HTTP 400: message", as the folder scripts
    write it), the OS message for file errors; the summary names the image before it."""
    if isinstance(exc, EmptyImageFile):
        return EMPTY_FILE
    detail = getattr(exc, "detail", None)
    status = getattr(exc, "status", None)
    if detail is not None and status is not None:
        return f"HTTP {status}: {detail}"
    return str(exc) or type(exc).__name__
