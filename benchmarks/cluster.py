"""A Chute cluster on PostgreSQL with 1, 2 and 3 nodes: point-to-point throughput, and where the CPU goes.

    python -m benchmarks.cluster [--url postgresql://...] [--nodes 1,2,3] [--messages 200000] [--batch 100]
                                 [--inflight 2] [--body 256] [--workload p2p|fanout] [--relayed]
                                 [--forwarded] [--json]

For each node count it starts that many `chute serve --store` processes on a fresh database (16 shards), one queue
per shard, and drives them from this process: for every queue, `--inflight` producers publishing batches of
`--batch` and a consumer receiving and acking, each connected to the node that holds the queue's shard (no
forwarding: what the cluster itself can do). `--workload fanout`: 4 topics (on 4 shards), each with 4 subscription
queues; producers publish to each topic through its owner, a consumer per queue receives and acks through the
queue's owner; figures are deliveries (4 per message). A fresh queue subscribed to a topic of another shard moves to
the topic's shard (docs/cluster.md), so by default a topic's fan-out stays in its shard and the topics spread over
the nodes; with `--relayed` each queue is kept in its own shard (a message in it when it is subscribed) and every
copy crosses shards through a relay (src/chute/cluster/relay.py). CPU is read from /proc for the nodes, for this
process (the clients) and for the PostgreSQL server's processes. Without --url a private durable PostgreSQL is
started (fsync on, synchronous_commit on) and deleted afterwards. Nothing here is a test: figures go to
BENCHMARKS.md with the machine they were measured on (on a machine with fewer cores than processes, throughput
cannot grow with nodes; the CPU per message says what each part costs, and what more cores would buy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import asyncpg

import chute
from benchmarks.postgres_store import cpu_seconds, machine, server_facts
from chute.cluster.placement import home_shard
from tests.cluster.processes import ClusterWatch, NodeProcess, balanced
from tests.postgres.helpers import fresh_database

SHARDS = 16


def family(root: int) -> list[int]:
    """`root` and its children (PostgreSQL's postmaster and its backends; not other servers on the machine)."""
    pids = [root]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == root:
                    pids.append(int(entry.name))
            except (OSError, ValueError):
                pass
    return pids


def queue_per_shard() -> dict[int, str]:
    found: dict[int, str] = {}
    i = 0
    while len(found) < SHARDS:
        found.setdefault(home_shard(f"bench-{i}", SHARDS), f"bench-{i}")
        i += 1
    return found


async def drive(url: str, queue: str, messages: int, batch: int, inflight: int, body: bytes) -> None:
    """Publish and consume `messages` bodies through one queue on the node at `url`."""
    batches = messages // batch
    next_batch = iter(range(batches))
    async with chute.AsyncClient(url, timeout=60, reconnect=False) as client:

        async def producer() -> None:
            chunk = [body] * batch
            for _ in next_batch:
                await client.publish_batch(queue, chunk)

        await asyncio.gather(consume(client, queue, batches * batch, batch, inflight),
                             *(producer() for _ in range(inflight)))  # fmt: skip


async def consume(client, queue: str, count: int, batch: int, inflight: int) -> None:
    """Receive `count` messages of `queue` in batches, acking each batch without waiting (`inflight` at most)."""
    done, acks = 0, set()
    while done < count:
        deliveries = await client.receive(queue, batch, wait_s=1.0, lease_s=300)
        if deliveries:
            acks.add(asyncio.ensure_future(client.ack(deliveries)))
            done += len(deliveries)
        if len(acks) >= inflight:
            _, acks = await asyncio.wait(acks, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.gather(*acks)


FANOUT_TOPICS = 4
FANOUT_SUBSCRIPTIONS = 4


def names_on(prefix: str, shards: list[int]) -> list[str]:
    """A name of each of `shards`, in order."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < len(set(shards)):
        name = f"{prefix}{i}"
        if home_shard(name, SHARDS) in shards:
            found.setdefault(home_shard(name, SHARDS), name)
        i += 1
    return [found[shard] for shard in shards]


async def set_up_fanout(client, relayed: bool) -> dict[str, list[str]]:
    """{topic: its subscription queues}: topic t on shard 4t, its queues on the next four shards' names."""
    topics = names_on("fan-topic-", [4 * t for t in range(FANOUT_TOPICS)])
    plan = {}
    for t, topic in enumerate(topics):
        queues = names_on(f"fan-{t}-q", [(4 * t + k) % SHARDS for k in range(1, FANOUT_SUBSCRIPTIONS + 1)])
        await client.create_topic(topic)
        for queue in queues:
            await client.create_queue(queue, lease_s=300)
            if relayed:
                await client.publish(queue, b"seed")  # not empty: it stays in its shard, a relay feeds it
            await client.subscribe(topic, ">", queue)
            if relayed:
                seed = await client.receive(queue, 1, wait_s=5)
                await client.ack(seed)
        plan[topic] = queues
    return plan


async def drive_fanout(topic_url: str, topic: str, queue_urls: dict[str, str], messages: int, batch: int,
                       inflight: int, body: bytes) -> None:  # fmt: skip
    """Publish `messages` to `topic` at its owner; receive and ack every copy of each of its queues at theirs."""
    batches = iter(range(messages // batch))

    async def producer(client) -> None:
        chunk = [body] * batch
        for _ in batches:
            await client.publish_batch(topic, chunk)

    async def consumer(url: str, queue: str) -> None:
        async with chute.AsyncClient(url, timeout=60, reconnect=False) as client:
            await consume(client, queue, messages // batch * batch, batch, inflight)

    async with chute.AsyncClient(topic_url, timeout=60, reconnect=False) as client:
        await asyncio.gather(*(producer(client) for _ in range(inflight)),
                             *(consumer(url, queue) for queue, url in queue_urls.items()))  # fmt: skip


async def placement(url: str) -> dict[str, int]:
    """Every name's shard, as the cluster placed it (table chute_placement)."""
    connection = await asyncpg.connect(url)
    try:
        return {row["name"]: row["shard"] for row in await connection.fetch("SELECT name, shard FROM chute_placement")}
    finally:
        await connection.close()


async def one_size(base_url: str, postmaster: int | None, count: int, args) -> dict:
    url = await fresh_database(base_url)
    names = [f"node-{i}" for i in range(count)]
    directory = tempfile.mkdtemp(prefix="chute-bench-cluster-")
    nodes = [NodeProcess(url, name, f"{directory}/{name}", "--shards", str(SHARDS), lease_s=10) for name in names]
    try:
        async with ClusterWatch(url) as watch:
            owners = await watch.until(balanced(names), 120)
        by_name = {node.name: node for node in nodes}
        body = b"x" * args.body
        if args.workload == "fanout":
            async with chute.AsyncClient(nodes[0].url, timeout=60, reconnect=False) as client:
                plan = await set_up_fanout(client, args.relayed)
            placed = await placement(url)  # a subscribed queue may have moved to its topic's shard

            def at(name: str) -> str:
                return by_name[owners[placed[name]]].url

            per_topic = args.messages // FANOUT_TOPICS // args.batch * args.batch
            work = [drive_fanout(at(topic), topic, {q: at(q) for q in queues}, per_topic, args.batch, args.inflight,
                                 body) for topic, queues in plan.items()]  # fmt: skip
            relayed = sum(placed[q] != placed[t] for t, queues in plan.items() for q in queues)
            total = per_topic * FANOUT_TOPICS * FANOUT_SUBSCRIPTIONS  # deliveries
        else:
            queues = queue_per_shard()
            async with chute.AsyncClient(nodes[0].url, timeout=60, reconnect=False) as client:
                for name in queues.values():
                    await client.create_queue(name, lease_s=300)
            per_queue = args.messages // SHARDS // args.batch * args.batch
            def via(shard: int) -> str:  # the owner, or with --forwarded the next node (every call forwarded)
                if not args.forwarded or count == 1:
                    return by_name[owners[shard]].url
                return nodes[(names.index(owners[shard]) + 1) % count].url

            work = [drive(via(shard), name, per_queue, args.batch, args.inflight, body)
                    for shard, name in queues.items()]  # fmt: skip
            total = per_queue * SHARDS
            relayed = None
        node_pids = [node.process.pid for node in nodes]
        pg_pids = family(postmaster) if postmaster else []
        before = (cpu_seconds(node_pids), time.process_time(), cpu_seconds(pg_pids), time.perf_counter())
        await asyncio.gather(*work)
        pg_pids = sorted(set(pg_pids) | set(family(postmaster))) if postmaster else []
        after = (cpu_seconds(node_pids), time.process_time(), cpu_seconds(pg_pids), time.perf_counter())
        seconds = after[3] - before[3]
        return {
            "nodes": count, "workload": args.workload, "forwarded": bool(args.forwarded and count > 1),
            "relayed_subscriptions": relayed, "messages": total,
            "seconds": round(seconds, 2),
            "messages_per_s": round(total / seconds),
            "cpu_us_per_message_nodes": round((after[0] - before[0]) / total * 1e6, 1),
            "cpu_us_per_message_clients": round((after[1] - before[1]) / total * 1e6, 1),
            "cpu_us_per_message_postgres": round((after[2] - before[2]) / total * 1e6, 1) if postmaster else None,
        }  # fmt: skip
    finally:
        for node in nodes:
            node.stop()


async def run(url: str, postmaster: int | None, args) -> list[dict]:
    return [await one_size(url, postmaster, count, args) for count in args.nodes]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an existing PostgreSQL (default: start a private, durable one)")
    parser.add_argument("--nodes", type=lambda v: [int(n) for n in v.split(",")], default=[1, 2, 3])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--inflight", type=int, default=2, help="batches in flight per queue (16 queues)")
    parser.add_argument("--body", type=int, default=256)
    parser.add_argument("--workload", choices=("p2p", "fanout"), default="p2p")
    parser.add_argument("--relayed", action="store_true", help="fanout: every subscription through a relay")
    parser.add_argument("--forwarded", action="store_true",
                        help="p2p: clients connect to a node that does not own their queue (every call forwarded)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    server = None
    url = args.url
    if url is None:
        from tests.postgres.server import PostgresServer

        server = PostgresServer(durable=True).start()
        url = server.url
    try:
        facts = asyncio.run(server_facts(url))
        results = asyncio.run(run(url, server.process.pid if server else None, args))
    finally:
        if server is not None:
            server.destroy()
    report = {"machine": machine(), "postgres": facts, "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"machine: {report['machine']}")
    print(f"PostgreSQL {facts['server_version']}: fsync={facts['fsync']} "
          f"synchronous_commit={facts['synchronous_commit']}")  # fmt: skip
    for r in results:
        unit = f"deliveries/s ({r['relayed_subscriptions']} relayed subs)"
        if r["workload"] == "p2p":
            unit = "msg/s p2p" + (", forwarded" if r["forwarded"] else "")
        print(f"{r['nodes']} node(s): {r['messages_per_s']:>7,} {unit}; CPU per message: nodes "
              f"{r['cpu_us_per_message_nodes']} us, clients {r['cpu_us_per_message_clients']} us, PostgreSQL "
              f"{r['cpu_us_per_message_postgres']} us")  # fmt: skip


if __name__ == "__main__":
    main()
