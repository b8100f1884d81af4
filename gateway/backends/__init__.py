"""Registry of accounting backends: mode name -> backend class, imported on demand.

One module per backend, so a mode's dependencies (redis-py for naive and pooled)
are only imported when that mode runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..registry import load

if TYPE_CHECKING:
    from .base import Backend

BACKENDS: dict[str, str] = {
    "off": "gateway.backends.off:OffBackend",
    "naive": "gateway.backends.naive:NaiveBackend",
    "pooled": "gateway.backends.pooled:PooledBackend",
    "raw": "gateway.backends.raw:RawBackend",
    "multiplexed": "gateway.backends.multiplexed:MultiplexedBackend",
    "batched": "gateway.backends.batched:BatchedBackend",
}


def backend_class(mode: str) -> type[Backend]:
    return load(BACKENDS, mode, "mode")  # type: ignore[no-any-return]
