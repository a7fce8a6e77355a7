"""`python -m chute DIR [--demo]`: open a data directory in-process and keep it served until interrupted.

Until the network server lands (`chute serve`), this is how to run the broker by hand: it recovers DIR (creating
it if needed), reports what recovery found and what the queues hold, and with `--demo` publishes, consumes and
acks a few messages through the durable store.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from chute import Broker
from chute.errors import ChuteError


async def _main(data_dir: str, demo: bool, fsync: str) -> int:
    async with Broker(data_dir, fsync=fsync) as broker:
        report = broker.recovery
        print(f"chute: serving {data_dir} in-process (fsync {fsync})")
        if report is not None:
            cut = f", torn tail cut at {report.truncated_at[0]}:{report.truncated_at[1]}" if report.truncated_at else ""
            print(f"chute: recovered {report.records} records from {report.segments} segment(s){cut}")
        if demo:
            await broker.create_queue("demo")
            ids = await broker.publish_batch("demo", [_publish(i) for i in range(3)])
            print(f"chute: published {len(ids)} messages to 'demo'")
            for delivery in await broker.receive("demo", 10):
                print(f"chute: received {delivery.body!r} (delivery {delivery.delivery_count})")
                await broker.ack("demo", delivery.receipt)
        for queue in broker.list_queues():
            stats = broker.queue_stats(queue.name)
            print(f"  queue {queue.name}: ready {stats.ready}, delayed {stats.delayed}")
        if demo:
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        print("chute: press Ctrl-C to stop")
        await stop.wait()
    print("chute: closed cleanly")
    return 0


def _publish(i: int):
    from chute import Publish

    return Publish(body=f"hello {i}".encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chute", description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", nargs="?", default="./chute-data", help="data directory (default ./chute-data)")
    parser.add_argument("--demo", action="store_true", help="publish, consume and ack a few messages, then exit")
    parser.add_argument("--fsync", choices=["always", "interval", "never"], default="always")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_main(args.data_dir, args.demo, args.fsync))
    except ChuteError as exc:
        print(f"chute: error: {exc.name}: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
