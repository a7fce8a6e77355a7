"""Auth on the native protocol, over real sockets: HELLO without or with wrong credentials is refused
(`unauthenticated`, connection closed); every request a user lacks the permission for is `forbidden`, changes
nothing (checked through an admin's view of the queue) and leaves the connection usable."""

from __future__ import annotations

import asyncio
import socket

import msgspec
import pytest

import chute
from chute.errors import Forbidden, Unauthenticated
from chute.protocol import messages as m
from chute.protocol.connection import Connection
from chute.protocol.frames import Op
from chute.testing import serving
from tests.auth.conftest import users

pytestmark = pytest.mark.timeout(60)


def client(server, user: str | None = None, password: str | None = None, **options) -> chute.AsyncClient:
    return chute.AsyncClient(server.url, user=user, password=password, reconnect=False, timeout=10, **options)


@pytest.fixture
async def server():
    async with serving(users=users()) as running:
        async with client(running, "admin", "admin-pw") as admin:
            await admin.create_queue("orders.dlq")
            await admin.create_queue("orders.a", max_deliveries=1, dead_letter_queue="orders.dlq")
            await admin.create_queue("orders.b")
            await admin.create_queue("other")
            await admin.create_topic("events.x")
            await admin.subscribe("events.x", ">", "orders.b")
            for queue in ("orders.a", "other"):
                await admin.publish(queue, b"one")
                await admin.publish(queue, b"two")
        yield running


async def test_no_credentials_are_refused(server):
    with pytest.raises(Unauthenticated, match="requires credentials"):
        await client(server).connect()


@pytest.mark.parametrize(("user", "password"), [("alice", "wrong"), ("nobody", "alice-pw"), ("alice", "")])
async def test_wrong_password_or_unknown_user_is_refused(server, user, password):
    with pytest.raises(Unauthenticated, match="wrong user name or password"):
        await client(server, user, password).connect()


async def test_wrong_token_is_refused(server):
    with pytest.raises(Unauthenticated, match="token is not valid"):
        await chute.AsyncClient(server.url.replace("chute://", "chute://cht_forged@"), reconnect=False).connect()


async def test_credentials_in_the_url(server):
    url = server.url.replace("chute://", "chute://alice:alice-pw@")
    async with chute.AsyncClient(url, reconnect=False) as alice:
        assert [q.name for q in await alice.list_queues()] == ["orders.a", "orders.b", "orders.dlq"]


async def test_requests_pipelined_behind_a_refused_hello_are_never_run(server):
    """A client that sends requests right behind a bad HELLO gets the refusal, and nothing it sent was done."""
    conn = Connection("client")
    data = conn.hello(user="alice", password="wrong")
    data += conn.send(Op.CALL, m.CallRequest(method="purge_queue", args={"name": "orders.a"}), 1)
    data += conn.send(Op.PUBLISH, m.PublishRequest(dest="orders.a", messages=[chute.Publish(body=b"x")]), 2)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(data)
    received = b""
    async with asyncio.timeout(10):
        while chunk := await reader.read(65536):
            received += chunk
    writer.close()
    frames = conn.receive_data(received) if received else []
    assert [f.op for f in frames] == [Op.ERROR] and frames[0].body.name == "unauthenticated"
    async with client(server, "admin", "admin-pw") as admin:
        assert (await admin.queue_stats("orders.a")).ready == 2


async def snapshot(server) -> dict:
    """Everything a refused request could have changed, as the admin sees it."""
    async with client(server, "admin", "admin-pw") as admin:
        queues = {q.name: msgspec.to_builtins(q) for q in await admin.list_queues()}
        stats = {name: msgspec.to_builtins(await admin.queue_stats(name)) for name in queues}
        for each in stats.values():
            each.pop("oldest_age_s", None)  # moves with time
            each.pop("received_age_s", None)  # so does this
        topics = msgspec.to_builtins(await admin.list_topics())
        return {"queues": queues, "stats": stats, "topics": topics}


