"""Inputs → a stream of :class:`Record`: image files, folders, path lists, Parquet, WebDataset.

Every reader streams: a folder is listed one directory at a time, a Parquet file read in small
row batches, a tar shard read member by member, so a run over millions of images starts at once
and holds only what is in flight. Whatever a reader can tell is wrong (a broken symlink, a
corrupt row, a truncated shard) becomes a record with an ``error``, never an exception: one bad
input must not stop the run.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vision_server.bulk.listed_clashes import ListedClashes, find_clashes
from vision_server.bulk.records import Record, safe_text
from vision_server.captionfiles import (
    CaseProbe,
    CaseRules,
    describe_os_error,
    file_problem,
    folds_case,
    is_hidden,
    is_image,
    is_listed_image,
    remove_stale_temps,
    sharing_stems,
)
from vision_server.parquet_images import (
    ColumnKind,
    ImageColumnError,
    excerpt,
    image_column,
    none_exists,
    paths_problem,
)

InputKind = Literal["file", "folder", "list", "parquet", "webdataset"]
WEBDATASET_IMAGES = ("jpg", "jpeg", "png", "webp")
KEY_COLUMNS = ("__key__", "key")  # taken as the key column when --key-column is not given
_PARQUET_ROWS = 64  # rows per read: small, so a table of large images stays within memory


@dataclass(frozen=True)
class ReadOptions:
    recursive: bool = True
    image_column: str | None = None  # Parquet: image bytes (or HF Image struct) or a path column
    key_column: str | None = None  # Parquet: the column that names each row
    # Folders: delete our caption temp files a killed run left (captionfiles.remove_stale_temps)
    # from each folder as it is listed; only for runs that write caption files there.
    tidy: bool = False
    # Whether a folder's file system folds case (b.txt is B.txt), asked once per folder and run
    # where two stems differ in case alone: the file system itself (captionfiles.folds_case), or
    # in tests the answer of a disk this machine cannot mount.
    case_probe: CaseProbe = folds_case


class InputError(ValueError):
    """An input the run cannot use at all (bad usage: missing path, unknown kind, no such column)."""


def input_kind(path: Path) -> InputKind:
    name = path.name.lower()
    if path.is_dir():
        return "folder"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".txt", ".jsonl")):
        return "list"
    if is_image(path):
        return "file"
    raise InputError(f"{path}: not an image, folder, .txt/.jsonl list, .parquet file or .tar shard")


def check_inputs(inputs: Iterable[Path], options: ReadOptions) -> dict[Path, InputKind]:
    """Each input's kind, or :class:`InputError` for what is bad usage rather than bad data."""
    kinds: dict[Path, InputKind] = {}
    for path in inputs:
        if not path.exists() and not path.is_symlink():
            raise InputError(f"{path}: no such file or folder")
        kinds[path] = input_kind(path)
        if kinds[path] == "parquet":
            _check_parquet(path, options)
        elif kinds[path] == "list":
            _check_list(path)
    return kinds


def _check_list(path: Path) -> None:
    """Refuse a ``.txt``/``.jsonl`` list none of whose lines names an existing file.

    Such a list is not a list of this dataset's images: a caption file (``caption dataset/*``
    takes ``cat.txt`` too), a JSONL of captions, or a list moved away from its images. Said
    once, as bad usage, instead of one "no such file" failure per line. Read only up to the
    first line that names a file, so a real list costs a look at its first line.
    """
    lines, paths, first = 0, 0, ""

    def listed_paths() -> Iterator[str]:
        nonlocal lines, paths, first
        for _, entry, listed in _list_entries(path):
            lines += 1
            first = first or entry
            if listed is not None:
                paths += 1
                yield os.path.expanduser(entry)

    try:
        missing = none_exists(path, listed_paths())
    except OSError as error:
        raise InputError(f"{path}: cannot read the list ({error.strerror or error})") from error
    if lines == 0 or (missing is None and paths > 0):
        return
    raise InputError(
        f"{path}: none of its lines names an existing file ({lines} line{'s' * (lines != 1)}; the "
        f"first is {excerpt(first)}); "
        "a .txt or .jsonl input is a list of image paths, one a line, relative to the list's "
        "folder. Is it a caption file, or captions? Give the images or their folder instead"
    )


