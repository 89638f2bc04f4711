"""Dataset files on disk: which files are images, where their captions go, and safe writes.

Shared by the HTTP folder client (``vision-client folder``) and the offline dataset captioner
(``vision-server caption``), so both name, skip and merge caption files the same way. Standard
library only: the client package must not pull in the model layer, and this must not pull in HTTP.

Captions live beside their image with the image's suffix replaced (``cat.png`` -> ``cat.txt``),
the convention of kohya-ss, OneTrainer, taggui and joycaption. A caption file is written to a
temporary file in the same folder and renamed over the target, so an error or Ctrl+C never
leaves a half-written caption that a later "skip existing" run would trust. Only a hard kill
(``kill -9``, power loss) between the two steps can leave the temporary file behind; the folder
captioners sweep such leftovers when they walk a folder (:func:`remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vision_server.atomic_files import create_whole, replacing

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"})

Mode = Literal["skip", "overwrite", "append", "prepend"]
MODES: tuple[Mode, ...] = ("skip", "overwrite", "append", "prepend")

STALE_TEMP_AGE = 15 * 60.0
"""Seconds after which a temporary caption file of ours is a crash's leftover, safe to delete.

A write takes milliseconds, so a temp file this old cannot be one that another live run (a second
``vision-client folder``, ``vision-server caption`` or a gallery save on the same folder) is
writing right now; deleting a younger one could pull it from under that run's rename. The margin
is huge on purpose: it also covers a slow network drive and clocks that disagree a little.
"""

_TEMP_NAME = re.compile(r"\.vision-caption\.[0-9a-f]{16}\.tmp")  # exactly what temp_path makes
_LINE_BREAK = re.compile(r"\r\n|[\r\n]")  # what Python's text files (and trainers) split lines at

log = logging.getLogger(__name__)


def is_image(path: Path) -> bool:
    """Judge by extension, in any case; macOS ``._name`` resource forks only look like images."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("._")


def is_hidden(name: str) -> bool:
    """Whether a name below a dataset's root is left out of the dataset: it starts with ".".

    ``.ipynb_checkpoints/``, ``.thumbnails/``, ``.cache/``, ``.Trash-1000/`` hold copies and
    thumbnails of the images, not training images, and trainers that read the captions (kohya-ss)
    skip such names; macOS ``._name`` files are among them. The rule of every folder captioner,
    the gallery and ``vision-server train``: a hidden folder is not entered, a hidden file (or
    symlink) is not listed. Only names below the root count, so a root such as ``~/.datasets/x``
    is read as usual, and an image named on the command line is taken whatever its name.
    """
    return name.startswith(".")


def is_listed_image(name: str) -> bool:
    """Whether a folder listing takes the entry ``name`` as an image: named like one, not hidden."""
    return not is_hidden(name) and is_image(Path(name))


def find_images(root: Path, *, recursive: bool = True) -> list[Path]:
    """Every image file under ``root``, sorted so runs and logs are reproducible."""
    return [path for path in list_images(root, recursive=recursive).images if path.is_file()]


@dataclass(frozen=True)
class ImageListing:
    """What a folder captioner finds under a folder: ``images``, every entry named like an image
    that is not a folder (sorted; a broken symlink, a symlink loop or a FIFO among them, which
    :func:`file_problem` tells apart), and ``unlisted``, the folders it could not list and why.

    Nothing is dropped without a word: a user who counts the images in a dataset finds each one
    captioned, skipped or failed with its reason, as ``vision-server caption`` reports them.
    """

    images: list[Path]
    unlisted: list[tuple[Path, str]]


def list_images(root: Path, *, recursive: bool = True) -> ImageListing:
    """The images (and unreadable folders) under ``root``; symlinked and hidden folders are not
    entered, hidden files not listed (:func:`is_hidden`)."""
    unlisted: list[tuple[Path, str]] = []

    def note(exc: OSError) -> None:
        unlisted.append((Path(exc.filename or root), f"cannot list folder: {describe_os_error(exc)}"))

    images: list[Path] = []
    if not recursive:
        try:
            with os.scandir(root) as scan:
                images = [Path(e.path) for e in scan if is_listed_image(e.name) and not _is_dir(e)]
        except OSError as exc:
            note(exc)
    else:  # os.walk puts symlinked folders among the folders and does not enter them: no loops
        for folder, dirs, names in os.walk(root, onerror=note):
            dirs[:] = [name for name in dirs if not is_hidden(name)]  # os.walk enters only these
            images.extend(Path(folder, name) for name in names if is_listed_image(name))
    return ImageListing(sorted(images), sorted(unlisted))


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as an image file, or None when it looks readable: the words
    of every folder captioner for a broken symlink, a loop, a FIFO, a file it may not read."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"broken symlink (points to {printable(os.readlink(path))})"
        return "no such file"
    except OSError as exc:
        return describe_os_error(exc)
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    return None


