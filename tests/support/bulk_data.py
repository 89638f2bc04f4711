"""Datasets for the ``vision-server caption`` tests: real image files, and the bad ones people have."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.support.images import image_bytes
from tests.support.processes import cli_command

NON_UTF8_NAME = b"caf\xe9 latin1.png"  # a Latin-1 name from an old archive: not valid UTF-8


def picture(seed: int, size: tuple[int, int] = (40, 32), fmt: str = "PNG") -> bytes:
    """The file bytes of ``images.noise(seed, size)`` in ``fmt``."""
    return image_bytes(seed, fmt, size)


def good_images(root: Path, count: int) -> dict[Path, bytes]:
    """``count`` real images in nested folders, with spaces and non-ASCII in the names."""
    folders = ["", "sub", "sub/deeper level", "ünïcödé ☕", "a/b/c"]
    written: dict[Path, bytes] = {}
    for n in range(count):
        folder = root / folders[n % len(folders)]
        folder.mkdir(parents=True, exist_ok=True)
        fmt, ext = (("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp"))[n % 3]
        name = [f"img {n:03d}", f"photo_{n:03d}", f"bild-{n:03d} ü"][n % 3] + ext
        data = picture(n, (24 + n % 17, 20 + n % 13), fmt)
        (folder / name).write_bytes(data)
        written[folder / name] = data
    return written


def messy_folder(root: Path, count: int) -> tuple[dict[Path, bytes], dict[str, str]]:
    """Good images plus one of every bad file; returns the good ones and {bad name: reason part}."""
    good = good_images(root, count)
    bad = root / "bad"
    bad.mkdir()
    (bad / "zero bytes.png").write_bytes(b"")
    (bad / "truncated.png").write_bytes(picture(1)[:60])
    (bad / "not an image.jpg").write_text("hello, I am text", encoding="utf-8")
    (bad / "broken link.png").symlink_to(bad / "missing-target.png")
    (bad / "loop.png").symlink_to(bad / "loop.png")
    (bad / "dup.jpg").write_bytes(picture(7, fmt="JPEG"))
    (bad / "dup.png").write_bytes(picture(8))
    locked = bad / "locked.png"
    locked.write_bytes(picture(9))
    locked.chmod(0)
    reasons = {
        # Offline nobody sends anything: the messages speak about the file.
        "zero bytes.png": "the file is empty (0 bytes)",
        "truncated.png": "decode",
        "not an image.jpg": "the file is not in a supported image format (PNG, JPEG,",
        "broken link.png": "broken symlink",
        "loop.png": "symlink loop",
        "dup.jpg": "dup.png",
        "dup.png": "dup.jpg",
    }
    if os.geteuid() != 0:  # root reads a mode-000 file anyway
        reasons["locked.png"] = "permission denied"
    else:
        good[locked] = picture(9)
    odd = os.path.join(os.fsencode(root / "sub"), NON_UTF8_NAME)
    with open(odd, "wb") as handle:
        handle.write(picture(10))
    good[Path(os.fsdecode(odd))] = picture(10)
    return good, reasons


def caption_command(*args: str | Path) -> list[str]:
    return [*cli_command(), "caption", *map(str, args)]


def cli_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISION_SERVER_")}
    env["XDG_CONFIG_HOME"] = str(tmp / "config")
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env
