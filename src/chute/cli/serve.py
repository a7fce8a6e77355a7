"""`chute serve`: run a broker in this process until SIGTERM or SIGINT, then stop gracefully and exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys

import click

from chute.errors import ChuteError
from chute.server import Server, holdreport, load_config, looplag


@click.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory of the durable log and checkpoints.  [default: ./chute-data]",
)
@click.option(
    "--store", envvar="CHUTE_STORE", default=None, metavar="URL",
    help="postgresql://user@host/db (or $CHUTE_STORE): keep the log in PostgreSQL instead of --data-dir.",
)
@click.option(
    "--node-name", default=None,
    help="With --store: this node's name in the cluster, unique per node (a node started under a running name "
         "takes it over).  [default: the host name, plus -PORT when --port is neither 6160 nor 0]",
)
@click.option(
    "--shards", type=int, default=None,
    help="With --store, on the cluster's first node: its number of shards (later nodes read it).  [default: 16]",
)
@click.option(
    "--cluster-lease", "cluster_lease_s", type=float, default=None, metavar="SECONDS",
    help="With --store: a node silent this long is dead and its shards are taken over (within the lease plus "
         "their recovery; longer pauses than this cost a node its shards).  [default: 5]",
)
@click.option(
    "--advertise", default=None, metavar="HOST",
    help="With --store: the host other nodes reach this one at.  [default: --host]",
)
@click.option("--host", default=None, help="Address to listen on.  [default: 127.0.0.1]")
@click.option("--port", type=int, default=None, help="Native protocol port (0: any free port).  [default: 6160]")
@click.option(
    "--http-port", type=int, default=None,
    help="HTTP port: HTTP API, dashboard, /metrics, SQS API, /healthz (0: any free port; -1: none).  [default: 6161]",
)
@click.option(
    "--amqp-port", type=int, default=None,
    help="AMQP 0-9-1 port for pika, aio-pika, kombu (0: any free port; -1: none).  [default: 5672]",
)  # fmt: skip
@click.option(
    "--fsync",
    type=click.Choice(["always", "interval", "never"]),
    default=None,
    help="When a publish is confirmed: after fsync (always), fsync every 100 ms (interval), never.  [default: always]",
)
@click.option("--token", envvar="CHUTE_TOKEN", default=None, help="A superuser token (or $CHUTE_TOKEN): auth is on.")
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False),
    default=None,
    help="PEM certificate (chain): both listeners speak TLS 1.2+ (needs --tls-key).",
)
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None, help="PEM private key of --tls-cert.")
@click.option(
    "--allow-anonymous",
    is_flag=True,
    default=None,
    help="Allow a non-loopback --host without users or a token (anyone may do everything).",
)
@click.option(
    "--max-connections", type=int, default=None, help="Connections beyond this are refused.  [default: 10000]"
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML file with any of these settings (flags win).",
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
)
@click.option(
    "--pidfile", type=click.Path(dir_okay=False), default=None, metavar="PATH",
    help="Write the process id to PATH once listening; removed on a clean stop.",
)  # fmt: skip
def serve(config_file, log_level, http_port, pidfile, **flags) -> None:  # fmt: skip
    """Run a broker: durable storage in --data-dir, the native protocol on --port, HTTP on --http-port, AMQP 0-9-1
    on --amqp-port.

    Users: `chute user add ...` (the users file in --data-dir) or [[users]] in --config; see docs/security.md.

    SIGTERM or SIGINT stops it gracefully: no new connections, in-flight requests finish, everything is flushed
    and fsynced, exit status 0."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)  # fmt: skip
    try:
        amqp_port = flags.pop("amqp_port")
        config = load_config(config_file, http_port=None if http_port == -1 else http_port,
                             amqp_port=None if amqp_port == -1 else amqp_port, **flags)  # fmt: skip
        if http_port == -1 or amqp_port == -1:
            config.http_port = None if http_port == -1 else config.http_port
            config.amqp_port = None if amqp_port == -1 else config.amqp_port
            config.validate()
        looplag.interval_from_env()  # a benchmark's knob: refused here, before anything starts
        holdreport.threshold_from_env()  # (and the stall diagnostic's)
    except ChuteError as exc:
        raise click.ClickException(f"{exc.message} ({exc.name})") from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        _run(_serve(config, pidfile))
    except ChuteError as exc:
        raise click.ClickException(f"{exc.message} ({exc.name})") from None
    except OSError as exc:  # a bind carries no filename; the data directory (e.g. not a directory) does
        what = f"cannot use {exc.filename}" if exc.filename else "cannot listen"
        raise click.ClickException(f"{what}: {exc.strerror or exc}") from None


