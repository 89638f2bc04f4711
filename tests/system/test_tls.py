"""HTTPS with --ssl-cert/--ssl-key, through the same listen() the server process uses, and the
Python client's answer to a certificate it does not trust or a port without TLS."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import ClientConnectionError, ClientSession, web

from tests.support.images import save_flat
from tests.support.processes import cli_command, server_env
from tests.support.tls import self_signed
from vision_server.app import create_app
from vision_server.client import AsyncVisionClient, RetryPolicy, VisionConnectionError, VisionTLSError
from vision_server.server import listen, ssl_context
from vision_server.settings import Settings, SettingsError
from vision_server.testing.fake import FakeCaptioner


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


def test_each_wrong_tls_file_is_named(tmp_path: Path) -> None:
    """OpenSSL's "PEM lib", "key values mismatch" and "No such file" name neither file."""
    cert, key = self_signed(tmp_path)
    (tmp_path / "other").mkdir()
    _, other_key = self_signed(tmp_path / "other")

    def refusal(cert_path: Path, key_path: Path) -> str:
        with pytest.raises(SettingsError) as caught:
            ssl_context(Settings(cache_dir=tmp_path, ssl_cert=cert_path, ssl_key=key_path))
        return str(caught.value)

    assert f"ssl_cert {key} holds no PEM certificate" in refusal(key, cert)  # swapped
    assert f"ssl_key {cert} holds no PEM private key" in refusal(cert, cert)
    assert "ssl_key is not the private key of that certificate" in refusal(cert, other_key)
    assert f"(ssl_key {tmp_path / 'nope.pem'}: No such file" in refusal(cert, tmp_path / "nope.pem")


def test_an_encrypted_key_is_an_error_not_a_passphrase_prompt(tmp_path: Path) -> None:
    """Without a password callback OpenSSL prompts on the terminal: a foreground start hung at
    "Enter PEM pass phrase:", a service failed with "[Errno 22] Invalid argument"."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not available")
    cert, key = self_signed(tmp_path)
    encrypted = tmp_path / "key-encrypted.pem"
    subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:secret", "-out", str(encrypted)],
        check=True, capture_output=True,
    )  # fmt: skip
    settings = f"Settings(cache_dir={str(tmp_path)!r}, ssl_cert={str(cert)!r}, ssl_key={str(encrypted)!r})"
    script = (
        f"from vision_server.server import *; from vision_server.settings import *; ssl_context({settings})"
    )
    # No terminal here, so a prompting OpenSSL would read the passphrase from this stdin.
    done = subprocess.run(
        [sys.executable, "-c", script],
        input="secret\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0 and "Enter PEM pass phrase" not in done.stdout + done.stderr
    assert "is encrypted with a passphrase" in done.stderr and "openssl pkey" in done.stderr


def test_cert_and_key_go_together(tmp_path: Path) -> None:
    with pytest.raises(SettingsError):
        Settings(cache_dir=tmp_path, ssl_cert=tmp_path / "cert.pem")


@asynccontextmanager
async def https_server(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """A server on HTTPS with a fresh self-signed certificate: its https://localhost URL and the cert."""
    cert, key = self_signed(tmp_path)
    settings = Settings(cache_dir=tmp_path, port=0, ssl_cert=cert, ssl_key=key)
    runner = web.AppRunner(create_app(settings, FakeCaptioner()))
    await runner.setup()
    try:
        urls = await listen(runner, settings)
        yield "https://localhost:" + urls[0].rsplit(":", 1)[1], cert
    finally:
        await runner.cleanup()


@dataclass(frozen=True)
class CountingPolicy(RetryPolicy):
    """Retries at once and records each one, so a test sees whether the client retried."""

    waits: list[int] = field(default_factory=list)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        self.waits.append(attempt)
        return 0.0


async def test_client_does_not_retry_an_untrusted_certificate_and_says_how_to_trust_it(
    tmp_path: Path,
) -> None:
    """A certificate failure is the same on every try: the client raises at once, naming the fix."""
    policy = CountingPolicy(retries=3)
    async with https_server(tmp_path) as (url, _cert):
        async with AsyncVisionClient(url, retry_policy=policy) as client:
            with pytest.raises(VisionTLSError, match="not trusted") as caught:
                await client.caption(save_flat(tmp_path / "a.png"), "CAPTION")
    assert "SSL_CERT_FILE" in str(caught.value) and url in str(caught.value)
    assert policy.waits == []