# (description, user, the call) -- each call lacks exactly the permission it needs
REFUSED = [
    ("publish to a queue", "bob", lambda c: c.publish("orders.a", b"x")),
    ("publish to a queue outside the pattern", "alice", lambda c: c.publish("other", b"x")),
    ("publish to a topic", "bob", lambda c: c.publish("events.x", b"x", subject="s")),
    ("publish a batch", "mgr", lambda c: c.publish_batch("orders.a", [b"x", b"y"])),
    ("receive", "alice", lambda c: c.receive("other")),
    ("receive without consume", "mgr", lambda c: c.receive("orders.a")),
    ("consume", "alice", lambda c: c.consume("other")),
    ("peek", "mgr", lambda c: c.peek("orders.a")),
    ("create a queue", "alice", lambda c: c.create_queue("orders.new")),
    ("create a queue outside the pattern", "mgr", lambda c: c.create_queue("elsewhere")),
    ("update a queue", "alice", lambda c: c.update_queue("orders.a", lease_s=5)),
    ("delete a queue", "alice", lambda c: c.delete_queue("orders.b")),
    ("purge a queue", "bob", lambda c: c.purge_queue("orders.a")),
    ("purge a queue outside the pattern", "mgr", lambda c: c.purge_queue("other")),
    ("redrive", "alice", lambda c: c.redrive("orders.dlq")),
    ("queue stats of an unseen queue", "alice", lambda c: c.queue_stats("other")),
    ("create a topic", "alice", lambda c: c.create_topic("events.y")),
    ("delete a topic", "alice", lambda c: c.delete_topic("events.x")),
    ("subscribe without manage on the queue", "mgr", lambda c: c.subscribe("events.x", ">", "other")),
    ("subscribe without manage on the topic", "alice", lambda c: c.subscribe("events.x", ">", "orders.a")),
    ("unsubscribe", "alice", lambda c: c.unsubscribe("events.x", ">", "orders.b")),
    ("update a topic", "alice", lambda c: c.update_topic("events.x", retention_s=5)),
    ("update a subscription without manage on the topic", "alice",
     lambda c: c.update_subscription("events.x", ">", "orders.b", filter={"k": "v"})),
]


@pytest.mark.parametrize(("what", "user", "call"), REFUSED, ids=[r[0] for r in REFUSED])
async def test_a_request_without_the_permission_is_forbidden_and_changes_nothing(server, what, user, call):
    before = await snapshot(server)
    async with client(server, user, f"{user}-pw") as caller:
        with pytest.raises(Forbidden, match=f"^{user} lacks"):
            await call(caller)
        assert await caller.list_topics() is not None  # the connection stays open and usable
    assert await snapshot(server) == before


async def test_settling_someone_elses_delivery_needs_consume_on_its_queue(server):
    async with client(server, "admin", "admin-pw") as admin, client(server, "alice", "alice-pw") as alice:
        [delivery] = await admin.receive("other")
        before = await snapshot(server)
        for settle in (alice.ack, alice.nack, lambda d: alice.extend(d, 60)):
            with pytest.raises(Forbidden):
                await settle(delivery)
        assert await snapshot(server) == before
        assert (await admin.queue_stats("other")).in_flight == 1


async def test_what_a_user_may_do_works(server):
    async with client(server, "alice", "alice-pw") as alice:
        await alice.publish("orders.a", b"three")
        await alice.publish("events.x", b"event", subject="e")
        [delivery] = await alice.receive("orders.a")
        await alice.ack(delivery)
        consumer = await alice.consume("orders.b")
        got = await consumer.get(timeout=10)
        assert got is not None and got.body == b"event"
        await alice.ack(got)
        await consumer.close()
        assert (await alice.queue_stats("orders.a")).ready == 2
    async with client(server, "mgr", "mgr-pw") as mgr:
        await mgr.create_queue("orders.new")
        await mgr.subscribe("events.x", "new.>", "orders.new")
        await mgr.unsubscribe("events.x", "new.>", "orders.new")
        assert await mgr.purge_queue("orders.a") == 2
        await mgr.delete_queue("orders.new")
        await mgr.create_topic("events.y")
        await mgr.delete_topic("events.y")


async def test_lists_show_only_what_the_caller_may_see(server):
    async with client(server, "bob", "bob-pw") as bob:
        assert [q.name for q in await bob.list_queues()] == ["orders.a", "orders.b", "orders.dlq"]
        assert await bob.list_topics() == []
    async with client(server, "mgr", "mgr-pw") as mgr:
        assert [t.name for t in await mgr.list_topics()] == ["events.x"]
    async with client(server, "admin", "admin-pw") as admin:
        assert [q.name for q in await admin.list_queues()] == ["orders.a", "orders.b", "orders.dlq", "other"]


