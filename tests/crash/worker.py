"""Crash-test worker: publishes and acks through a durable broker until it is killed (or its time is up).

    python -m tests.crash.worker DATA_DIR LOG_PATH SEED

It appends one line to LOG_PATH per event, with os.write (no Python buffer; the OS keeps the bytes when the
process is SIGKILLed), and only after the broker call returned:
    P <seq> <seq> ...   publishes confirmed (bodies are b"m<seq>")
    I <seq> ...         acks about to be sent (intent: they may or may not land)
    A <seq> ...         acks confirmed
The checker (test_sigkill.py) holds the broker to these lines after the kill.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time

from chute import Broker, Publish
from chute.storage import FileStore

TIME_LIMIT_S = 30.0  # stops by itself if nobody kills it


async def run(data_dir: str, log_path: str, seed: int) -> None:
    rng = random.Random(seed)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def note(tag: str, seqs) -> None:
        os.write(log, (tag + " " + " ".join(str(s) for s in seqs) + "\n").encode())

    # small segments and frequent checkpoints: kills also land in rollovers, checkpoints and compaction
    store = FileStore(data_dir, segment_max_bytes=64 * 1024)
    async with Broker(store=store, checkpoint_bytes=128 * 1024) as broker:
        await broker.create_queue("crash", lease_s=600)
        await broker.create_topic("fan")
        await broker.create_queue("fan-a", lease_s=600)
        await broker.subscribe("fan", ">", "fan-a")
        note("S", [seed])
        next_seq = seed * 10_000_000
        deadline = time.monotonic() + TIME_LIMIT_S
        while time.monotonic() < deadline:
            size = rng.randint(1, 50)
            seqs = list(range(next_seq, next_seq + size))
            next_seq += size
            dest = "crash" if rng.random() < 0.8 else "fan"
            await broker.publish_batch(dest, [Publish(body=b"m%d" % s) for s in seqs])
            note("P" if dest == "crash" else "F", seqs)
            for queue in ("crash", "fan-a"):
                deliveries = await broker.receive(queue, rng.randint(1, 60))
                chosen = [d for d in deliveries if rng.random() < 0.7]
                if chosen:
                    acked = [int(d.body[1:]) for d in chosen]
                    note("I", acked)
                    await broker.ack(queue, [d.receipt for d in chosen])
                    note("A", acked)


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1], sys.argv[2], int(sys.argv[3])))
