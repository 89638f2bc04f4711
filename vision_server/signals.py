"""Turning stop requests from the OS into a call on the event loop, on POSIX and on Windows.

POSIX: SIGTERM (systemd, docker stop, kill) and SIGINT (Ctrl+C) through the loop's own signal
handling, and SIGHUP (the terminal closed, or a ``kill -HUP`` meant as a reload) too, so that
drains instead of killing the process with requests in flight; under ``nohup`` (SIGHUP ignored
when the process starts) it stays ignored.

Windows has no loop signal handlers; there the console's Ctrl+C and Ctrl+Break (what NSSM and
``taskkill`` send to a console program) arrive as SIGINT and SIGBREAK on the main thread, and the
handler hands them to the loop thread-safely.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import sys
from collections.abc import Callable
from types import FrameType

StopCallback = Callable[[int], None]


def stop_signals() -> tuple[signal.Signals, ...]:
    if sys.platform == "win32":
        return (signal.SIGINT, signal.SIGBREAK)  # type: ignore[attr-defined,unused-ignore]
    hangup = (signal.SIGHUP,) if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL else ()
    return (signal.SIGTERM, signal.SIGINT, *hangup)


def install_stop_handlers(loop: asyncio.AbstractEventLoop, callback: StopCallback) -> Callable[[], None]:
    """Call ``callback(signum)`` on ``loop`` for every stop signal; returns a function that undoes it."""
    signals = stop_signals()
    if sys.platform != "win32":
        for signum in signals:
            loop.add_signal_handler(signum, callback, int(signum))
        return functools.partial(_remove_loop_handlers, loop, signals)
    previous = {signum: signal.getsignal(signum) for signum in signals}
    handler = functools.partial(_forward_to_loop, loop, callback)
    for signum in signals:
        signal.signal(signum, handler)
    return functools.partial(_restore_handlers, previous)


def _forward_to_loop(
    loop: asyncio.AbstractEventLoop, callback: StopCallback, signum: int, frame: FrameType | None
) -> None:
    loop.call_soon_threadsafe(callback, signum)


def _remove_loop_handlers(loop: asyncio.AbstractEventLoop, signals: tuple[signal.Signals, ...]) -> None:
    for signum in signals:
        loop.remove_signal_handler(signum)


def _restore_handlers(previous: dict[signal.Signals, object]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)  # type: ignore[arg-type]