async def test_api_tokens_and_the_superuser_token(tmp_path):
    from chute.server.users import UsersFile, new_token

    secret, record = new_token("ci")
    with UsersFile(tmp_path).edit() as stored:
        stored.extend(users())
        stored[1].tokens.append(record)  # alice
    async with serving(str(tmp_path), token="root-token") as running:
        async with chute.AsyncClient(running.url.replace("chute://", "chute://:root-token@"), reconnect=False) as root:
            await root.create_queue("orders.q")
        async with chute.AsyncClient(running.url, token=secret, reconnect=False) as alice:
            await alice.publish("orders.q", b"x")
            with pytest.raises(Forbidden):
                await alice.create_queue("orders.r")
        with UsersFile(tmp_path).edit() as stored:
            stored[1].tokens.clear()  # revoke: the next connection is refused (within the 1 s recheck)
        await _eventually_refused(running.url, secret)


async def _eventually_refused(url: str, token: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        try:
            async with chute.AsyncClient(url, token=token, reconnect=False):
                pass
        except Unauthenticated:
            return
        assert loop.time() < deadline, "the revoked token still works after 10 s"
        await asyncio.sleep(0.1)


async def test_without_auth_everyone_may_do_everything():
    async with serving() as running, chute.AsyncClient(running.url, reconnect=False) as anyone:
        await anyone.create_queue("q")
        await anyone.publish("q", b"x")


def test_a_refused_connection_does_not_leak_a_socket_to_the_broker():
    """The server closes a refused connection itself: reading it ends with EOF."""

    async def main() -> None:
        async with serving(users=users()) as running:
            conn = Connection("client")
            with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
                sock.sendall(conn.hello())
                data = await asyncio.to_thread(_read_all, sock)
            [frame] = conn.receive_data(data)
            assert frame.body.name == "unauthenticated"

    asyncio.run(main())


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data



async def _sessions_of(running, name: str, *, gone: bool, seconds: float = 15) -> None:
    """Wait until the server has (or no longer has) a native connection of user `name`, without sending it
    anything (the session's heartbeat is what must notice a change of users)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while any(s.principal.name == name for s in running.server.sessions) == gone:
        assert loop.time() < deadline, f"{name}'s connection still {'open' if gone else 'missing'} after {seconds} s"
        await asyncio.sleep(0.05)


async def test_open_connections_of_a_changed_or_deleted_user_are_closed(tmp_path):
    from chute.server.users import Grant, UsersFile, new_token

    secret, record = new_token("ci")
    with UsersFile(tmp_path).edit() as stored:
        stored.extend(users())
        stored[1].tokens.append(record)  # alice's token
    async with serving(str(tmp_path), heartbeat_s=0.5) as running:
        async with client(running, "admin", "admin-pw") as admin:
            await admin.create_queue("orders.a")
        by_password = client(running, "alice", "alice-pw", heartbeat_s=0.5)
        by_token = chute.AsyncClient(running.url, token=secret, reconnect=False, timeout=10, heartbeat_s=0.5)
        bob = client(running, "bob", "bob-pw", heartbeat_s=0.5)
        async with by_password, by_token, bob:
            await by_password.receive("orders.a", wait_s=0)
            await by_token.receive("orders.a", wait_s=0)
            await bob.receive("orders.a", wait_s=0)
            with UsersFile(tmp_path).edit() as stored:  # alice loses consume; nobody sends anything
                stored[1].grants = [Grant(allow=["publish"], queues="orders.*")]
            await _sessions_of(running, "alice", gone=True)  # both of alice's connections are closed
            with pytest.raises(chute.errors.ChuteError):
                await by_password.receive("orders.a", wait_s=0)
            await bob.receive("orders.a", wait_s=0)  # an unchanged user keeps its connection
            with UsersFile(tmp_path).edit() as stored:
                del stored[2]  # bob is deleted
            await _sessions_of(running, "bob", gone=True)
        async with client(running, "alice", "alice-pw") as alice:  # back, with the new permissions
            await alice.publish("orders.a", b"x")
            with pytest.raises(Forbidden):
                await alice.receive("orders.a", wait_s=0)
        with pytest.raises(Unauthenticated):
            async with client(running, "bob", "bob-pw"):
                pass


async def test_anonymous_connections_are_closed_when_auth_is_turned_on(tmp_path):
    from chute.server.users import UsersFile

    async with (
        serving(str(tmp_path), heartbeat_s=0.5) as running,
        chute.AsyncClient(running.url, reconnect=False, timeout=10, heartbeat_s=0.5) as anyone,
    ):
        await anyone.create_queue("q")
        with UsersFile(tmp_path).edit() as stored:  # the first user turns auth on
            stored.extend(users())
        await _sessions_of(running, "anonymous", gone=True)
        with pytest.raises(chute.errors.ChuteError):
            await anyone.list_queues()
