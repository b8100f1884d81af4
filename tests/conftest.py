from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.backends import BACKENDS
from gateway.http import FRONT_ENDS

from .helpers import RedisServer

REDIS_MODES = [m for m in BACKENDS if m != "off"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # One contract suite runs over every implementation, uvicorn-style.
    if "mode" in metafunc.fixturenames:
        metafunc.parametrize("mode", list(BACKENDS))
    if "redis_mode" in metafunc.fixturenames:
        metafunc.parametrize("redis_mode", REDIS_MODES)
    if "http" in metafunc.fixturenames:
        metafunc.parametrize("http", list(FRONT_ENDS))


@pytest.fixture(scope="session")
def redis_session() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_server(redis_session: RedisServer) -> RedisServer:
    """The session's redis-server, emptied for this test."""
    redis_session.client().flushall()
    return redis_session


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may stop, pause or restart."""
    server = RedisServer().start()
    yield server
    server.cleanup()
