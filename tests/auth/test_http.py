"""Auth on the HTTP listener, for every route of the HTTP API's table (`chute.server.api.ROUTES`): no
credentials and a wrong password are 401 (with `WWW-Authenticate` and the JSON error shape), a user lacking the
route's permission is 403, and neither changes anything; a user with exactly that permission succeeds. Also
/metrics, /healthz, login sessions and whoami."""

from __future__ import annotations

import base64

import aiohttp
import pytest

import chute
from chute.server.auth import CHALLENGE
from chute.server.users import Grant
from chute.testing import serving
from tests.auth.conftest import make_user, users
from tests.auth.test_native import snapshot

pytestmark = pytest.mark.timeout(60)
api = pytest.importorskip("chute.server.api")
ROUTES = getattr(api, "ROUTES", ())

EVERYWHERE = ("queues", "topics")


def only(permission: str):
    """A user with exactly `permission` on every queue and topic."""
    return make_user(f"only-{permission}", "pw", grants=[Grant(allow=[permission], queues="*"),
                                                         Grant(allow=[permission], topics="*")])  # fmt: skip


def all_but(permission: str):
    """A user with every permission but `permission` on every queue and topic."""
    others = [p for p in ("publish", "consume", "manage") if p != permission]
    return make_user(f"without-{permission}", "pw", grants=[Grant(allow=others, queues="*"),
                                                            Grant(allow=others, topics="*")])  # fmt: skip


def every_user():
    topic_admin = make_user("topic-admin", "pw", grants=[Grant(allow=["manage"], topics="*")])
    return [*users(), make_user("nobody", "pw"), topic_admin,
            *(only(p) for p in ("publish", "consume", "manage")),
            *(all_but(p) for p in ("publish", "consume", "manage"))]  # fmt: skip


# The name each route is called on (so a successful call has something to act on) and a valid body / query.
NAMES = {"create_queue": "orders.new", "delete_queue": "orders.c", "create_topic": "events.new",
         "redrive": "orders.dlq"}  # fmt: skip
BINDING = {"pattern": ">", "queue": "orders.b"}
BODIES = {
    "create_queue": {}, "update_queue": {"lease_s": 5}, "publish": {"body": "x"},
    "publish_batch": {"messages": [{"body": "x"}]}, "receive": {}, "nack": {"receipts": None},
    "ack": {"receipts": None}, "extend": {"receipts": None, "lease_s": 30}, "redrive": {}, "create_topic": {},
    "update_topic": {}, "publish_to_topic": {"body": "x", "subject": "a"},
    "publish_batch_to_topic": {"messages": [{"body": "x", "subject": "a"}]},
    "subscribe": {"pattern": "new.>", "queue": "orders.a"}, "update_subscription": {"filter": None},
    "login": {"user": "alice", "password": "alice-pw"},
}  # fmt: skip
QUERIES = {"update_subscription": BINDING, "unsubscribe": BINDING}


def right_user(route) -> str:
    if route.access in ("publish", "consume", "manage"):
        return f"only-{route.access}"
    return {"see": "only-consume", "user": "nobody", "superuser": "admin", "public": "nobody"}[route.access]


def wrong_user(route) -> str | None:
    if route.access in ("publish", "consume", "manage"):
        return f"without-{route.access}"
    return {"see": "nobody", "superuser": "alice"}.get(route.access)


@pytest.fixture
async def server():
    async with serving(users=every_user()) as running:
        async with chute.AsyncClient(running.url, user="admin", password="admin-pw", reconnect=False) as admin:
            await admin.create_queue("orders.dlq")
            await admin.create_queue("orders.a", max_deliveries=1, dead_letter_queue="orders.dlq")
            await admin.create_queue("orders.b")
            await admin.create_queue("orders.c")
            await admin.create_topic("events.x")
            await admin.subscribe("events.x", ">", "orders.b")
            await admin.publish("orders.a", b"one")
            await admin.publish("orders.a", b"two")
        yield running


def request_of(route, server, receipts=None):
    name = NAMES.get(route.operation_id, "events.x" if route.kind == "topic" else "orders.a")
    path = route.path.replace("{name}", name)
    body = BODIES.get(route.operation_id)
    if body is not None and "receipts" in body:
        body = {**body, "receipts": receipts or ["1"]}
    return route.method, f"{server.http_url}{path}", body, QUERIES.get(route.operation_id)


async def call(session, route, server, headers=None, receipts=None):
    method, url, body, query = request_of(route, server, receipts)
    async with session.request(method, url, json=body, params=query, headers=headers) as response:
        text = await response.text()
        return response.status, response.headers, text


def password_of(user: str) -> str:
    return f"{user}-pw" if user in ("admin", "alice", "bob", "mgr") else "pw"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def ids(routes):
    return [f"{r.method} {r.path}" for r in routes]


PROTECTED = [r for r in ROUTES if r.access != "public"]


@pytest.mark.skipif(not PROTECTED, reason="the HTTP API's route table has not landed")
@pytest.mark.parametrize("route", PROTECTED, ids=ids(PROTECTED))
async def test_no_or_wrong_credentials_are_401_and_change_nothing(server, route):
    before = await snapshot(server)
    async with aiohttp.ClientSession() as session:
        for headers in (None, basic("alice", "wrong"), basic("ghost", "pw"), {"Authorization": "Bearer cht_nope"},
                        {"Authorization": "Digest abc"}):  # fmt: skip
            status, headers_back, text = await call(session, route, server, headers)
            assert status == 401, text
            assert headers_back["WWW-Authenticate"] == CHALLENGE
            assert '"name":"unauthenticated"' in text.replace(" ", "")
    assert await snapshot(server) == before


