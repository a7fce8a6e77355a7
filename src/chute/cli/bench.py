"""`chute bench`: the standard workloads over the network, against `--url` or against a broker subprocess it starts
(and stops) itself. The workloads are in `chute.bench`; this module parses flags and prints the table.

Invariant: like every command, a failure is one line on stderr and exit 1; a broker it started is stopped.
"""

from __future__ import annotations

import sys

import click
from rich.table import Table

from chute.bench import DEFAULT_MESSAGES, WORKLOADS, BenchError, BrokerProcess, Options, Row, run_bench
from chute.cli.common import json_option, one_line_errors, print_json, stdout_console
from chute.client.url import parse_url
from chute.errors import ChuteError


def _check_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        parse_url(value)
    except ChuteError as exc:
        raise click.BadParameter(exc.message, ctx, param) from None
    return value


def _format(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def print_table(rows: list[Row]) -> None:
    table = Table(title="chute bench")
    for column, justify in (("workload", "left"), ("metric", "left"), ("value", "right"), ("unit", "left"),
                            ("target", "right")):  # fmt: skip
        table.add_column(column, justify=justify)
    for row in rows:
        table.add_row(row.workload, row.metric, _format(row.value), row.unit, row.target)
    stdout_console().print(table)


@click.command()
@click.option("--url", default=None, callback=_check_url, metavar="URL",
              help="Benchmark this running broker.  [default: start one as a subprocess]")  # fmt: skip
@json_option
@click.option("--workload", "workloads", multiple=True, type=click.Choice(WORKLOADS), metavar="NAME",
              help=f"Run only this workload (repeatable): {', '.join(WORKLOADS)}.  [default: all]")  # fmt: skip
@click.option("--messages", type=click.IntRange(min=1), default=None, metavar="N",
              help="Messages per workload.  [default: " + ", ".join(f"{k} {v:,}" for k, v in DEFAULT_MESSAGES.items())
              + "]")  # fmt: skip
@click.option("--size", type=click.IntRange(min=8, max=1_000_000), default=256, show_default=True, metavar="BYTES",
              help="Body size.")  # fmt: skip
@click.option("--rate", type=click.FloatRange(min=1, max=1_000_000), default=2000.0, show_default=True, metavar="R",
              help="latency: messages per second.")  # fmt: skip
@click.option("--duration", type=click.FloatRange(min=0.1, max=3600), default=5.0, show_default=True, metavar="S",
              help="latency: seconds of publishing.")  # fmt: skip
@click.option("--subscriptions", type=click.IntRange(min=1, max=1000), default=4, show_default=True, metavar="K",
              help="fanout: subscriptions (each to its own queue).")  # fmt: skip
@click.option("--queues", type=click.IntRange(min=1, max=100_000), default=1000, show_default=True, metavar="Q",
              help="queues: queues published to round-robin.")  # fmt: skip
@click.option("--idle-queues", type=click.IntRange(min=0, max=1_000_000), default=10_000, show_default=True,
              metavar="N", help="queues: idle queues while measuring idle CPU.")  # fmt: skip
@click.option("--idle-connections", type=click.IntRange(min=0, max=100_000), default=1000, show_default=True,
              metavar="N", help="queues: idle connections while measuring idle CPU.")  # fmt: skip
@click.option("--idle-seconds", "idle_s", type=click.FloatRange(min=0.1, max=3600), default=10.0, show_default=True,
              metavar="S", help="queues: length of the idle period.")  # fmt: skip
@click.option("--window", type=click.IntRange(min=1, max=1_000_000), default=2000, show_default=True, metavar="N",
              help="p2p, fanout, queues, backlog: most unconfirmed publishes at a time.")  # fmt: skip
@click.option("--max-lag", type=click.IntRange(min=0), default=10_000, show_default=True, metavar="N",
              help="p2p, fanout: most messages the producer may be ahead of the consumers (0: no limit).")  # fmt: skip
@click.option("--fsync", type=click.Choice(["always", "interval", "never"]), default="always", show_default=True,
              help="fsync policy of the broker bench starts (ignored with --url).")  # fmt: skip
def bench(url, as_json, workloads, **settings) -> None:
    """Measure a broker over the network: durable point-to-point throughput, latency at a fixed rate, fan-out,
    many queues (and idle CPU), backlog memory.

    Without --url it starts `chute serve` as a subprocess for each workload (temporary data directory, free
    port), so client and broker always run in separate processes, and stops it after the workload. Idle CPU
    and RSS are measured only for a broker it started (n/a with --url). Progress goes to stderr; the table (or
    --json) to stdout."""
    options = Options(workloads=workloads or WORKLOADS, **settings)

    def progress(text: str) -> None:
        click.echo(f"chute bench: {text}", err=True)

    def started(broker: BrokerProcess) -> None:
        progress(f"started a broker (pid {broker.pid}) at {broker.url}, data in {broker.data_dir}, "
                 f"fsync {broker.fsync}")  # fmt: skip

    with one_line_errors(BenchError):
        rows = run_bench(options, url, progress, started)
    if as_json:
        print_json([row.as_dict() for row in rows])
    else:
        print_table(rows)
    sys.stdout.flush()
