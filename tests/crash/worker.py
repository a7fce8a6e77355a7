"""Crash-test worker: publishes, receives and acks through a durable broker until it is killed or its time is up.

    python -m tests.crash.worker DATA_DIR LOG_PATH --seed N [--time-limit S]     (from the repository root)

It opens a Broker on DATA_DIR (FileStore, fsync "always", small segments and frequent checkpoints so that kills
also land in segment rollovers, checkpoints and compaction), makes sure queue "crash" and topic "fan" with two
subscriptions (queues "fan-a" and "fan-b") exist, then runs steps of two publishes and one
receive-and-ack per queue, concurrently (so group commit shares writes and fsyncs between them), until the
time limit.

The log: one line per event, appended to LOG_PATH with os.write (no Python buffer: the OS keeps the bytes when the
process is SIGKILLed; no fsync is needed because the log is read only after the process is dead). Lines about a
broker call are written only after the call returned, except the intents, written before it:

    O <seed> <pid>         opening the broker (recovery is about to run)
    S <seed>               broker started, queues and topic in place
    T <dest> <seq>...      a publish is about to be sent (intent: it may or may not land)
    P <dest> <seq>...      publish confirmed (dest "crash" is the queue, "fan" the topic)
    I <queue> <seq>...     acks are about to be sent (intent: they may or may not land)
    A <queue> <seq>...     acks confirmed
    E                      time limit reached, broker closed cleanly
    X <text>               the worker saw the broker break a guarantee; it exits with status 1

Sequence numbers are unique across runs on one directory as long as each run gets its own seed
(seq = seed * SEQ_BLOCK + counter). `body_of(seq)` / `headers_of(seq)` give the exact body and headers stored
for a seq, so the checker can verify content as well as presence.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time

from chute import Broker, Publish
from chute.storage import FileStore

SEQ_BLOCK = 10_000_000
SEGMENT_MAX_BYTES = 64 * 1024
CHECKPOINT_BYTES = 128 * 1024
QUEUE = "crash"
TOPIC = "fan"
FAN_QUEUES = ("fan-a", "fan-b")
QUEUES = (QUEUE, *FAN_QUEUES)
SOURCE = {QUEUE: QUEUE, "fan-a": TOPIC, "fan-b": TOPIC}  # queue -> where its messages are published
_PAD = bytes(range(32, 127)) * 20


def body_of(seq: int) -> bytes:
    """The body published for `seq`: the seq itself, then 0-1200 bytes of padding that depend on it."""
    return b"seq=%d;" % seq + _PAD[: (seq * 7919) % 1201]


def headers_of(seq: int) -> dict[str, str]:
    return {"seq": str(seq)}


def seq_of(body: bytes) -> int:
    return int(body[4 : body.index(b";")])


class Log:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def note(self, tag: str, *fields) -> None:
        # one os.write per line: O_APPEND keeps concurrent lines whole, and nothing waits in a Python buffer
        os.write(self.fd, (" ".join([tag, *(str(f) for f in fields)]) + "\n").encode())


class Violation(Exception):
    """The broker broke a guarantee the worker can see by itself."""


class Worker:
    """Each step runs two publishes and one receive-and-ack per queue concurrently, so one group commit carries
    publishes, deliveries, nacks and acks together. Steps, not free-running loops: a read of a body that is not
    cached waits until the log writer is idle (FileStore.read awaits flush()), so with free-running publishers
    the fan-out consumers (whose bodies leave the cache when the other subscription acks) hardly ever ack."""

    def __init__(self, broker: Broker, log: Log, seed: int) -> None:
        self.broker, self.log, self.rng = broker, log, random.Random(seed)
        self.next_seq = seed * SEQ_BLOCK
        self.leased: dict[str, set[int]] = {q: set() for q in QUEUES}  # leases of 600 s outlive this run
        self.acked: dict[str, set[int]] = {q: set() for q in QUEUES}

    async def step(self) -> None:
        await asyncio.gather(self.publish(), self.publish(), *(self.consume(q) for q in QUEUES))

    async def publish(self) -> None:
        size = self.rng.randint(1, 50)
        seqs = list(range(self.next_seq, self.next_seq + size))
        self.next_seq += size
        dest = QUEUE if self.rng.random() < 0.7 else TOPIC
        self.log.note("T", dest, *seqs)
        await self.broker.publish_batch(dest, [Publish(body=body_of(s), headers=headers_of(s)) for s in seqs])
        self.log.note("P", dest, *seqs)

    async def consume(self, queue: str) -> None:
        leased, acked = self.leased[queue], self.acked[queue]
        deliveries = await self.broker.receive(queue, self.rng.randint(1, 100))
        for delivery in deliveries:
            seq = seq_of(delivery.body)
            if delivery.body != body_of(seq) or delivery.headers != headers_of(seq):
                raise Violation(f"{queue}: seq {seq} delivered with a damaged body or headers")
            if seq in acked:
                raise Violation(f"{queue}: seq {seq} delivered again after its ack was confirmed")
            if seq in leased:
                raise Violation(f"{queue}: seq {seq} delivered twice while its lease holds")
            leased.add(seq)
        to_ack, to_nack = [], []
        for delivery in deliveries:
            draw = self.rng.random()
            if draw < 0.7:
                to_ack.append(delivery)
            elif draw < 0.8:
                to_nack.append(delivery)  # ready again at once: it will be delivered again
        if to_nack:
            await self.broker.nack(queue, [d.receipt for d in to_nack])
            leased.difference_update(seq_of(d.body) for d in to_nack)
        if to_ack:
            seqs = [seq_of(d.body) for d in to_ack]
            self.log.note("I", queue, *seqs)
            await self.broker.ack(queue, [d.receipt for d in to_ack])
            self.log.note("A", queue, *seqs)
            leased.difference_update(seqs)
            acked.update(seqs)


async def run(data_dir: str, log_path: str, seed: int, time_limit_s: float) -> int:
    log = Log(log_path)
    log.note("O", seed, os.getpid())
    store = FileStore(data_dir, fsync_policy="always", segment_max_bytes=SEGMENT_MAX_BYTES)
    async with Broker(store=store, checkpoint_bytes=CHECKPOINT_BYTES) as broker:
        for name in QUEUES:
            await broker.create_queue(name, lease_s=600)  # idempotent: a run killed half-way set up is finished
        await broker.create_topic(TOPIC)
        [topic] = [info for info in broker.list_topics() if info.name == TOPIC]
        bound = {(s.pattern, s.queue) for s in topic.subscriptions}
        for pattern, queue in ((">", "fan-a"), (TOPIC, "fan-b")):
            if (pattern, queue) not in bound:
                await broker.subscribe(TOPIC, pattern, queue)
        log.note("S", seed)
        worker = Worker(broker, log, seed)
        deadline = time.monotonic() + time_limit_s
        try:
            while time.monotonic() < deadline:
                await worker.step()
        except Violation as violation:
            log.note("X", violation)
            return 1
    log.note("E")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("data_dir")
    parser.add_argument("log_path")
    parser.add_argument("--seed", type=int, required=True, help="seeds the choices and numbers the sequences")
    parser.add_argument("--time-limit", type=float, default=30.0, help="stop by itself after this many seconds")
    args = parser.parse_args(argv)
    if not 0 < args.seed < 2**40:
        parser.error("--seed must be a positive integer")
    return asyncio.run(run(args.data_dir, args.log_path, args.seed, args.time_limit))


if __name__ == "__main__":
    sys.exit(main())