def describe_os_error(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return printable(exc.strerror or str(exc))


def printable(text: str) -> str:
    """``text`` (a file name) as reports show it, on one line: bytes of a name that is not UTF-8
    become ``\\xNN``, a line break or tab ``\\n``/``\\r``/``\\t``, other control characters
    ``\\xNN``. So each report is one line, and a dry run's ``word TAB path TAB detail`` lines
    stay three fields, whatever the dataset's names hold."""
    return (
        text.encode("utf-8", "surrogateescape")
        .decode("utf-8", "backslashreplace")
        .translate(_CONTROL_ESCAPES)
    )


_CONTROL_ESCAPES = {
    code: {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(chr(code), f"\\x{code:02x}")
    for code in (*range(0x20), 0x7F)
}


def caption_suffix(ext: str) -> str:
    """``txt`` or ``.txt`` -> ``.txt``; refuse extensions that would overwrite the images."""
    suffix = "." + ext.strip().lstrip(".")
    if suffix == "." or "/" in suffix or "\\" in suffix:
        raise ValueError(f"invalid caption extension {ext!r}")
    if suffix.lower() in IMAGE_EXTENSIONS:
        raise ValueError(f"caption extension {ext!r} is an image extension; captions would replace images")
    return suffix


def caption_path(image: Path, suffix: str) -> Path:
    """Where the caption of ``image`` goes: same folder, same stem."""
    return image.with_suffix(suffix)


def shared_caption_reason(captions: Sequence[str], others: Sequence[str]) -> str:
    """Why an image is not captioned when another image in its folder has the same stem
    (``a.jpg`` and ``a.png`` -> ``a.txt``): the one rule of every folder captioner.

    Neither image is captioned, whatever order they come in and whether the caption file exists:
    a trainer pairs ``a.txt`` with both images, so any caption written there (or already there)
    is wrong for one of them. ``captions`` names the caption file(s), ``others`` the other images;
    each name is shown :func:`printable`, so a line break in one cannot split the report.
    """
    shown_captions = [printable(name) for name in captions]
    shown_others = [printable(name) for name in others]
    files = f"file {shown_captions[0]}" if len(captions) == 1 else f"files {', '.join(shown_captions)}"
    if len(others) == 1:
        return f"shares its caption {files} with {shown_others[0]}; neither is captioned, rename one of them"
    return f"shares its caption {files} with {', '.join(shown_others)}; none is captioned, rename all but one"


CaseProbe = Callable[[Path], bool]
"""Whether the file system holding a folder takes ``B.txt`` for ``b.txt``: :func:`folds_case`,
or a stand-in that tests give the folder captioners (no case-insensitive mount on a CI machine)."""


def folds_case(folder: Path) -> bool:
    """Whether ``folder``'s file system folds case (macOS APFS/HFS+ by default, Windows NTFS, an
    exFAT or Samba share): there ``b.txt`` and ``B.txt`` are one file, so ``b.jpg`` and ``B.png``
    would share a caption file exactly as ``b.jpg`` and ``b.png`` do.

    Asked of the file system itself, never guessed from the platform: one Linux box mounts ext4
    and a Samba share, and a macOS volume or an NTFS folder may be case-sensitive. A name in the
    folder is looked up with its case swapped (``Cat.jpg`` as ``cAT.JPG``); when no entry has
    that name and the look-up still finds a file, the file system folded the case. (Not an
    inode comparison: a CIFS mount with ``noserverino`` numbers each name it is asked for anew.)
    Only a folder with no name to swap gets a temporary file of ours, deleted at once (a hard
    kill in between leaves the kind of leftover the folder captioners sweep anyway). A folder
    that cannot be listed or written gets False: no caption can be written there either.
    """
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    listed = set(names)
    for name in names:
        swapped = name.swapcase()
        if swapped == name or swapped.swapcase() != name:  # no letters, or a one-way one (ß -> SS)
            continue
        if swapped in listed:  # both spellings are entries of their own
            return False
        return _resolves(folder / swapped)
    return _probe_with_temp_file(folder)


def _resolves(path: Path) -> bool:
    try:
        os.lstat(path)
    except OSError:
        return False
    return True


def _probe_with_temp_file(folder: Path) -> bool:
    probe = temp_path(folder / "probe")  # lower-case hex: its swapped name is another name
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        return False
    try:
        return _resolves(probe.with_name(probe.name.swapcase()))
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


class CaseRules:
    """Per folder, for one run: the key under which two caption files are one file there.

    ``probe`` (:func:`folds_case`) is asked once per folder, and only when it matters: when two
    images' stems differ in case alone. Elsewhere no question reaches the file system at all.
    """

    def __init__(self, probe: CaseProbe = folds_case) -> None:
        self._probe = probe
        self._answers: dict[Path, bool] = {}

    def folds(self, folder: Path) -> bool:
        answer = self._answers.get(folder)
        if answer is None:
            answer = self._answers[folder] = self._probe(folder)
        return answer


def same_file_key(name: str, folds: bool) -> str:
    """``name`` (a stem or a file name) as a file system that folds case (``folds``) compares it.

    ``str.casefold`` is a little broader than the tables NTFS and APFS use (``ß`` matches
    ``ss``): a pair it joins that the file system keeps apart is refused with a clear message,
    while the reverse would let one caption overwrite the other without a word.
    """
    return name.casefold() if folds else name


def sharing_stems(names: Sequence[str], folder: Path, case: CaseRules) -> Callable[[str], list[str]]:
    """For each image name of ``folder``, the names (itself included) whose caption file is its
    own: the same stem, or, on a file system that folds case, the same stem in any case. The
    file system is asked (``case``) only when two stems differ in case alone."""
    folded: dict[str, list[str]] = {}
    for name in names:
        folded.setdefault(Path(name).stem.casefold(), []).append(name)
    folds = any(len({Path(name).stem for name in group}) > 1 for group in folded.values()) and case.folds(
        folder
    )
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(same_file_key(Path(name).stem, folds), []).append(name)
    return lambda name: groups[same_file_key(Path(name).stem, folds)]


def one_line(caption: str) -> str:
    """``caption`` as a caption file holds it: each line break (CRLF, CR or LF) becomes a space.

    Trainers read a caption file by lines: kohya-ss sd-scripts takes only the first line (and,
    with ``enable_wildcard``, each line as a caption of its own, picked at random), so a
    caption's second sentence on a line of its own would be dropped or trained as another
    caption. Every folder captioner applies this to the model's caption, and only to it: a
    prefix, suffix or separator the user gives, and the text already in the file, stay as they
    are. JSONL and Parquet rows keep the caption verbatim (JSON escapes a line break).
    """
    return _LINE_BREAK.sub(" ", caption)


# A named pipe, socket or device where a caption file belongs: opening a pipe waits for a writer
# forever, so no tool reads it, and the image fails with these words (after the file's name).
NOT_A_REGULAR_CAPTION = "is not a regular file (a pipe, socket or device), not a caption file"
A_FOLDER_NOT_A_CAPTION = "is a directory, not a caption file"


def _is_special(path: Path) -> bool:
    """Whether ``path`` is there and is neither a regular file nor a folder (a pipe...)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def _is_folder(path: Path) -> bool:
    """Whether ``path`` is a folder (through a link); no error, as :func:`_is_special`."""
    try:
        return stat.S_ISDIR(path.stat().st_mode)
    except OSError:
        return False


def read_caption(path: Path) -> str | None:
    """The caption text, or ``None`` when there is no file (nor a regular one: a pipe that
    appeared since the run looked is never opened)."""
    if _is_special(path):
        return None
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return None


def caption_target_problem(target: Path) -> str | None:
    """Why no caption file can be written at ``target``, or None when nothing stands in the way
    that a look can tell: one reason for every folder captioner, asked before an image is sent.

    A folder where the caption file belongs would be taken for a caption by ``skip`` and would
    fail ``overwrite``. A name longer than the file system allows (``STEM.<task>.txt`` beside an
    image whose own name is near the 255-byte limit) cannot be created at all; without this
    check a run would send the image, then fail to save its caption, or stop on the error.
    """
    try:
        info = target.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            size = len(os.fsencode(target.name))
            return (
                f"the name of its caption file ({size} bytes) is too long for the file system; "
                "rename the image to a shorter name"
            )
        return None  # anything else shows, with its own words, when the file is read or written
    if stat.S_ISDIR(info.st_mode):
        return f"{printable(target.name)} {A_FOLDER_NOT_A_CAPTION}"
    if not stat.S_ISREG(info.st_mode):
        return f"{printable(target.name)} {NOT_A_REGULAR_CAPTION}"
    return None


def has_caption(path: Path) -> bool:
    """A caption counts only if it has text; an empty file is what a failed run used to leave.

    Bytes, not text, are checked, so a caption in another encoding still counts, and a file we
    cannot read is left alone rather than overwritten. A pipe, socket or device is no caption
    (never opened: a pipe would wait for a writer forever): a run plans such an image as failed,
    and one that appears while the image is captioned fails it at the write
    (:class:`NotACaptionFile`), in ``skip`` mode too, where it was taken for a caption written
    meanwhile. A name too long for the file system names no file: no caption there.
    """
    if _is_special(path) or _is_folder(path):  # a folder: the write refuses it likewise
        return False
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return False
    except OSError as exc:
        return exc.errno != errno.ENAMETOOLONG
    return bool(data.removeprefix(b"\xef\xbb\xbf").strip())


def merge_caption(existing: str | None, new: str, mode: Mode, separator: str = " ") -> str:
    """The text to store for ``mode``; append/prepend keep what is already there."""
    old = (existing or "").strip()
    if mode in ("skip", "overwrite") or not old:
        return new
    return f"{old}{separator}{new}" if mode == "append" else f"{new}{separator}{old}"


def temp_path(path: Path) -> Path:
    """A hidden, unique temporary file beside ``path``.

    Its name has a fixed length (36 characters) rather than embedding ``path.name``: a caption
    whose name is near the file system's limit (255 bytes) must not fail for its temp name.
    """
    return path.with_name(f".vision-caption.{secrets.token_hex(8)}.tmp")


def is_caption_temp(name: str) -> bool:
    """Whether a file name is one of :func:`temp_path`'s, and nothing else a user might keep."""
    return _TEMP_NAME.fullmatch(name) is not None


def remove_stale_temps(
    folder: Path, names: Iterable[str], *, now: float | None = None, min_age: float = STALE_TEMP_AGE
) -> int:
    """Delete the temp files of ours among ``names`` (a listing of ``folder``) that are older
    than ``min_age`` seconds; returns how many went."""
    removed = remove_stale_files(folder, names, is_caption_temp, now=now, min_age=min_age)
    if removed:
        log.info("removed %d leftover temporary caption file(s) in %s", removed, folder)
    return removed


def remove_stale_files(
    folder: Path,
    names: Iterable[str],
    matches: Callable[[str], bool],
    *,
    now: float | None = None,
    min_age: float = STALE_TEMP_AGE,
) -> int:
    """Delete the files among ``names`` (a listing of ``folder``) whose name ``matches`` and that
    are older than ``min_age`` seconds; returns how many went. The one rule for every leftover
    temporary file a killed run can leave (caption files, a Parquet fold).

    Only regular files are touched, never a link or a folder. Any error (the file just went, a
    read-only dataset, no permission) leaves that file alone: a leftover costs some bytes, while
    failing a captioning run over it would cost a night.
    """
    now = time.time() if now is None else now
    removed = 0
    for name in names:
        if not matches(name):
            continue
        path = folder / name
        try:
            info = path.lstat()
            if not stat.S_ISREG(info.st_mode) or now - info.st_mtime < min_age:
                continue
            path.unlink()
        except OSError:
            continue
        removed += 1
    return removed


def sweep_stale_temps(root: Path, *, recursive: bool = True, min_age: float = STALE_TEMP_AGE) -> int:
    """:func:`remove_stale_temps` in ``root`` and, with ``recursive``, every folder below it
    (symlinked and hidden folders not entered, as :func:`find_images` walks: no run writes a
    caption in ``.git`` or ``.cache``, and walking a big one costs minutes); returns how many went."""
    if not recursive:
        try:
            names = os.listdir(root)
        except OSError:
            return 0
        return remove_stale_temps(root, names, min_age=min_age)
    now = time.time()
    removed = 0
    for folder, dirs, names in os.walk(root):
        dirs[:] = [name for name in dirs if not is_hidden(name)]  # pruned: the files are dot-named too
        removed += remove_stale_temps(Path(folder), names, now=now, min_age=min_age)
    return removed


class ReadOnlyCaption(PermissionError):
    """An existing caption file without write permission: the user's way of saying "keep this
    one". A plain ``open(path, "w")`` would refuse it; the rename of an atomic write would not,
    so the check is ours. Its text says what to do, and the folder captioners report it as that
    image's failure."""

    def __init__(self, path: Path) -> None:
        message = f"{printable(path.name)} is read-only; make it writable (chmod u+w) to let it be replaced"
        super().__init__(errno.EACCES, message, str(path))

    def __str__(self) -> str:
        return str(self.strerror)


class NotACaptionFile(OSError):
    """A pipe, socket or device (or, with ``folder``, a folder) stands where a caption file
    would go: it is nobody's caption, and replacing it would take it away from whatever uses it
    (a folder refuses the rename with a bare "Is a directory"). Its text says so, in the words a
    run uses when it plans the image."""

    def __init__(self, path: Path, *, folder: bool = False) -> None:
        what = A_FOLDER_NOT_A_CAPTION if folder else NOT_A_REGULAR_CAPTION
        code = errno.EISDIR if folder else errno.EEXIST
        super().__init__(code, f"{printable(path.name)} {what}", str(path))

    def __str__(self) -> str:
        return str(self.strerror)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) all at once, or leave it untouched on any error.

    An existing file keeps its permission bits (a group-writable dataset stays group-writable;
    the new file is not reset to the umask), and a file without write permission is not
    replaced at all (:class:`ReadOnlyCaption`), nor is a pipe, socket or device
    (:class:`NotACaptionFile`). A symlinked caption is replaced by a plain file
    and the file it points to is left alone: writing through the link could reach outside the
    dataset (the gallery must never do that), and captions linked to one shared file would all
    end up with the last image's text. So the link is what is replaced, and the rules look at
    it, not at its target: the new file gets a new file's mode, and a read-only target (every
    file of a git-annex store is) neither blocks the write nor makes the new caption read-only.
    """
    try:
        info = path.lstat()
    except FileNotFoundError:
        info = None
    if info is not None and not (
        stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode) or stat.S_ISDIR(info.st_mode)
    ):
        raise NotACaptionFile(path)  # a pipe that appeared since the run looked (or the gallery's)
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise NotACaptionFile(path, folder=True)  # made since the run looked
    if info is not None and not stat.S_ISREG(info.st_mode):
        info = None  # a link: replaced as a new file would be made
    if info is not None and not _writable(path, info.st_mode):
        raise ReadOnlyCaption(path)
    try:
        with replacing(path, temp_path(path)) as tmp:
            # os.open with 0o666 lets the umask decide the mode of a new file, like a plain open() would.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            with os.fdopen(fd, "wb") as handle:
                handle.write(text.encode("utf-8"))
            if info is not None:
                os.chmod(tmp, stat.S_IMODE(info.st_mode))
    except OSError as exc:
        # A folder made between the look above and the rename: the rename refuses it ("Is a
        # directory"; "Access is denied" on Windows). Said in the planning's words too.
        if path.is_dir() and not path.is_symlink():
            raise NotACaptionFile(path, folder=True) from exc
        raise


# Why an image is skipped after all: in skip mode every caption file it was to get was written
# while it was being captioned (another run, the gallery). One wording for every folder captioner.
WRITTEN_MEANWHILE = (
    "its caption file was written meanwhile (by another run, or saved in the gallery); left as it is"
)


def write_new_caption(path: Path, text: str) -> bool:
    """``skip`` mode's write: ``text`` as ``path`` unless it holds a caption now; whether written.

    A caption saved while the run captioned the image (another run, the gallery) stays, also
    one saved between this look and the write: a new file is published only where no file is
    (:func:`create_whole`). An empty file, which counts as no caption, is replaced as before,
    and so is every file where the file system has no hard links (its gap is a moment); a pipe
    is refused as :func:`write_atomic` refuses it."""
    if has_caption(path):
        return False
    if not os.path.lexists(path):
        with contextlib.suppress(OSError):  # no hard links here: the plain write below
            if create_whole(path, temp_path(path), text.encode("utf-8")):
                return True
        if has_caption(path):
            return False
    write_atomic(path, text)
    return True


def _writable(path: Path, mode: int) -> bool:
    """Whether we may rewrite ``path`` in place: a write bit at all (root passes ``os.access``
    whatever the bits say) and, for anyone else, write access of our own."""
    return bool(mode & 0o222) and os.access(path, os.W_OK)