async def test_client_says_https_to_a_plain_http_port_needs_http(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, port=0)
    runner = web.AppRunner(create_app(settings, FakeCaptioner()))
    await runner.setup()
    policy = CountingPolicy(retries=3)
    try:
        port = (await listen(runner, settings))[0].rsplit(":", 1)[1]
        async with AsyncVisionClient(f"https://127.0.0.1:{port}", retry_policy=policy) as client:
            with pytest.raises(VisionTLSError, match="http://") as caught:
                await client.caption(save_flat(tmp_path / "a.png"), "CAPTION")
    finally:
        await runner.cleanup()
    assert "does the server speak HTTPS" in str(caught.value)
    assert policy.waits == []


async def test_client_says_plain_http_to_an_https_port_needs_https(tmp_path: Path) -> None:
    """The TLS server hangs up on plain HTTP: "Server disconnected" alone said nothing of why, and a
    folder run waited --wait-for-server for a server that was there all along."""
    async with https_server(tmp_path) as (url, _cert):
        plain = url.replace("https://", "http://")
        policy = CountingPolicy(retries=3)
        waits: list[str] = []
        async with AsyncVisionClient(
            plain, retry_policy=policy, wait_for_server=300, on_server_wait=waits.append
        ) as client:
            with pytest.raises(VisionTLSError) as caught:
                await client.caption(save_flat(tmp_path / "a.png"), "CAPTION")
    assert str(caught.value) == f"{plain} hung up without an answer, and that port speaks HTTPS: use {url}"
    assert policy.waits == [] and waits == []


async def test_a_plain_port_that_hangs_up_is_not_called_https(tmp_path: Path) -> None:
    """A server that drops the connection unanswered but has no TLS keeps the old hint and retries."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    policy = CountingPolicy(retries=2)
    try:
        async with AsyncVisionClient(f"http://127.0.0.1:{port}", retry_policy=policy) as client:
            with pytest.raises(VisionConnectionError) as caught:
                await client.caption(save_flat(tmp_path / "a.png"), "CAPTION")
    finally:
        server.close()
        await server.wait_closed()
    assert not isinstance(caught.value, VisionTLSError)
    assert "if the server speaks HTTPS" in str(caught.value) and policy.waits == [0, 1]


async def test_cli_trusts_a_self_signed_server_through_ssl_cert_file(tmp_path: Path) -> None:
    """The documented fix works as written: SSL_CERT_FILE=cert.pem vision-client ..."""
    image = save_flat(tmp_path / "a.png")
    script = Path(sys.executable).with_name("vision-client")
    env = {k: v for k, v in os.environ.items() if k not in ("VISION_HOST", "VISION_API_KEY", "SSL_CERT_FILE")}
    async with https_server(tmp_path) as (url, cert):

        async def run(extra: dict[str, str]) -> tuple[int, str, str]:
            process = await asyncio.create_subprocess_exec(
                str(script), "--url", url, "--retries", "5", "caption", str(image),
                env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(process.communicate(), 120)
            assert process.returncode is not None
            return process.returncode, out.decode(), err.decode()

        code, out, err = await run({})
        assert code == 1 and out == ""
        assert "is not trusted" in err and "SSL_CERT_FILE" in err and "Traceback" not in err
        code, out, err = await run({"SSL_CERT_FILE": str(cert)})
        assert code == 0 and out.strip(), err


def test_a_bad_key_stops_the_start_before_the_model_loads(tmp_path: Path) -> None:
    """With --preload the model loaded (tens of seconds for a real one, on the GPU) before the
    listening socket found the key unusable; the files are checked first now."""
    cert, _ = self_signed(tmp_path)
    (tmp_path / "other").mkdir()
    _, other_key = self_signed(tmp_path / "other")
    command = [*cli_command(), "serve", "--model", "test:tiny", "--preload", "--port", "0"]
    command += ["--cache-dir", str(tmp_path / "cache"), "--ssl-cert", str(cert), "--ssl-key", str(other_key)]
    done = subprocess.run(
        command, env=server_env(tmp_path), capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2, done.stderr
    assert "not the private key of that certificate" in done.stderr
    assert " loaded " not in done.stderr and "serving" not in done.stderr
