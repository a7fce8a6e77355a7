"""The connection's life: handshake, credentials on Chute's users, permissions, heartbeats and dead peers,
connection exceptions for protocol violations, and 320 CONNECTION_FORCED when the server stops."""

from __future__ import annotations

import socket

import pika
import pytest
from pamqp import commands, frame
from pika.exceptions import ChannelClosedByBroker, ConnectionClosedByBroker, ProbableAuthenticationError

from chute.server.users import Grant
from chute.testing import running_server
from tests.amqp.conftest import chute_only
from tests.amqp.raw import Raw
from tests.auth.conftest import make_user

pytestmark = pytest.mark.timeout(60)


@chute_only
def test_users_and_permissions():
    users = [make_user("alice", "alice-pw", grants=[Grant(allow=["publish", "consume", "manage"], queues="orders.*")])]
    with running_server(users=users) as server:
        url = server.amqp_url.replace("amqp://", "amqp://alice:alice-pw@")
        connection = pika.BlockingConnection(pika.URLParameters(url))
        try:
            channel = connection.channel()
            channel.queue_declare("orders.new")
            channel.basic_publish("", "orders.new", b"ok")
            with pytest.raises(ChannelClosedByBroker) as caught:
                connection.channel().queue_declare("payments")
            assert caught.value.reply_code == 403
        finally:
            connection.close()
        for bad in ("alice:wrong@", "guest:guest@", ""):
            with pytest.raises((ProbableAuthenticationError, ConnectionClosedByBroker,
                                pika.exceptions.AuthenticationError)):  # fmt: skip
                pika.BlockingConnection(pika.URLParameters(server.amqp_url.replace("amqp://", f"amqp://{bad}")))


def test_amqplain_mechanism(server):
    raw = Raw(server.server.amqp_port)
    try:
        raw.send(b"AMQP\x00\x00\x09\x01")
        start = raw.expect(commands.Connection.Start)
        assert set(start.mechanisms.split()) == {"PLAIN", "AMQPLAIN"}
        from pamqp import encode

        response = encode.field_table({"LOGIN": "guest", "PASSWORD": "guest"})[4:]
        raw.method(0, commands.Connection.StartOk(mechanism="AMQPLAIN", response=response.decode("latin-1")))
        raw.expect(commands.Connection.Tune)
    finally:
        raw.close()


def test_wrong_protocol_header_gets_ours_back(server):
    raw = Raw(server.server.amqp_port)
    try:
        raw.send(b"AMQP\x01\x01\x00\x0a")
        assert raw.sock.recv(8) == b"AMQP\x00\x00\x09\x01"
        assert raw.read() is None
    finally:
        raw.close()


@pytest.mark.parametrize(
    "bad, code",
    [
        (frame.marshal(commands.Basic.Qos(), 0), 504),  # a channel method on channel 0
        (frame.marshal(commands.Basic.Qos(), 2), 504),  # a channel that was never opened
        (frame.marshal(commands.Channel.Open(), 1), 504),  # opened twice
        pytest.param(frame.marshal(commands.Channel.Open(), 5000), 530, marks=chute_only),  # above channel_max
        # (RabbitMQ 3.10 does not answer this one)
        (b"\x03\x00\x01\x00\x00\x00\x01x\xce", 505),  # a body frame with no publish
        (b"\x01\x00\x01\x00\x00\x00\x04\x00\x3c\x00\x0a\x00", 501),  # no frame-end octet
        pytest.param(b"\x01\x00\x01\x00\x00\x00\x04\x00\x99\x00\x01\xce", 501, marks=chute_only),  # an unknown
        # method (RabbitMQ 3.10 closes the socket without connection.close)
        (b"\x01\x00\x01\x7f\xff\xff\xff", 501),  # larger than frame_max
    ],
)
def test_protocol_violations_are_connection_exceptions(server, bad, code):
    raw = Raw(server.server.amqp_port)
    try:
        raw.handshake()
        raw.send(bad)
        assert raw.close_reason() == code
    finally:
        raw.close()


def test_a_silent_peer_is_dropped_after_missed_heartbeats(server):
    raw = Raw(server.server.amqp_port)
    try:
        raw.handshake(heartbeat=1)
        got = []
        while (each := raw.read()) is not None:  # the server's heartbeats, then its close (2 intervals silent)
            got.append(each)
        assert got, "the server sent no heartbeat"
    finally:
        raw.close()


