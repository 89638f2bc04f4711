"""Image bytes → pixels at the model's size, in worker processes so the GIL never starves the
model thread. Everything here is a top-level function over picklable values.

The worker reads the file itself (a path is cheaper to send than its bytes); images from tables
and tar shards arrive as bytes. A full-size decode lives only inside
:func:`vision_server.images.prepare_image`; what comes back is the model-size
:class:`~vision_server.images.PreparedImage` a queued job holds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

from vision_server.bulk.records import Record
from vision_server.captionfiles import describe_os_error
from vision_server.errors import InvalidImage, VisionServerError
from vision_server.images import LOCAL_FILE, STORED, PixelSpec, PreparedImage, prepare_image

PARENT_CHECK_SECONDS = 0.5


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold back SIGINT in this thread while it may start a worker (creating the pool, submitting).

    Ctrl+C reaches the whole process group, and a worker spends its first second or so importing
    the package before :func:`worker_init` can ignore it: each worker then died with a
    KeyboardInterrupt traceback. A new process inherits the blocked mask, so it never sees the
    signal; the parent gets it as soon as the mask is restored. (No signal masks on Windows.)
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def worker_init() -> None:
    """Ctrl+C reaches the whole process group: the parent decides how to stop, not the workers.

    A worker also exits when its parent is gone: after a ``kill -9`` nobody else would end it,
    and it would keep the parent's stdout and stderr open for ever.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    threading.Thread(target=_exit_with, args=(parent,), name="parent-watch", daemon=True).start()


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(0)


def prepare_record(record: Record, spec: PixelSpec, max_pixels: int) -> PreparedImage | str:
    """The record's image resized to ``spec``, or the reason it cannot be captioned."""
    try:
        if record.data is not None:
            data, source = record.data, STORED
        elif record.path is not None:
            data, source = record.path.read_bytes(), LOCAL_FILE
        else:
            return "the record has neither a file nor image bytes"
        # Nobody sent these bytes: a refusal speaks about the file, not about what to send.
        return prepare_image(data, spec, max_pixels=max_pixels, source=source)
    except InvalidImage as exc:  # "PATH: the file is empty (0 bytes)", as the folder clients say
        return exc.reason
    except VisionServerError as exc:
        return exc.message
    except OSError as exc:
        return describe_os_error(exc)
    except Exception as exc:  # a decoder bug must not take the whole run down
        return f"cannot decode the image ({type(exc).__name__}: {exc})"
