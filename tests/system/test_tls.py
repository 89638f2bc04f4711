"""HTTPS with --ssl-cert/--ssl-key, through the same listen() the server process uses."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from aiohttp import ClientConnectionError, ClientSession, web

from vision_server.app import create_app
from vision_server.server import listen, ssl_context
from vision_server.settings import Settings, SettingsError
from vision_server.testing.fake import FakeCaptioner


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A throw-away certificate for localhost and 127.0.0.1 (cryptography if present, else openssl)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        _with_cryptography(cert, key)
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl command is available")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True, capture_output=True,
        )  # fmt: skip
    return cert, key


def _with_cryptography(cert_path: Path, key_path: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(alt, critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


async def test_serves_https_with_the_given_certificate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    settings = Settings(cache_dir=tmp_path, port=0, ssl_cert=cert, ssl_key=key)
    runner = web.AppRunner(create_app(settings, FakeCaptioner()))
    await runner.setup()
    try:
        urls = await listen(runner, settings)
        assert len(urls) == 1 and urls[0].startswith("https://127.0.0.1:")
        port = urls[0].rsplit(":", 1)[1]
        trusted = ssl.create_default_context(cafile=str(cert))
        async with ClientSession() as session:
            async with session.get(f"https://localhost:{port}/health", ssl=trusted) as response:
                assert response.status == 200 and (await response.json())["status"] == "ok"
            with pytest.raises(ClientConnectionError):  # the default trust store does not know it
                await session.get(f"https://localhost:{port}/health")
            with pytest.raises(ClientConnectionError):  # and plain HTTP gets no answer
                await session.get(f"http://localhost:{port}/health")
    finally:
        await runner.cleanup()


def test_bad_certificate_is_a_clear_start_error(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate")
    key.write_text("not a key")
    with pytest.raises(SettingsError, match="ssl_cert"):
        ssl_context(Settings(cache_dir=tmp_path, ssl_cert=cert, ssl_key=key))


def test_cert_and_key_go_together(tmp_path: Path) -> None:
    with pytest.raises(SettingsError):
        Settings(cache_dir=tmp_path, ssl_cert=tmp_path / "cert.pem")
