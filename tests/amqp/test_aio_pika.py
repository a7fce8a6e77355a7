"""aio-pika (over aiormq and pamqp) against Chute: a robust connection, an RPC round trip with reply_to and
correlation_id, publisher confirms, every field type of a header table (floats too), and reconnecting after the
server went away."""

from __future__ import annotations

import asyncio
import datetime
import uuid
from decimal import Decimal

import aio_pika
import pytest

import chute
from chute.testing import serving

pytestmark = pytest.mark.timeout(60)


async def test_rpc_with_reply_to_and_correlation_id():
    async with serving() as server:
        connection = await aio_pika.connect_robust(server.amqp_url)
        async with connection:
            server_channel = await connection.channel()
            requests = await server_channel.declare_queue("rpc_queue")

            async def serve(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                async with message.process():
                    n = int(message.body)
                    await server_channel.default_exchange.publish(
                        aio_pika.Message(str(n * n).encode(), correlation_id=message.correlation_id),
                        routing_key=message.reply_to,
                    )

            await requests.consume(serve)
            client_channel = await connection.channel()
            callback = await client_channel.declare_queue(exclusive=True)
            futures: dict[str, asyncio.Future] = {}

            async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                async with message.process():
                    futures.pop(message.correlation_id).set_result(int(message.body))

            await callback.consume(on_reply)
            results = []
            for n in range(5):
                correlation_id = str(uuid.uuid4())
                futures[correlation_id] = asyncio.get_running_loop().create_future()
                await client_channel.default_exchange.publish(
                    aio_pika.Message(str(n).encode(), correlation_id=correlation_id, reply_to=callback.name),
                    routing_key="rpc_queue",
                )
                results.append(await asyncio.wait_for(futures[correlation_id], 10))
            assert results == [0, 1, 4, 9, 16]


async def test_every_field_type_round_trips():
    headers = {"float": 2.5, "int": -3, "bool": False, "decimal": Decimal("1.25"), "bytes": bytearray(b"\x01\x02"),
               "time": datetime.datetime(2025, 6, 7, 8, 9, 10, tzinfo=datetime.UTC), "none": None,
               "list": [1, "a", [2.5]], "table": {"inner": {"deep": "yes"}}, "text": "plain"}  # fmt: skip
    async with serving() as server, await aio_pika.connect(server.amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue("fields")
        await channel.default_exchange.publish(aio_pika.Message(b"body", headers=headers), routing_key="fields")
        message = await queue.get(timeout=5)
        await message.ack()
    got = dict(message.headers)
    got["time"] = got["time"].replace(tzinfo=datetime.UTC) if got["time"].tzinfo is None else got["time"]
    assert got == headers


async def test_an_expiration_header_from_another_front_that_is_not_milliseconds_stays_in_the_table():
    # a native (HTTP, SQS) message may carry any string as `amqp-expiration`; sent as the expiration property,
    # aio-pika's float() refused it while building the message: its consumer never saw that message (nor acked
    # it), and queue.get raised
    odd = {"amqp-expiration": "Binary", "region": "eu"}
    async with serving() as server:
        async with chute.AsyncClient(server.url) as client:
            await client.create_queue("odd-expiration")
            await client.publish("odd-expiration", b"odd", headers=odd)
            await client.publish("odd-expiration", b"plain")
        async with await aio_pika.connect(server.amqp_url) as connection:
            queue = await (await connection.channel()).get_queue("odd-expiration", ensure=False)
            got = []
            async with asyncio.timeout(10), queue.iterator() as messages:
                async for message in messages:
                    await message.ack()
                    got.append(message)
                    if len(got) == 2:
                        break
    assert [message.body for message in got] == [b"odd", b"plain"]
    assert got[0].headers == odd and got[0].expiration is None


async def test_robust_connection_comes_back_after_a_restart(tmp_path):
    async with serving(str(tmp_path)) as server:
        port = server.amqp_url
    # the same data directory and port again: the robust connection reconnects and redeclares
    from chute.server import Server, ServerConfig

    host_port = int(port.rsplit(":", 1)[1].strip("/"))
    config = ServerConfig(data_dir=str(tmp_path), port=0, http_port=None, amqp_port=host_port, fsync="never")
    first = await Server(config).start()
    connection = await aio_pika.connect_robust(port, reconnect_interval=0.1)
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue("robust", durable=True)
        await channel.default_exchange.publish(aio_pika.Message(b"before"), routing_key="robust")
        await first.stop()
        second = await Server(config).start()
        try:
            reconnected = asyncio.get_running_loop().create_future()
            connection.reconnect_callbacks.add(lambda *_: reconnected.done() or reconnected.set_result(True))
            await asyncio.wait_for(reconnected, 20)
            await channel.default_exchange.publish(aio_pika.Message(b"after"), routing_key="robust")
            bodies = []
            for _ in range(2):
                message = await queue.get(timeout=5)
                await message.ack()
                bodies.append(message.body)
            assert bodies == [b"before", b"after"]
        finally:
            await connection.close()
            await second.stop()
    finally:
        if not connection.is_closed:
            await connection.close()
