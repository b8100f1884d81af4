"""Calibration: no Redis at all. Measures what the HTTP front end alone costs."""

from __future__ import annotations

from .base import Backend


class OffBackend(Backend):
    name = "off"
    uses_redis = False

    async def incr(self, key: str) -> None:
        return None
