"""Fixtures: real servers (started once per session, killed at the end) and
limiters over every combination the client supports: standalone and 3+3
cluster, RESP2 and RESP3, sync and asyncio."""

from __future__ import annotations

import uuid
from typing import Iterator

import pytest
import redis
import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from servers import Cluster, Standalone
from tollgate import AsyncLimiter, Limiter

COMBOS = [("standalone", 2), ("standalone", 3), ("cluster", 2), ("cluster", 3)]
IDS = [f"{t}-resp{p}" for t, p in COMBOS]


@pytest.fixture(scope="session")
def standalone() -> Iterator[Standalone]:
    server = Standalone()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    yield c
    c.stop()


def sync_client(request: pytest.FixtureRequest, topology: str, protocol: int, **kw):
    if topology == "standalone":
        port = request.getfixturevalue("standalone").port
        return redis.Redis(port=port, protocol=protocol, **kw)
    c = request.getfixturevalue("cluster")
    return RedisCluster(host="127.0.0.1", port=c.ports[0], protocol=protocol, **kw)


def async_client(request: pytest.FixtureRequest, topology: str, protocol: int, **kw):
    if topology == "standalone":
        port = request.getfixturevalue("standalone").port
        return aredis.Redis(port=port, protocol=protocol, **kw)
    c = request.getfixturevalue("cluster")
    return AsyncRedisCluster(host="127.0.0.1", port=c.ports[0], protocol=protocol, **kw)


@pytest.fixture(params=COMBOS, ids=IDS)
def limiter(request: pytest.FixtureRequest) -> Iterator[Limiter]:
    topology, protocol = request.param
    client = sync_client(request, topology, protocol)
    lim = Limiter(client)
    yield lim
    lim.close()
    client.close()


@pytest.fixture(params=COMBOS, ids=IDS)
async def alimiter(request: pytest.FixtureRequest):
    topology, protocol = request.param
    client = async_client(request, topology, protocol)
    lim = AsyncLimiter(client)
    yield lim
    await lim.close()
    await client.aclose()


def uniq(prefix: str = "t") -> str:
    """A fresh name, so tests sharing a server never share state."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
