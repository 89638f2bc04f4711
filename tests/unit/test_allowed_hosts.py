"""Which Host names a server answers (DNS rebinding), and the setting that names more of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from vision_server.allowed_hosts import AllowedHosts, host_name, is_loopback_name
from vision_server.settings import Settings, SettingsError, load_settings

LOOPBACK = AllowedHosts.parse([], "127.0.0.1")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("localhost", "localhost"),
        ("LocalHost:54880", "localhost"),
        ("example.com.", "example.com"),
        ("Example.COM.:8080", "example.com"),
        ("127.0.0.1:54880", "127.0.0.1"),
        ("[::1]:54880", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),  # not valid in a Host header, but not a name with a port either
    ],
)
def test_the_name_a_host_header_holds(header: str, expected: str) -> None:
    assert host_name(header) == expected


@pytest.mark.parametrize(
    "bind", ["127.0.0.1", "127.0.0.2", "::1", "localhost", "LOCALHOST", "::ffff:127.0.0.1", "dev.localhost"]
)
def test_loopback_binds(bind: str) -> None:
    assert is_loopback_name(bind)
    assert AllowedHosts.parse([], bind).enabled


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "192.168.1.20", "myhost.lan", ""])
def test_other_binds_check_nothing_unless_told(bind: str) -> None:
    off = AllowedHosts.parse([], bind)
    assert not off.enabled and off.allows("evil.example")
    on = AllowedHosts.parse(["vision.lan"], bind)
    assert on.enabled and on.allows("vision.lan:54880") and not on.allows("evil.example")


@pytest.mark.parametrize(
    "header",
    [
        "localhost",
        "localhost:54880",  # the web page, an SSH tunnel
        "LOCALHOST.:54880",
        "app.localhost:54880",
        "127.0.0.1:54880",
        "127.8.9.10",
        "[::1]:54880",
        "0.0.0.0:54880",  # an address cannot be rebound
        "192.168.1.20:54880",
        "[2001:db8::5]:54880",
        "",  # no Host at all: an HTTP/1.0 client, never a browser
    ],
)
def test_loopback_names_and_addresses_pass(header: str) -> None:
    assert LOOPBACK.allows(header)
    assert LOOPBACK.allows(None)


@pytest.mark.parametrize(
    "header",
    [
        "evil.example",
        "evil.example:54880",
        "localhost.evil.example",
        "127.0.0.1.evil.example",
        "evillocalhost:54880",
        "2130706433",  # a browser would have sent 127.0.0.1 for this; only a name is left
    ],
)
def test_other_names_are_refused_on_loopback(header: str) -> None:
    assert not LOOPBACK.allows(header)


def test_allowed_names_domains_and_subdomains() -> None:
    allowed = AllowedHosts.parse(["Vision.Example.com.", ".lab.example", "*.pods.example"], "127.0.0.1")
    assert allowed.entries == ("vision.example.com", ".lab.example", "*.pods.example")
    assert allowed.allows("vision.example.com:443") and allowed.allows("VISION.example.com")
    assert not allowed.allows("other.example.com") and not allowed.allows("example.com")
    assert allowed.allows("lab.example") and allowed.allows("gpu1.lab.example")
    assert not allowed.allows("xlab.example")
    assert allowed.allows("a.pods.example") and allowed.allows("a.b.pods.example")
    assert not allowed.allows("pods.example") and not allowed.allows("xpods.example")


def test_a_star_turns_the_check_off() -> None:
    for bind in ("127.0.0.1", "0.0.0.0"):
        off = AllowedHosts.parse(["vision.lan", "*"], bind)
        assert not off.enabled and off.allows("evil.example")


def test_setting_from_flags_config_and_environment(tmp_path: Path) -> None:
    default = Settings()
    assert default.allowed_hosts == () and default.allowed_host_names.enabled
    assert not Settings(host="0.0.0.0").allowed_host_names.enabled
    assert Settings(allowed_hosts="vision.lan").allowed_hosts == ("vision.lan",)  # type: ignore[arg-type]  # the str shorthand under test: __post_init__ makes it a tuple
    flags = load_settings({"allowed_hosts": ("vision.lan", ".example.com")}, environ={})
    assert flags.allowed_host_names.entries == ("vision.lan", ".example.com")
    env = load_settings(environ={"VISION_SERVER_ALLOWED_HOSTS": "a.lan, b.lan"})
    assert env.allowed_hosts == ("a.lan", "b.lan")
    config = tmp_path / "config.toml"
    config.write_text('allowed-host = ["vision.example.com"]\n')
    assert load_settings(environ={}, config_path=config).allowed_hosts == ("vision.example.com",)
    config.write_text('allowed_hosts = ["*"]\n')
    assert not load_settings(environ={}, config_path=config).allowed_host_names.enabled


@pytest.mark.parametrize(
    "entry", ["http://vision.lan", "vision.lan:54880", "vision.lan/", "two words", "", "*.", "a..b", "-x.lan"]
)
def test_unusable_entries_stop_the_start(entry: str) -> None:
    with pytest.raises(SettingsError, match=r"allowed_hosts: .* is not a host name; .*without scheme, port"):
        Settings(allowed_hosts=(entry,))


def test_an_unusable_entry_names_where_it_was_set() -> None:
    with pytest.raises(SettingsError, match=r"set by VISION_SERVER_ALLOWED_HOSTS"):
        load_settings(environ={"VISION_SERVER_ALLOWED_HOSTS": "https://vision.lan"})


def test_the_start_log_description_lists_every_accepted_name() -> None:
    assert AllowedHosts.parse([], "127.0.0.1").describe() == "localhost, *.localhost, IP addresses"
    described = AllowedHosts.parse(["Vision.LAN.", "*.example.com"], "0.0.0.0").describe()
    assert described == "localhost, *.localhost, IP addresses, vision.lan, *.example.com"
