"""The gallery's view of a dataset folder: its images, each image's caption sources, search, pages.

The folder is listed with the dataset captioner's own reader (same images, same order, symlinked
folders not entered) and the listing is kept for a few seconds, so paging and searching do not
walk the tree on every click; a save or a fresh caption is seen at once, since caption files are
read through a cache that checks their mtime. Image files whose symlinks lead out of the root are
left out: the gallery never shows or touches anything outside its folder.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vision_server.bulk.readers import ReadOptions, iter_records
from vision_server.captionfiles import (
    CaseProbe,
    CaseRules,
    folds_case,
    printable,
    shared_caption_reason,
    write_atomic,
)
from vision_server.gallery.jsonl import JsonlCaptions
from vision_server.gallery.paths import beside, is_clean_relative, is_under, url_form
from vision_server.gallery.sidecars import (
    PRIMARY,
    TextCache,
    by_stem,
    is_caption_suffix,
    primary_first,
    sidecar_path,
)

RESCAN_AFTER = 5.0  # seconds a folder listing is trusted (longer for folders slow to list)
RESCAN_ON_MISS_AFTER = 1.0  # an unknown path lists again, at most this often (404s stay cheap)
LISTING_SHARE = 0.1  # listing again takes at most this share of the time, however big the folder
MAX_FRESH = 10_000  # images whose fresh model captions are remembered
Field = Literal["all", "name", "caption"]
Has = Literal["any", "with", "without"]


@dataclass(frozen=True)
class Entry:
    key: str  # path relative to the root, "/" between folders
    path: Path  # root / key, symlinks not resolved
    sidecars: tuple[str, ...]  # caption suffixes present when listed (".txt", ".tags", ...)
    # the other images of its folder with the same stem: they share every caption file of it
    stem_clash: tuple[str, ...] = ()


@dataclass(frozen=True)
class Query:
    text: str = ""
    field: Field = "all"
    has: Has = "any"  # with or without a .txt caption


@dataclass(frozen=True)
class Source:
    name: str  # ".txt", ".tags", "jsonl", "jsonl <CAPTION>", "<CAPTION>"
    kind: Literal["sidecar", "jsonl", "model"]
    text: str | None  # None: no such file yet (the .txt slot is always shown)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "text": self.text}


class Catalog:
    """One dataset folder. Blocking file work: call from a thread (the API layer does)."""

    def __init__(
        self,
        root: Path,
        *,
        writable: bool,
        page_size: int,
        jsonl: Path | None = None,
        case_probe: CaseProbe = folds_case,
    ) -> None:
        self.root = root
        self.real_root = root.resolve()
        self.writable = writable
        self.page_size = page_size
        self.jsonl = JsonlCaptions(jsonl, root) if jsonl is not None else None
        self._texts = TextCache()
        self._entries: dict[str, Entry] = {}
        self._listed_at = -math.inf
        self._listing_seconds = 0.0  # how long the last listing took
        self._fresh: OrderedDict[str, dict[str, str]] = OrderedDict()  # key -> task -> caption
        # Whether a folder's file system folds case (cat.txt is Cat.txt there), asked once per
        # folder for the catalog's life, and only where an answer is needed.
        self._case = CaseRules(case_probe)

    # --- listing -----------------------------------------------------------------------------------

    def entries(self, *, rescan: bool = False) -> dict[str, Entry]:
        if rescan or self._age() > max(RESCAN_AFTER, self._listing_seconds / LISTING_SHARE):
            started = time.monotonic()
            self._entries = dict(self._scan())
            self._listed_at = time.monotonic()
            self._listing_seconds = self._listed_at - started
        return self._entries

    def _age(self) -> float:
        return time.monotonic() - self._listed_at

    def _scan(self) -> Iterable[tuple[str, Entry]]:
        folders: dict[Path, _FolderCaptions] = {}
        # A writable gallery saves caption files here, so it also sweeps a crash's temp files.
        read = ReadOptions(recursive=True, tidy=self.writable, case_probe=self._case.folds)
        for record in iter_records([self.root], read):
            if record.path is None or record.error is not None or not is_clean_relative(record.key):
                continue
            if os.path.islink(record.path) and not is_under(record.path, self.real_root):
                continue  # a symlink out of the dataset
            folder = record.path.parent
            if folder not in folders:
                try:
                    folders[folder] = _FolderCaptions(by_stem(os.listdir(folder)))
                except OSError:
                    folders[folder] = _FolderCaptions({})
            sidecars = folders[folder].of(record.path.stem, functools.partial(self._case.folds, folder))
            yield record.key, Entry(record.key, record.path, sidecars, record.stem_clash)

    def find(self, key: str) -> Entry | None:
        """The listed image ``key`` names, still under the root now; None for anything else."""
        if not is_clean_relative(key):
            return None
        entries = self.entries()
        if key not in entries and self._age() > max(
            RESCAN_ON_MISS_AFTER, self._listing_seconds / LISTING_SHARE
        ):
            entries = self.entries(rescan=True)  # a file added since the last listing
        entry = entries.get(key)
        if entry is None or not is_under(entry.path, self.real_root):
            return None
        return entry

    # --- captions ----------------------------------------------------------------------------------

    def sources(self, entry: Entry) -> list[Source]:
        """Every caption of ``entry``: sidecar files (``.txt`` always), the JSONL, model captions."""
        suffixes = entry.sidecars if PRIMARY in entry.sidecars else (PRIMARY, *entry.sidecars)
        found = [Source(s, "sidecar", self._read_sidecar(entry, s)) for s in suffixes]
        if self.jsonl is not None:
            rows = self.jsonl.captions().get(entry.key, {})
            found += [Source(name, "jsonl", text) for name, text in rows.items()]
        found += [Source(task, "model", text) for task, text in self._fresh.get(entry.key, {}).items()]
        return found

    def _read_sidecar(self, entry: Entry, suffix: str) -> str | None:
        path = sidecar_path(entry.path, suffix)
        if os.path.islink(path) and not is_under(path, self.real_root):
            return None
        return self._texts.read(path)

    def remember(self, key: str, task: str, text: str) -> None:
        """A fresh model caption, shown as a source until the server restarts."""
        captions = self._fresh.pop(key, {})
        captions.pop(task, None)
        captions[task] = text  # the newest last
        self._fresh[key] = captions
        while len(self._fresh) > MAX_FRESH:
            self._fresh.popitem(last=False)

    def shared_file(self, entry: Entry, suffix: str) -> str | None:
        """Why ``entry``'s caption file may not be written (another image of its folder has the
        same stem, so a trainer pairs the file with both), or None: the rule of every dataset
        tool (:func:`~vision_server.captionfiles.shared_caption_reason`), each file named
        relative to the root as the image is (``sub/a.txt``, not ``a.txt``)."""
        if not entry.stem_clash:
            return None
        caption = beside(entry.key, sidecar_path(entry.path, suffix).name)
        return shared_caption_reason([caption], [beside(entry.key, name) for name in entry.stem_clash])

    def save(self, entry: Entry, suffix: str, text: str) -> Path:
        """Replace one caption file atomically (the caller has checked the gallery is writable
        and :meth:`shared_file`)."""
        if not is_caption_suffix(suffix):
            raise ValueError(f"{suffix!r} is not a caption file suffix (.txt, .caption, .tags, .<name>.txt)")
        target = sidecar_path(entry.path, suffix)
        write_atomic(target, text)
        if suffix not in entry.sidecars and entry.key in self._entries:  # a new caption file
            suffixes = primary_first((*entry.sidecars, suffix))
            self._entries[entry.key] = dataclasses.replace(entry, sidecars=suffixes)
        return target

    # --- search and pages --------------------------------------------------------------------------

    def matches(self, entry: Entry, query: Query) -> bool:
        sources = self.sources(entry) if query.text or query.has != "any" else []
        if query.has != "any":
            primary = next((s.text for s in sources if s.name == PRIMARY), None)
            if (query.has == "with") != bool(primary and primary.strip()):
                return False
        if not query.text:
            return True
        needle = query.text.casefold()
        if query.field in ("all", "name") and needle in entry.key.casefold():
            return True
        return query.field in ("all", "caption") and any(
            s.text is not None and needle in s.text.casefold() for s in sources
        )

    def page(self, number: int, query: Query) -> dict[str, Any]:
        """One page of the images matching ``query`` (page numbers from 1; past the end: the last)."""
        found = [entry for entry in self.entries().values() if self.matches(entry, query)]
        pages = max(1, math.ceil(len(found) / self.page_size))
        number = min(max(1, number), pages)
        shown = found[(number - 1) * self.page_size : number * self.page_size]
        return {
            "total": len(found),
            "all": len(self.entries()),
            "page": number,
            "pages": pages,
            "page_size": self.page_size,
            "items": [self.item(entry) for entry in shown],
        }

    def item(self, entry: Entry) -> dict[str, Any]:
        """One image for the page: ``path`` (the key; JSON bodies name the image by it), ``name``
        to show (bytes of a name that is not UTF-8 as ``\\xNN``), ``ref`` for URLs."""
        return {
            "path": entry.key,
            "name": printable(entry.key),
            "ref": url_form(entry.key),
            "sources": [source.as_dict() for source in self.sources(entry)],
        }

    def export_row(self, entry: Entry) -> dict[str, Any]:
        """A ``metadata.jsonl`` row (``file_name``, ``caption``) with every source beside it.

        ``caption`` is the ``.txt`` file's text, else the newest model caption, else the JSONL's.
        """
        sources = self.sources(entry)
        by_kind = {kind: [s for s in sources if s.kind == kind and s.text is not None] for kind in
                   ("sidecar", "model", "jsonl")}  # fmt: skip
        primary = next((s.text for s in by_kind["sidecar"] if s.name == PRIMARY), None)
        if primary is None and by_kind["model"]:
            primary = by_kind["model"][-1].text
        if primary is None and by_kind["jsonl"]:
            primary = by_kind["jsonl"][0].text
        return {
            "file_name": entry.key,
            "caption": primary,
            "sources": {s.name: s.text for s in sources if s.text is not None},
        }


class _FolderCaptions:
    """One folder's caption files by image stem (:func:`by_stem`), for one listing.

    Where the folder's file system folds case, ``cat.txt`` is the caption of ``Cat.jpg`` (the
    PowerShell script used to lower-case caption names, and the other dataset tools read and
    skip it there): a file whose stem differs in case alone counts too. The index by folded stem
    is built once per folder, when an image first has no caption of its exact stem.
    """

    def __init__(self, found: dict[str, tuple[str, ...]]) -> None:
        self._found = found
        self._any_case: dict[str, tuple[str, ...]] | None = None

    def of(self, stem: str, folds: Callable[[], bool]) -> tuple[str, ...]:
        """The caption suffixes of the image ``stem``; ``folds`` asks the file system, only when
        a caption file's stem differs from it in case alone."""
        exact = self._found.get(stem)
        if exact is not None:
            return exact
        if self._any_case is None:
            merged: dict[str, set[str]] = {}
            for name, suffixes in self._found.items():
                merged.setdefault(name.casefold(), set()).update(suffixes)
            self._any_case = {key: primary_first(found) for key, found in merged.items()}
        others = self._any_case.get(stem.casefold(), ())
        return others if others and folds() else ()
