"""The engine link over TLS (``[engine] tls``): a real engine serving wss:// with a self-signed
certificate made here by the ``openssl`` command, and the bot's link verifying it."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
import pytest_asyncio

from bot.engine_link import EngineLink, EngineUnavailable, client_ssl_context, engine_url
from bot.engine_child import EngineSupervisor
from engine.contract.config import ConfigError, load_config, parse_config
from tests.conftest import write_config
from tests.engine.service.link_helpers import authenticated

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]


def make_certificate(directory: Path, name: str, common_name: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate (for 127.0.0.1) and its key, PEM."""
    cert, key = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={common_name}",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


@pytest.fixture(scope="module")
def tls_config(tmp_path_factory, tiny_model_dir) -> Path:
    """Mutual TLS: the engine's certificate, and the bot's, each trusted by the other side."""
    root = tmp_path_factory.mktemp("engine-tls")
    (root / "adapters").mkdir()
    cert, key = make_certificate(root, "engine")
    client_cert, client_key = make_certificate(root, "bot", "arcae-bot")
    path = write_config(root, tiny_model_dir)
    tls = (f'tls = true\ntls_cert_file = "{cert.name}"\ntls_key_file = "{key.name}"\ntls_ca_file = "{cert.name}"\n'
           f'tls_client_ca_file = "{client_cert.name}"\ntls_client_cert_file = "{client_cert.name}"\n'
           f'tls_client_key_file = "{client_key.name}"\nrate_outputs = false\n')
    path.write_text(path.read_text().replace('device = "cpu"\n', 'device = "cpu"\n' + tls, 1))
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tls_engine(tls_config):
    config = load_config(tls_config)
    supervisor = EngineSupervisor(tls_config, config, grace_s=20, extra_env={"OMP_NUM_THREADS": "1"})
    await supervisor.start()
    yield supervisor, config
    await supervisor.close()


async def test_the_engine_serves_wss_and_the_bot_verifies_it(tls_engine):
    supervisor, config = tls_engine
    assert supervisor.url.startswith("wss://127.0.0.1:")
    link = EngineLink(lambda: supervisor.url, supervisor.secret, ssl_context=client_ssl_context(config))
    try:
        await link.start()
        assert link.connected
        assert (await link.status()).model == "tiny-sdxl"
    finally:
        await link.close()
    session, ws = await authenticated(supervisor.url, supervisor.secret, ssl_context=client_ssl_context(config))
    await ws.close()
    await session.close()


async def test_a_client_that_does_not_trust_the_certificate_never_connects(tls_engine):
    supervisor, _ = tls_engine
    for url in (supervisor.url, supervisor.url.replace("wss://", "ws://")):  # system CAs; no TLS at all
        link = EngineLink(url, supervisor.secret, backoff_s=[0.2])
        try:
            await link.start(timeout=5)
            assert not link.connected
            with pytest.raises(EngineUnavailable):
                await link.status()
        finally:
            await link.close()


async def test_a_client_without_the_bots_certificate_is_refused(tls_engine):
    supervisor, config = tls_engine
    trusts_engine_only = ssl.create_default_context(cafile=config.path(config.engine.tls_ca_file))
    link = EngineLink(supervisor.url, supervisor.secret, backoff_s=[0.2], ssl_context=trusts_engine_only)
    try:
        await link.start(timeout=5)
        assert not link.connected
    finally:
        await link.close()


async def test_a_missing_certificate_stops_the_engine_with_a_clear_error(tls_config, tmp_path):
    bad = tmp_path / "config.toml"
    text = tls_config.read_text()
    bad.write_text(text.replace('tls_cert_file = "engine-cert.pem"', f'tls_cert_file = "{tmp_path}/nope.pem"'))
    supervisor = EngineSupervisor(bad, load_config(bad), grace_s=5, extra_env={"OMP_NUM_THREADS": "1"})
    with pytest.raises(EngineUnavailable) as info:
        await supervisor.start()
    assert "cannot load the TLS certificate" in str(info.value) and "nope.pem" in str(info.value)


def test_tls_settings_are_checked_and_pick_the_scheme(tmp_path):
    with pytest.raises(ConfigError, match="tls_cert_file and tls_key_file go together"):
        parse_config({"engine": {"tls": True, "tls_cert_file": "c.pem"}})
    with pytest.raises(ConfigError, match="set tls = true"):
        parse_config({"engine": {"tls_cert_file": "c.pem", "tls_key_file": "k.pem"}})
    with pytest.raises(ConfigError, match="tls_client_cert_file and tls_client_key_file go together"):
        parse_config({"engine": {"tls": True, "tls_client_cert_file": "c.pem"}})
    remote = {"mode": "remote", "host": "gpu.example", "port": 7861}
    assert engine_url(parse_config({"engine": remote})) == "ws://gpu.example:7861/ws"
    assert engine_url(parse_config({"engine": {**remote, "tls": True}})) == "wss://gpu.example:7861/ws"
    assert client_ssl_context(parse_config({"engine": remote})) is None
    with pytest.raises(Exception, match="tls_ca_file"):
        client_ssl_context(parse_config({"engine": {**remote, "tls": True, "tls_ca_file": str(tmp_path / "x.pem")}}))
