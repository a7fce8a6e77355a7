"""AMQP's own metadata is durable with the log: exchange types and flags, bindings with their arguments
(typed headers bindings, exchange-to-exchange bindings) and queue flags survive a restart, kept in the topics' and
queues' attributes; a data directory that still has the old `amqp-exchanges.json` is imported once."""

from __future__ import annotations

import asyncio
import json
import signal

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker, NackError

import chute
from chute import Broker
from chute.testing import running_server
from tests.amqp.conftest import chute_only
from tests.amqp.test_dead_letter import get_one
from tests.amqp.test_routing import drain

pytestmark = chute_only


def _channel(server):
    return pika.BlockingConnection(pika.URLParameters(server.amqp_url)).channel()


def _refused(channel, call) -> int:
    with pytest.raises(ChannelClosedByBroker) as caught:
        call(channel)
    return caught.value.reply_code


def test_exchanges_bindings_and_queue_flags_survive_a_restart(tmp_path):
    with running_server(str(tmp_path)) as server:
        channel = _channel(server)
        channel.exchange_declare("events", "topic", durable=True)
        channel.exchange_declare("audit", "headers", durable=True, internal=True)
        channel.exchange_bind("audit", "events", "orders.#")
        channel.queue_declare("important", durable=True, arguments={"x-max-priority": 5})
        channel.queue_bind("important", "audit", arguments={"x-match": "all", "level": 3})
        channel.queue_declare("created", durable=True)
        channel.queue_bind("created", "events", "orders.created")
        channel.connection.close()
    assert not (tmp_path / "amqp-exchanges.json").exists()  # all of it is in the log
    with running_server(str(tmp_path)) as server:
        channel = _channel(server)
        channel.exchange_declare("events", "topic", passive=True)
        assert _refused(channel, lambda ch: ch.exchange_declare("events", "fanout", durable=True)) == 406
        channel = channel.connection.channel()
        assert _refused(channel, lambda ch: ch.queue_declare("important", durable=True)) == 406  # its arguments
        channel = channel.connection.channel()
        channel.queue_declare("important", durable=True, arguments={"x-max-priority": 5})
        channel.confirm_delivery()
        channel.basic_publish("events", "orders.created", b"three", pika.BasicProperties(headers={"level": 3}))
        channel.basic_publish("events", "orders.paid", b"four", pika.BasicProperties(headers={"level": 4}))
        assert drain(channel, "important") == [b"three"]  # events -> audit (typed headers) -> important
        assert drain(channel, "created") == [b"three"]
        assert _refused(channel, lambda ch: ch.basic_publish("audit", "", b"x")) == 403  # still internal
        channel.connection.close()


def test_unbinding_and_deleting_are_durable_too(tmp_path):
    with running_server(str(tmp_path)) as server:
        channel = _channel(server)
        channel.exchange_declare("fan", "fanout", durable=True)
        channel.exchange_declare("gone", "direct", durable=True)
        channel.queue_declare("q", durable=True)
        channel.queue_bind("q", "fan")
        channel.queue_unbind("q", "fan")
        channel.exchange_delete("gone")
        channel.connection.close()
    with running_server(str(tmp_path)) as server:
        channel = _channel(server)
        channel.confirm_delivery()
        channel.basic_publish("fan", "", b"nobody")
        assert drain(channel, "q") == []
        assert _refused(channel, lambda ch: ch.exchange_declare("gone", "direct", passive=True)) == 404
        channel.connection.close()


