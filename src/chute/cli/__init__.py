"""The `chute` command line: `chute serve` runs a broker; every other command talks to one through the client
(`--url`, default $CHUTE_URL, then chute://127.0.0.1:6160).

Invariant: a command fails with a non-zero exit and a one-line error on stderr, never a traceback; a usage error
(bad flag value, unknown option or command, missing argument) is one line too, with exit status 2 (`ChuteGroup`).
"""

from __future__ import annotations

import click

from chute.cli.admin import queue, subscribe, topic, unsubscribe
from chute.cli.bench import bench
from chute.cli.cluster import cluster
from chute.cli.common import ChuteGroup
from chute.cli.messages import consume, publish, tail
from chute.cli.serve import serve
from chute.cli.users import user


@click.group(cls=ChuteGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="chute", prog_name="chute")
def main() -> None:
    """Chute: a durable message broker. `chute serve` runs one; the other commands talk to it."""


main.add_command(serve)
main.add_command(bench)
main.add_command(publish)
main.add_command(consume)
main.add_command(tail)
main.add_command(queue)
main.add_command(topic)
main.add_command(subscribe)
main.add_command(unsubscribe)
main.add_command(user)
main.add_command(cluster)
