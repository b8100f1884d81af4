"""Per-client-IP request accounting in Redis, in front of an HTTP service."""

__version__ = "0.1.0"

# Before any submodule: a compiled build is used only while it matches the sources (gateway.native).
from . import native as _native

_native.guard()