# The store's writer thread resolves a group commit only once it gets the GIL back from the event loop; with
# CPython's default 5 ms switch interval a busy loop can keep a confirm waiting up to 5 ms after its fsync.
# 1 ms gave 8% more p2p and 15% more fan-out throughput (medians of interleaved `chute bench` runs; no clear effect
# on latency; BENCHMARKS.md). The server owns this process, so setting this process-wide value is ours to do.
SWITCH_INTERVAL_S = 0.001

# The garbage collector's young generation is collected every GC_YOUNG_THRESHOLD allocations of tracked objects
# (CPython's default is 700). A busy broker allocates a few short-lived containers per message (requests, replies,
# futures), so at 700 the short-lived ones are promoted before they die and older generations fill up: full
# collections then walk every queue's structures. With 1,000 queues taking 90,000 messages that was ~1,200 young,
# ~110 middle and 10 full collections and 10-15% of the server's CPU. But a young collection walks up to this many
# live objects: at 20,000 that held the loop 8-10 ms in a soak (cache-cold objects, ~0.45 us each). At 5,000 it is
# a ~2 ms walk, and the server's CPU per message was the same as at 20,000 (p2p 4.70-4.90 against 4.80-4.87 us,
# the 1,000-queue run 31.6-34.8k against 30.1-30.7k msg/s; BENCHMARKS.md, issue 12). Process-wide, like the switch
# interval.
GC_YOUNG_THRESHOLD = 5_000


def _freeze_startup_objects(collect: bool = True) -> None:
    """Move every object the collector tracks so far out of its reach for good (`gc.freeze`): before the server
    starts (the modules, classes and functions of Chute, aiohttp, uvloop and the rest: about 50,000), after a
    collection; and again once it serves (what the start made: the fronts' modules, recovery's objects), without
    one. They live as long as the process, but each middle and full collection walked them again: 20-27 ms holds
    of the loop, the first about a minute after start, measured in a soak (BENCHMARKS.md, issue 12). A frozen
    object is still freed by reference counting; only a cycle among them would wait for the process's end.

    The second freeze does not collect: that collection held the loop 6-16 ms once the server listened, and found
    no garbage in any of six starts (an empty directory, and 50,000 messages recovered from a checkpoint or
    replayed after a SIGKILL). Whatever cycle the start left would be frozen: once, bounded by the start."""
    if collect:
        gc.collect()
    gc.freeze()


def _run(coro) -> None:
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


async def _serve(config, pidfile: str | None = None) -> None:
    server = Server(config)
    _freeze_startup_objects()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    # again once started: what start made (recovery, and the modules the HTTP, AMQP and SQS fronts import then:
    # ~22,000 objects) would otherwise be walked by the first middle collection, 9-21 ms a minute later (issue 12)
    _freeze_startup_objects(collect=False)
    try:
        if pidfile is not None:
            _write_pidfile(pidfile)
        await stop.wait()
    finally:
        await server.stop()
    if pidfile is not None:
        with contextlib.suppress(OSError):
            os.unlink(pidfile)


def _write_pidfile(path: str) -> None:
    """Our pid and a newline, written whole (a temporary file renamed over PATH): a reader never sees a part."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", encoding="ascii") as file:
            file.write(f"{os.getpid()}\n")
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise OSError(exc.errno, exc.strerror, path) from None  # named as given: "cannot use PATH: ..."
