"""Chute's AMQP 0-9-1 front (docs/amqp.md): pika, aio-pika, kombu and other AMQP clients talk to the broker.

`frames.py` the framing constants and the codec around pamqp; `connection.py` the sans-I/O protocol (framing,
handshake and channel rules); `session.py` the asyncio.Protocol of one connection, `handshake.py` its credentials,
`dispatch.py` the running of each channel's methods in order; `channel.py` deliveries, prefetch and acks;
`declare.py`, `basic.py` and `tx.py` the methods; `exchanges.py` exchanges and bindings as Chute topics and
subscriptions; `mapping.py` properties and headers ↔ Chute messages, queue arguments ↔ queue settings; `front.py`
the listener.
"""

from chute.amqp.front import DEFAULT_AMQP_PORT, AmqpFront

__all__ = ["AmqpFront", "DEFAULT_AMQP_PORT"]
