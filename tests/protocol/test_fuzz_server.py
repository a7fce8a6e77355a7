"""Fuzzing a live server over real sockets on 127.0.0.1.

Hypothesis sends random bytes and mutated valid frames (flipped bytes, truncation, a changed length or opcode, a
corrupted PUBLISH payload) on a raw socket, after a valid HELLO or instead of it. What the server must answer is
predicted by feeding the same bytes to a sans-I/O server `Connection` (the oracle): a protocol violation gets one
connection-level ERROR (id 0, code 1005 / 1006 / 1007) and the connection is closed; valid requests get exactly one
REPLY or ERROR with their id and the connection stays usable. Meanwhile a well-behaved `chute.AsyncClient` keeps
publishing and consuming on the same server, and afterwards its queue's stats show exactly what it published.

Every socket read has a timeout; the number of examples comes from the hypothesis profile (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chute
from chute.errors import ChuteError, FrameTooLarge, ProtocolError, UnsupportedVersion
from chute.model import Publish
from chute.protocol import Connection, Op
from chute.protocol import messages as m
from chute.protocol.frames import HEADER, HEADER_SIZE, REQUESTS, pack_header
from chute.testing import running_server

pytestmark = pytest.mark.timeout(180)

GOOD = "good-queue"  # the well-behaved client's queue
FUZZ = "fz"  # the queue fuzzed PUBLISH frames go to (a name no few-byte mutation turns into GOOD)
MAX_FRAME = 128 * 1024
SERVER_OPTIONS = {"max_frame_bytes": MAX_FRAME, "max_message_bytes": 64 * 1024, "heartbeat_s": 5.0}
READ_TIMEOUT_S = 5.0
PING_ID = 0xFFFF_FFF0
CONNECTION_ERRORS = {ProtocolError.code, FrameTooLarge.code, UnsupportedVersion.code}
ERROR_DECODER = msgspec.msgpack.Decoder(m.ErrorBody)

# -- a raw peer ---------------------------------------------------------------------------------------------------


@dataclass
class Received:
    frames: list[tuple[int, int, bytes]] = field(default_factory=list)  # (opcode, correlation id, payload)
    eof: bool = False

    def errors(self, correlation_id: int) -> list[m.ErrorBody]:
        return [ERROR_DECODER.decode(p) for op, c, p in self.frames if op == Op.ERROR and c == correlation_id]

    def answered(self) -> Counter:
        return Counter(c for op, c, _ in self.frames if op in (Op.REPLY, Op.ERROR) and c)


class RawPeer:
    """A blocking socket that speaks frames by hand; every read is bounded by a deadline."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.received = Received()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:  # the server may have closed already (it answered an earlier part)
            pass

    def shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def read_until(self, done, timeout: float = READ_TIMEOUT_S) -> Received:
        """Read frames until `done(received)` or EOF; fail the test if neither happens within `timeout`."""
        deadline = time.monotonic() + timeout
        received = self.received
        while not done(received) and not received.eof:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no answer within {timeout} s; got {received.frames}"
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                received.eof = True
            self.buffer += data
            while len(self.buffer) >= HEADER_SIZE:
                length, opcode, _flags, correlation_id = HEADER.unpack_from(self.buffer)
                if len(self.buffer) < length + 4:
                    break
                received.frames.append((opcode, correlation_id, bytes(self.buffer[HEADER_SIZE : length + 4])))
                del self.buffer[: length + 4]
        return received

    def read_to_eof(self, timeout: float = READ_TIMEOUT_S) -> Received:
        return self.read_until(lambda r: False, timeout)

    def handshake(self, **hello) -> m.Welcome:
        self.send(Connection("client").hello(**hello))
        received = self.read_until(lambda r: any(op in (Op.WELCOME, Op.ERROR) for op, _, _ in r.frames))
        [(op, corr, payload)] = [f for f in received.frames if f[0] in (Op.WELCOME, Op.ERROR)]
        assert op == Op.WELCOME, ERROR_DECODER.decode(payload)
        return msgspec.msgpack.decode(payload, type=m.Welcome)


# -- the oracle ---------------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    error: ChuteError | None  # the connection error the server must send (then close)
    known_bug: bool  # invalid UTF-8: the server closes without an ERROR frame (see test_frames.py)
    requests: Counter  # correlation ids of the complete, valid requests before any error
    pending: bool  # an incomplete frame is left: the server waits for more bytes
    hello: bool  # the stream contained an accepted HELLO


def predict(stream: bytes) -> Prediction:
    """What a server must do with `stream`: the sans-I/O server Connection, fed one byte at a time."""
    oracle = Connection("server", max_frame_bytes=MAX_FRAME)
    requests: Counter = Counter()
    hello = False
    for i in range(len(stream)):
        try:
            frames = oracle.receive_data(stream[i : i + 1])
        except ChuteError as exc:
            return Prediction(exc, False, requests, False, hello)
        except UnicodeDecodeError:
            return Prediction(None, True, requests, False, hello)
        for frame in frames:
            if frame.op is Op.HELLO:
                try:
                    oracle.accept(frame.body, server="oracle", heartbeat_s=5.0, max_message_bytes=1)
                except UnsupportedVersion as exc:
                    return Prediction(exc, False, requests, False, hello)
                hello = True
            elif frame.op in REQUESTS:
                requests[frame.correlation_id] += 1
    return Prediction(None, False, requests, bool(oracle._buffer), hello)


def publish_frame(correlation_id: int = 7, bodies: tuple[bytes, ...] = (b"hi",)) -> bytes:
    request = m.PublishRequest(dest=FUZZ, messages=[Publish(body=body) for body in bodies])
    return Connection("client").send(Op.PUBLISH, request, correlation_id)


def check_exchange(port: int, data: bytes, mode: str) -> None:
    """Send `data` (mode "raw": instead of a HELLO; "pipelined": right behind one; "after": after the WELCOME)
    and check the server's answer against the oracle."""
    hello = b"" if mode == "raw" else Connection("client").hello()
    prediction = predict(hello + data)
    with RawPeer(port) as peer:
        if mode == "after":
            peer.handshake()
        else:
            data = hello + data
        peer.send(data)
        if prediction.error is not None or prediction.known_bug:
            received = peer.read_to_eof()
            assert received.eof
            others = [f for f in received.frames if not (f[0] == Op.ERROR and f[1] == 0)]
            for op, corr, _ in others:  # replies to requests in chunks the server read before the bad one
                assert op in (Op.WELCOME, Op.HEARTBEAT, Op.DELIVER) or corr in prediction.requests, received
            if prediction.known_bug:
                assert received.errors(0) == [] or received.errors(0)[0].code == ProtocolError.code
                return
            [error] = received.errors(0)
            assert received.frames[-1][:2] == (Op.ERROR, 0), "nothing may follow a connection error"
            assert error.code == prediction.error.code and error.name == prediction.error.name
            assert error.code in CONNECTION_ERRORS
            return
        expected = prediction.requests
        if prediction.pending:
            received = peer.read_until(lambda r: r.answered() == expected)
            assert received.answered() == expected and received.errors(0) == [], received
            peer.shutdown_write()  # the server has half a frame: EOF makes it close, without an error
            received = peer.read_to_eof()
            assert received.errors(0) == [], received
            return
        if prediction.hello or mode != "raw":
            assert PING_ID not in expected
            peer.send(Connection("client").send(Op.CALL, m.CallRequest(method="list_queues"), PING_ID))
            expected = expected + Counter({PING_ID: 1})
        received = peer.read_until(lambda r: r.answered() == expected)
        assert not received.eof and received.errors(0) == [], received
        assert received.answered() == expected
        if PING_ID in expected:  # the connection is still usable
            assert [op for op, c, _ in received.frames if c == PING_ID] == [Op.REPLY]


# -- the well-behaved client --------------------------------------------------------------------------------------


