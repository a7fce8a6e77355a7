"""TLS on both listeners with a certificate made in the test (trustme): the native client and the CLI verify it
with the CA, fail clearly without it or for another host name; HTTPS with aiohttp; clear errors for bad files."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import warnings

import aiohttp
import pytest

import chute
from chute.errors import ConnectionLost, InvalidArgument
from chute.testing import running_server, serving
from tests.auth.conftest import users

pytestmark = pytest.mark.timeout(60)


async def test_a_native_round_trip_over_tls(tls_files):
    async with serving(tls_cert=tls_files["cert"], tls_key=tls_files["key"]) as server:
        assert server.url.startswith("chutes://127.0.0.1:")
        async with chute.AsyncClient(server.url, tls_ca=tls_files["ca"], reconnect=False) as client:
            await client.create_queue("q")
            await client.publish("q", b"secret")
            [delivery] = await client.receive("q")
            assert delivery.body == b"secret"
            await client.ack(delivery)
            ssl_object = client._link.transport.get_extra_info("ssl_object")
            assert ssl_object.version() in ("TLSv1.2", "TLSv1.3")


async def test_credentials_over_tls(tls_files):
    async with serving(users=users(), tls_cert=tls_files["cert"], tls_key=tls_files["key"]) as server:
        url = server.url.replace("chutes://", "chutes://alice:alice-pw@")
        async with chute.AsyncClient(url, tls_ca=tls_files["ca"], reconnect=False) as alice:
            assert await alice.list_queues() == []


async def test_without_the_ca_the_client_refuses_the_server_clearly(tls_files):
    async with serving(tls_cert=tls_files["cert"], tls_key=tls_files["key"]) as server:
        with pytest.raises(ConnectionLost, match="not trusted.*tls_ca"):
            await chute.AsyncClient(server.url, reconnect=False).connect()


async def test_the_host_name_is_checked(ca, tmp_path):
    cert = ca.issue_cert("broker.example")  # not 127.0.0.1
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    async with serving(tls_cert=str(tmp_path / "cert.pem"), tls_key=str(tmp_path / "key.pem")) as server:
        with pytest.raises(ConnectionLost, match="not trusted"):
            await chute.AsyncClient(server.url, tls_ca=str(tmp_path / "ca.pem"), reconnect=False).connect()


async def test_the_ca_can_come_from_the_environment(tls_files, monkeypatch):
    monkeypatch.setenv("CHUTE_TLS_CA", tls_files["ca"])
    async with (
        serving(tls_cert=tls_files["cert"], tls_key=tls_files["key"]) as server,
        chute.AsyncClient(server.url, reconnect=False) as client,
    ):
        await client.create_queue("q")


async def test_a_plain_client_gets_no_service_from_a_tls_listener(tls_files):
    async with serving(tls_cert=tls_files["cert"], tls_key=tls_files["key"]) as server:
        plain = server.url.replace("chutes://", "chute://")
        with pytest.raises(ConnectionLost):
            await chute.AsyncClient(plain, reconnect=False, connect_timeout=5).connect()


async def test_tls_before_1_2_is_refused(tls_files):
    old = ssl.create_default_context(cafile=tls_files["ca"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is deprecated: that is the point
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    async with serving(tls_cert=tls_files["cert"], tls_key=tls_files["key"]) as server:
        assert server.server.ssl.minimum_version == ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=old)
            writer.close()


async def test_https_on_the_http_listener(tls_files):
    async with serving(users=users(), tls_cert=tls_files["cert"], tls_key=tls_files["key"]) as server:
        assert server.http_url.startswith("https://")
        context = ssl.create_default_context(cafile=tls_files["ca"])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{server.http_url}/healthz", ssl=context) as response:
                assert response.status == 200
            login = {"user": "alice", "password": "alice-pw"}
            async with session.post(f"{server.http_url}/api/v1/login", json=login, ssl=context) as response:
                assert response.status == 200
                token = (await response.json())["token"]
            headers = {"Authorization": f"Bearer {token}"}
            async with session.get(f"{server.http_url}/api/v1/whoami", headers=headers, ssl=context) as response:
                assert (await response.json())["name"] == "alice"
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.get(f"{server.http_url}/healthz")  # the system's CAs do not know ours


def test_the_sync_client_and_the_cli_verify_with_the_ca(tls_files):
    with running_server(tls_cert=tls_files["cert"], tls_key=tls_files["key"]) as server:
        with chute.Client(server.url, tls_ca=tls_files["ca"]) as client:
            client.create_queue("jobs")
        cli = [sys.executable, "-m", "chute", "queue", "list", "--json", "--url", server.url]
        listed = subprocess.run([*cli, "--tls-ca", tls_files["ca"]], capture_output=True, text=True, timeout=30)
        assert listed.returncode == 0, listed.stderr
        assert [q["name"] for q in json.loads(listed.stdout)] == ["jobs"]
        refused = subprocess.run(cli, capture_output=True, text=True, timeout=30, env=_without_ca())
        assert refused.returncode == 1 and "not trusted" in refused.stderr and "--tls-ca" in refused.stderr
        assert refused.stderr.count("\n") == 1


def _without_ca() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "CHUTE_TLS_CA"}


@pytest.mark.parametrize(("which", "says"), [
    ("missing-cert", "cannot read the TLS certificate"),
    ("missing-key", "cannot read the TLS key"),
    ("mismatched", "does not belong to the certificate"),
    ("not-pem", "cannot load the TLS certificate"),
])  # fmt: skip
async def test_bad_tls_files_are_clear_errors(tls_files, ca, tmp_path, which, says):
    cert, key = tls_files["cert"], tls_files["key"]
    if which == "missing-cert":
        cert = str(tmp_path / "nope.pem")
    elif which == "missing-key":
        key = str(tmp_path / "nope.pem")
    elif which == "mismatched":
        other = ca.issue_cert("127.0.0.1")
        other.private_key_pem.write_to_path(str(tmp_path / "other-key.pem"))
        key = str(tmp_path / "other-key.pem")
    else:
        (tmp_path / "junk.pem").write_text("not a certificate\n")
        cert = str(tmp_path / "junk.pem")
    with pytest.raises(InvalidArgument, match=says):
        async with serving(tls_cert=cert, tls_key=key):
            pass
