"""Requests pipelined on one connection run in the order they were sent, although a PUBLISH to one destination
runs without a task (at once, answered when durable) and other requests run as tasks: a PUBLISH behind a
request that became a task in the same read waits its turn too. Frames written by hand, all in one write."""

from __future__ import annotations

import msgspec
import pytest

from chute.model import Publish
from chute.protocol import Connection, Op
from chute.protocol import messages as m
from chute.testing import running_server
from tests.protocol.test_fuzz_server import ERROR_DECODER, RawPeer

REPLY = msgspec.msgpack.Decoder(m.PublishReply)


def call(correlation_id: int, method: str, **args) -> bytes:
    return Connection("client").send(Op.CALL, m.CallRequest(method=method, args=args), correlation_id)


def publish(correlation_id: int, dest: str, *bodies: bytes) -> bytes:
    request = m.PublishRequest(dest=dest, messages=[Publish(body=body) for body in bodies])
    return Connection("client").send(Op.PUBLISH, request, correlation_id)


def answers(peer: RawPeer, count: int) -> dict[int, tuple[int, bytes]]:
    received = peer.read_until(lambda r: len(r.answered()) >= count)
    return {corr: (op, payload) for op, corr, payload in received.frames if corr and op in (Op.REPLY, Op.ERROR)}


@pytest.fixture(scope="module")
def server():
    with running_server(fsync="always") as running:
        yield running


@pytest.mark.parametrize("behind_hello", [False, True], ids=["after-welcome", "behind-hello"])
def test_a_publish_behind_a_call_in_the_same_read_runs_after_it(server, behind_hello):
    queue = f"fresh-{behind_hello}"
    requests = call(1, "create_queue", name=queue) + publish(2, queue, b"one", b"two") + publish(3, queue, b"three")
    with RawPeer(server.port) as peer:
        if behind_hello:
            peer.send(Connection("client").hello() + requests)
        else:
            peer.handshake()
            peer.send(requests)
        got = answers(peer, 3)
    errors = {corr: ERROR_DECODER.decode(payload).name for corr, (op, payload) in got.items() if op == Op.ERROR}
    assert errors == {}  # each publish found the queue the CALL before it created
    first, second = REPLY.decode(got[2][1]).ids, REPLY.decode(got[3][1]).ids
    assert len(first) == 2 and len(second) == 1 and first[0] < first[1] < second[0]


def test_a_refused_publish_is_answered_with_its_error_and_the_connection_goes_on(server):
    with RawPeer(server.port) as peer:
        peer.handshake()
        peer.send(call(1, "create_queue", name="exists"))
        answers(peer, 1)
        peer.send(publish(2, "missing", b"lost") + publish(3, "exists", b"kept"))
        got = answers(peer, 3)
    assert got[2][0] == Op.ERROR and ERROR_DECODER.decode(got[2][1]).name == "queue_not_found"
    assert got[3][0] == Op.REPLY and len(REPLY.decode(got[3][1]).ids) == 1
