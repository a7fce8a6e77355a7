"""Cluster nodes as processes for tests: `chute serve --store URL` on 127.0.0.1 with free ports, its log read by a
thread (so a long run never fills the pipe), and a look at the cluster's rows that waits on NOTIFY.

`NodeProcess(url, name, tmp_path, lease_s)` starts a node and returns once it listens; `.url`, `.http_url`,
`.kill(sig)`, `.stop()`; `node_processes(url, names, tmp_path, *flags)` starts several and kills them all when its
block ends (printing their logs first if CHUTE_CLUSTER_LOGS is set).
`ClusterWatch` holds a LISTEN connection on the cluster's channel and re-reads the
shard rows each time a node announces something (and every `poll_s`, since a node that dies announces nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time

import asyncpg

LISTENING = re.compile(r"native protocol listening on (chute://[\d.]+:\d+)")
HTTP_LISTENING = re.compile(r"HTTP listening on (http://[\d.]+:\d+)")
START_TIMEOUT_S = 90.0


class NodeProcess:
    """One `chute serve --store` process; its stderr collected line by line in `lines`."""

    def __init__(self, url: str, name: str, data_dir: str, *extra: str, lease_s: float | None = 5.0) -> None:
        """`lease_s=None`: `chute serve`'s default lease (no `--cluster-lease`)."""
        self.name = name
        lease = ["--cluster-lease", str(lease_s)] if lease_s is not None else []
        self.args = [sys.executable, "-m", "chute", "serve", "--store", url, "--node-name", name,
                     "--data-dir", data_dir, "--port", "0", "--http-port", "0", "--amqp-port", "-1",
                     *lease, *extra]  # fmt: skip
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self.process = subprocess.Popen(self.args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = self.wait_for(LISTENING).group(1)
        self.http_url = next(m.group(1) for line in self.lines if (m := HTTP_LISTENING.search(line)))

    def _read(self) -> None:
        for raw in self.process.stderr:
            with self._seen:
                self.lines.append(raw.decode(errors="replace"))
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: re.Pattern[str], timeout_s: float = START_TIMEOUT_S, start: int = 0) -> re.Match:
        """The first log line from line `start` on matching `pattern` (waiting for it); raises if the process
        ends or `timeout_s` passes first."""
        deadline = time.monotonic() + timeout_s
        checked = start
        with self._seen:
            while True:
                for line in self.lines[checked:]:
                    if found := pattern.search(line):
                        return found
                checked = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"node {self.name} never logged {pattern.pattern!r}:\n{self.text[-5000:]}")
                self._seen.wait(left)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def kill(self) -> None:
        if self.alive:
            self.process.send_signal(signal.SIGCONT)  # a stopped process must run to die by SIGTERM (not SIGKILL)
            self.process.kill()
        self.process.wait(30)
        self._reader.join(10)
        self.process.stderr.close()

    def stop(self) -> int:
        """SIGTERM (a graceful stop: shards handed back); the exit status."""
        if self.alive:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
        try:
            code = self.process.wait(60)
        finally:
            self._reader.join(10)
            self.process.stderr.close()
        return code


class ClusterWatch:
    """The shard rows of the cluster in a database, re-read whenever a node notifies (or every `poll_s`)."""

    def __init__(self, url: str, poll_s: float = 0.25) -> None:
        self.url = url
        self.poll_s = poll_s
        self._connection: asyncpg.Connection | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> ClusterWatch:
        self._connection = await asyncpg.connect(self.url)
        await self._connection.add_listener("chute_cluster", lambda *_: self._changed.set())
        return self

    async def __aexit__(self, *exc) -> None:
        await self._connection.close()

    async def owners(self) -> dict[int, str | None]:
        """shard -> the node holding its current lease (None: nobody)."""
        rows = await self._connection.fetch(
            "SELECT shard, CASE WHEN lease_until > now() THEN owner END AS owner FROM chute_shards ORDER BY shard"
        )
        return {row["shard"]: row["owner"] for row in rows}

    async def until(self, predicate, timeout_s: float) -> dict[int, str | None]:
        """Wait until `predicate(owners)` holds; the owners then. Raises AssertionError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._changed.clear()
            owners = await self.owners()
            if predicate(owners):
                return owners
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the cluster never reached the state wanted; owners: {owners}")
            try:  # a node that dies announces nothing: its lease's end is seen by the next look
                await asyncio.wait_for(self._changed.wait(), min(left, self.poll_s))
            except TimeoutError:
                pass


def balanced(names: list[str], shards: int = 16):
    """A predicate: every shard held by one of `names`, each holding ⌊shards/n⌋ or ⌈shards/n⌉."""
    low, high = shards // len(names), -(-shards // len(names))

    def check(owners: dict[int, str | None]) -> bool:
        counts = {name: 0 for name in names}
        for owner in owners.values():
            if owner not in counts:
                return False
            counts[owner] += 1
        return all(low <= count <= high for count in counts.values())

    return check


@contextlib.asynccontextmanager
async def node_processes(url: str, names: list[str], tmp_path, *extra: str, lease_s: float | None = 5.0):
    """Nodes `names` (each `NodeProcess(url, name, tmp_path / name, *extra, lease_s=lease_s)`), started one after
    the other; all killed when the block ends, their logs printed first if CHUTE_CLUSTER_LOGS is set."""
    nodes: list[NodeProcess] = []
    try:
        for name in names:
            nodes.append(await asyncio.to_thread(NodeProcess, url, name, str(tmp_path / name), *extra,
                                                 lease_s=lease_s))  # fmt: skip
        yield nodes
    finally:
        for node in nodes:
            await asyncio.to_thread(node.kill)
        if os.environ.get("CHUTE_CLUSTER_LOGS"):
            for node in nodes:
                print(f"--- {node.name}\n{node.text[-8000:]}")
