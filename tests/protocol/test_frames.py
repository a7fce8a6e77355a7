"""The sans-I/O layer of the native protocol (`chute.protocol`), and docs/protocol.md checked against it.

- every payload type round-trips: `Connection.send` on one role, `receive_data` on the other (hypothesis
  strategies built from the Struct field types, so a new field is covered without touching this file);
- any split of the byte stream (whole, all frames at once, one byte at a time, random cuts) gives the same frames;
- the golden bytes, the opcode table, the payload field lists, the CALL methods and the error table of
  docs/protocol.md equal what the code has (so the doc cannot drift);
- handshake and framing rules raise ProtocolError / FrameTooLarge / UnsupportedVersion;
- arbitrary bytes give frames or a ChuteError, never another exception.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chute.errors import (
    BY_CODE,
    ERRORS,
    ChuteError,
    FrameTooLarge,
    InvalidReceipt,
    ProtocolError,
    UnsupportedVersion,
)
from chute.model import Delivery, Message, Publish
from chute.protocol import PROTOCOL_VERSIONS, Connection, Op
from chute.protocol import messages as m
from chute.protocol.connection import PAYLOAD_TYPES, decode_reply, error_from
from chute.protocol.frames import (
    CLIENT_OPS,
    DEFAULT_PORT,
    HANDSHAKE_MAX_FRAME_BYTES,
    HEADER,
    HEADER_SIZE,
    REQUESTS,
    SERVER_OPS,
    pack_header,
)
from chute.protocol.sizes import delivery_size, fitting, publish_size
from chute.server.calls import CALLS

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
REPLY_TYPES = (m.PublishReply, m.ConsumeReply, m.ReceiveReply, m.CallReply, m.Empty)


# -- helpers ----------------------------------------------------------------------------------------------------


def open_server(**kwargs) -> Connection:
    """A server Connection past the handshake."""
    conn = Connection("server", **kwargs)
    [frame] = conn.receive_data(Connection("client").hello())
    assert frame.op is Op.HELLO
    conn.accept(frame.body, server="test", heartbeat_s=10.0, max_message_bytes=1024)
    assert conn.state == "open"
    return conn


def open_client(max_frame_bytes: int = 16 * 2**20) -> Connection:
    """A client Connection past the handshake."""
    server = Connection("server", max_frame_bytes=max_frame_bytes)
    client = Connection("client")
    [hello] = server.receive_data(client.hello())
    [welcome] = client.receive_data(server.accept(hello.body, server="test", heartbeat_s=10.0,
                                                  max_message_bytes=1024))  # fmt: skip
    assert welcome.op is Op.WELCOME and client.state == "open"
    return client


def raw_frame(opcode: int, correlation_id: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return pack_header(opcode, correlation_id, len(payload), flags) + payload


def frame_key(frame) -> tuple:
    return frame.op, frame.correlation_id, frame.body


# -- hypothesis strategies from the Struct field types -----------------------------------------------------------

ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
floats = st.floats(allow_nan=False)
json_like = st.recursive(
    st.none() | st.booleans() | ints | floats | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def strategy_for(tp: Any) -> st.SearchStrategy:
    """A strategy of values of type `tp` that survive a MessagePack round trip unchanged."""
    if tp is Any:
        return json_like
    if tp is type(None):
        return st.none()
    if tp is bool:
        return st.booleans()
    if tp is int:
        return ints
    if tp is float:
        return floats
    if tp is str:
        return st.text(max_size=30)
    if tp is bytes:
        return st.binary(max_size=64)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=3)
    if origin is dict:
        return st.dictionaries(strategy_for(args[0]), strategy_for(args[1]), max_size=3)
    if origin is typing.Union or origin is types.UnionType:
        return st.one_of([strategy_for(arg) for arg in args])
    if origin is Literal:
        return st.sampled_from(args)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return struct_strategy(tp)
    raise NotImplementedError(f"no strategy for {tp!r}")  # a new field type: teach strategy_for about it


def struct_strategy(cls: type[msgspec.Struct]) -> st.SearchStrategy:
    """Instances of `cls`: required fields always, optional ones sometimes (else their default)."""
    required: dict[str, st.SearchStrategy] = {}
    optional: dict[str, st.SearchStrategy] = {}
    for field in msgspec.structs.fields(cls):
        strategy = st.deferred(lambda tp=field.type: strategy_for(tp))
        (required if field.required else optional)[field.name] = strategy
    return st.fixed_dictionaries(required, optional=optional).map(lambda kwargs: cls(**kwargs))


CLIENT_PAYLOADS = {op: PAYLOAD_TYPES[op] for op in sorted(CLIENT_OPS) if op is not Op.HELLO}
SERVER_PAYLOADS = {op: PAYLOAD_TYPES[op] for op in sorted(SERVER_OPS) if op not in (Op.WELCOME, Op.REPLY)}


def payload_of(op: Op) -> st.SearchStrategy:
    cls = PAYLOAD_TYPES[op]
    return st.none() if cls is None else struct_strategy(cls)


correlation_ids = st.integers(min_value=1, max_value=2**32 - 1)


@st.composite
def client_frames(draw) -> tuple[Op, Any, int]:
    """(op, payload, correlation id) of a frame a client may send after the handshake."""
    op = draw(st.sampled_from(sorted(CLIENT_PAYLOADS)))
    correlation_id = draw(correlation_ids) if op in REQUESTS else 0
    return op, draw(payload_of(op)), correlation_id


@st.composite
def server_frames(draw) -> tuple[Op, Any, int]:
    """(op, payload, correlation id) of a frame a server may send after the handshake."""
    op = draw(st.sampled_from(sorted(SERVER_PAYLOADS) + [Op.REPLY]))
    if op is Op.REPLY:
        payload = draw(st.sampled_from(REPLY_TYPES).flatmap(struct_strategy))
        return op, payload, draw(correlation_ids)
    correlation_id = draw(correlation_ids) if op is Op.ERROR and draw(st.booleans()) else 0
    return op, draw(payload_of(op)), correlation_id


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


# -- round trips --------------------------------------------------------------------------------------------------


def test_every_opcode_has_a_payload_type_and_a_direction():
    assert set(PAYLOAD_TYPES) == set(Op)
    assert set(Op) == CLIENT_OPS | SERVER_OPS
    assert {Op.HEARTBEAT} == CLIENT_OPS & SERVER_OPS
    assert CLIENT_OPS - {Op.HELLO, Op.HEARTBEAT} == REQUESTS
    assert HEADER_SIZE == 10 and HEADER.format in (">IBBI", b">IBBI")


@given(frame=client_frames())
def test_client_frames_round_trip(frame):
    op, payload, correlation_id = frame
    data = open_client().send(op, payload, correlation_id)
    assert len(data) == HEADER.unpack_from(data)[0] + 4
    [got] = open_server().receive_data(data)
    assert (got.op, got.correlation_id, got.body) == (op, correlation_id, payload)


@given(frame=server_frames())
def test_server_frames_round_trip(frame):
    op, payload, correlation_id = frame
    data = open_server().send(op, payload, correlation_id)
    [got] = open_client().receive_data(data)
    assert (got.op, got.correlation_id) == (op, correlation_id)
    if op is Op.REPLY:
        assert isinstance(got.body, bytes)
        assert decode_reply(got.body, type(payload)) == payload
    else:
        assert got.body == payload


@given(hello=struct_strategy(m.Hello))
def test_hello_round_trips(hello):
    data = Connection("client").send(Op.HELLO, hello)
    server = Connection("server")
    [got] = server.receive_data(data)
    assert got.op is Op.HELLO and got.correlation_id == 0 and got.body == hello
    assert server.state == "open"


@given(welcome=struct_strategy(m.Welcome), version=st.sampled_from(PROTOCOL_VERSIONS))
def test_welcome_round_trips(welcome, version):
    welcome = msgspec.structs.replace(welcome, version=version)
    client = Connection("client")
    [got] = client.receive_data(Connection("server").send(Op.WELCOME, welcome))
    assert got.body == welcome
    assert client.state == "open" and client.welcome == welcome and client.version == welcome.version
    assert client.max_frame_bytes == welcome.max_frame_bytes


@given(token=st.none() | st.text(max_size=20), client=st.text(max_size=20),
       heartbeat_s=st.floats(min_value=0.05, max_value=3600))  # fmt: skip
def test_hello_and_accept(token, client, heartbeat_s):
    me = Connection("client")
    server = Connection("server", max_frame_bytes=1 << 20)
    [hello] = server.receive_data(me.hello(token=token, client=client, heartbeat_s=heartbeat_s))
    assert hello.body == m.Hello(versions=list(PROTOCOL_VERSIONS), token=token, client=client,
                                 heartbeat_s=heartbeat_s)  # fmt: skip
    [welcome] = me.receive_data(server.accept(hello.body, server="s", heartbeat_s=heartbeat_s,
                                              max_message_bytes=4096))  # fmt: skip
    assert welcome.body == m.Welcome(version=max(PROTOCOL_VERSIONS), server="s", heartbeat_s=heartbeat_s,
                                     max_frame_bytes=1 << 20, max_message_bytes=4096)  # fmt: skip
    assert me.version == server.version == max(PROTOCOL_VERSIONS)
    assert me.max_frame_bytes == 1 << 20


@pytest.mark.parametrize("cls", ERRORS, ids=lambda cls: cls.name)
def test_every_error_travels_in_an_error_frame(cls):
    exc = cls("details")
    if cls is InvalidReceipt:
        exc.receipts = [3, 4]
    client = open_client()
    for correlation_id in (0, 42):
        [frame] = client.receive_data(Connection("server").error_frame(exc, correlation_id))
        assert frame.op is Op.ERROR and frame.correlation_id == correlation_id
        assert frame.body == m.ErrorBody(code=cls.code, name=cls.name, message="details", retryable=cls.retryable,
                                         receipts=[3, 4] if cls is InvalidReceipt else None)  # fmt: skip
        back = error_from(frame.body)
        assert type(back) is cls and back.message == "details"
        assert (back.code, back.name, back.retryable, back.closes_connection) == (
            cls.code, cls.name, cls.retryable, cls.closes_connection)  # fmt: skip
    assert BY_CODE[cls.code] is cls


def test_an_unknown_error_code_keeps_its_code_name_and_retryable():
    exc = error_from(m.ErrorBody(code=9999, name="from_the_future", message="m", retryable=True, receipts=[1]))
    assert type(exc) is ChuteError
    assert (exc.code, exc.name, exc.retryable, exc.message, exc.receipts) == (9999, "from_the_future", True, "m", [1])


def test_decode_reply_rejects_the_wrong_type():
    payload = open_server().send(Op.REPLY, m.PublishReply(ids=[1, 2]), 5)[HEADER_SIZE:]
    assert decode_reply(payload, m.PublishReply) == m.PublishReply(ids=[1, 2])
    with pytest.raises(ProtocolError):
        decode_reply(payload, m.ConsumeReply)
    with pytest.raises(ProtocolError):
        decode_reply(b"\xc1", m.Empty)


# -- splitting the byte stream -----------------------------------------------------------------------------------


@given(frames=st.lists(client_frames(), min_size=1, max_size=6), cuts=st.lists(st.integers(0, 10**6), max_size=8))
def test_any_split_of_the_stream_gives_the_same_frames(frames, cuts):
    sender = Connection("client")
    stream = sender.hello() + b"".join(sender.send(op, payload, corr) for op, payload, corr in frames)

    def feed(chunks) -> list[tuple]:
        conn = Connection("server")
        got = []
        for chunk in chunks:
            got += [frame_key(f) for f in conn.receive_data(chunk)]
        assert conn._buffer == b""
        return got

    whole = feed([stream])
    assert whole[1:] == [(op, corr, payload) for op, payload, corr in frames]
    assert whole[0][0] is Op.HELLO
    each_frame = []
    rest = stream
    while rest:
        size = HEADER.unpack_from(rest)[0] + 4
        each_frame.append(rest[:size])
        rest = rest[size:]
    assert feed(each_frame) == whole
    assert feed([stream[i : i + 1] for i in range(len(stream))]) == whole
    assert feed(split(stream, cuts)) == whole


@given(frames=st.lists(server_frames(), min_size=1, max_size=6), cuts=st.lists(st.integers(0, 10**6), max_size=8))
def test_any_split_of_the_server_stream_gives_the_same_frames(frames, cuts):
    server = open_server()
    stream = server.accept(m.Hello(versions=[1]), server="s", heartbeat_s=1.0, max_message_bytes=1)
    stream += b"".join(server.send(op, payload, corr) for op, payload, corr in frames)

    def feed(chunks) -> list[tuple]:
        conn = Connection("client")
        return [frame_key(f) for chunk in chunks for f in conn.receive_data(chunk)]

    whole = feed([stream])
    assert len(whole) == len(frames) + 1
    assert feed([stream[i : i + 1] for i in range(len(stream))]) == whole
    assert feed(split(stream, cuts)) == whole


def test_an_incomplete_frame_waits_for_the_rest():
    conn = Connection("server")
    data = Connection("client").hello()
    assert conn.receive_data(data[:-1]) == []
    assert conn.state == "handshake"
    [frame] = conn.receive_data(data[-1:])
    assert frame.op is Op.HELLO


def test_flags_are_ignored():
    conn = open_server()
    [frame] = conn.receive_data(raw_frame(Op.HEARTBEAT, 0, flags=0xFF))
    assert frame.op is Op.HEARTBEAT and frame.body is None


def test_a_heartbeat_payload_is_ignored():
    [frame] = open_server().receive_data(raw_frame(Op.HEARTBEAT, 0, b"\x01\x02"))
    assert frame.op is Op.HEARTBEAT and frame.body is None


# -- docs/protocol.md ---------------------------------------------------------------------------------------------


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def doc_blocks(kind: str) -> dict[str, str]:
    """Fenced blocks of docs/protocol.md whose info string is `kind NAME`, by NAME."""
    pattern = re.compile(r"^```" + kind + r"[ \t]*(\S*)[ \t]*\n(.*?)^```", re.M | re.S)
    return {match.group(1): match.group(2) for match in pattern.finditer(doc_text())}


def golden(name: str) -> bytes:
    return bytes.fromhex("".join(doc_blocks("hex")[name].split()))


def test_the_doc_has_the_golden_examples():
    assert {"hello", "heartbeat", "publish", "publish-reply"} <= set(doc_blocks("hex"))


def test_golden_hello():
    data = Connection("client").hello()
    assert data == golden("hello")
    assert data == Connection("client").hello(token=None, client="", heartbeat_s=10.0)
    assert len(data) == 75  # 58 before HELLO gained user and password (nil), 74 before version 2


def test_golden_heartbeat():
    assert Connection("client").send(Op.HEARTBEAT) == golden("heartbeat")
    assert Connection("server").send(Op.HEARTBEAT) == golden("heartbeat") == bytes.fromhex("00000006030000000000")


def test_golden_publish():
    request = m.PublishRequest(dest="jobs", messages=[Publish(body=b"hi")])
    data = open_client().send(Op.PUBLISH, request, 7)
    assert data == golden("publish")
    [frame] = open_server().receive_data(golden("publish"))
    assert (frame.op, frame.correlation_id, frame.body) == (Op.PUBLISH, 7, request)


def test_golden_publish_reply():
    data = open_server().send(Op.REPLY, m.PublishReply(ids=[1]), 7)
    assert data == golden("publish-reply")
    [frame] = open_client().receive_data(data)
    assert decode_reply(frame.body, m.PublishReply) == m.PublishReply(ids=[1])


def test_golden_welcome_with_the_fsync_policy():
    server = Connection("server")
    [hello] = server.receive_data(Connection("client").hello())
    data = server.accept(hello.body, server="chute/0.1.0", heartbeat_s=10.0, max_message_bytes=2**20, fsync="always")
    assert data == golden("welcome")
    client = Connection("client")
    [frame] = client.receive_data(data)
    assert frame.body.fsync == "always" and client.welcome.max_frame_bytes == 16 * 2**20


def test_a_welcome_without_the_fsync_field_reads_as_none():
    older = msgspec.msgpack.encode({"version": 1, "server": "old", "heartbeat_s": 10.0, "max_frame_bytes": 2**20,
                                    "max_message_bytes": 2**16})  # fmt: skip
    client = Connection("client")
    [frame] = client.receive_data(pack_header(Op.WELCOME, 0, len(older)) + older)
    assert frame.body.fsync is None and client.state == "open"


def test_golden_consume_of_an_ephemeral_subscription():
    request = m.ConsumeRequest(consumer=1, queue="", topic="orders", pattern="orders.*")
    assert open_client().send(Op.CONSUME, request, 9) == golden("consume-ephemeral")
    [frame] = open_server().receive_data(golden("consume-ephemeral"))
    assert (frame.op, frame.correlation_id, frame.body) == (Op.CONSUME, 9, request)


def test_a_consume_without_the_newer_fields_is_a_consume_of_a_queue():
    older = msgspec.msgpack.encode({"consumer": 1, "queue": "jobs", "prefetch": 100, "lease_s": None})
    [frame] = open_server().receive_data(pack_header(Op.CONSUME, 3, len(older)) + older)
    assert frame.body == m.ConsumeRequest(consumer=1, queue="jobs", topic=None, pattern=">", filter=None)
    reply = open_client().receive_data(open_server().send(Op.REPLY, m.ConsumeReply(consumer=1), 3))[0]
    assert decode_reply(reply.body, m.ConsumeReply).queue is None


def test_the_doc_states_the_port_and_the_handshake_limit():
    text = doc_text()
    assert f"port **{DEFAULT_PORT}**" in text
    assert HANDSHAKE_MAX_FRAME_BYTES == 64 * 1024 and "**64 KiB**" in text


def table_rows(header: str) -> list[list[str]]:
    """Rows of the markdown table whose header row starts with `header`."""
    lines = doc_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_the_doc_error_table_is_errors_ERRORS():
    rows = table_rows("| name | code |")
    yes_no = {"yes": True, "no": False}
    documented = [(name.strip("`"), int(code), yes_no[retry], yes_no[closes]) for name, code, retry, closes, _ in rows]
    assert documented == [(e.name, e.code, e.retryable, e.closes_connection) for e in ERRORS]


def test_the_doc_opcode_table_is_Op():
    rows = table_rows("| opcode | name |")
    documented = {int(code, 16): name for code, name, *_ in rows}
    assert documented == {op.value: op.name for op in Op}
    for code, _, direction, *_ in rows:
        op = Op(int(code, 16))
        expected = {
            "client → server": op in CLIENT_OPS and op not in SERVER_OPS,
            "server → client": op in SERVER_OPS and op not in CLIENT_OPS,
            "both ways": op in SERVER_OPS and op in CLIENT_OPS,
        }
        assert expected[direction], (op, direction)
        payload = rows[[r[0] for r in rows].index(code)][4]
        if PAYLOAD_TYPES[op] is not None:
            assert payload == f"`{PAYLOAD_TYPES[op].__name__}`"


def test_the_doc_payload_fields_are_the_Structs():
    from chute import model

    documented: dict[str, list[str]] = {}
    current = None
    for line in doc_blocks("fields")[""].splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            current = documented[line.strip()] = []
        else:
            current.append(line.split()[0])
    for name, fields in documented.items():
        cls = getattr(m, name, None) or getattr(model, name)
        assert fields == [f.name for f in msgspec.structs.fields(cls)], name
    used = {t for t in PAYLOAD_TYPES.values() if t is not None} | set(REPLY_TYPES)
    assert {t.__name__ for t in used} <= set(documented)


def test_the_doc_lists_the_CALL_methods():
    rows = table_rows("| method | args |")
    assert {row[0].strip("`") for row in rows} == set(CALLS)


# -- handshake rules ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", sorted(CLIENT_OPS - {Op.HELLO}))
def test_a_server_wants_hello_first(op):
    conn = Connection("server")
    with pytest.raises(ProtocolError, match="HELLO"):
        conn.receive_data(raw_frame(op, 1, msgspec.msgpack.encode({})))
    assert conn.state == "closed"


@pytest.mark.parametrize("op", sorted(SERVER_OPS - {Op.WELCOME, Op.ERROR}))
def test_a_client_wants_welcome_or_error_first(op):
    conn = Connection("client")
    with pytest.raises(ProtocolError, match="WELCOME"):
        conn.receive_data(raw_frame(op, 0, msgspec.msgpack.encode({})))
    assert conn.state == "closed"


def test_a_client_accepts_an_error_first():
    client = Connection("client")
    [frame] = client.receive_data(Connection("server").error_frame(UnsupportedVersion("no")))
    assert frame.op is Op.ERROR and frame.body.code == UnsupportedVersion.code
    assert client.state == "handshake"


def test_hello_after_the_handshake_is_an_error():
    conn = open_server()
    with pytest.raises(ProtocolError, match="after the handshake"):
        conn.receive_data(Connection("client").hello())
    assert conn.state == "closed"


def test_welcome_after_the_handshake_is_an_error():
    client = open_client()
    server = Connection("server")
    server.receive_data(Connection("client").hello())
    welcome = server.accept(m.Hello(versions=[1]), server="s", heartbeat_s=1.0, max_message_bytes=1)
    with pytest.raises(ProtocolError, match="after the handshake"):
        client.receive_data(welcome)


def test_frames_pipelined_behind_hello_are_accepted():
    client = Connection("client")
    stream = client.hello() + client.send(Op.CALL, m.CallRequest(method="list_queues"), 1)
    frames = Connection("server").receive_data(stream)
    assert [f.op for f in frames] == [Op.HELLO, Op.CALL]


@pytest.mark.parametrize("opcode", [0x00, 0x07, 0x11, 0x24, 0x33, 0x41, 0xFF])
@pytest.mark.parametrize("role", ["server", "client"])
def test_unknown_opcodes(opcode, role):
    conn = open_server() if role == "server" else open_client()
    with pytest.raises(ProtocolError, match="unknown opcode"):
        conn.receive_data(raw_frame(opcode, 1, b"\x80"))
    assert conn.state == "closed"


@pytest.mark.parametrize("op", sorted(SERVER_OPS - CLIENT_OPS))
def test_a_server_refuses_server_opcodes(op):
    with pytest.raises(ProtocolError, match="does not accept"):
        open_server().receive_data(raw_frame(op, 1, b"\x80"))


@pytest.mark.parametrize("op", sorted(CLIENT_OPS - SERVER_OPS))
def test_a_client_refuses_client_opcodes(op):
    with pytest.raises(ProtocolError, match="does not accept"):
        open_client().receive_data(raw_frame(op, 1, b"\x80"))


@pytest.mark.parametrize("op", sorted(REQUESTS))
def test_a_request_needs_a_correlation_id(op):
    payload = open_client().send(op, valid_payload(op), 1)[HEADER_SIZE:]
    conn = open_server()
    assert conn.receive_data(raw_frame(op, 1, payload))[0].op is op
    with pytest.raises(ProtocolError, match="correlation id"):
        conn.receive_data(raw_frame(op, 0, payload))


def valid_payload(op: Op) -> msgspec.Struct:
    """A well-formed payload of request `op`."""
    return {
        Op.PUBLISH: m.PublishRequest(dest="q", messages=[Publish(body=b"x")]),
        Op.CONSUME: msgspec.convert({"consumer": 1, "queue": "q"}, m.ConsumeRequest),
        Op.CANCEL: m.CancelRequest(consumer=1),
        Op.RECEIVE: m.ReceiveRequest(queue="q"),
        Op.ACK: m.AckRequest(queue="q", receipts=[1]),
        Op.NACK: m.NackRequest(queue="q", receipts=[1]),
        Op.EXTEND: m.ExtendRequest(queue="q", receipts=[1], lease_s=1.0),
        Op.CALL: m.CallRequest(method="list_queues"),
    }[op]


@pytest.mark.parametrize("length", range(6))
def test_a_length_shorter_than_the_header(length):
    conn = open_server()
    with pytest.raises(ProtocolError, match="shorter than its header"):
        conn.receive_data(HEADER.pack(length, Op.HEARTBEAT, 0, 0) + b"\x00" * 16)
    assert conn.state == "closed"


def test_the_handshake_frame_limit_is_64_kib():
    conn = Connection("server", max_frame_bytes=1 << 20)
    assert conn.receive_data(HEADER.pack(65536 - 4, Op.HELLO, 0, 0)) == []  # exactly 64 KiB: waits for the rest
    conn = Connection("server", max_frame_bytes=1 << 20)
    with pytest.raises(FrameTooLarge):
        conn.receive_data(HEADER.pack(65536 - 3, Op.HELLO, 0, 0))  # refused from the header alone
    assert conn.state == "closed"
    client = Connection("client")
    with pytest.raises(FrameTooLarge):
        client.receive_data(HEADER.pack(65536 - 3, Op.WELCOME, 0, 0))


def test_a_hello_of_exactly_64_kib_is_accepted():
    hello = m.Hello(versions=[1], client="")
    size = len(Connection("client").send(Op.HELLO, hello))
    hello.client = "x" * (65536 - size - 2)  # str8 → str16 header grows by 2 bytes
    data = Connection("client").send(Op.HELLO, hello)
    assert len(data) == 65536
    [frame] = Connection("server").receive_data(data)
    assert frame.body == hello


def test_the_negotiated_frame_limit():
    server = open_server(max_frame_bytes=100_000)
    assert server.receive_data(HEADER.pack(100_000 - 4, Op.CALL, 0, 1)) == []
    server = open_server(max_frame_bytes=100_000)
    with pytest.raises(FrameTooLarge):
        server.receive_data(HEADER.pack(100_000 - 3, Op.CALL, 0, 1))
    client = open_client(max_frame_bytes=100_000)
    assert client.max_frame_bytes == 100_000
    with pytest.raises(FrameTooLarge):
        client.send(Op.PUBLISH, m.PublishRequest(dest="q", messages=[Publish(body=b"x" * 100_000)]), 1)
    with pytest.raises(FrameTooLarge):
        client.receive_data(HEADER.pack(100_000 - 3, Op.REPLY, 0, 1))


def test_send_checks_the_correlation_id_range():
    conn = open_client()
    conn.send(Op.HEARTBEAT, None, 2**32 - 1)
    for bad in (-1, 2**32):
        with pytest.raises(ValueError):
            conn.send(Op.HEARTBEAT, None, bad)


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # nothing
        b"\xc1",  # never-used MessagePack byte
        b"\x82\xa4dest",  # truncated map
        msgspec.msgpack.encode({"dest": 1, "messages": []}),  # wrong type
        msgspec.msgpack.encode({"messages": []}),  # missing field
        msgspec.msgpack.encode({"dest": "q", "messages": [{"body": "not bytes"}]}),  # wrong nested type
        msgspec.msgpack.encode([1, 2]),  # not a map
        msgspec.msgpack.encode({"dest": "q", "messages": []}) + b"\x00",  # trailing bytes
    ],
)
def test_a_bad_payload_is_a_protocol_error(payload):
    conn = open_server()
    with pytest.raises(ProtocolError, match="bad PUBLISH payload"):
        conn.receive_data(raw_frame(Op.PUBLISH, 1, payload))
    assert conn.state == "closed"


INVALID_UTF8_PUBLISH = b"\x82\xa4dest\xa2\xff\xfe\xa8messages\x90"  # {"dest": <str of bytes ff fe>, "messages": []}


def test_invalid_utf8_in_a_payload_is_a_protocol_error():
    conn = open_server()
    with pytest.raises(ProtocolError):
        conn.receive_data(raw_frame(Op.PUBLISH, 1, INVALID_UTF8_PUBLISH))


def test_invalid_utf8_in_a_hello_is_a_protocol_error():
    payload = b"\x82\xa8versions\x91\x01\xa5token\xa1\xff"  # {"versions": [1], "token": <str of byte ff>}
    with pytest.raises(ProtocolError):
        Connection("server").receive_data(raw_frame(Op.HELLO, 0, payload))


def test_unknown_fields_are_ignored():
    payload = msgspec.msgpack.encode({"dest": "q", "messages": [], "from_the_future": [1, 2]})
    [frame] = open_server().receive_data(raw_frame(Op.PUBLISH, 1, payload))
    assert frame.body == m.PublishRequest(dest="q", messages=[])


def test_a_bad_hello_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        Connection("server").receive_data(raw_frame(Op.HELLO, 0, msgspec.msgpack.encode({"versions": "1"})))


@pytest.mark.parametrize("versions", [[], [3], [0, 99], [2**40]])
def test_no_common_version(versions):
    server = Connection("server")
    [hello] = server.receive_data(Connection("client").send(Op.HELLO, m.Hello(versions=versions)))
    with pytest.raises(UnsupportedVersion):
        server.accept(hello.body, server="s", heartbeat_s=1.0, max_message_bytes=1)
    assert server.state == "closed"
    frame = server.error_frame(UnsupportedVersion("none"))
    [error] = Connection("client").receive_data(frame)
    assert error.correlation_id == 0 and error.body.code == 1007


def test_the_server_picks_the_highest_common_version():
    server = Connection("server")
    [hello] = server.receive_data(Connection("client").send(Op.HELLO, m.Hello(versions=[7, 1, 0])))
    server.accept(hello.body, server="s", heartbeat_s=1.0, max_message_bytes=1)
    assert server.version == 1


def test_a_client_refuses_a_version_it_did_not_offer():
    welcome = m.Welcome(version=3, server="s", heartbeat_s=1.0, max_frame_bytes=1 << 20, max_message_bytes=1)
    client = Connection("client")
    with pytest.raises(UnsupportedVersion):
        client.receive_data(Connection("server").send(Op.WELCOME, welcome))
    assert client.state == "closed"


def test_a_closed_connection_accepts_nothing():
    conn = Connection("server")
    with pytest.raises(ProtocolError):
        conn.receive_data(raw_frame(Op.PUBLISH, 1, b"\x80"))
    with pytest.raises(ProtocolError, match="closed"):
        conn.receive_data(Connection("client").hello())


def test_a_bad_frame_after_good_ones_raises_and_the_good_ones_are_not_returned():
    """The documented contract of receive_data: the error wins; the caller closes the connection."""
    conn = open_server()
    good = raw_frame(Op.HEARTBEAT, 0)
    with pytest.raises(ProtocolError):
        conn.receive_data(good + good + raw_frame(0x7F, 1))


def test_role_must_be_client_or_server():
    with pytest.raises(ValueError):
        Connection("peer")  # type: ignore[arg-type]


# -- arbitrary bytes ----------------------------------------------------------------------------------------------


def feed_all(conn: Connection, chunks: list[bytes]) -> list:
    frames = []
    try:
        for chunk in chunks:
            frames += conn.receive_data(chunk)
    except ChuteError as exc:
        assert type(exc) in ERRORS and exc.closes_connection, exc
        assert conn.state == "closed"
        with pytest.raises(ProtocolError):
            conn.receive_data(b"")
    return frames


@given(data=st.binary(max_size=300), hello_first=st.booleans(), cuts=st.lists(st.integers(0, 1000), max_size=5))
def test_arbitrary_bytes_to_a_server_give_frames_or_a_chute_error(data, hello_first, cuts):
    stream = (Connection("client").hello() if hello_first else b"") + data
    for frame in feed_all(Connection("server"), split(stream, cuts)):
        assert frame.op in CLIENT_OPS


@given(
    frames=st.lists(client_frames(), max_size=4),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
)
def test_mutated_client_streams_give_frames_or_a_chute_error(frames, edits):
    client = Connection("client")
    stream = bytearray(client.hello() + b"".join(client.send(op, p, c) for op, p, c in frames))
    for position, value in edits:
        stream[position % len(stream)] = value
    feed_all(Connection("server"), [bytes(stream)])
    feed_all(Connection("server"), [bytes(stream[i : i + 1]) for i in range(len(stream))])


@given(data=st.binary(max_size=300), welcome_first=st.booleans())
def test_arbitrary_bytes_to_a_client_give_frames_or_a_chute_error(data, welcome_first):
    server = Connection("server")
    server.receive_data(Connection("client").hello())
    stream = server.accept(m.Hello(versions=[1]), server="s", heartbeat_s=1.0, max_message_bytes=1) if welcome_first \
        else b""  # fmt: skip
    for frame in feed_all(Connection("client"), [stream + data]):
        assert frame.op in SERVER_OPS


# -- sizing batches to the frame limit (chute.protocol.sizes) --------------------------------------------------

texts = st.none() | st.text(max_size=40)
header_maps = st.dictionaries(st.text(max_size=20), st.text(max_size=60), max_size=6)
large_ints = st.integers(0, 2**63 - 1)
times = st.floats(0, 1e12, allow_nan=False)


@st.composite
def deliveries(draw) -> Delivery:
    message = Message(
        id=draw(large_ints), body=draw(st.binary(max_size=300)), headers=draw(header_maps),
        publish_time=draw(times), priority=draw(st.integers(0, 9)), subject=draw(texts), group=draw(texts),
        dedup_id=draw(texts), expires_at=draw(st.none() | times),
    )  # fmt: skip
    return Delivery(
        queue=draw(st.text(min_size=1, max_size=80)), receipt=draw(large_ints), delivery_count=draw(large_ints),
        message=message, lease_deadline=draw(times),
        dead_letter_reason=draw(st.none() | st.sampled_from(["rejected", "max_deliveries", "expired", "overflow"])),
        dead_letter_source=draw(texts),
    )  # fmt: skip


@given(delivery=deliveries())
def test_delivery_size_is_an_upper_bound(delivery):
    assert delivery_size(delivery) >= len(msgspec.msgpack.encode(delivery))


@given(
    body=st.binary(max_size=300), headers=st.none() | header_maps, priority=st.integers(0, 9),
    delay_s=st.none() | times, ttl_s=st.none() | times, group=texts, dedup_id=texts, subject=texts,
)  # fmt: skip
def test_publish_size_is_an_upper_bound(body, headers, priority, delay_s, ttl_s, group, dedup_id, subject):
    message = Publish(body=body, headers=headers, priority=priority, delay_s=delay_s, ttl_s=ttl_s, group=group,
                      dedup_id=dedup_id, subject=subject)  # fmt: skip
    assert publish_size(message) >= len(msgspec.msgpack.encode(message))


@given(batch=st.lists(deliveries(), min_size=1, max_size=40), limit=st.integers(2_000, 20_000))
def test_what_fitting_counts_fits_one_frame(batch, limit):
    count = fitting(batch, limit)
    assert 1 <= count <= len(batch)
    if count > 1:
        frame = Connection("server", max_frame_bytes=limit).send(
            Op.DELIVER, m.Deliver(consumer=1, deliveries=batch[:count])
        )
        assert len(frame) <= limit


@given(batch=st.lists(deliveries(), max_size=3), consumer=st.integers(1, 2**31), corr=st.integers(0, 2**32 - 1))
def test_a_sent_frame_is_its_header_and_its_payload_as_msgpack(batch, consumer, corr):
    payload = m.Deliver(consumer=consumer, deliveries=batch)
    body = msgspec.msgpack.encode(payload)
    data = open_server().send(Op.DELIVER, payload, corr)
    assert data == HEADER.pack(len(body) + 6, Op.DELIVER, 0, corr) + body
    assert type(data) is bytes


def test_a_frame_of_exactly_the_limit_is_sent_one_byte_more_is_not():
    exact = m.ErrorBody(code=1, name="x", message="a" * 98)  # (99 "a"s take one byte more: the same str prefix)
    limit = HEADER_SIZE + len(msgspec.msgpack.encode(exact))
    conn = Connection("server", max_frame_bytes=limit)
    assert len(conn.send(Op.ERROR, exact)) == limit
    with pytest.raises(FrameTooLarge):
        conn.send(Op.ERROR, m.ErrorBody(code=1, name="x", message="a" * 99))
    with pytest.raises(ValueError):
        conn.send(Op.ERROR, exact, 2**32)


def test_the_frames_of_every_message_are_not_tracked_by_the_garbage_collector():
    # A busy client or broker makes these per message or per frame, and many live until their confirm; tracked,
    # they made most young collections of a client publishing to 1,000 queues (BENCHMARKS.md, ninth session).
    # They hold only data, never themselves, so they cannot form a cycle.
    import gc

    message = Message(id=1, body=b"x", headers={"k": "v"}, publish_time=1.0)
    delivery = Delivery(queue="q", receipt=1, delivery_count=1, message=message)
    per_message = [
        m.PublishRequest(dest="q", messages=[Publish(body=b"x")], more=[m.PublishGroup(dest="r", messages=[])]),
        m.PublishGroup(dest="r", messages=[Publish(body=b"y")]),
        m.PublishReply(ids=[1, 2]),
        m.Deliver(consumer=1, deliveries=[delivery]),
        m.AckRequest(queue="q", receipts=[1]),
        m.NackRequest(queue="q", receipts=[1]),
        m.ExtendRequest(queue="q", receipts=[1], lease_s=1.0),
        m.ReceiveReply(deliveries=[delivery]),
        m.Empty(),
    ]
    assert [type(p).__name__ for p in per_message if gc.is_tracked(p)] == []
    client = open_client()
    (frame,) = client.receive_data(raw_frame(Op.DELIVER, 0, msgspec.msgpack.encode(per_message[3])))
    assert frame.body == per_message[3]
    assert not gc.is_tracked(frame) and not gc.is_tracked(frame.body)
