"""Registries of implementations chosen by name: `"name": "module:Class"`, imported on demand,
so an implementation's dependencies load only when it is used."""

from __future__ import annotations

import importlib
from typing import Any


def load(table: dict[str, str], name: str, what: str) -> Any:
    """The class registered under `name`; ValueError naming `what` and the known names."""
    try:
        module_name, _, attr = table[name].partition(":")
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(table)}") from None
    return getattr(importlib.import_module(module_name), attr)
