"""Who the client is behind trusted proxies: the X-Forwarded-For walk, and the setting that names them."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from vision_server import server
from vision_server.api import auth
from vision_server.api.ratelimit import bucket_of
from vision_server.settings import Settings, SettingsError, load_settings
from vision_server.trusted_proxies import TrustedProxies, parse_address

LOCAL = TrustedProxies.parse(["127.0.0.1"])
POOL = TrustedProxies.parse(["10.0.0.0/24", "fd00::/8"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.7", "203.0.113.7"),
        (" 203.0.113.7 ", "203.0.113.7"),
        ("203.0.113.7:51234", "203.0.113.7"),
        ("2001:db8::1", "2001:db8::1"),
        ("2001:DB8:0::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("::ffff:10.0.0.5", "10.0.0.5"),
        ("unknown", None),
        ("_hidden", None),
        ("", None),
        ("203.0.113.7:", None),
        ("203.0.113.7:http", None),
        ("203.0.113.7:123456", None),
        ("[2001:db8::1", None),
        ("[2001:db8::1]x", None),
        ("999.1.1.1", None),
        ("example.com", None),
        ("1.2.3.4/24", None),
        ("203.0.113.7:\u0661\u0662", None),  # Arabic-Indic digits are not a port
    ],
)
def test_addresses_as_proxies_write_them(text: str, expected: str | None) -> None:
    address = parse_address(text)
    assert (None if address is None else str(address)) == expected


def test_an_untrusted_peer_keeps_its_own_address_whatever_it_sends() -> None:
    assert LOCAL.client("198.51.100.4", ["203.0.113.7"]) is None
    assert LOCAL.client("127.0.0.2", ["203.0.113.7"]) is None  # one address, not the loopback net
    assert TrustedProxies().client("127.0.0.1", ["203.0.113.7"]) is None  # the default trusts nobody
    assert LOCAL.client(None, ["203.0.113.7"]) is None
    assert LOCAL.client("not an address", ["203.0.113.7"]) is None


def test_a_trusted_peer_names_the_client() -> None:
    assert LOCAL.client("127.0.0.1", ["203.0.113.7"]) == "203.0.113.7"
    assert LOCAL.client("::ffff:127.0.0.1", ["203.0.113.7"]) == "203.0.113.7"  # dual-stack socket
    assert LOCAL.client("127.0.0.1", []) is None
    assert LOCAL.client("127.0.0.1", [" , "]) is None


def test_the_walk_goes_from_the_right_and_skips_trusted_hops() -> None:
    # The client wrote 6.6.6.6 itself; 203.0.113.7 is what the first trusted proxy saw.
    assert POOL.client("10.0.0.2", ["6.6.6.6, 203.0.113.7, 10.0.0.9"]) == "203.0.113.7"
    # HAProxy adds its own header line rather than extending the client's: lines join in order.
    assert POOL.client("10.0.0.2", ["6.6.6.6", "203.0.113.7", "10.0.0.9"]) == "203.0.113.7"
    # Every hop trusted: the leftmost one.
    assert POOL.client("10.0.0.2", ["10.0.0.7, 10.0.0.9"]) == "10.0.0.7"


def test_ipv6_peers_and_hops() -> None:
    assert POOL.client("fd00::2", ["2001:db8::7"]) == "2001:db8::7"
    assert POOL.client("fd00::2", ["[2001:db8::7]:5000, fd12::1"]) == "2001:db8::7"
    assert POOL.client("2001:db8::2", ["203.0.113.7"]) is None
    assert POOL.client("10.0.0.2", ["2001:db8::7, 10.0.0.9"]) == "2001:db8::7"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("garbage", None),  # the peer's own entry is no address: keep the peer
        ("203.0.113.7, garbage", None),  # nothing trusted vouches for what lies left of it
        ("203.0.113.7, unknown, 10.0.0.9", "10.0.0.9"),  # the last hop a trusted proxy vouched for
        ("203.0.113.7,,10.0.0.9", "203.0.113.7"),  # an empty list element is no hop
        ("\u00e9\u00e8\x7f, 10.0.0.9", "10.0.0.9"),
        ("1" * 5000, None),
    ],
)
def test_garbage_ends_the_walk_without_guessing(header: str, expected: str | None) -> None:
    assert POOL.client("10.0.0.2", [header]) == expected


def test_trust_is_by_network_and_family() -> None:
    assert POOL.trusts(ipaddress.ip_address("10.0.0.255"))
    assert not POOL.trusts(ipaddress.ip_address("10.0.1.0"))
    assert not POOL.trusts(ipaddress.ip_address("::a00:1"))  # 10.0.0.1's bits, but IPv6
    assert bool(POOL) and not TrustedProxies()


def test_setting_from_flags_config_and_environment(tmp_path: Path) -> None:
    assert Settings().trusted_proxies == () and not Settings().trusted_proxy_networks
    assert Settings(trusted_proxies="127.0.0.1").trusted_proxies == ("127.0.0.1",)  # type: ignore[arg-type]  # the str shorthand under test: __post_init__ makes it a tuple
    flags = load_settings({"trusted_proxies": ("127.0.0.1", "10.0.0.0/24")}, environ={})
    assert [str(n) for n in flags.trusted_proxy_networks.networks] == ["127.0.0.1/32", "10.0.0.0/24"]
    env = load_settings(environ={"VISION_SERVER_TRUSTED_PROXIES": "127.0.0.1, ::1"})
    assert env.trusted_proxies == ("127.0.0.1", "::1")
    as_json = load_settings(environ={"VISION_SERVER_TRUSTED_PROXIES": '["10.0.0.0/8"]'})
    assert as_json.trusted_proxies == ("10.0.0.0/8",)
    config = tmp_path / "config.toml"
    config.write_text('trusted-proxies = ["fd00::/8"]\n')
    assert load_settings(environ={}, config_path=config).trusted_proxies == ("fd00::/8",)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("proxy.example", "'proxy.example' is not an IP address or network"),
        ("10.0.0.7/24", "write the network 10.0.0.0/24 or the address 10.0.0.7"),
        ("10.0.0.0/33", "is not an IP address or network"),
        ("", "is not an IP address or network"),
    ],
)
def test_unusable_entries_stop_the_start(entry: str, message: str) -> None:
    with pytest.raises(SettingsError, match="trusted_proxies: .*" + message.replace(".", r"\.")):
        Settings(trusted_proxies=(entry,))


# --- the other readers of client and bound addresses read them as parse_address does -----------


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::1%lo", True),
        ("::ffff:127.0.0.1", True),  # a dual-stack socket's view of an IPv4 loopback client
        ("[::1]", True),
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("fe80::1%eth0", False),
        ("localhost", False),  # a name is no address
        ("", False),
        (None, False),
    ],
)
def test_loopback_checks_agree_with_parse_address(address: str | None, loopback: bool) -> None:
    assert auth.is_loopback(address) is loopback
    if address is not None:  # a bound address, as runner.addresses lists it
        assert server.is_loopback((address, 54880)) is loopback


def test_a_server_bound_to_ipv4_mapped_loopback_counts_as_loopback() -> None:
    """The address --host ::ffff:127.0.0.1 binds is reachable from this machine only: no warning
    about a missing API key (Python before 3.13 calls it no loopback address by itself)."""
    assert server.is_loopback(("::ffff:127.0.0.1", 54880, 0, 0))


@pytest.mark.parametrize(
    ("client", "bucket"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),  # the IPv4 client it is, not a bucket of its own
        ("2001:db8:1:1::a", "2001:db8:1:1::/64"),
        ("2001:db8:1:1:ffff::3%eth0", "2001:db8:1:1::/64"),
        ("/run/vision.sock", "/run/vision.sock"),
        (None, "-"),
    ],
)
def test_rate_limit_and_bulk_turns_key_clients_alike(client: str | None, bucket: str) -> None:
    assert bucket_of(client) == bucket