def test_a_data_directory_with_the_old_json_file_is_imported_once(tmp_path):
    async def as_an_earlier_version_left_it() -> None:  # topics, queues, subscriptions; the rest in the file
        async with Broker(data_dir=str(tmp_path), fsync="never") as old:
            await old.create_queue("legacy-q")
            await old.create_topic("exchange.legacy-x")
            await old.subscribe("exchange.legacy-x", "invoice", "legacy-q")

    asyncio.run(as_an_earlier_version_left_it())
    legacy = {
        "exchanges": {"legacy-x": {"type": "direct", "durable": True, "auto_delete": False, "internal": False,
                                   "arguments": {}}},  # fmt: skip
        "bindings": [{"exchange": "legacy-x", "queue": "legacy-q", "key": "invoice", "arguments": {}}],
        "queues": {"legacy-q": {"durable": True, "auto_delete": False, "exclusive": False,
                                "arguments": {"x-max-priority": 3}}},  # fmt: skip
    }
    (tmp_path / "amqp-exchanges.json").write_text(json.dumps(legacy))
    for run in range(2):  # imported at the first start, from the log at the second
        with running_server(str(tmp_path)) as server:
            assert not (tmp_path / "amqp-exchanges.json").exists(), run
            assert (tmp_path / "amqp-exchanges.json.imported").exists()
            channel = _channel(server)
            assert _refused(channel, lambda ch: ch.exchange_declare("legacy-x", "topic")) == 406  # its type
            channel = channel.connection.channel()
            assert _refused(channel, lambda ch: ch.queue_declare("legacy-q")) == 406  # its x-max-priority
            channel = channel.connection.channel()
            channel.confirm_delivery()
            channel.basic_publish("legacy-x", "invoice", f"run {run}".encode())
            assert drain(channel, "legacy-q") == [f"run {run}".encode()]
            channel.queue_unbind("legacy-q", "legacy-x", "invoice")  # the imported binding is a real one
            channel.queue_bind("legacy-q", "legacy-x", "invoice")
            channel.connection.close()


def test_declarations_answered_before_a_sigkill_are_there_after_it(tmp_path):
    from tests.amqp.test_sigkill import free_port, serve

    port = free_port()
    url = f"amqp://guest:guest@127.0.0.1:{port}/"
    with (tmp_path / "serve.log").open("w") as log:
        server = serve(tmp_path / "data", port, log)
        try:
            connection = pika.BlockingConnection(pika.URLParameters(url))
            channel = connection.channel()
            channel.exchange_declare("orders", "topic", durable=True)
            channel.exchange_declare("eu", "fanout", durable=True)
            channel.exchange_bind("eu", "orders", "*.eu")
            channel.queue_declare("eu-orders", durable=True, arguments={"x-max-length": 100})
            channel.queue_bind("eu-orders", "eu")
            channel.queue_declare("scratch", durable=False)
            connection.close()  # every declaration was answered; the server is not stopped
        finally:
            server.send_signal(signal.SIGKILL)  # no clean stop: only what the log holds comes back
            server.wait(30)
        server = serve(tmp_path / "data", port, log)
        try:
            channel = pika.BlockingConnection(pika.URLParameters(url)).channel()
            channel.confirm_delivery()
            channel.basic_publish("orders", "paid.eu", b"routed", mandatory=True)  # orders -> eu -> eu-orders
            assert drain(channel, "eu-orders") == [b"routed"]
            assert _refused(channel, lambda ch: ch.queue_declare("eu-orders", durable=True)) == 406
            channel = channel.connection.channel()
            assert _refused(channel, lambda ch: ch.queue_declare("scratch", passive=True)) == 404  # not durable
            channel.connection.close()
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)


def test_a_reject_publish_dlx_queue_of_an_earlier_version_is_upgraded_at_start(tmp_path):
    """Before the broker dead-lettered refused publishes itself, `reject-publish-dlx` was kept as overflow
    `reject` (the AMQP front dead-lettered them): such a queue gets `reject-dead-letter` at the next start."""
    arguments = {"x-max-length": 1, "x-overflow": "reject-publish-dlx", "x-dead-letter-exchange": "",
                 "x-dead-letter-routing-key": "dead"}  # fmt: skip
    with running_server(str(tmp_path)) as server:
        channel = _channel(server)
        channel.queue_declare("dead", durable=True)
        channel.queue_declare("small", durable=True, arguments=arguments)
        channel.connection.close()
        with chute.Client(server.url) as client:
            client.update_queue("small", overflow="reject")  # what an earlier version had stored
    with running_server(str(tmp_path)) as server:
        with chute.Client(server.url) as client:
            assert {q.name: q.settings.overflow for q in client.list_queues()}["small"] == "reject-dead-letter"
        channel = _channel(server)
        channel.queue_declare("small", durable=True, arguments=arguments)  # still the same declaration
        channel.confirm_delivery()
        channel.basic_publish("", "small", b"kept")
        with pytest.raises(NackError):
            channel.basic_publish("", "small", b"refused")
        method, _, body = get_one(channel, "dead")
        assert body == b"refused"
        channel.connection.close()
