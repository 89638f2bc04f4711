"""Which peers may say who the client is, and who the client then is (``X-Forwarded-For``).

Behind a reverse proxy every connection comes from the proxy, so the address of the real client
is only in the header the proxy adds. That header is believed only from peers the operator named
(``--trusted-proxy``): anyone else could write any address into it. The walk goes from the right,
since each proxy appends the address it saw: the rightmost entry was written by our peer, the one
left of it by the proxy that entry names, and so on. The first address that is not a trusted proxy
is the client; whatever lies further left was written by that client and proves nothing.

Pure stdlib (``ipaddress``), no HTTP: the settings check the configured entries with it, and
:mod:`vision_server.api.proxies` applies it to requests.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_address(text: str) -> Address | None:
    """An address as proxies write it, or None when it is none.

    Accepts ``203.0.113.7``, ``2001:db8::1``, and the forms with a port some proxies write
    (``203.0.113.7:51234``, ``[2001:db8::1]:443``, ``[2001:db8::1]``); drops an IPv6 zone
    (``fe80::1%eth0``) and returns an IPv4-mapped IPv6 address (``::ffff:10.0.0.5``, what a
    dual-stack socket reports) as the IPv4 address it is. ``unknown``, obfuscated names and any
    other text are None.
    """
    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not (rest == "" or _is_port(rest)):
            return None
        text = host
    elif text.count(":") == 1:  # IPv4 with a port; a bare IPv6 address has at least two colons
        text, _, port = text.partition(":")
        if not _is_port(":" + port):
            return None
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_port(text: str) -> bool:
    digits = text[1:]
    return text.startswith(":") and 0 < len(digits) <= 5 and digits.isascii() and digits.isdigit()


def parse_network(entry: str) -> Network:
    """One ``--trusted-proxy`` entry: an address (a network of one) or a CIDR network.

    A network with host bits set (``10.0.0.7/24``) is refused rather than silently widened:
    the operator may have meant the address, or the network, and trust should not be a guess.
    """
    text = entry.strip()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "/" in text:
            try:
                wider = ipaddress.ip_network(text, strict=False)
            except ValueError:
                pass
            else:
                raise ValueError(
                    f"{entry!r} has host bits set: write the network {wider} or the address "
                    f"{text.partition('/')[0]}"
                ) from None
        raise ValueError(
            f"{entry!r} is not an IP address or network (like 127.0.0.1, 10.0.0.0/24 or fd00::/8): {exc}"
        ) from None


@dataclass(frozen=True)
class TrustedProxies:
    """The networks whose forwarding headers are believed; empty: none are (the default)."""

    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> TrustedProxies:
        """Raises ValueError naming the first entry that is not an address or network."""
        return cls(tuple(parse_network(entry) for entry in entries))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: Address) -> bool:
        return any(address.version == net.version and address in net for net in self.networks)

    def client(self, peer: str | None, forwarded_for: Iterable[str]) -> str | None:
        """The client's address when ``peer`` is a trusted proxy that named one, else None.

        ``forwarded_for`` holds the ``X-Forwarded-For`` header values in the order received
        (HAProxy adds a header of its own rather than extending the client's). The walk goes from
        the right, skipping trusted proxies; the first other address is the client. When every
        hop is trusted, the leftmost is. An entry that is no address ends the walk: the client is
        then the last trusted hop passed, or nobody (None: keep the peer), never a guess.
        """
        peer_address = parse_address(peer) if peer else None
        if peer_address is None or not self.trusts(peer_address):
            return None
        hops = [hop for value in forwarded_for for hop in value.split(",") if hop.strip()]
        last_trusted: Address | None = None
        for hop in reversed(hops):
            address = parse_address(hop)
            if address is None:
                break
            if not self.trusts(address):
                return str(address)
            last_trusted = address
        return str(last_trusted) if last_trusted is not None else None
