"""The deployment files in service/ are valid for the tools that read them, and agree with the server."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import paths
from tests.support.processes import cli_command
from vision_server.settings import Settings

SERVICE = paths.SERVICE


def unit_values(key: str) -> list[str]:
    text = (SERVICE / "vision-server.service").read_text()
    return re.findall(rf"(?m)^{key}=(.*)$", text)


def test_haproxy_config_is_valid() -> None:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed (apt-get install -y haproxy)")
    result = subprocess.run(
        [haproxy, "-c", "-f", str(SERVICE / "haproxy.cfg")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_haproxy_checks_readiness_not_liveness() -> None:
    text = (SERVICE / "haproxy.cfg").read_text()
    assert "http-check send meth GET uri /ready" in text and "http-check expect status 200" in text
    assert re.search(r"timeout server\s+10m", text) and "option redispatch" in text
    assert re.search(r"default-server .*maxconn \d+", text)


def test_systemd_unit_is_type_notify_and_outlasts_the_grace_period() -> None:
    assert unit_values("Type") == ["notify"] and unit_values("NotifyAccess") == ["main"]
    grace = Settings().shutdown_grace
    stop = unit_values("TimeoutStopSec")[0]
    assert int(stop) > grace
    assert unit_values("Restart") == ["on-failure"]
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert unit_values(hardening), hardening
    assert unit_values("PrivateDevices") in ([], ["no"], ["false"])  # it would hide the GPU
    assert any("nvidia" in value for value in unit_values("DeviceAllow"))
    assert unit_values("CacheDirectory") == ["vision-server"]
    assert "VISION_SERVER_CACHE_DIR=%C/vision-server" in unit_values("Environment")


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify`` with no complaint at all. It checks that ExecStart= exists, so
    it runs on a copy whose ExecStart= is this environment's vision-server instead of /opt/...."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (SERVICE / "vision-server.service").read_text()
    installed = " ".join(cli_command())
    copy, count = re.subn(
        r"(?m)^ExecStart=/opt/vision-server/venv/bin/vision-server", f"ExecStart={installed}", unit
    )
    assert count == 1, "ExecStart= should name /opt/vision-server/venv/bin/vision-server once"
    (tmp_path / "vision-server.service").write_text(copy)
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "vision-server.service")], capture_output=True, text=True
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


def test_nssm_script_parses_and_waits_for_the_drain() -> None:
    script = SERVICE / "install-nssm.ps1"
    text = script.read_text()
    assert "AppStopMethodConsole $drainMs" in text and "($ShutdownGraceSeconds + 30) * 1000" in text
    import tree_sitter
    import tree_sitter_powershell  # both in the test extra: no PowerShell runs here, so parse it

    parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language()))
    tree = parser.parse(script.read_bytes())
    stack, errors = [tree.root_node], []
    while stack:
        node = stack.pop()
        if node.type == "ERROR" or node.is_missing:
            errors.append(node.start_point[0] + 1)
        stack.extend(node.children)
    assert not errors, f"syntax errors at lines {sorted(errors)}"


def test_nssm_script_probes_the_address_it_made_the_server_listen_on() -> None:
    """``-ListenHost 10.0.0.5`` answers nowhere on 127.0.0.1: the printed probe must use it (no
    PowerShell runs here, so the lines that pick the address are checked as written)."""
    text = (SERVICE / "install-nssm.ps1").read_text()
    assert "Probe: Invoke-RestMethod http://${probeHost}:$Port/health" in text
    assert "$probeHost = $ListenHost" in text
    assert "if ($ListenHost -in @('0.0.0.0', '::', '')) { $probeHost = '127.0.0.1' }" in text


def test_nssm_script_hands_a_config_file_to_the_server() -> None:
    """The service account's own config folder is hard to find: ``-ConfigFile`` names the file
    (``VISION_SERVER_CONFIG``), and a missing one stops the install instead of the service's start
    (checked as written: no PowerShell runs here)."""
    text = (SERVICE / "install-nssm.ps1").read_text()
    assert '[string]$ConfigFile = ""' in text
    assert 'if ($ConfigFile) { $environment += "VISION_SERVER_CONFIG=$ConfigFile" }' in text
    assert "if (-not (Test-Path -LiteralPath $ConfigFile -PathType Leaf)) {" in text


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_install_torch_first_and_never_timm(name: str) -> None:
    text = (SERVICE / name).read_text()
    torch_at = text.index("pip install torch --index-url")
    assert torch_at < text.index("pip install .")
    assert not re.search(r"\b(timm|torchvision|einops)\b", text)
    assert "STOPSIGNAL SIGTERM" in text and "/health" in text