def distinct_inputs(
    inputs: Sequence[Path], kinds: dict[Path, InputKind], recursive: bool
) -> tuple[tuple[Path, ...], list[tuple[Path, Path]]]:
    """``inputs`` without the folders and images another input already gives, and what was left
    out: (the input, the one that gives its images).

    ``caption data data/sub``, or a folder named twice, would caption those images twice: twice
    the work, and in ``append`` mode the caption twice in one file. Paths are compared with
    their symlinks resolved, as the folder reader reaches them (it enters no symlinked folder,
    so whatever lies below a folder's resolved path is listed with it, but for hidden names:
    ``caption data data/.cache`` captions both). Lists, Parquet files and tar shards are taken
    as they are.

    Each input names the first other input (in the order given) that gives its images: an
    earlier one of the same kind and place that is itself kept, or a folder above it (an
    earlier one only when kept). The places are looked up by path, so ``caption data/*.png``
    with tens of thousands of images costs one lookup per folder above each image, not a
    comparison with every other input.
    """
    parents: dict[Path, Path] = {}  # each file's folder, resolved once however many files it has
    places = [
        _place(path, kinds[path], parents) if kinds[path] in ("folder", "file") else None for path in inputs
    ]
    folders: dict[Path, list[int]] = {}  # a folder input's place -> their indexes, in order
    for index, (path, place) in enumerate(zip(inputs, places, strict=True)):
        if place is not None and kinds[path] == "folder":
            folders.setdefault(place, []).append(index)
    first_kept: dict[tuple[Path, str], int] = {}  # (place, kind) -> its first input not left out
    covered: dict[int, int] = {}
    for index, (path, place) in enumerate(zip(inputs, places, strict=True)):
        if place is None:
            continue
        found: list[int] = []
        same = first_kept.get((place, kinds[path]))
        if same is not None:  # the same folder or file again: the first one stays
            found.append(same)
        if recursive:
            above: Iterable[Path] = place.parents
        else:
            above = (place.parent,) if kinds[path] == "file" else ()
        reach = _listed_from(place)
        for top in above:
            if len(top.parts) < reach:
                break  # a hidden name lies between: the folder does not list this place
            given = folders.get(top)
            if given is not None:
                # an earlier one counts only when kept; a later one is not decided yet
                found.extend(other for other in given if other > index or other not in covered)
        if found:
            covered[index] = min(found)
        else:
            first_kept.setdefault((place, kinds[path]), index)
    kept = tuple(path for index, path in enumerate(inputs) if index not in covered)
    return kept, [(inputs[index], inputs[other]) for index, other in sorted(covered.items())]


def _listed_from(place: Path) -> int:
    """How many leading parts a folder above ``place`` has at least if listing it reaches
    ``place``: one past the last hidden name in it (0 when none is hidden)."""
    return max((index + 1 for index, part in enumerate(place.parts) if is_hidden(part)), default=0)


def _place(path: Path, kind: InputKind, parents: dict[Path, Path] | None = None) -> Path:
    """Where ``path``'s images are: a folder's own resolved path, or a file's resolved folder
    and its own name (its caption file goes beside the name it is listed by). ``parents``
    keeps the files' folders resolved so far (many files share one)."""
    absolute = Path(os.path.abspath(path))
    if kind == "folder":
        return absolute.resolve()
    parents = {} if parents is None else parents
    folder = parents.get(absolute.parent)
    if folder is None:
        folder = parents[absolute.parent] = absolute.parent.resolve()
    return folder / absolute.name


def iter_records(inputs: Iterable[Path], options: ReadOptions) -> Iterator[Record]:
    """Every image of every input, in order (folders sorted by name, depth first)."""
    inputs = list(inputs)
    listed = [path for path in inputs if input_kind(path) in ("file", "list") or _lists_paths(path, options)]
    clashes: list[ListedClashes] = []  # found when the first input of listed paths is reached
    case = CaseRules(options.case_probe)  # each folder's file system is asked once in a run

    def shared() -> ListedClashes:
        if not clashes:
            clashes.append(find_clashes(lambda: _listed_paths(listed, options), case))
        return clashes[0]

    for path in inputs:
        kind = input_kind(path)
        if kind == "folder":
            yield from _folder(path, options.recursive, tidy=options.tidy, case=case)
        elif kind == "file":
            yield Record(
                str(path), path.name, path=path, error=file_problem(path), stem_clash=shared().others(path)
            )
        elif kind == "list":
            yield from _path_list(path, shared())
        elif kind == "parquet":
            yield from _parquet(path, options, shared() if path in listed else None)
        else:
            yield from _webdataset(path)


