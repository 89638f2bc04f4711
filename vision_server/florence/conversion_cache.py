"""Keep one converted copy per source, so only the first load of an original-layout model pays for conversion.

Split from the converters because caching is a separate concern: fingerprinting a source, converting
into a private temp dir, publishing it with an atomic rename, and cleaning up after crashes. This
module imports the converters (`convert`, `adapters`); they never import it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from vision_server.errors import ModelSourceError
from vision_server.florence.adapters import adapter_layout, adapter_weights_file, convert_adapter
from vision_server.florence.convert import CONVERSIONS, convert_checkpoint, detect_layout, read_weight_file

logger = logging.getLogger(__name__)

# Bump when the converter's output changes, so cached conversions are redone.
CONVERTER_VERSION = 1
STALE_TEMP_SECONDS = 24 * 3600


def conversions_performed() -> int:
    """Number of checkpoint and adapter conversions run in this process."""
    return CONVERSIONS.value


def ensure_native(src: Path, cache_dir: Path) -> Path:
    """``src`` itself when native; otherwise a cached native copy, converted only if missing."""
    src = Path(src)
    if detect_layout(src) == "native":
        return src
    return _cached(src, Path(cache_dir), convert_checkpoint, kind="conversion")


def cached_native(src: Path, cache_dir: Path) -> Path | None:
    """What :func:`ensure_native` would return if that needs no conversion, else None (no work done)."""
    src = Path(src)
    if detect_layout(src) == "native":
        return src
    target = _entry(src, Path(cache_dir))
    return target if target.is_dir() else None


def ensure_native_adapter(adapter_dir: Path, cache_dir: Path) -> Path:
    """A PEFT adapter with native key names: ``adapter_dir`` itself, or a cached renamed copy."""
    adapter_dir = Path(adapter_dir)
    weights = adapter_weights_file(adapter_dir)
    if adapter_layout(read_weight_file(weights)) == "native":
        return adapter_dir
    return _cached(adapter_dir, Path(cache_dir), convert_adapter, kind="adapter conversion")


def _cached(src: Path, cache_dir: Path, convert: Callable[[Path, Path], Path], *, kind: str) -> Path:
    """Look up or create ``cache_dir/<name>-<fingerprint>``; the entry appears atomically by rename."""
    target = _entry(src, cache_dir)
    if target.is_dir():
        logger.info("using cached %s %s for %s", kind, target, src)
        return target
    temp = _new_temp_dir(cache_dir, target.name)
    try:
        convert(src, temp)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return _publish(temp, target, src, kind)


def _entry(src: Path, cache_dir: Path) -> Path:
    return cache_dir / f"{_safe_name(src)}-{source_fingerprint(src)[:16]}"


def _new_temp_dir(cache_dir: Path, name: str) -> Path:
    """An empty private directory next to the final entry, so the last step is a same-disk rename."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_dirs(cache_dir)
        return Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=cache_dir))
    except OSError as error:
        raise ModelSourceError(
            f"cannot write to the cache directory {cache_dir} ({error}); choose a writable cache directory"
        ) from error


def _publish(temp: Path, target: Path, src: Path, kind: str) -> Path:
    """Rename the finished conversion into place; if another process won the race, use its copy."""
    try:
        os.rename(temp, target)
    except OSError as error:
        shutil.rmtree(temp, ignore_errors=True)
        if not target.is_dir():
            raise ModelSourceError(f"cannot create the cache entry {target} ({error})") from error
        logger.info("using cached %s %s for %s (made by another process)", kind, target, src)
    return target


def source_fingerprint(src: Path) -> str:
    """Hash of the resolved path and the name, size and mtime of every file: any change means a new entry."""
    digest = hashlib.sha256(f"v{CONVERTER_VERSION}\0{src.resolve()}".encode())
    for path in sorted(src.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        stat = path.stat()
        digest.update(f"\0{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _safe_name(src: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", src.resolve().name) or "model"


def _remove_stale_temp_dirs(cache_dir: Path) -> None:
    """Temp dirs left by a crashed conversion; a day old means nobody is still writing them."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for path in cache_dir.glob(".*.tmp"):
        try:
            if path.is_dir() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue
