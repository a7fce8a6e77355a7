"""The sans-I/O `AmqpConnection`: any split of the byte stream gives the same events, and any bytes give events
or an AmqpError (a connection exception), never another exception. A live server then gets random and mutated
frames: each bad connection is closed with a connection exception, and nothing stored changes."""

from __future__ import annotations

import os
import socket

import pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import body as content
from pamqp import commands, frame, header

from chute.amqp.connection import PROTOCOL_HEADER, AmqpConnection, Content, Header, Method
from chute.amqp.errors import AmqpError
from tests.amqp.conftest import chute_only
from tests.amqp.raw import Raw

pytestmark = pytest.mark.timeout(120)


def _opened() -> AmqpConnection:
    conn = AmqpConnection()
    conn.receive_data(PROTOCOL_HEADER)
    conn.receive_data(frame.marshal(commands.Connection.StartOk(response="\0guest\0guest"), 0))
    conn.tune(10)
    conn.receive_data(frame.marshal(commands.Connection.TuneOk(channel_max=100, frame_max=4096, heartbeat=10), 0))
    conn.receive_data(frame.marshal(commands.Connection.Open(virtual_host="/"), 0))
    conn.open_ok()
    conn.receive_data(frame.marshal(commands.Channel.Open(), 1))
    return conn


def _publish(body: bytes, channel: int = 1) -> bytes:
    properties = commands.Basic.Properties(content_type="text/plain", headers={"n": 1})
    parts = [frame.marshal(commands.Basic.Publish(exchange="", routing_key="q"), channel),
             frame.marshal(header.ContentHeader(0, len(body), properties), channel)]  # fmt: skip
    for offset in range(0, len(body), 4000):
        parts.append(frame.marshal(content.ContentBody(body[offset : offset + 4000]), channel))
    return b"".join(parts)


def _summary(events) -> list:
    out = []
    for event in events:
        if isinstance(event, Content):
            out.append(("content", event.channel, event.properties.content_type, event.body))
        elif isinstance(event, Method):
            out.append(("method", event.channel, event.method.name))
        else:
            out.append(type(event).__name__)
    return out


STREAM = (_publish(b"x" * 10_000) + frame.marshal(commands.Basic.Qos(prefetch_count=5), 1) + _publish(b"")
          + b"\x08\x00\x00\x00\x00\x00\x00\xce" + _publish(b"tail"))  # fmt: skip


def test_whole_and_byte_by_byte_give_the_same_events():
    whole = _summary(_opened().receive_data(STREAM))
    assert [e[0] for e in whole] == ["content", "method", "content", "content"]
    assert whole[0][3] == b"x" * 10_000 and whole[0][2] == "text/plain"
    conn = _opened()
    events = []
    for i in range(len(STREAM)):
        events.extend(conn.receive_data(STREAM[i : i + 1]))
    assert _summary(events) == whole


def test_handshake_events():
    conn = AmqpConnection()
    assert [type(e) for e in conn.receive_data(PROTOCOL_HEADER)] == [Header]


@given(st.binary(max_size=300), st.integers(0, 2))
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_any_bytes_give_events_or_an_amqp_error(data, stage):
    conn = _opened() if stage else AmqpConnection()
    if stage == 2:
        data = STREAM[: len(data) % len(STREAM)] + data  # a valid prefix, then garbage
    try:
        conn.receive_data(data)
    except AmqpError as exc:
        assert exc.connection and 500 <= exc.code < 600
        assert conn.state == "closed"


@st.composite
def bad_frames(draw):
    """Random bytes, or a valid frame truncated, or with bytes changed, or with a wrong size, or junk appended."""
    good = draw(st.sampled_from([
        frame.marshal(commands.Basic.Qos(prefetch_count=3), 1),
        frame.marshal(commands.Basic.Ack(delivery_tag=1), 1),
        _publish(b"hello", 1),
        frame.marshal(commands.Channel.Flow(active=True), 1),
    ]))  # fmt: skip
    how = draw(st.sampled_from(["random", "truncate", "flip", "size", "junk"]))
    if how == "random":
        return draw(st.binary(min_size=1, max_size=200))
    if how == "truncate":
        return good[: draw(st.integers(1, len(good) - 1))] + b"\x01\x00\x01\x00\x00\x00\x00"  # then a bad frame
    if how == "flip":
        i = draw(st.integers(0, len(good) - 1))
        return good[:i] + bytes([good[i] ^ draw(st.integers(1, 255))]) + good[i + 1 :] + b"\xff" * 8
    if how == "size":
        return good[:3] + draw(st.binary(min_size=4, max_size=4)) + good[7:] + b"\xff" * 8
    return good + draw(st.binary(min_size=1, max_size=50)) + b"\xff" * 8


@pytest.fixture(scope="module")
def sentinel(server):
    """A queue with 3 messages that no fuzzed connection may change. Its connection sends no heartbeats: a
    BlockingConnection answers them only when used, and a slow run (a loaded machine, tracemalloc) can go longer
    than two heartbeat intervals between the examples that use it."""
    params = pika.URLParameters(server.amqp_url)
    params.heartbeat = 0
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    channel.queue_declare("sentinel")
    channel.confirm_delivery()
    for _ in range(3):
        channel.basic_publish("", "sentinel", b"s")
    yield connection
    connection.close()


@given(bad_frames())
@settings(max_examples=int(os.environ.get("CHUTE_AMQP_FUZZ", "200")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@chute_only  # RabbitMQ lets many of these wait for its socket timeouts
def test_a_live_server_closes_bad_connections_and_changes_nothing(server, sentinel, data):
    raw = Raw(server.server.amqp_port)
    try:
        raw.handshake()
        raw.send(data)
        raw.sock.shutdown(socket.SHUT_WR)  # a frame cut short is then cut for good
        code = raw.close_reason()
        assert code is None or 500 <= code < 600 or code in (403, 404, 406), code
    finally:
        raw.close()
    assert sentinel.channel().queue_declare("sentinel", passive=True).method.message_count == 3


_SHORT = st.text(max_size=40).filter(lambda t: len(t.encode()) < 256)


@given(st.from_regex(r"[a-zA-Z0-9._:-]{0,100}", fullmatch=True), _SHORT, st.booleans(), st.booleans(),
       st.integers(0, 2**63 - 1))  # pamqp encodes delivery tags as signed
@settings(max_examples=200)
def test_hand_decoded_publish_and_ack_equal_pamqps(exchange, key, mandatory, multiple, tag):
    from chute.amqp.frames import decode_method as _decode_method

    for method in (commands.Basic.Publish(exchange=exchange, routing_key=key, mandatory=mandatory),
                   commands.Basic.Ack(delivery_tag=tag, multiple=multiple)):  # fmt: skip
        payload = frame.marshal(method, 1)[7:-1]
        reference = type(method)()
        reference.unmarshal(payload[4:])
        assert dict(_decode_method(payload)) == dict(reference)
        for cut in (5, len(payload) - 1):
            with pytest.raises(AmqpError):
                _decode_method(payload[:cut])


@given(st.from_regex(r"[a-zA-Z0-9._:@#,/+ -]{0,127}", fullmatch=True), _SHORT, st.booleans(),
       st.integers(0, 2**63 - 1), st.integers(0, 2**32 - 1), _SHORT)
@settings(max_examples=200)
def test_hand_encoded_deliver_and_get_ok_equal_pamqps(exchange, key, redelivered, tag, count, consumer_tag):
    # for every name pamqp takes, the same bytes; other short strings (from another front) pamqp refuses to encode
    from chute.amqp.frames import deliver_method, get_ok_method

    get_ok = commands.Basic.GetOk(delivery_tag=tag, redelivered=redelivered, exchange=exchange, routing_key=key,
                                  message_count=count)  # fmt: skip
    assert get_ok_method(tag, redelivered, exchange, key, count) == frame.marshal(get_ok, 1)[7:-1]
    deliver = commands.Basic.Deliver(consumer_tag=consumer_tag, delivery_tag=tag, redelivered=redelivered,
                                     exchange=exchange, routing_key=key)  # fmt: skip
    assert deliver_method(consumer_tag, tag, redelivered, exchange, key) == frame.marshal(deliver, 1)[7:-1]


_TEXT = st.text(max_size=300)  # over 255 bytes too: the property cannot carry it, the table does
_TABLE = st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda t: len(t.encode()) < 128),
                         st.one_of(st.text(max_size=20), st.integers(-(2**31), 2**31 - 1), st.booleans(),
                                   st.binary(max_size=8)), max_size=3)  # fmt: skip
_HEADER_VALUES = {
    "amqp-content-type": _TEXT, "amqp-content-encoding": _TEXT, "amqp-correlation-id": _TEXT,
    "amqp-reply-to": _TEXT, "amqp-expiration": st.from_regex(r"[0-9]{1,6}", fullmatch=True), "amqp-message-id": _TEXT,
    "amqp-type": _TEXT, "amqp-user-id": _TEXT, "amqp-app-id": _TEXT, "amqp-cluster-id": _TEXT,
    "amqp-delivery-mode": st.sampled_from(["1", "2", "0", "255", "256", "x", ""]),
    "amqp-priority": st.sampled_from(["0", "5", "9", "255", "300", "-1", "x"]),
    "amqp-timestamp": st.sampled_from(["0", "1700000000", "-5", "x", str(2**63)]),
    "region": _TEXT, "amqp-exchange": _TEXT, "k" * 300: _TEXT,  # (a name AMQP cannot carry)
}  # fmt: skip


@given(st.fixed_dictionaries({}, optional=_HEADER_VALUES), st.one_of(st.none(), _TABLE), st.integers(0, 9),
       st.floats(0, 2e9), st.binary(max_size=40), st.sampled_from([None, "rejected", "expired"]))
@settings(max_examples=300)
def test_hand_encoded_content_header_equals_pamqps(headers, table, priority, publish_time, body, dead_reason):
    # every delivery's content header is encoded by hand: byte for byte what pamqp makes of the same properties
    # (`to_properties`), whatever headers another front gave the message (values a property cannot carry, such
    # as a 300-byte message id or a delivery mode of 0, go to the table: pamqp would refuse them as properties)
    from chute.amqp.mapping import _pack_table, content_header, to_properties
    from chute.model import Delivery, Message

    headers = dict(headers)
    if table:
        _pack_table(table, headers)
    message = Message(id=7, body=body, headers=headers, publish_time=publish_time, priority=priority)
    delivery = Delivery(queue="q", receipt=1, delivery_count=1, message=message, dead_letter_reason=dead_reason,
                        dead_letter_source="dlq-source" if dead_reason else None)  # fmt: skip
    reference = header.ContentHeader(0, len(body), to_properties(delivery)).marshal()  # pamqp takes them all
    assert content_header(delivery) == reference


_NAME = st.from_regex(r"[a-zA-Z0-9\-_.:@#,/+ ]{0,20}", fullmatch=True)  # what pamqp lets a client send
_ARGS = st.dictionaries(st.sampled_from(["x-message-ttl", "x-max-length", "x-overflow", "x-dead-letter-exchange",
                                         "x-expires", "x-match", "x-queue-type", "x-max-priority", "x-chute-fifo",
                                         "x-unknown", "format"]),  # fmt: skip
                        st.one_of(st.integers(-5, 10**6), st.text(max_size=10), st.booleans()), max_size=3)
_TAG = st.integers(0, 50)
METHODS = st.one_of(
    st.builds(commands.Queue.Declare, queue=_NAME, passive=st.booleans(), durable=st.booleans(),
              exclusive=st.booleans(), auto_delete=st.booleans(), arguments=_ARGS),
    st.builds(commands.Queue.Bind, queue=_NAME, exchange=_NAME, routing_key=_NAME, arguments=_ARGS),
    st.builds(commands.Queue.Unbind, queue=_NAME, exchange=_NAME, routing_key=_NAME, arguments=_ARGS),
    st.builds(commands.Queue.Purge, queue=_NAME),
    st.builds(commands.Queue.Delete, queue=_NAME, if_unused=st.booleans(), if_empty=st.booleans()),
    st.builds(commands.Exchange.Declare, exchange=_NAME, exchange_type=st.sampled_from(
        ["direct", "fanout", "topic", "headers", "x-custom"]), passive=st.booleans(), durable=st.booleans(),
        arguments=_ARGS),  # fmt: skip
    st.builds(commands.Exchange.Delete, exchange=_NAME, if_unused=st.booleans()),
    st.builds(commands.Basic.Qos, prefetch_count=st.integers(0, 65535), global_=st.booleans()),
    st.builds(commands.Basic.Consume, queue=_NAME, consumer_tag=_NAME, no_ack=st.booleans(), exclusive=st.booleans()),
    st.builds(commands.Basic.Cancel, consumer_tag=_NAME),
    st.builds(commands.Basic.Get, queue=_NAME, no_ack=st.booleans()),
    st.builds(commands.Basic.Ack, delivery_tag=_TAG, multiple=st.booleans()),
    st.builds(commands.Basic.Nack, delivery_tag=_TAG, multiple=st.booleans(), requeue=st.booleans()),
    st.builds(commands.Basic.Reject, delivery_tag=_TAG, requeue=st.booleans()),
    st.builds(commands.Basic.Recover, requeue=st.booleans()),
    st.just(commands.Confirm.Select()),
    st.just(commands.Tx.Select()),
    st.just(commands.Tx.Commit()),
)


def _marshal(method) -> bytes | None:
    """The frame of a method, or None if pamqp refuses to encode it (its own checks on names)."""
    try:
        return frame.marshal(method, 1)
    except (ValueError, TypeError):
        return None


@given(st.lists(METHODS, min_size=1, max_size=8))
@settings(max_examples=int(os.environ.get("CHUTE_AMQP_FUZZ", "200")) // 2, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@chute_only
def test_random_well_formed_methods_get_an_answer_never_an_internal_error(server, sentinel, methods):
    frames = [f for f in (_marshal(m) for m in methods) if f is not None]
    raw = Raw(server.server.amqp_port)
    try:
        raw.handshake()
        raw.send(b"".join(frames) + frame.marshal(commands.Channel.Close(200, "bye", 0, 0), 1)
                 + frame.marshal(commands.Connection.Close(200, "bye", 0, 0), 0))  # fmt: skip
        while (got := raw.read()) is not None:
            if isinstance(got[1], commands.Connection.Close):
                assert got[1].reply_code != 541, got[1].reply_text  # 541: a handler failed (a bug)
                raw.method(0, commands.Connection.CloseOk())
    finally:
        raw.close()
    assert sentinel.channel().queue_declare("sentinel", passive=True).method.message_count == 3
