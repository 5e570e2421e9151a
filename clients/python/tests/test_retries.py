"""Which calls the client repeats after a lost reply: only those that are safe
to repeat. A call that charges without an `id` (RL.ACQUIRE, RL.CREDITS.DEDUCT,
RL.CREDITS.GRANT) goes out once, whatever redis-py's own `Retry` would do; with
an `id`, a repeat is answered from the first decision and charges nothing."""

from __future__ import annotations

import threading
import time
from typing import Iterator

import pytest
import redis
import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.retry import Retry

from conftest import uniq
from tollgate import AsyncLimiter, Limiter

# Keeps the server busy for `ms` milliseconds (no keys: any node runs it).
BUSY = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
while true do
  t = redis.call('TIME')
  if t[1] * 1000000 + t[2] - start > tonumber(ARGV[1]) * 1000 then break end
end
return 1
"""
TIMEOUT = 0.2
BLOCK_MS = 500


def owner_port(request: pytest.FixtureRequest, topology: str, key: str) -> int:
    if topology == "standalone":
        return request.getfixturevalue("standalone").port
    cluster = request.getfixturevalue("cluster")
    slot = key_slot(key.encode())
    with redis.Redis(port=cluster.ports[0], decode_responses=True) as r:
        for start, end, primary, *_ in r.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(primary[1])
    raise AssertionError("no owner")


class Blocked:
    """Runs a busy script on `port` in a thread for BLOCK_MS (started when
    entered, joined on exit)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with redis.Redis(port=self.port, socket_timeout=10) as r:
            r.ping()
            self.ready.set()
            r.eval(BUSY, 0, BLOCK_MS)

    def __enter__(self) -> "Blocked":
        self.thread.start()
        assert self.ready.wait(5)
        # Until the script runs (the server then answers nobody), however busy the machine.
        with redis.Redis(port=self.port, socket_timeout=0.05, retry=Retry(NoBackoff(), 0)) as probe:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    probe.ping()
                except redis.exceptions.TimeoutError:
                    return self
                time.sleep(0.01)
        raise AssertionError("the busy script did not start")

    def __exit__(self, *exc: object) -> None:
        self.thread.join(10)


