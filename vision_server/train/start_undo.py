"""What a training run's start made before its first write, taken away again when the start fails.

A run locks ``--output`` before its (slow) model load, making the folders above a new nested
``--output`` for the lock file to go in. When the start then fails (the model cannot be loaded,
a check after the lock, a second Ctrl+C) nothing was trained, and the disk is left as it was
found: the lock file and the folders this start made go, and nothing that was there before (an
earlier run's lock file or folders, or a folder another run made meanwhile) is touched.
"""

from __future__ import annotations

from pathlib import Path

from vision_server.output_lock import remove_lock_file


class StartUndo:
    """The folders and lock files one start made, in the order it made them."""

    def __init__(self) -> None:
        self.folders: list[Path] = []
        self.lock_files: list[Path] = []  # filled by output_lock.holding(..., made=...)
        self._failed = False

    def make_folders(self, folder: Path) -> None:
        """Make ``folder`` and the missing folders above it, one at a time, noting each one this
        start made (not one that another run made a moment before). Raises ``OSError``."""
        missing = []
        while not folder.is_dir() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        for path in reversed(missing):  # the topmost first
            try:
                path.mkdir()
            except FileExistsError:
                if not path.is_dir():
                    raise
                continue
            self.folders.append(path)

    def undo(self) -> None:
        """The start failed: remove the lock files now (call it while they are still held), and
        the folders at :meth:`remove_folders`."""
        for lock_file in self.lock_files:
            remove_lock_file(lock_file)
        self.lock_files.clear()
        self._failed = True

    def remove_folders(self) -> None:
        """After a failed start (:meth:`undo`), once its lock is let go (on Windows the lock file
        goes only then): the folders made, the deepest first. A folder that is not empty (another
        run's lock file in it) stays, and so do the ones above it. Nothing when the start did
        not fail."""
        if not self._failed:
            return
        for folder in reversed(self.folders):
            try:
                folder.rmdir()
            except OSError:
                break
        self.folders.clear()
