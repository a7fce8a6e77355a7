"""Fixtures of the HTTP API tests: a real server (chute.testing.serving, ports chosen by the OS on 127.0.0.1) and
an aiohttp client session, with a helper that returns (status, parsed JSON body) and checks the error shape."""

from __future__ import annotations

import json
from dataclasses import dataclass

import aiohttp
import pytest

from chute.errors import BY_NAME
from chute.testing import RunningServer, serving


@dataclass
class Api:
    server: RunningServer
    session: aiohttp.ClientSession

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    async def call(self, method: str, path: str, body=None, *, data=None, headers=None, prefix="/api/v1"):
        """One request; returns (status, JSON body or None for an empty body). Any error body must be the
        documented shape, with the status of its entry in the error table."""
        kwargs = {"headers": headers}
        if data is not None:
            kwargs["data"] = data
        elif body is not None:
            kwargs["json"] = body
        async with self.session.request(method, self.base + prefix + path, **kwargs) as response:
            text = await response.text()
            payload = json.loads(text) if text else None
            if response.status >= 400:
                check_error(response.status, payload)
            return response.status, payload

    async def ok(self, method: str, path: str, body=None, *, expect: int | None = None, **kwargs):
        status, payload = await self.call(method, path, body, **kwargs)
        assert status < 300, (status, payload)
        if expect is not None:
            assert status == expect, (status, payload)
        return payload

    async def error(self, method: str, path: str, body=None, **kwargs) -> tuple[int, str, str]:
        """A request that must fail: (status, error name, message)."""
        status, payload = await self.call(method, path, body, **kwargs)
        assert status >= 400, (status, payload)
        return status, payload["error"]["name"], payload["error"]["message"]


def check_error(status: int, payload) -> None:
    assert isinstance(payload, dict) and set(payload) == {"error"}, payload
    error = payload["error"]
    assert {"name", "code", "message", "retryable"} <= set(error), error
    cls = BY_NAME.get(error["name"])
    assert cls is not None, f"{error['name']} is not in the error table"
    assert (cls.code, cls.retryable) == (error["code"], error["retryable"]), error
    assert status == cls.http_status or cls.name == "chute_error", (status, error)


@pytest.fixture
async def server():
    async with serving() as running:
        yield running


@pytest.fixture
async def api(server):
    async with aiohttp.ClientSession() as session:
        yield Api(server, session)
