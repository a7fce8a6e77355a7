"""Chute's AMQP 0-9-1 front (docs/amqp.md): pika, aio-pika, kombu and other AMQP clients talk to the broker.

`connection.py` is the sans-I/O protocol (framing, handshake and channel rules, pamqp for the codec);
`session.py` the asyncio.Protocol of one connection; `channel.py` deliveries, prefetch and acks; `declare.py` and
`basic.py` the methods; `exchanges.py` exchanges and bindings as Chute topics and subscriptions; `mapping.py`
properties and headers ↔ Chute messages, queue arguments ↔ queue settings; `front.py` the listener.
"""

from chute.amqp.front import DEFAULT_AMQP_PORT, AmqpFront

__all__ = ["AmqpFront", "DEFAULT_AMQP_PORT"]