def test_heartbeats_keep_an_idle_pika_connection_open(server):
    connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url + "?heartbeat=1"))
    try:
        connection.sleep(2.5)  # pika answers heartbeats while it sleeps; silence would end it after 2 s
        assert connection.is_open
        connection.channel().queue_declare("", exclusive=True)
    finally:
        connection.close()


@chute_only
def test_stop_closes_connections_with_320():
    with running_server() as server:
        connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
        channel = connection.channel()
        channel.queue_declare("kept")
    with pytest.raises(ConnectionClosedByBroker) as caught:
        connection.process_data_events(time_limit=5)
        channel.queue_declare("kept", passive=True)
    assert caught.value.reply_code == 320


@chute_only
def test_amqp_port_off_and_default_taken(tmp_path):
    with running_server(amqp_port=None) as server:
        assert server.amqp_url is None and server.server.amqp is None
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            blocker.bind(("127.0.0.1", 5672))
        except OSError:
            pytest.skip("port 5672 is in use here (a RabbitMQ?): the fallback is then what runs")
        blocker.listen()
        with running_server(amqp_port=5672) as server:  # the default port, taken: the server starts without AMQP
            assert server.server.amqp is None


@chute_only
def test_amqps_with_the_servers_tls_certificate(tmp_path):
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    with running_server(tls_cert=str(tmp_path / "cert.pem"), tls_key=str(tmp_path / "key.pem")) as server:
        assert server.amqp_url.startswith("amqps://")
        context = ssl.create_default_context()
        ca.configure_trust(context)
        params = pika.ConnectionParameters("127.0.0.1", server.server.amqp_port,
                                           ssl_options=pika.SSLOptions(context, "127.0.0.1"))  # fmt: skip
        connection = pika.BlockingConnection(params)
        try:
            channel = connection.channel()
            channel.queue_declare("over-tls")
            channel.confirm_delivery()
            channel.basic_publish("", "over-tls", b"secret")
            assert channel.basic_get("over-tls", auto_ack=True)[2] == b"secret"
        finally:
            connection.close()


@chute_only
def test_a_storage_failure_nacks_the_publish_and_closes_with_541():
    import errno

    with running_server(fsync="always") as server:
        connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
        channel = connection.channel()
        channel.queue_declare("doomed")
        channel.confirm_delivery()
        server.server.broker.store.fs.fail("fsync", errno.EIO)  # the next fsync fails: the store goes read-only
        with pytest.raises((pika.exceptions.NackError, ConnectionClosedByBroker)) as caught:
            channel.basic_publish("", "doomed", b"never durable")
            connection.process_data_events(time_limit=5)
        if isinstance(caught.value, pika.exceptions.NackError):  # the nack came first, then the close
            with pytest.raises(ConnectionClosedByBroker) as caught:
                connection.process_data_events(time_limit=5)
                channel.queue_declare("doomed", passive=True)
        assert caught.value.reply_code == 541


@chute_only
def test_a_connection_whose_user_changed_is_closed_with_320(tmp_path):
    from chute.server.users import UsersFile

    with UsersFile(tmp_path).edit() as stored:
        stored.append(make_user("carol", "carol-pw", grants=[Grant(allow=["manage", "consume"], queues="c.*")]))
        stored.append(make_user("dave", "dave-pw", grants=[Grant(allow=["manage"], queues="d.*")]))
    with running_server(str(tmp_path)) as server:
        def connect(user, heartbeat):
            url = server.amqp_url.replace("amqp://", f"amqp://{user}:{user}-pw@") + f"?heartbeat={heartbeat}"
            return pika.BlockingConnection(pika.URLParameters(url))

        # carol's heartbeats make the server look at the users file; dave sends none while the test waits on carol
        carol, dave = connect("carol", 1), connect("dave", 0)
        try:
            carol.channel().queue_declare("c.jobs")
            with UsersFile(tmp_path).edit() as stored:  # carol loses consume; dave is unchanged
                stored[0].grants = [Grant(allow=["manage"], queues="c.*")]
            with pytest.raises(ConnectionClosedByBroker) as caught:
                carol.process_data_events(time_limit=15)  # the users file is looked at within seconds
                carol.channel()
            assert caught.value.reply_code == 320
            assert dave.is_open
            dave.channel().queue_declare("d.jobs")
        finally:
            for connection in (carol, dave):
                if connection.is_open:
                    connection.close()
