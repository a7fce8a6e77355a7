"""kombu (over py-amqp) against Chute: SimpleQueue, and a Producer and a Consumer on a topic exchange."""

from __future__ import annotations

import kombu
import pytest

pytestmark = pytest.mark.timeout(60)


def test_simple_queue(server, name):
    with kombu.Connection(server.amqp_url) as connection:
        queue = connection.SimpleQueue(name)
        for i in range(3):
            queue.put({"n": i})
        received = []
        for _ in range(3):
            message = queue.get(timeout=5)
            received.append(message.payload)
            message.ack()
        assert received == [{"n": 0}, {"n": 1}, {"n": 2}]
        with pytest.raises(queue.Empty):
            queue.get(timeout=0.2)
        queue.close()


def test_producer_and_consumer_on_a_topic_exchange(server, name):
    exchange = kombu.Exchange(name, type="topic", durable=True)
    eu = kombu.Queue(f"{name}-eu", exchange, routing_key="orders.*.eu")
    every = kombu.Queue(f"{name}-all", exchange, routing_key="orders.#")
    with kombu.Connection(server.amqp_url) as connection:
        producer = connection.Producer()
        seen: dict[str, list] = {"eu": [], "all": []}

        def on_eu(body, message):
            seen["eu"].append(body)
            message.ack()

        def on_all(body, message):
            seen["all"].append(body)
            message.ack()

        with connection.Consumer([eu], callbacks=[on_eu]), connection.Consumer([every], callbacks=[on_all]):
            for key in ("orders.new.eu", "orders.new.us", "orders.paid.eu", "payments.new.eu"):
                producer.publish({"key": key}, exchange=exchange, routing_key=key, declare=[eu, every],
                                 serializer="json", retry=True)  # fmt: skip
            while len(seen["eu"]) < 2 or len(seen["all"]) < 3:
                connection.drain_events(timeout=5)
        assert [b["key"] for b in seen["eu"]] == ["orders.new.eu", "orders.paid.eu"]
        assert [b["key"] for b in seen["all"]] == ["orders.new.eu", "orders.new.us", "orders.paid.eu"]
