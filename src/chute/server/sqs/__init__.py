"""Placeholder: routes are added by the work on this area."""

from __future__ import annotations


def add_routes(app, server) -> None:
    return None
