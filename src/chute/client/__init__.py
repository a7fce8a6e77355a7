"""Clients of the native protocol: `AsyncClient` (asyncio) and `Client` (blocking, a thin layer that runs an
AsyncClient in a background event loop thread). Both share `chute.protocol` with the server."""

from chute.client.aio import AsyncClient
from chute.client.consumer import AsyncConsumer
from chute.client.sync import Client, Consumer

__all__ = ["AsyncClient", "AsyncConsumer", "Client", "Consumer"]