LIMITED = [r for r in ROUTES if wrong_user(r) is not None]


@pytest.mark.skipif(not LIMITED, reason="the HTTP API's route table has not landed")
@pytest.mark.parametrize("route", LIMITED, ids=ids(LIMITED))
async def test_a_user_without_the_permission_gets_403_and_nothing_changes(server, route):
    before = await snapshot(server)
    async with aiohttp.ClientSession() as session:
        status, _, text = await call(session, route, server, basic(wrong_user(route), password_of(wrong_user(route))))
    assert status == 403, text
    assert '"name":"forbidden"' in text.replace(" ", "")
    assert await snapshot(server) == before


@pytest.mark.skipif(not ROUTES, reason="the HTTP API's route table has not landed")
@pytest.mark.parametrize("route", ROUTES, ids=ids(ROUTES))
async def test_a_user_with_exactly_the_permission_succeeds(server, route):
    receipts = None
    if route.operation_id in ("ack", "nack", "extend"):
        async with chute.AsyncClient(server.url, user="admin", password="admin-pw", reconnect=False) as admin:
            receipts = [str(d.receipt) for d in await admin.receive("orders.a", lease_s=60)]
            # settle over HTTP while the native connection that leased them is still open
            async with aiohttp.ClientSession() as session:
                who = right_user(route)
                status, _, text = await call(session, route, server, basic(who, password_of(who)), receipts=receipts)
    else:
        async with aiohttp.ClientSession() as session:
            status, _, text = await call(
                session, route, server, basic(right_user(route), password_of(right_user(route)))
            )
    assert 200 <= status < 300, text


async def test_subscribing_needs_manage_on_the_queue_too(server):
    url = f"{server.http_url}/api/v1/topics/events.x/subscriptions"
    async with aiohttp.ClientSession() as session:
        for who in ("mgr", "topic-admin"):  # manage on events.* but not on the queue "elsewhere" / any queue
            async with session.post(
                url, json={"pattern": ">", "queue": "elsewhere"}, headers=basic(who, password_of(who))
            ) as response:
                assert response.status == 403, who


async def test_unsubscribing_and_changing_a_filter_need_manage_on_the_queue_too(server):
    before = await snapshot(server)
    url = f"{server.http_url}/api/v1/topics/events.x/subscriptions"
    topic_admin = basic("topic-admin", "pw")  # manage on every topic, on no queue
    async with aiohttp.ClientSession() as session:
        async with session.delete(url, params=BINDING, headers=topic_admin) as response:
            assert response.status == 403
        async with session.patch(url, params=BINDING, json={"filter": None}, headers=topic_admin) as response:
            assert response.status == 403
    assert await snapshot(server) == before


async def test_lists_show_only_what_the_caller_may_see(server):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.http_url}/api/v1/queues", headers=basic("bob", "bob-pw")) as r:
            assert r.status == 200
            assert sorted(q["name"] for q in (await r.json())["queues"]) == ["orders.a", "orders.b", "orders.c",
                                                                           "orders.dlq"]  # fmt: skip
        async with session.get(f"{server.http_url}/api/v1/topics", headers=basic("bob", "bob-pw")) as r:
            assert (await r.json())["topics"] == []


async def test_login_gives_a_session_token_for_bearer(server):
    async with aiohttp.ClientSession() as session:
        login = f"{server.http_url}/api/v1/login"
        async with session.post(login, json={"user": "alice", "password": "wrong"}) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == CHALLENGE
        async with session.post(login, json={"user": "alice", "password": "alice-pw"}) as response:
            assert response.status == 200
            reply = await response.json()
        assert reply["token"].startswith("chs_") and reply["expires_s"] > 0
        bearer = {"Authorization": f"Bearer {reply['token']}"}
        async with session.get(f"{server.http_url}/api/v1/whoami", headers=bearer) as response:
            me = await response.json()
        assert me == {"name": "alice", "auth_enabled": True, "superuser": False,
                      "permissions": [{"allow": ["publish", "consume"], "queues": "orders.*"},
                                      {"allow": ["publish"], "topics": "events.*"}]}  # fmt: skip
        async with session.post(f"{server.http_url}/api/v1/queues/other/purge", headers=bearer) as response:
            assert response.status == 403


async def test_metrics_need_a_user_and_healthz_stays_open(server):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.http_url}/healthz") as response:
            assert response.status == 200
        async with session.get(f"{server.http_url}/metrics") as response:
            assert response.status == 401
            assert "WWW-Authenticate" in response.headers
        async with session.get(f"{server.http_url}/metrics", headers=basic("alice", "wrong")) as response:
            assert response.status == 401
        async with session.get(f"{server.http_url}/metrics", headers=basic("nobody", "pw")) as response:
            assert response.status == 200
            assert 'queue="orders.a"' not in await response.text()  # nobody sees no queue
        async with session.get(f"{server.http_url}/metrics", headers=basic("bob", "bob-pw")) as response:
            assert response.status == 200
            text = await response.text()
            assert 'queue="orders.a"' in text and 'queue="other"' not in text


async def test_with_auth_off_no_credentials_are_needed():
    async with serving() as running, aiohttp.ClientSession() as session:
        async with session.get(f"{running.http_url}/api/v1/whoami") as response:
            assert response.status == 200
            assert (await response.json())["auth_enabled"] is False
        async with session.get(f"{running.http_url}/metrics") as response:
            assert response.status == 200