@pytest.fixture(params=["standalone", "cluster"])
def topology(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.param


def admin_for(request: pytest.FixtureRequest, topology: str) -> Limiter:
    if topology == "standalone":
        return Limiter(redis.Redis(port=request.getfixturevalue("standalone").port))
    return Limiter(RedisCluster(host="127.0.0.1", port=request.getfixturevalue("cluster").ports[0]))


def used(admin: Limiter, key: str, plan: str, name: str = "rpm") -> int:
    lim = admin.usage(key, plan).limit(name)
    assert lim is not None and lim.used is not None
    return lim.used


def test_an_acquire_without_id_is_sent_once_when_its_reply_times_out(request, topology) -> None:
    admin = admin_for(request, topology)
    plan, key = uniq("plan"), uniq("user")
    admin.plans.set(plan, {"rpm": "sliding 100/1m"})
    port = owner_port(request, topology, key)
    if topology == "standalone":
        client = redis.Redis(port=port, socket_timeout=TIMEOUT)
    else:
        client = RedisCluster(host="127.0.0.1", port=request.getfixturevalue("cluster").ports[0], socket_timeout=TIMEOUT)
    limiter = Limiter(client)
    limiter.peek(key, plan)  # connected, slot table loaded
    with Blocked(port):
        with pytest.raises((redis.exceptions.TimeoutError, redis.exceptions.ConnectionError)):
            limiter.acquire(key, plan)
    time.sleep(0.2)
    assert used(admin, key, plan) == 1, "the acquire was charged more than once"
    # With an id, the lost reply is asked again and the server answers the first decision.
    limiter.peek(key, plan)  # connected again (a timeout closes the connection)
    with Blocked(port):
        try:
            d = limiter.acquire(key, plan, id="req-1")
            assert d.allowed and d.id == "req-1"
        except (redis.exceptions.TimeoutError, redis.exceptions.ConnectionError):
            pass  # every retry also fell within the block: still charged once
    time.sleep(0.2)
    assert used(admin, key, plan) == 2
    limiter.peek(key, plan)
    d = limiter.acquire(key, plan, id="req-1")
    assert d.allowed and used(admin, key, plan) == 2
    limiter.close()
    client.close()
    admin.client.close()


def test_a_single_connection_client_also_sends_an_acquire_without_id_once(standalone) -> None:
    admin = Limiter(redis.Redis(port=standalone.port))
    plan, key = uniq("plan"), uniq("user")
    admin.plans.set(plan, {"rpm": "sliding 100/1m"})
    client = redis.Redis(port=standalone.port, socket_timeout=TIMEOUT, single_connection_client=True)
    limiter = Limiter(client)
    limiter.peek(key, plan)
    with Blocked(standalone.port):
        with pytest.raises((redis.exceptions.TimeoutError, redis.exceptions.ConnectionError)):
            limiter.acquire(key, plan)
    time.sleep(0.2)
    assert used(admin, key, plan) == 1, "the acquire was charged more than once"
    assert limiter.acquire(key, plan).allowed  # the one connection is usable again
    assert used(admin, key, plan) == 2
    client.close()
    admin.client.close()


def test_credits_without_id_are_sent_once_when_the_reply_times_out(request, topology) -> None:
    admin = admin_for(request, topology)
    ckey = uniq("credits")
    admin.credits.grant(ckey, 100)
    port = owner_port(request, topology, ckey)
    if topology == "standalone":
        client = redis.Redis(port=port, socket_timeout=TIMEOUT)
    else:
        client = RedisCluster(host="127.0.0.1", port=request.getfixturevalue("cluster").ports[0], socket_timeout=TIMEOUT)
    limiter = Limiter(client)
    limiter.credits.balance(ckey)
    with Blocked(port):
        with pytest.raises((redis.exceptions.TimeoutError, redis.exceptions.ConnectionError)):
            limiter.credits.deduct(ckey, 10)
    time.sleep(0.2)
    assert admin.credits.balance(ckey) == 90
    limiter.credits.balance(ckey)  # connected again (a timeout closes the connection)
    with Blocked(port):
        with pytest.raises((redis.exceptions.TimeoutError, redis.exceptions.ConnectionError)):
            limiter.credits.grant(ckey, 5)
    time.sleep(0.2)
    assert admin.credits.balance(ckey) == 95
    client.close()
    admin.client.close()


async def test_an_async_acquire_without_id_is_sent_once_when_its_reply_times_out(request, topology) -> None:
    admin = admin_for(request, topology)
    plan, key = uniq("plan"), uniq("user")
    admin.plans.set(plan, {"rpm": "sliding 100/1m"})
    port = owner_port(request, topology, key)
    if topology == "standalone":
        client = aredis.Redis(port=port, socket_timeout=TIMEOUT)
    else:
        client = AsyncRedisCluster(host="127.0.0.1", port=request.getfixturevalue("cluster").ports[0], socket_timeout=TIMEOUT)
    limiter = AsyncLimiter(client)
    await limiter.peek(key, plan)
    with Blocked(port):
        with pytest.raises((redis.exceptions.TimeoutError, redis.exceptions.ConnectionError)):
            await limiter.acquire(key, plan)
    time.sleep(0.2)
    assert used(admin, key, plan) == 1, "the acquire was charged more than once"
    ckey = "{%s}:c" % key
    await limiter.credits.grant(ckey, 10, id="g1")
    with Blocked(port):
        with pytest.raises((redis.exceptions.TimeoutError, redis.exceptions.ConnectionError)):
            await limiter.credits.deduct(ckey, 1)
    time.sleep(0.2)
    assert await limiter.credits.balance(ckey) == 9
    await limiter.close()
    await client.aclose()
    admin.client.close()


def test_a_release_is_retried_in_a_cluster_when_its_reply_times_out(cluster) -> None:
    """RL.RELEASE is safe to repeat (a repeat says reason 'released'): a reply
    lost to a timeout is asked again."""
    rc = RedisCluster(host="127.0.0.1", port=cluster.ports[0], socket_timeout=TIMEOUT)
    limiter = Limiter(rc)
    plan, key = uniq("plan"), uniq("user")
    limiter.plans.set(plan, {"jobs": "concurrency 1 ttl 30s"})
    assert limiter.acquire(key, plan, id="r1").allowed
    port = rc.nodes_manager.get_node_from_slot(key_slot(key.encode())).port
    with Blocked(port):
        released = limiter.release(key, "r1")
    assert released.released or released.reason == "released"
    assert limiter.peek(key, plan).allowed
    rc.close()