class GoodClient(threading.Thread):
    """Publishes to GOOD and consumes what it published, in its own event loop, until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(name="good-client", daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.published: list[bytes] = []
        self.received: list[bytes] = []
        self.stats: chute.QueueStats | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self.main())
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.ready.set()

    async def main(self) -> None:
        async with chute.AsyncClient(self.url, timeout=10) as client:
            await client.create_queue(GOOD)
            consumer = await client.consume(GOOD, prefetch=5)
            self.ready.set()
            n = 0
            while not self.stop.is_set() or n < 20:
                body = b"good-%d" % n
                await client.publish(GOOD, body)
                self.published.append(body)
                delivery = await consumer.get(timeout=10)
                assert delivery is not None, "the good consumer got nothing for 10 s"
                await client.ack(delivery)
                self.received.append(delivery.body)
                n += 1
                await asyncio.sleep(0.002)
            await consumer.close()
            self.stats = await client.queue_stats(GOOD)

    def finish(self) -> None:
        self.stop.set()
        self.join(30)
        assert not self.is_alive(), "the good client did not finish"
        if self.error is not None:
            raise self.error


@pytest.fixture(scope="module")
def server():
    with running_server(**SERVER_OPTIONS) as running:
        with chute.Client(running.url, timeout=10) as admin:
            admin.create_queue(FUZZ)
        yield running


@pytest.fixture(scope="module")
def good_client(server):
    client = GoodClient(server.url)
    client.start()
    assert client.ready.wait(30) and client.error is None, client.error
    yield client
    client.finish()
    assert client.received == client.published  # every message, in order
    stats = client.stats
    assert (stats.published, stats.delivered, stats.acked) == (len(client.published),) * 3
    assert (stats.ready, stats.in_flight, stats.delayed, stats.dead_lettered, stats.bytes) == (0, 0, 0, 0, 0)


# -- strategies ---------------------------------------------------------------------------------------------------

modes = st.sampled_from(["raw", "pipelined", "after"])
bodies = st.lists(st.binary(max_size=40), min_size=1, max_size=3).map(tuple)


@st.composite
def mutated_frames(draw) -> bytes:
    frame = bytearray(publish_frame(draw(st.integers(1, 2**32 - 1)), draw(bodies)))
    kind = draw(st.sampled_from(["flip", "truncate", "length", "opcode", "payload", "append", "correlation"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            frame[draw(st.integers(0, len(frame) - 1))] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        frame = frame[: draw(st.integers(0, len(frame) - 1))]
    elif kind == "length":
        length = draw(
            st.integers(0, 2**32 - 1) | st.integers(len(frame) - 20, len(frame) + 20).map(lambda n: max(0, n))
        )
        frame[0:4] = length.to_bytes(4, "big")
    elif kind == "opcode":
        frame[4] = draw(st.integers(0, 255))
    elif kind == "payload":
        start = draw(st.integers(HEADER_SIZE, len(frame) - 1))
        end = draw(st.integers(start, len(frame)))
        frame[start:end] = draw(st.binary(min_size=end - start, max_size=end - start))
    elif kind == "append":
        frame += draw(st.binary(min_size=1, max_size=30))
    else:
        frame[6:10] = draw(st.integers(0, 3)).to_bytes(4, "big")
    return bytes(frame)


fuzz_data = st.one_of(
    st.binary(min_size=1, max_size=200),
    mutated_frames(),
    st.tuples(mutated_frames(), mutated_frames()).map(b"".join),
    st.tuples(st.just(publish_frame(9)), mutated_frames()).map(b"".join),
)
fuzz_settings = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- tests --------------------------------------------------------------------------------------------------------


def test_fuzzed_frames_get_an_error_and_a_close_and_leave_others_alone(server, good_client):
    @fuzz_settings
    @given(data=fuzz_data, mode=modes)
    def fuzz(data, mode):
        check_exchange(server.port, data, mode)
        assert good_client.error is None and good_client.is_alive(), good_client.error

    fuzz()


def test_valid_frames_get_a_normal_reply(server, good_client):
    with RawPeer(server.port) as peer:
        peer.handshake()
        peer.send(publish_frame(7) + publish_frame(8, (b"a", b"b")))
        received = peer.read_until(lambda r: r.answered() == Counter({7: 1, 8: 1}))
        replies = {c: msgspec.msgpack.decode(p, type=m.PublishReply) for op, c, p in received.frames if c}
        assert len(replies[7].ids) == 1 and len(replies[8].ids) == 2


@pytest.mark.parametrize(
    "data, code",
    [
        (publish_frame(), ProtocolError.code),  # not a HELLO first
        (HEADER.pack(70_000, Op.HELLO, 0, 0), FrameTooLarge.code),  # over 64 KiB before the handshake
        (Connection("client").send(Op.HELLO, m.Hello(versions=[3, 4])), UnsupportedVersion.code),
        (Connection("client").send(Op.HELLO, m.Hello(versions=[])), UnsupportedVersion.code),
        (pack_header(Op.HELLO, 0, 1) + b"\xc1", ProtocolError.code),
    ],
    ids=["publish-first", "too-large-hello", "versions-3-4", "no-versions", "bad-hello"],
)
def test_handshake_violations(server, data, code):
    with RawPeer(server.port) as peer:
        peer.send(data)
        received = peer.read_to_eof()
        assert received.eof and [e.code for e in received.errors(0)] == [code]


@pytest.mark.parametrize(
    "data, code",
    [
        (pack_header(Op.PUBLISH, 0, 1) + b"\x80", ProtocolError.code),  # zero correlation id
        (pack_header(Op.DELIVER, 0, 1) + b"\x80", ProtocolError.code),  # wrong direction
        (pack_header(0x7E, 1, 1) + b"\x80", ProtocolError.code),  # unknown opcode
        (HEADER.pack(3, Op.CALL, 0, 1), ProtocolError.code),  # length shorter than the header
        (HEADER.pack(MAX_FRAME, Op.CALL, 0, 1), FrameTooLarge.code),  # over max_frame_bytes
        (Connection("client").hello(), ProtocolError.code),  # a second HELLO
        (pack_header(Op.CALL, 1, 1) + b"\xa1", ProtocolError.code),  # wrong-typed payload
    ],
    ids=["zero-id", "deliver", "unknown-op", "short-length", "too-large", "second-hello", "wrong-type"],
)
def test_violations_after_the_handshake(server, data, code):
    with RawPeer(server.port) as peer:
        peer.handshake()
        peer.send(data)
        received = peer.read_to_eof()
        assert received.eof and [e.code for e in received.errors(0)] == [code]


def test_invalid_utf8_gets_a_protocol_error_frame(server):
    payload = b"\x82\xa4dest\xa2\xff\xfe\xa8messages\x90"
    with RawPeer(server.port) as peer:
        peer.handshake()
        peer.send(pack_header(Op.PUBLISH, 1, len(payload)) + payload)
        received = peer.read_to_eof()
        assert [e.code for e in received.errors(0)] == [ProtocolError.code]


def test_wrong_typed_call_args_are_invalid_arguments(server):
    with RawPeer(server.port) as peer:
        peer.handshake()
        request = m.CallRequest(method="queue_stats", args={"name": ["x"]})
        peer.send(Connection("client").send(Op.CALL, request, 5))
        received = peer.read_until(lambda r: r.answered()[5])
        [error] = received.errors(5)
        assert error.code in (1001, 1002), error


# -- authentication and heartbeats ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_server():
    with running_server(token="s3cret") as running:
        yield running


@pytest.mark.parametrize("token", ["wrong", None, "s3cret-but-longer", ""])
def test_a_wrong_token_is_unauthenticated_and_closed(token_server, token):
    with RawPeer(token_server.port) as peer:
        peer.send(Connection("client").hello(token=token))
        received = peer.read_to_eof()
        assert received.eof
        [error] = received.errors(0)
        assert (error.code, error.name) == (4001, "unauthenticated")
        assert [op for op, _, _ in received.frames] == [Op.ERROR]


def test_the_right_token_is_welcome(token_server):
    with RawPeer(token_server.port) as peer:
        welcome = peer.handshake(token="s3cret")
        assert welcome.version == 2


@pytest.fixture(scope="module")
def fast_heartbeat_server():
    with running_server(heartbeat_s=0.2) as running:
        yield running


def test_a_silent_connection_is_closed_after_3_intervals(fast_heartbeat_server):
    with RawPeer(fast_heartbeat_server.port) as peer:
        start = time.monotonic()
        received = peer.read_to_eof()
        elapsed = time.monotonic() - start
        assert received.eof
        assert 3 * 0.2 - 0.05 <= elapsed <= 3.0, elapsed
        assert received.errors(0) == []


def test_a_client_silent_after_hello_is_closed_after_3_intervals(fast_heartbeat_server):
    with RawPeer(fast_heartbeat_server.port) as peer:
        welcome = peer.handshake(heartbeat_s=0.2)
        assert welcome.heartbeat_s == 0.2
        start = time.monotonic()
        received = peer.read_to_eof()
        elapsed = time.monotonic() - start
        assert received.eof and 3 * 0.2 - 0.05 <= elapsed <= 3.0, elapsed
        assert Op.HEARTBEAT in [op for op, _, _ in received.frames]  # the server sent heartbeats meanwhile


def test_a_client_that_sends_heartbeats_stays_connected(fast_heartbeat_server):
    with RawPeer(fast_heartbeat_server.port) as peer:
        peer.handshake(heartbeat_s=0.2)
        heartbeat = Connection("client").send(Op.HEARTBEAT)
        for _ in range(15):  # 1.5 s: more than 3 intervals
            peer.send(heartbeat)
            time.sleep(0.1)
        peer.send(Connection("client").send(Op.CALL, m.CallRequest(method="list_queues"), 1))
        received = peer.read_until(lambda r: r.answered()[1])
        assert not received.eof and received.errors(0) == []


def test_no_frame_before_welcome(fast_heartbeat_server):
    with RawPeer(fast_heartbeat_server.port) as peer:
        time.sleep(0.35)
        peer.send(Connection("client").hello(heartbeat_s=0.2))
        received = peer.read_until(lambda r: any(op == Op.WELCOME for op, _, _ in r.frames))
        assert received.frames[0][0] == Op.WELCOME, received.frames[0]
        client = Connection("client")
        client.receive_data(b"".join(pack_header(op, c, len(p)) + p for op, c, p in received.frames))


# -- limits and leases ---------------------------------------------------------------------------------------------


def test_a_closed_connection_releases_its_deliveries_at_once(server):
    with chute.Client(server.url, timeout=10) as client:
        client.create_queue("released")
        client.publish("released", b"x")
        with RawPeer(server.port) as peer:
            peer.handshake()
            request = m.ReceiveRequest(queue="released", lease_s=600.0)
            peer.send(Connection("client").send(Op.RECEIVE, request, 3))
            received = peer.read_until(lambda r: r.answered()[3])
            [payload] = [p for op, c, p in received.frames if c == 3]
            assert len(msgspec.msgpack.decode(payload, type=m.ReceiveReply).deliveries) == 1
        [delivery] = client.receive("released", wait_s=5.0)  # not after the 600 s lease: at once
        assert delivery.body == b"x" and delivery.delivery_count == 2
        client.ack(delivery)


async def test_deliver_frames_fit_the_frame_limit():
    from chute.testing import serving

    async with (
        serving(max_frame_bytes=128 * 1024, max_message_bytes=64 * 1024) as running,
        chute.AsyncClient(running.url, timeout=10) as client,
    ):
        await client.create_queue("big")
        await client.publish_batch("big", [b"x" * 60_000] * 4)
        consumer = await client.consume("big", prefetch=10)
        got = [await consumer.get(timeout=5) for _ in range(4)]
        assert consumer.error is None, consumer.error
        assert all(d is not None for d in got)


async def test_messages_with_large_headers_are_cut_into_several_frames():
    """Bodies are small but headers fill the frame: DELIVER and RECEIVE replies are cut, nothing is lost."""
    from chute.testing import serving

    headers = {f"h{i}": "v" * 1000 for i in range(15)}  # ~15 KB of headers per message, 128 KiB frames
    async with (
        serving(max_frame_bytes=128 * 1024, max_message_bytes=64 * 1024) as running,
        chute.AsyncClient(running.url, timeout=10) as client,
    ):
        await client.create_queue("headers")
        await client.publish_batch("headers", [chute.Publish(body=b"%d" % i, headers=headers) for i in range(40)])
        received = await client.receive("headers", max_messages=40)
        assert 1 <= len(received) < 40  # one reply frame cannot hold them all
        await client.ack(received)
        consumer = await client.consume("headers", prefetch=100)
        pushed = [await consumer.get(timeout=5) for _ in range(40 - len(received))]
        assert consumer.error is None, consumer.error
        assert sorted(int(d.body) for d in received + pushed) == list(range(40))
        assert all(d.headers == headers for d in pushed)


async def test_a_peek_returns_what_fits_one_frame():
    from chute.testing import serving

    async with (
        serving(max_frame_bytes=128 * 1024, max_message_bytes=64 * 1024) as running,
        chute.AsyncClient(running.url, timeout=10) as client,
    ):
        await client.create_queue("browse")
        await client.publish_batch("browse", [b"%02d" % i + b"x" * 30_000 for i in range(10)])
        seen = await client.peek("browse", 10)
        assert 1 <= len(seen) < 10  # 300 KB do not fit a 128 KiB frame: the first ones, in order
        assert [d.body[:2] for d in seen] == [b"%02d" % i for i in range(len(seen))]
        assert (await client.queue_stats("browse")).ready == 10  # nothing was leased or lost
