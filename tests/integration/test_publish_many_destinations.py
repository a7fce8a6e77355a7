"""Protocol 2's PUBLISH with several destinations: one request, each group stored or refused on its own.

Driven two ways: the client's automatic batching (publish_nowait to many queues gathers per connection, not per
destination), and hand-made requests over a raw socket, so each refusal is checked group by group.
"""

from __future__ import annotations

import asyncio

import pytest

import chute
from chute.model import Publish
from chute.protocol import Connection, Op
from chute.protocol import messages as m
from chute.server.users import Grant, User, hash_password
from chute.testing import serving

pytestmark = pytest.mark.timeout(60)


async def test_publishes_to_many_queues_travel_together_and_keep_their_order():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        assert client.server_info.version == 2
        names = [f"q{i}" for i in range(50)]
        for name in names:
            await client.create_queue(name)
        requests = 0
        original = client._call

        async def counting(op, payload, kind, timeout=None):
            nonlocal requests
            requests += op is Op.PUBLISH
            return await original(op, payload, kind, timeout)

        client._call = counting
        futures = [client.publish_nowait(names[i % 50], b"%d" % i) for i in range(2000)]
        ids = await asyncio.gather(*futures)
        assert len(set(ids)) == 2000
        assert requests < 100  # a handful of requests carried 2,000 messages to 50 queues (one each: 2,000)
        for j, name in enumerate(names):
            bodies = [int(d.body) for d in await client.peek(name, 100)]
            assert bodies == list(range(j, 2000, 50))  # every message, in publish order


async def test_what_is_published_in_one_turn_of_the_loop_leaves_in_one_request():
    # with nothing in flight, the request leaves at the end of the turn (when a task started for it would first
    # run): a producer that publishes a few messages at a time (a paced loop) makes one request, one group commit,
    # per burst, not one for the first message and another, a confirm later, for the rest
    async with serving() as server, chute.AsyncClient(server.url, linger_s=0.5) as client:
        for name in ("a", "b"):
            await client.create_queue(name)
        requests = []
        original = client._call

        async def counting(op, payload, kind, timeout=None):
            if op is Op.PUBLISH:
                requests.append(1 + len(payload.more or ()))
            return await original(op, payload, kind, timeout)

        client._call = counting
        loop = asyncio.get_running_loop()
        for burst in range(3):
            started = loop.time()
            futures = [client.publish_nowait(name, b"%d" % burst) for name in ("a", "b", "a")]
            await asyncio.gather(*futures)
            assert loop.time() - started < 0.4  # not held back for the 0.5 s linger: it left in the same turn
        assert requests == [2, 2, 2]  # one request per burst, both destinations in it
        assert [d.body for d in await client.peek("a", 10)] == [b"0", b"0", b"1", b"1", b"2", b"2"]


async def raw_publish(url_port: int, request: m.PublishRequest, *, user=None, password=None) -> m.PublishReply:
    frame = await raw_request(url_port, request, user=user, password=password)
    assert frame.op is Op.REPLY, frame
    return msgspec_decode(frame.body)


async def raw_request(url_port: int, request: m.PublishRequest, *, user=None, password=None):
    """The frame that answers `request`, sent over a connection of its own (protocol 2)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", url_port)
    conn = Connection("client")
    try:
        writer.write(conn.hello(user=user, password=password))
        frames = []
        while not frames:
            frames = conn.receive_data(await reader.read(65536))
        assert frames[0].op is Op.WELCOME and frames[0].body.version == 2
        writer.write(conn.send(Op.PUBLISH, request, 1))
        frames = []
        while not frames:
            frames = conn.receive_data(await reader.read(65536))
        return frames[0]
    finally:
        writer.close()


def msgspec_decode(body) -> m.PublishReply:
    from chute.protocol.connection import decode_reply

    return decode_reply(body, m.PublishReply) if isinstance(body, bytes | memoryview) else body


async def test_each_group_is_stored_or_refused_on_its_own():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("a")
        await client.create_queue("full", max_length=1)
        await client.publish("full", b"already")
        await client.create_topic("t")
        await client.create_queue("sub")
        await client.subscribe("t", "t.>", "sub")
        request = m.PublishRequest(
            dest="a",
            messages=[Publish(body=b"a1"), Publish(body=b"a2")],
            more=[
                m.PublishGroup(dest="missing", messages=[Publish(body=b"lost")]),
                m.PublishGroup(dest="full", messages=[Publish(body=b"no room")]),
                m.PublishGroup(dest="t", messages=[Publish(body=b"routed", subject="t.x")]),
                m.PublishGroup(dest="a", messages=[Publish(body=b"a3", priority=99)]),  # invalid: refused alone
                m.PublishGroup(dest="a", messages=[Publish(body=b"a4")]),
            ],
        )
        reply = await raw_publish(server.port, request)
        failed = {f.group: f.error.name for f in reply.failed}
        assert failed == {1: "queue_not_found", 2: "queue_full", 4: "invalid_argument"}
        assert len(reply.ids) == 7
        assert [i == 0 for i in reply.ids] == [False, False, True, True, False, True, False]
        assert [d.body for d in await client.peek("a", 10)] == [b"a1", b"a2", b"a4"]
        assert [d.body for d in await client.peek("full", 10)] == [b"already"]
        assert [d.body for d in await client.peek("sub", 10)] == [b"routed"]


async def test_a_request_for_one_destination_is_what_it_always_was():
    async with serving() as server:
        frame = await raw_request(server.port, m.PublishRequest(dest="nowhere", messages=[Publish(body=b"x")]))
        assert frame.op is Op.ERROR and frame.body.name == "queue_not_found"  # an ERROR, not a reply with failed


async def test_groups_are_authorized_one_by_one():
    app = User(name="app", password_hash=hash_password("pw", log2_n=4),
               grants=[Grant(allow=["publish"], queues="mine.*")])  # fmt: skip
    async with (
        serving(users=[app], token="admin-token") as server,
        chute.AsyncClient(server.url, token="admin-token") as admin,
    ):
        await admin.create_queue("mine.a")
        await admin.create_queue("theirs")
        request = m.PublishRequest(
            dest="theirs", messages=[Publish(body=b"no")],
            more=[m.PublishGroup(dest="mine.a", messages=[Publish(body=b"yes")])],
        )  # fmt: skip
        reply = await raw_publish(server.port, request, user="app", password="pw")
        assert [(f.group, f.error.name) for f in reply.failed] == [(0, "forbidden")]
        assert [d.body for d in await admin.peek("mine.a", 10)] == [b"yes"]
        assert await admin.peek("theirs", 10) == []
