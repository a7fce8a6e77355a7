"""`Client`: the blocking client. It runs one `AsyncClient` in an event loop on a background thread and each
method waits for the async method of the same name, so there is one protocol implementation, not two.

    with chute.Client() as client:                       # CHUTE_URL or chute://127.0.0.1:6160
        client.create_queue("jobs")
        client.publish("jobs", b"hello")                  # returns once durable
        for delivery in client.consume("jobs", prefetch=10):
            handle(delivery); client.ack(delivery)

Invariant: every call blocks at most the client's timeout (plus the long-poll time of `receive`); the loop
thread is stopped by `close()` (or at exit of `with`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from chute.client.aio import AsyncClient
from chute.client.consumer import AsyncConsumer
from chute.errors import BrokerClosed, ChuteError
from chute.model import Delivery

# The AsyncClient methods that Client offers with the same signature and docstring, blocking.
DELEGATED = (
    "create_queue", "update_queue", "delete_queue", "purge_queue", "list_queues", "queue_stats",
    "create_topic", "update_topic", "delete_topic", "list_topics", "subscribe", "update_subscription",
    "unsubscribe", "peek", "redrive", "publish", "publish_batch", "flush", "receive", "ack", "nack", "extend",
    "ack_receipts",
)  # fmt: skip


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="chute-client", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float | None = None):
        if not self.thread.is_alive():
            coro.close()
            raise BrokerClosed("the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


class Client:
    """A blocking connection to a Chute broker. Takes the same arguments as `AsyncClient`; connects at once."""

    def __init__(self, url: str | None = None, **options) -> None:
        self._runner = _LoopThread()
        try:
            self._async: AsyncClient = self._runner.run(self._make(url, options))
        except BaseException:
            self._runner.stop()
            raise

    @staticmethod
    async def _make(url, options) -> AsyncClient:
        return await AsyncClient(url, **options).connect()

    @property
    def url(self) -> str:
        return self._async.url

    @property
    def server_info(self):
        """What the broker said in the handshake (see AsyncClient.server_info): limits and its `fsync` policy."""
        return self._async.server_info

    def publish_many(self, dest: str, bodies, **options) -> list[int]:
        """Publish many bodies with the same options, batched; return their ids once all are durable."""

        async def go() -> list[int]:
            futures = [self._async.publish_nowait(dest, body, **options) for body in bodies]
            await self._async.flush()  # cheaper than gathering every future: they are all done after it
            errors = [f.exception() for f in futures]  # every error retrieved; the first is raised
            first = next((error for error in errors if error is not None), None)
            if first is not None:
                raise first
            return [f.result() for f in futures]

        return self._runner.run(go())

    def ack_nowait(self, deliveries: Delivery | Sequence[Delivery]) -> concurrent.futures.Future[None]:
        """Ack without waiting (see AsyncClient.ack_nowait): a concurrent.futures.Future, done once the acks are
        durable (or with their error). Acks made in a row share requests; `flush()` waits for all of them."""

        result: concurrent.futures.Future[None] = concurrent.futures.Future()

        def start() -> None:  # on the client's loop, in call order
            try:
                inner = self._async.ack_nowait(deliveries)
            except BaseException as exc:
                result.set_exception(exc)
                return
            inner.add_done_callback(lambda done: _copy(done, result))

        if not self._runner.thread.is_alive():
            raise BrokerClosed("the client is closed")
        self._runner.loop.call_soon_threadsafe(start)
        return result

    def consume(self, queue: str, *, prefetch: int = 100, lease_s: float | None = None) -> Consumer:
        """A push consumer: iterate over it for deliveries (settle each with `ack` / `nack`), or `run(callback)`."""
        return Consumer(self, self._runner.run(self._async.consume(queue, prefetch=prefetch, lease_s=lease_s)))

    def subscribe_ephemeral(self, topic: str, pattern: str = ">", *, filter: dict | None = None,
                            prefetch: int = 100) -> Consumer:  # fmt: skip
        """A consumer of a subscription that lives as long as it does (see AsyncClient.subscribe_ephemeral):
        messages published from now on, at most once, nothing to ack; `close()` ends the subscription."""
        consumer = self._runner.run(self._async.subscribe_ephemeral(topic, pattern, filter=filter, prefetch=prefetch))
        return Consumer(self, consumer)

    def close(self) -> None:
        """Send pending publishes, stop consumers, close the connection and the loop thread. Idempotent."""
        if self._runner.thread.is_alive():
            try:
                self._runner.run(self._async.close(), timeout=self._async.timeout + 5)
            finally:
                self._runner.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _copy(done: asyncio.Future, result: concurrent.futures.Future) -> None:
    if done.cancelled():
        result.cancel()
    elif done.exception() is not None:
        result.set_exception(done.exception())
    else:
        result.set_result(done.result())


def _delegate(name: str):
    method = getattr(AsyncClient, name)

    @functools.wraps(method)
    def call(self: Client, *args, **kwargs):
        return self._runner.run(getattr(self._async, name)(*args, **kwargs))

    call.__annotations__ = dict(method.__annotations__)  # same parameters; returns the awaited value
    return call


for _name in DELEGATED:
    setattr(Client, _name, _delegate(_name))


class Consumer:
    """The blocking face of an AsyncConsumer: `for delivery in consumer`, `get(timeout)`, `run(callback)`."""

    def __init__(self, client: Client, consumer: AsyncConsumer) -> None:
        self._client = client
        self._async = consumer

    def __iter__(self) -> Iterator[Delivery]:
        """Deliveries as they come; what has arrived is taken in one go from the client's loop thread (one
        thread hop per batch, not per delivery), and what the loop did not yield goes back when it ends."""
        run = self._client._runner.run
        taken: deque[Delivery] = deque()
        try:
            while True:
                if not taken:
                    taken.extend(run(self._async.get_many(self._async.prefetch)))
                    if not taken:
                        return  # closed
                yield taken.popleft()
        finally:
            if taken:
                with contextlib.suppress(ChuteError):
                    run(self._async._put_back(list(taken)))

    def get(self, timeout: float | None = None) -> Delivery | None:
        """The next delivery, or None after `timeout` seconds without one."""
        return self._client._runner.run(self._async.get(timeout))

    def get_many(self, max_n: int, timeout: float | None = None) -> list[Delivery]:
        """Up to `max_n` deliveries: at once what has arrived, else wait up to `timeout` for the first ([] if
        none came; see AsyncConsumer.get_many)."""
        return self._client._runner.run(self._async.get_many(max_n, timeout))

    def __len__(self) -> int:
        """How many deliveries have arrived and not been taken yet."""
        return len(self._async)

    def __bool__(self) -> bool:
        return True

    def run(self, callback: Callable[[Delivery], None], *, max_messages: int | None = None) -> int:
        """Call `callback` for each delivery in this thread: ack when it returns, nack (requeue now) when it
        raises. Returns after `max_messages` (or when the consumer ends), once every ack is answered; how many
        were handled. Acks do not hold up the next delivery (`ack_nowait`); one that fails is logged and its
        message is delivered again."""
        handled = 0
        for delivery in self:
            try:
                callback(delivery)
            except Exception:
                self._client.nack(delivery)
            else:
                with contextlib.suppress(ChuteError):  # the client is closed: it will be delivered again
                    self._client.ack_nowait(delivery)
            handled += 1
            if max_messages is not None and handled >= max_messages:
                break
        with contextlib.suppress(ChuteError):
            self._client.flush()
        return handled

    def ack(self, deliveries) -> None:
        self._client.ack(deliveries)

    def ack_nowait(self, deliveries) -> concurrent.futures.Future[None]:
        return self._client.ack_nowait(deliveries)

    def nack(self, deliveries, **options) -> None:
        self._client.nack(deliveries, **options)

    def close(self) -> None:
        self._client._runner.run(self._async.close())

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
