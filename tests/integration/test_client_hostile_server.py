"""The client against a server that breaks the protocol after a correct handshake: every call ends promptly with
a ChuteError (never a hang, never a stray exception type), and what the client can safely ignore it ignores."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import msgspec
import pytest

import chute
from chute.errors import ChuteError, ConnectionLost, FrameTooLarge, ProtocolError
from chute.protocol import Connection, Op
from chute.protocol import messages as m
from chute.protocol.frames import pack_header

pytestmark = pytest.mark.timeout(30)

# (server connection, writer, the client's frame) -> what the server does with it
Behaviour = Callable[[Connection, asyncio.StreamWriter, object], Awaitable[None]]


class FakeServer:
    """A server that handshakes properly, then hands every client frame to `behaviour`."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.handlers: set[asyncio.Task] = set()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"chute://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        if self.handlers:  # each ends when the client has closed its side
            await asyncio.wait(self.handlers, timeout=5)
        self.server.close()
        await self.server.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handlers.add(asyncio.current_task())
        conn = Connection("server", max_frame_bytes=1 << 20)
        try:
            while data := await reader.read(65536):
                for frame in conn.receive_data(data):
                    if frame.op is Op.HELLO:
                        writer.write(conn.accept(frame.body, server="hostile", heartbeat_s=30.0,
                                                 max_message_bytes=1000))  # fmt: skip
                    elif frame.op is not Op.HEARTBEAT:
                        await self.behaviour(conn, writer, frame)
                await writer.drain()
        except (ChuteError, ConnectionError):
            pass
        finally:
            writer.close()


async def call_against(behaviour: Behaviour):
    """Run `list_queues` against a server with `behaviour`; return what it gave or raised."""
    async with FakeServer(behaviour) as url:
        client = await chute.AsyncClient(url, reconnect=False, timeout=5).connect()
        try:
            async with asyncio.timeout(10):  # the client's own timeout (5 s) must come first
                return await client.list_queues()
        except ChuteError as exc:
            return exc
        finally:
            await client.close()


def raw(op: int, correlation_id: int, payload: bytes) -> bytes:
    return pack_header(op, correlation_id, len(payload)) + payload


async def garbage(conn, writer, frame):
    writer.write(raw(0xEE, 0, b"\xff" * 32))  # a frame of an opcode that does not exist


async def garbage_lengths(conn, writer, frame):
    writer.write(b"\xff" * 64)  # a length of 4 GiB


async def reply_of_the_wrong_shape(conn, writer, frame):
    writer.write(raw(Op.REPLY, frame.correlation_id, msgspec.msgpack.encode([1, 2, 3])))


async def result_of_the_wrong_type(conn, writer, frame):
    writer.write(conn.send(Op.REPLY, m.CallReply(result="not a list of queues"), frame.correlation_id))


async def a_frame_over_the_limit(conn, writer, frame):
    writer.write(pack_header(Op.REPLY, frame.correlation_id, 64 << 20))  # a 64 MiB frame announced


async def hang_up(conn, writer, frame):
    writer.close()


async def a_second_welcome(conn, writer, frame):
    welcome = m.Welcome(version=1, server="x", heartbeat_s=30.0, max_frame_bytes=1 << 20, max_message_bytes=1)
    writer.write(conn.send(Op.WELCOME, welcome))


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        (garbage, ProtocolError),
        (garbage_lengths, FrameTooLarge),
        (reply_of_the_wrong_shape, ProtocolError),
        (result_of_the_wrong_type, ChuteError),
        (a_frame_over_the_limit, FrameTooLarge),
        (hang_up, ConnectionLost),
        (a_second_welcome, ProtocolError),
    ],
)
async def test_a_broken_server_gives_a_clear_error(behaviour, expected):
    outcome = await call_against(behaviour)
    assert isinstance(outcome, expected), outcome
    assert outcome.message


async def test_stray_frames_are_ignored_and_the_real_reply_still_arrives():
    """A reply to a request nobody made, and deliveries for a consumer that does not exist, are dropped."""

    async def stray_then_answer(conn, writer, frame):
        writer.write(conn.send(Op.REPLY, m.CallReply(result=[]), frame.correlation_id + 1000))
        writer.write(conn.send(Op.DELIVER, m.Deliver(consumer=77, deliveries=[])))
        writer.write(conn.send(Op.HEARTBEAT))
        writer.write(conn.send(Op.REPLY, m.CallReply(result=[]), frame.correlation_id))

    assert await call_against(stray_then_answer) == []


async def test_a_server_that_never_answers_gives_a_timeout():
    async def ignore(conn, writer, frame):
        pass

    async with FakeServer(ignore) as url:
        client = await chute.AsyncClient(url, reconnect=False, timeout=0.3).connect()
        try:
            with pytest.raises(chute.errors.RequestTimeout):
                await client.list_queues()
        finally:
            await client.close()
