"""`chute bench` (being written)."""

from __future__ import annotations

import click


@click.command()
def bench() -> None:
    """Run the standard workloads against a broker (not written yet)."""
    raise click.ClickException("chute bench is not written yet")
