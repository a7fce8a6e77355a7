"""A diagnostic knob (an environment variable `chute serve` reads) refuses what it cannot use: its parser raises
ValueError with the variable's name and range, and `chute serve` stops with that message before anything starts."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
from click.testing import CliRunner

from chute.cli import main as cli


def assert_refused(monkeypatch, name: str, bad_values: Iterable[str], parse: Callable[[], object], message: str):
    for bad in bad_values:
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=message):
            parse()
        result = CliRunner().invoke(cli, ["serve", "--port", "0", "--http-port", "-1", "--amqp-port", "-1"])
        assert result.exit_code == 1 and f"{name} must be" in result.output, result.output
