"""Heartbeats and dead peers on a live server, many connections at once (docs/protocol.md section 11).

The server keeps one timer for all connections (chute.server.heartbeats); these tests check what a peer sees:
a HEARTBEAT after half an interval of the server's silence on every connection, the interval a client asked
for in HELLO, and the closing of a connection silent for 3 intervals.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from chute.protocol import messages as m
from chute.protocol.connection import HEARTBEAT_BYTES, Connection
from chute.protocol.frames import HEADER, HEADER_SIZE, Op
from chute.server.heartbeats import tick_s
from chute.testing import serving

pytestmark = pytest.mark.timeout(60)
SLACK_S = 0.25  # the loop's own lateness on a busy test machine


class Peer:
    """A raw connection that records when each frame arrived."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.frames: list[tuple[float, int]] = []  # (arrival, opcode)
        self.closed_at: float | None = None
        self.task: asyncio.Task | None = None

    @classmethod
    async def open(cls, port: int, heartbeat_s: float | None) -> Peer:
        peer = cls(*await asyncio.open_connection("127.0.0.1", port))
        if heartbeat_s is not None:
            peer.writer.write(Connection("client").hello(heartbeat_s=heartbeat_s))
            header = await peer.reader.readexactly(HEADER_SIZE)
            length, opcode, _, _ = HEADER.unpack(header)
            assert opcode == Op.WELCOME
            welcome = msgspec.msgpack.decode(await peer.reader.readexactly(length - 6), type=m.Welcome)
            assert welcome.heartbeat_s == heartbeat_s
        peer.task = asyncio.ensure_future(peer._read())
        return peer

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                length, opcode, _, _ = HEADER.unpack(await self.reader.readexactly(HEADER_SIZE))
                await self.reader.readexactly(length - 6)
                self.frames.append((loop.time(), opcode))
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_at = loop.time()

    def heartbeats(self) -> list[float]:
        return [at for at, op in self.frames if op == Op.HEARTBEAT]

    def close(self) -> None:
        self.task.cancel()
        self.writer.close()


async def test_every_connection_gets_heartbeats_on_time_and_stays_open_while_it_sends_them():
    interval = 0.4
    async with serving(heartbeat_s=interval) as running:
        loop = asyncio.get_running_loop()
        peers = [await Peer.open(running.port, interval) for _ in range(40)]
        start = loop.time()
        try:
            while loop.time() - start < 2.5:  # more than 6 intervals; the peers send every 0.1 s
                for peer in peers:
                    peer.writer.write(HEARTBEAT_BYTES)
                await asyncio.sleep(0.1)
            sessions = list(running.server.sessions)
            assert len(sessions) == 40
            assert len({session._sweeper for session in sessions}) == 1  # one timer for all of them
            elapsed = loop.time() - start
            for peer in peers:
                assert peer.closed_at is None
                beats = peer.heartbeats()
                # every half interval (+ a grid step): about 10-12 in 2.5 s; never more often than asked. Counted
                # rather than timed one by one, since a busy test loop may read two of them back to back.
                assert elapsed / interval - 1 <= len(beats) <= elapsed / (interval / 2) + 1, beats
                gaps = [b - a for a, b in zip([start, *beats], beats, strict=False)]
                assert max(gaps) <= 2 * interval + SLACK_S, gaps  # far inside the peer's 3-interval dead limit
        finally:
            for peer in peers:
                peer.close()


async def test_the_interval_asked_for_in_hello_applies_at_once():
    # the server's own interval is 30 s; a client asking for 0.2 s gets heartbeats and a dead-peer check at 0.2 s
    async with serving(heartbeat_s=30.0) as running:
        loop = asyncio.get_running_loop()
        start = loop.time()
        peer = await Peer.open(running.port, 0.2)
        try:
            await asyncio.wait_for(peer.task, 10)  # it sends nothing after HELLO: closed after 3 intervals
            elapsed = peer.closed_at - start
            assert 3 * 0.2 - 0.05 <= elapsed <= 3 * 0.2 + 2 * tick_s(0.2) + SLACK_S + 1.5, elapsed  # never early
            assert len(peer.heartbeats()) >= 3  # the server sent heartbeats meanwhile
        finally:
            peer.close()


async def test_a_connection_that_never_says_hello_is_closed_after_3_intervals():
    async with serving(heartbeat_s=0.2) as running:
        loop = asyncio.get_running_loop()
        start = loop.time()
        silent = await Peer.open(running.port, None)
        talking = await Peer.open(running.port, 0.2)
        try:
            await asyncio.wait_for(silent.task, 10)
            elapsed = silent.closed_at - start
            assert 3 * 0.2 - 0.05 <= elapsed <= 3 * 0.2 + 2 * tick_s(0.2) + SLACK_S + 1.5, elapsed  # never early
            assert silent.frames == []  # nothing before WELCOME, not even a heartbeat
            await asyncio.wait_for(talking.task, 10)  # the other one said HELLO, then nothing: closed too
        finally:
            silent.close()
            talking.close()


async def test_a_closed_connection_leaves_no_timer_behind():
    async with serving(heartbeat_s=0.5) as running:
        peer = await Peer.open(running.port, 0.5)
        await asyncio.sleep(0.05)
        [session] = running.server.sessions
        sweeper = session._sweeper
        assert len(sweeper) == 1 and sweeper._timer is not None
        peer.close()
        for _ in range(100):
            if not running.server.sessions:
                break
            await asyncio.sleep(0.02)
        assert len(sweeper) == 0 and sweeper._timer is None
