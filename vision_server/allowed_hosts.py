"""Which ``Host`` names a server answers: the defence against DNS rebinding, without HTTP.

A web page on ``evil.example`` can make its own name resolve to ``127.0.0.1`` (DNS rebinding):
the visitor's browser then takes a server on loopback for the page's own origin and lets the page
read its answers. The one thing the browser cannot hide is the name it asked for: every request
carries ``Host: evil.example``. So a server that answers only the names it is known by stops the
attack, as Jupyter's local-host check and Vite's and webpack-dev-server's ``allowedHosts`` do.

These names always pass: ``localhost`` and ``*.localhost`` (browsers resolve them to loopback
themselves, RFC 6761), and every IP address literal. An address cannot be rebound: a page whose
origin is ``http://203.0.113.9`` reaches 203.0.113.9 and nothing else, so only a *name* can turn
a foreign page into the server's own origin. Letting addresses pass keeps ``http://127.0.0.1``,
``http://[::1]`` and, on a network, ``http://192.168.1.20`` working without a setting.

The check is on by default only when the server binds loopback (``127.0.0.1``, ``::1``,
``localhost``): that is the server a browser on the same machine can reach while no operator
set up a network service, the one DNS rebinding attacks. Bound elsewhere it is on only when
``--allowed-host`` names something. ``--allowed-host *`` turns it off.

Pure stdlib, no HTTP: the settings check the configured entries with it, and
:mod:`vision_server.api.host_check` applies it to requests.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from vision_server.trusted_proxies import parse_address

_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")


def host_name(header: str) -> str:
    """The name or address a ``Host`` header holds: lower-case, without the port, the IPv6
    brackets or a trailing dot (``Example.COM.:8080`` → ``example.com``, ``[::1]:80`` → ``::1``)."""
    text = header.strip().lower()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # name:port; a bare IPv6 address has at least two colons
        text = text.partition(":")[0]
    return text.rstrip(".")


def is_address(name: str) -> bool:
    """Whether ``name`` (as :func:`host_name` returns it) is an IP address literal."""
    return parse_address(name) is not None


def is_loopback_name(name: str) -> bool:
    """``localhost``, a ``*.localhost`` name, or a loopback address (127.0.0.0/8, ``::1``)."""
    name = host_name(name)
    if name == "localhost" or name.endswith(".localhost"):
        return True
    address = parse_address(name)  # also unwraps ::ffff:127.0.0.1 and drops an IPv6 zone
    return address is not None and address.is_loopback


def parse_entry(entry: str) -> str:
    """One ``--allowed-host`` entry, normalised: a name (``vision.example.com``), a domain with
    its subdomains (``.example.com``), its subdomains only (``*.example.com``), an address, or
    ``*``. Raises ValueError for anything a ``Host`` header could never match (a scheme, a port,
    a path), so a mistake stops the start instead of refusing every request."""
    text = entry.strip().lower()
    if text == "*":
        return text
    text = text.rstrip(".")
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if is_address(bare):
        return bare
    prefix = "*." if text.startswith("*.") else "." if text.startswith(".") else ""
    if not _NAME.fullmatch(text[len(prefix) :]):
        raise ValueError(
            f"{entry!r} is not a host name; write the name as it appears in the URL, without "
            "scheme, port or path: vision.example.com, .example.com for it and its subdomains, "
            "*.example.com for its subdomains only, or * to allow every name"
        )
    return text


@dataclass(frozen=True)
class AllowedHosts:
    """The names a server answers besides loopback names and addresses; ``enabled`` False: any."""

    entries: tuple[str, ...] = ()
    enabled: bool = False

    @classmethod
    def parse(cls, entries: Iterable[str], bind_host: str) -> AllowedHosts:
        """The check for a server bound to ``bind_host`` with these ``--allowed-host`` entries:
        on when they name something or the server binds loopback, off when one is ``*``.
        Raises ValueError naming the first entry that is no host name."""
        parsed = tuple(parse_entry(entry) for entry in entries)
        enabled = "*" not in parsed and (bool(parsed) or is_loopback_name(bind_host))
        return cls(parsed, enabled)

    def describe(self) -> str:
        """The names answered, for the start log: ``localhost, *.localhost, IP addresses`` and
        each ``--allowed-host`` entry as normalised (``.example.com``: it and its subdomains)."""
        always = "localhost, *.localhost, IP addresses"
        return f"{always}, {', '.join(self.entries)}" if self.entries else always

    def allows(self, header: str | None) -> bool:
        """Whether a request with this ``Host`` header is answered. A request without one passes:
        every browser sends it, so its absence is no page's doing (an HTTP/1.0 client, a probe)."""
        if not self.enabled or not header or not header.strip():
            return True
        name = host_name(header)
        if is_address(name) or is_loopback_name(name):
            return True
        return any(_matches(name, entry) for entry in self.entries)


def _matches(name: str, entry: str) -> bool:
    if entry.startswith("*."):
        return name.endswith(entry[1:])
    if entry.startswith("."):
        return name == entry[1:] or name.endswith(entry)
    return name == entry
