"""The cluster router's slot-map refresh while no node answers: backed off, one warning."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from gateway.cluster import ClusterRouter
from gateway.config import RedisTarget


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _no_node(target: RedisTarget) -> object:
    raise AssertionError("no node is made while the map is empty")


async def test_a_cluster_that_is_down_is_asked_with_backoff_and_warned_of_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    router = ClusterRouter(
        (RedisTarget(port=_closed_port()),),
        _no_node,
        connect_timeout=0.2,
        command_timeout=0.2,  # type: ignore[arg-type]
    )
    with caplog.at_level(logging.DEBUG, logger="gateway.cluster"):
        await router.start()
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.6
        while loop.time() < end:  # requests finding no node, every 2 ms
            router.schedule_refresh()
            await asyncio.sleep(0.002)
    # Intervals 0.2, 0.4, 0.8 s after the first: 4 refreshes in 1.6 s, not one per 100 ms (16).
    assert 3 <= router.refresh_errors <= 5, router.refresh_errors
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    await router.close()
