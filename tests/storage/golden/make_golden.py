"""Write the golden data directories of a file-store format, and what a broker must find in them.

Run with the Chute whose format the goldens pin (format version 1 was written by commit 62c21ba):

    python tests/storage/golden/make_golden.py tests/storage/golden/v1

It writes three data directories: `crashed/` and `log-only/` are a broker's files as a SIGKILL leaves them (copied
while the broker runs, after every publish and ack was confirmed; no clean-shutdown marker), `crashed/` with a
checkpoint and records after it, `log-only/` with records only; `clean/` was closed cleanly (a checkpoint of
everything). Segments are small (4 KiB), so each image has several. `state.json`
is what a broker of that version finds in each after a restart: every queue's stats and every stored message in
peek order, and the topics with their subscriptions. tests/storage/test_format_upgrade.py opens copies with
today's Chute and compares.

The clock is fixed, so message ids and times are the same on every run.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

from chute import Broker, Publish
from chute.storage.file import FileStore

START = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def store(path: Path) -> FileStore:
    return FileStore(path, fsync_policy="always", segment_max_bytes=4096)


async def fill(broker: Broker, clock: Clock, after_checkpoint: bool) -> None:
    await broker.create_queue("orders", lease_s=30)
    await broker.create_queue("later")
    await broker.create_queue("dlq")
    await broker.create_queue("work", max_deliveries=1, dead_letter_queue="dlq")
    await broker.create_queue("groups", fifo=True)
    await broker.create_queue("short", retention_s=3600)
    await broker.create_queue("subq")
    await broker.create_topic("events", retention_s=86400)
    await broker.subscribe("events", "a.*", "subq")
    await broker.publish_batch(
        "orders",
        [Publish(body=f"order {i}".encode(), headers={"n": str(i)}, priority=i % 3) for i in range(12)],
    )
    got = await broker.receive("orders", 3)
    await broker.ack("orders", [got[0].receipt, got[1].receipt])  # the third stays in flight
    await broker.publish("later", b"in an hour", delay_s=3600)
    await broker.publish("work", b"fails once")
    failed = await broker.receive("work", 1)
    await broker.nack("work", [failed[0].receipt])  # max_deliveries=1: to dlq, reason max_deliveries
    for i in range(6):
        await broker.publish("groups", f"g{i % 2} #{i}".encode(), group=f"g{i % 2}", dedup_id=f"d{i}")
    await broker.publish("short", b"expires", ttl_s=7200)
    for i in range(5):
        await broker.publish("events", f"event {i}".encode(), subject=f"a.{i}", headers={"k": "v"})
    await broker.publish("events", b"nobody hears this", subject="b.1")
    await broker.publish("orders", b"x" * 3000)  # a large body: a segment of its own
    if after_checkpoint:
        await broker.checkpoint()
        clock.now += 5
        await broker.publish_batch("orders", [Publish(body=f"after {i}".encode()) for i in range(4)])
        got = await broker.receive("orders", 2)
        await broker.ack("orders", [got[0].receipt])
        await broker.create_queue("late-queue", delay_s=10)
        await broker.publish("late-queue", b"late")
        await broker.subscribe("events", "a.>", "late-queue")
        await broker.publish("events", b"after checkpoint", subject="a.b.c")
        await broker.purge_queue("short")


async def image(target: Path, *, after_checkpoint: bool, clean: bool) -> None:
    work = target.with_name(target.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    clock = Clock()
    broker = Broker(store=store(work), clock=clock, auto_tick=False)
    await broker.start()
    await fill(broker, clock, after_checkpoint)
    if clean:
        await broker.close()
        shutil.copytree(work, target, ignore=shutil.ignore_patterns("lock"))
    else:
        await broker.store.flush()
        shutil.copytree(work, target, ignore=shutil.ignore_patterns("lock"))  # what a SIGKILL leaves
        await broker.close()
    shutil.rmtree(work)


def describe(broker: Broker) -> dict:
    """Everything the goldens pin, as JSON-able data (the same code reads old and new stores)."""
    queues = {}
    for info in broker.list_queues():
        stats = broker.queue_stats(info.name)
        queues[info.name] = {
            "settings": json.loads(_json(info.settings)),
            "ready": stats.ready,
            "in_flight": stats.in_flight,
            "delayed": stats.delayed,
            "bytes": stats.bytes,
        }
    topics = {}
    for topic in broker.list_topics():
        topics[topic.name] = json.loads(_json(topic))
    return {"queues": queues, "topics": topics}


async def messages(broker: Broker) -> dict:
    out = {}
    for info in broker.list_queues():
        out[info.name] = [
            {
                "id": d.message.id,
                "body": d.message.body.decode("latin-1"),
                "headers": d.message.headers,
                "priority": d.message.priority,
                "group": d.message.group,
                "subject": d.message.subject,
                "delivery_count": d.delivery_count,
                "dead_letter_reason": d.dead_letter_reason,
            }
            for d in await broker.peek(info.name, 1000)
        ]
    return out


async def found(path: Path) -> dict:
    """What a broker finds in a copy of `path`: queues (settings, depths, messages in peek order) and topics."""
    work = path.with_name(path.name + ".read")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(path, work)
    broker = Broker(store=store(work), clock=Clock(), auto_tick=False)
    await broker.start()
    try:
        state = describe(broker)
        state["messages"] = await messages(broker)
        return state
    finally:
        await broker.close()
        shutil.rmtree(work)


def _json(value) -> bytes:
    import msgspec

    return msgspec.json.encode(value)


async def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, after_checkpoint, clean in (("crashed", True, False), ("clean", False, True), ("log-only", False, False)):
        target = out / name
        shutil.rmtree(target, ignore_errors=True)
        await image(target, after_checkpoint=after_checkpoint, clean=clean)
    state = {name: await found(out / name) for name in ("crashed", "clean", "log-only")}
    (out / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