def _listed_paths(inputs: Iterable[Path], options: ReadOptions) -> Iterator[tuple[str, str]]:
    """(as listed, its path) of every image file input, every entry of every path list and
    every row of a Parquet file's path column."""
    for path in inputs:
        if input_kind(path) == "file":
            yield str(path), str(path)
            continue
        if input_kind(path) == "parquet":
            yield from _parquet_paths(path, options)
            continue
        try:
            yield from (
                (entry, listed) for _number, entry, listed in _list_entries(path) if listed is not None
            )
        except OSError:
            continue  # an unreadable list is reported when it is read for captioning


def count_images(inputs: Iterable[Path], options: ReadOptions) -> int | None:
    """How many records :func:`iter_records` will give, when knowable cheaply (not for tar shards)."""
    total = 0
    for path in inputs:
        kind = input_kind(path)
        if kind == "webdataset":
            return None
        if kind == "folder":
            total += sum(1 for _ in _folder(path, options.recursive))
        elif kind == "list":
            with path.open("rb") as handle:
                total += sum(1 for line in handle if line.strip())
        elif kind == "parquet":
            import pyarrow.parquet as pq

            try:
                total += pq.ParquetFile(path).metadata.num_rows
            except Exception:
                total += 1  # reported as one failed record
        else:
            total += 1
    return total


# --- files and folders ---------------------------------------------------------------------------


def _folder(
    root: Path, recursive: bool, *, tidy: bool = False, case: CaseRules | None = None
) -> Iterator[Record]:
    """Images under ``root``, one directory listing at a time; symlinked folders are not entered
    (no loops), symlinked files are followed; hidden names below ``root`` are no part of it
    (:func:`~vision_server.captionfiles.is_hidden`). With ``tidy``, stale caption temp files go from
    each folder listed (the listing is already there: no second walk of a big tree). ``case``
    tells the folders whose file system folds case (where ``b.jpg`` and ``B.png`` share a
    caption file); without it, only a count is wanted, so no probe."""
    source = str(root)
    case = case or CaseRules(lambda _folder: False)

    def visit(folder: Path) -> Iterator[Record]:
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as exc:
            key = folder.relative_to(root).as_posix()
            yield Record(source, key, path=folder, error=f"cannot list folder: {describe_os_error(exc)}")
            return
        if tidy:
            remove_stale_temps(folder, (entry.name for entry in entries))
        images = [e for e in entries if is_listed_image(e.name) and not _is_real_dir(e)]
        stems = sharing_stems([entry.name for entry in images], folder, case)
        for entry in images:
            path = Path(entry.path)
            others = [name for name in stems(entry.name) if name != entry.name]
            yield Record(
                source,
                path.relative_to(root).as_posix(),
                path=path,
                error=file_problem(path),
                stem_clash=tuple(safe_text(name) for name in others),
            )
        if recursive:
            for entry in entries:
                if _is_real_dir(entry) and not is_hidden(entry.name):
                    yield from visit(Path(entry.path))

    yield from visit(root)


def _is_real_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _path_list(list_path: Path, clashes: ListedClashes) -> Iterator[Record]:
    """A ``.txt`` (one path a line) or ``.jsonl`` (a string, or an object with ``path``/``file``/
    ``image``) list; relative paths are relative to the list's folder. ``clashes`` names the
    listed images that would share a caption file (:mod:`~vision_server.bulk.listed_clashes`)."""
    source = str(list_path)
    for number, entry, listed in _list_entries(list_path):
        if listed is None:
            yield Record(source, f"line {number}", error="not a path, nor an object with a 'path'")
            continue
        path = Path(listed)
        yield Record(source, entry, path=path, error=file_problem(path), stem_clash=clashes.others(path))


def _list_entries(list_path: Path) -> Iterator[tuple[int, str, str | None]]:
    """(line number, entry, its path) of each non-blank line; the path is None for a line that
    names no image. Strings, not Paths: the shared-caption check reads every line of a list."""
    base = os.fspath(list_path.parent)
    is_jsonl = list_path.name.lower().endswith(".jsonl")
    with list_path.open(encoding="utf-8", errors="surrogateescape") as handle:
        for number, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                continue
            entry = _list_entry(text) if is_jsonl else text
            if entry is None:
                yield number, text, None
                continue
            yield number, entry, os.path.join(base, os.path.expanduser(entry))  # an absolute one wins


