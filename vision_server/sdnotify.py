"""systemd's ``sd_notify`` protocol without libsystemd: one datagram to ``$NOTIFY_SOCKET``.

With ``Type=notify`` systemd waits for ``READY=1`` before it counts the service as started (so
units ordered after it, and ``systemctl start`` itself, wait until the port is open), shows
``STATUS=`` in ``systemctl status``, and learns from ``STOPPING=1`` that the drain has begun.
Outside systemd (no ``NOTIFY_SOCKET``, or Windows) every call is a cheap no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def socket_address(value: str) -> str:
    """systemd writes abstract-namespace sockets with a leading ``@``; the kernel wants a NUL byte."""
    return "\0" + value[1:] if value.startswith("@") else value


class Notifier:
    """Sends state changes to the service manager named by ``address`` (None: do nothing)."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        environ = os.environ if environ is None else environ
        return cls(environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None and hasattr(socket, "AF_UNIX")

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; False (never an exception) when it cannot."""
        if not self.enabled or not assignments:
            return False
        assert self.address is not None
        payload = "\n".join(assignments).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(socket_address(self.address))
                sock.sendall(payload)
        except OSError as exc:
            log.debug("sd_notify to %s failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")
