"""Per-client-IP request accounting in Redis, in front of an HTTP service."""

__version__ = "0.1.0"