def _list_entry(text: str) -> str | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, dict):
        value = next((value[k] for k in ("path", "file", "image") if isinstance(value.get(k), str)), None)
    return value if isinstance(value, str) and value else None


# --- Parquet -------------------------------------------------------------------------------------


def _image_column(schema: Any, wanted: str | None) -> tuple[str, ColumnKind]:
    """The image column by the rule ``vision-server train`` shares (:mod:`vision_server.parquet_images`)."""
    try:
        chosen = image_column(schema, wanted)
    except ImageColumnError as exc:
        hint = "; name one with --image-column" if wanted is None else ""
        raise InputError(f"{exc}{hint}") from None
    return chosen.name, chosen.kind


def image_column_note(path: Path, options: ReadOptions) -> str | None:
    """Which column a Parquet input's images are read from and why, when another could have been."""
    import pyarrow.parquet as pq

    if options.image_column is not None:
        return None
    try:
        note = image_column(pq.read_schema(path)).note
    except Exception:
        return None  # unreadable or no image column: reported as such elsewhere
    return f"{path}: {note}; --image-column picks another" if note else None


def _key_column(schema: Any, wanted: str | None) -> str | None:
    if wanted is not None:
        if wanted not in schema.names:
            raise InputError(f"no column {wanted!r} (columns: {', '.join(schema.names)})")
        return wanted
    return next((name for name in KEY_COLUMNS if name in schema.names), None)


def _check_parquet(path: Path, options: ReadOptions) -> None:
    """Column mistakes are usage errors; an unreadable file is bad data, reported while reading."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception:
        return
    try:
        column, kind = _image_column(schema, options.image_column)
        _key_column(schema, options.key_column)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    if kind != "path":
        return
    # A path column none of whose values names an existing file (a column named by hand that
    # holds the captions, say, or paths relative to another folder) is a usage error said once,
    # as train says it, not one "no such file" failure per row. A real path column costs a look
    # at its first value.
    problem = paths_problem(path, column, _column_values(path, column))
    if problem is None:
        return
    if options.image_column is not None:
        raise InputError(f"--image-column {options.image_column!r}: {path}: {problem}")
    raise InputError(f"{path}: {problem}; relative paths are read from the table's folder")


def _column_values(path: Path, column: str) -> Iterator[Any]:
    """The values of one column, a row batch at a time (read only as far as they are wanted)."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        for batch in table.iter_batches(batch_size=4096, columns=[column]):
            yield from batch.column(column).to_pylist()
    except Exception:
        return  # unreadable pages: reported while reading for captioning


def _lists_paths(path: Path, options: ReadOptions) -> bool:
    """Whether ``path`` is a Parquet file whose image column holds paths (caption files go
    beside them, so they take part in the shared-caption check as list entries do)."""
    if input_kind(path) != "parquet":
        return False
    import pyarrow.parquet as pq

    try:
        return _image_column(pq.read_schema(path), options.image_column)[1] == "path"
    except Exception:
        return False  # unreadable or no such column: reported while reading


def _parquet_paths(path: Path, options: ReadOptions) -> Iterator[tuple[str, str]]:
    """(as listed, its path) of each row of a path column, resolved as :func:`_parquet_record`
    resolves them; only that column is read."""
    import pyarrow.parquet as pq

    base = os.fspath(path.parent)
    try:
        table = pq.ParquetFile(path)
        column = _image_column(table.schema_arrow, options.image_column)[0]
        for batch in table.iter_batches(batch_size=4096, columns=[column]):
            for value in batch.column(column).to_pylist():
                if isinstance(value, str) and value:
                    yield value, os.path.join(base, value)
    except Exception:
        return  # reported while reading for captioning


def _parquet(path: Path, options: ReadOptions, clashes: ListedClashes | None = None) -> Iterator[Record]:
    import pyarrow.parquet as pq

    source = str(path)
    try:
        table = pq.ParquetFile(path)
        image_column, kind = _image_column(table.schema_arrow, options.image_column)
        key_column = _key_column(table.schema_arrow, options.key_column)
    except Exception as exc:
        yield Record(source, "", error=f"cannot read the Parquet file ({_short(exc)})")
        return
    columns = [image_column] + ([key_column] if key_column and key_column != image_column else [])
    row = 0
    try:
        for batch in table.iter_batches(batch_size=_PARQUET_ROWS, columns=columns):
            values = batch.column(image_column).to_pylist()
            keys = batch.column(key_column).to_pylist() if key_column else [None] * len(values)
            for value, key in zip(values, keys, strict=True):
                yield _parquet_record(source, path.parent, row, value, key, kind, clashes)
                row += 1
    except Exception as exc:
        yield Record(source, f"row {row}", error=f"rows from {row} on cannot be read ({_short(exc)})")


