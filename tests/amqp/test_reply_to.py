"""Direct reply-to (`amq.rabbitmq.reply-to`): RabbitMQ's RPC tutorial with pika, and an RPC round trip with
aio-pika, with no reply queue; its rules (no-ack only, a request needs the channel's reply consumer)."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

REPLY_TO = "amq.rabbitmq.reply-to"


def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def test_rpc_tutorial_with_direct_reply_to(server, name):
    url = pika.URLParameters(server.amqp_url)
    server_connection, client_connection = pika.BlockingConnection(url), pika.BlockingConnection(url)
    try:
        responder = server_connection.channel()
        responder.queue_declare(name)

        def on_request(ch, method, properties, body):
            ch.basic_publish("", properties.reply_to, str(fib(int(body))).encode(),
                             pika.BasicProperties(correlation_id=properties.correlation_id))  # fmt: skip
            ch.basic_ack(method.delivery_tag)

        responder.basic_qos(prefetch_count=1)
        responder.basic_consume(name, on_request)
        client = client_connection.channel()
        replies: dict[str, bytes] = {}
        client.basic_consume(REPLY_TO, lambda ch, m, p, body: replies.__setitem__(p.correlation_id, body),
                             auto_ack=True)  # fmt: skip
        for n in (10, 20, 7):
            correlation = str(uuid.uuid4())
            client.basic_publish("", name, str(n).encode(), pika.BasicProperties(reply_to=REPLY_TO,
                                 correlation_id=correlation))  # fmt: skip
            for _ in range(200):
                if correlation in replies:
                    break
                server_connection.process_data_events(time_limit=0.01)
                client_connection.process_data_events(time_limit=0.01)
            assert replies.get(correlation) == str(fib(n)).encode()
    finally:
        server_connection.close()
        client_connection.close()


def test_reply_consumer_must_be_no_ack_and_requests_need_one(channel):
    with pytest.raises(ChannelClosedByBroker) as caught:
        channel.basic_consume(REPLY_TO, lambda *args: None, auto_ack=False)
    assert caught.value.reply_code == 406
    channel = channel.connection.channel()
    with pytest.raises(ChannelClosedByBroker) as caught:
        channel.basic_publish("", "anything", b"?", pika.BasicProperties(reply_to=REPLY_TO))
        channel.basic_get("amq.rabbitmq.reply-to")  # a round trip, so the channel.close has come
    assert caught.value.reply_code == 406 and "fast reply consumer does not exist" in caught.value.reply_text


def test_a_reply_to_a_channel_that_is_gone_is_unroutable(connection, name):
    requester = connection.channel()
    requester.basic_consume(REPLY_TO, lambda *args: None, auto_ack=True)
    requester.queue_declare(name)
    requester.basic_publish("", name, b"req", pika.BasicProperties(reply_to=REPLY_TO))
    responder = connection.channel()
    responder.confirm_delivery()
    method, properties, _ = responder.basic_get(name, auto_ack=True)
    assert properties.reply_to.startswith(REPLY_TO + ".")
    requester.close()
    with pytest.raises(pika.exceptions.UnroutableError):
        responder.basic_publish("", properties.reply_to, b"late", mandatory=True)


def test_aio_pika_rpc_with_direct_reply_to(server, name):
    async def main() -> None:
        connection = await aio_pika.connect_robust(server.amqp_url)
        async with connection:
            serving = await connection.channel()
            requests = await serving.declare_queue(name)

            async def serve(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                async with message.process():
                    await serving.default_exchange.publish(
                        aio_pika.Message(str(int(message.body) ** 2).encode(),
                                         correlation_id=message.correlation_id),  # fmt: skip
                        routing_key=message.reply_to,
                    )

            await requests.consume(serve)
            calling = await connection.channel()
            replies = await calling.get_queue(REPLY_TO, ensure=False)
            futures: dict[str, asyncio.Future] = {}

            async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                futures.pop(message.correlation_id).set_result(message.body)

            await replies.consume(on_reply, no_ack=True)
            for n in range(5):
                correlation = str(uuid.uuid4())
                futures[correlation] = asyncio.get_running_loop().create_future()
                await calling.default_exchange.publish(
                    aio_pika.Message(str(n).encode(), correlation_id=correlation, reply_to=REPLY_TO),
                    routing_key=name,
                )
                assert await asyncio.wait_for(futures[correlation], 10) == str(n * n).encode()

    asyncio.run(main())