def _parquet_record(
    source: str,
    base: Path,
    row: int,
    value: Any,
    key: Any,
    kind: ColumnKind,
    clashes: ListedClashes | None = None,  # for a path column: its images sharing a caption file
) -> Record:
    name = str(key) if key is not None else None
    if kind == "struct" and isinstance(value, dict):
        if value.get("bytes"):
            value = value["bytes"]
        else:
            kind, value = "path", value.get("path")
    if kind == "path":
        if not isinstance(value, str) or not value:
            return Record(source, name or str(row), error=f"row {row} has no image path")
        listed = Path(value)
        path = listed if listed.is_absolute() else base / listed
        clash = clashes.others(path) if clashes is not None else ()
        return Record(source, name or value, path=path, error=file_problem(path), stem_clash=clash)
    if not isinstance(value, bytes) or not value:
        return Record(source, name or str(row), error=f"row {row} has no image bytes")
    return Record(source, name or str(row), data=value)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# --- WebDataset ----------------------------------------------------------------------------------


def _webdataset(path: Path) -> Iterator[Record]:
    """Samples of a WebDataset shard: members sharing a ``__key__`` (the name up to the first dot
    of its file name) are one sample; its first jpg/jpeg/png/webp member is the image."""
    source = str(path)
    key: str | None = None
    image: bytes | None = None
    try:
        with tarfile.open(path, mode="r|*", tarinfo=_StrictTarInfo) as shard:
            for member in shard:
                if not member.isfile():
                    continue
                member_key, extension = _split_member(member.name)
                if member_key != key:
                    if key is not None:
                        yield _sample(source, key, image)
                    key, image = member_key, None
                if image is None and extension in WEBDATASET_IMAGES:
                    handle = shard.extractfile(member)
                    image = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        if key is not None and image is not None:
            yield _sample(source, key, image)
        after = f" after sample {safe_text(key)!r}" if key is not None else ""
        yield Record(source, key or "", error=f"the shard is corrupt or truncated{after} ({_short(exc)})")
        return
    if key is not None:
        yield _sample(source, key, image)


class _StrictTarInfo(tarfile.TarInfo):
    """A header reader that calls a damaged end of the shard damage.

    ``tarfile`` ends the iteration quietly, as if the archive were complete, when a header after
    the first is cut short, missing (the file stops between members) or garbage: a shard cut by
    an interrupted download or copy would lose its remaining samples without a word. Only the
    end-of-archive block of zeros ends a shard here; anything else raises :class:`tarfile.ReadError`.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> _StrictTarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except _EOF_HEADER:
            raise  # the end-of-archive marker: a complete shard
        except _EMPTY_HEADER:
            if tarfile_.offset == 0:
                raise tarfile.ReadError("empty file") from None
            raise tarfile.ReadError("unexpected end of data (no end-of-archive marker)") from None
        except _TRUNCATED_HEADER:
            raise tarfile.ReadError("unexpected end of data in a member header") from None
        except _INVALID_HEADER as exc:
            raise tarfile.ReadError(f"damaged member header ({exc})") from None


# tarfile's header errors (not in its public API, nor in typeshed), as fromtarfile raises them.
_EOF_HEADER: type[Exception] = getattr(tarfile, "EOFHeaderError")  # noqa: B009
_EMPTY_HEADER: type[Exception] = getattr(tarfile, "EmptyHeaderError")  # noqa: B009
_TRUNCATED_HEADER: type[Exception] = getattr(tarfile, "TruncatedHeaderError")  # noqa: B009
_INVALID_HEADER: type[Exception] = getattr(tarfile, "InvalidHeaderError")  # noqa: B009


def _split_member(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _sample(source: str, key: str, image: bytes | None) -> Record:
    if image is None:
        return Record(source, key, error=f"no {'/'.join(WEBDATASET_IMAGES)} member in the sample")
    return Record(source, key, data=image)
