"""redis-py parses replies with hiredis when it is installed (the default in this
suite) and with its own pure-Python RESP2/RESP3 parsers otherwise: the client's
results are the same with either, sync and async."""

from __future__ import annotations

import pytest
import redis
import redis.asyncio as aredis
from redis._parsers import (
    _AsyncHiredisParser,
    _AsyncRESP2Parser,
    _AsyncRESP3Parser,
    _HiredisParser,
    _RESP2Parser,
    _RESP3Parser,
)

from conftest import uniq
from test_limiter import strip_time
from tollgate import AsyncLimiter, Limiter

PLAN = {"rpm": "sliding 2/1m", "tpm": "bucket 1000 token/1m", "jobs": "concurrency 3 ttl 30s", "big": "cap 500 token"}


def script(lim, tag: str, plan: str):
    key, ckey = "{%s}:rl" % tag, "{%s}:credits" % tag
    out = [lim.credits.grant(ckey, 100, id="g", ttl_ms=3_600_000)]
    out.append(strip_time(lim.acquire(key, plan, costs={"token": 100}, id="a", credits=(ckey, 10)), key))
    out.append(strip_time(lim.acquire(key, plan, costs={"token": 100}), key))
    out.append(strip_time(lim.acquire(key, plan), key))
    out.append(strip_time(lim.peek(key, plan, costs={"token": 501}), key))
    rel = lim.release(key, "a", {"token": 5})
    out.append((rel.released, rel.plan, [(x.name, x.remaining) for x in rel.limits]))
    out.append(lim.release(key, "a").released)
    out.append([(b.id, b.left, b.granted) for b in lim.credits.blocks(ckey)])
    out.append(lim.credits.deduct(ckey, 1))
    out.append(lim.plans.get(plan))
    return out


async def ascript(lim, tag: str, plan: str):
    key, ckey = "{%s}:rl" % tag, "{%s}:credits" % tag
    out = [await lim.credits.grant(ckey, 100, id="g", ttl_ms=3_600_000)]
    out.append(strip_time(await lim.acquire(key, plan, costs={"token": 100}, id="a", credits=(ckey, 10)), key))
    out.append(strip_time(await lim.acquire(key, plan, costs={"token": 100}), key))
    out.append(strip_time(await lim.acquire(key, plan), key))
    out.append(strip_time(await lim.peek(key, plan, costs={"token": 501}), key))
    rel = await lim.release(key, "a", {"token": 5})
    out.append((rel.released, rel.plan, [(x.name, x.remaining) for x in rel.limits]))
    out.append((await lim.release(key, "a")).released)
    out.append([(b.id, b.left, b.granted) for b in await lim.credits.blocks(ckey)])
    out.append(await lim.credits.deduct(ckey, 1))
    out.append(await lim.plans.get(plan))
    return out


@pytest.mark.parametrize("protocol", [2, 3])
def test_hiredis_and_the_python_parsers_give_the_same_results(standalone, protocol: int) -> None:
    plan = uniq("plan")
    Limiter(redis.Redis(port=standalone.port)).plans.set(plan, PLAN)
    results = []
    for parser in (_HiredisParser, _RESP2Parser if protocol == 2 else _RESP3Parser):
        pool = redis.ConnectionPool(port=standalone.port, protocol=protocol, parser_class=parser)
        client = redis.Redis(connection_pool=pool)
        conn = pool.get_connection()
        assert isinstance(conn._parser, parser)
        pool.release(conn)
        results.append(script(Limiter(client), uniq("acct"), plan))
        client.close()
    assert results[0] == results[1]


@pytest.mark.parametrize("protocol", [2, 3])
async def test_hiredis_and_the_python_parsers_give_the_same_results_async(standalone, protocol: int) -> None:
    plan = uniq("plan")
    Limiter(redis.Redis(port=standalone.port)).plans.set(plan, PLAN)
    results = []
    for parser in (_AsyncHiredisParser, _AsyncRESP2Parser if protocol == 2 else _AsyncRESP3Parser):
        pool = aredis.ConnectionPool(port=standalone.port, protocol=protocol, parser_class=parser)
        client = aredis.Redis(connection_pool=pool)
        conn = await pool.get_connection()
        assert isinstance(conn._parser, parser)
        await pool.release(conn)
        results.append(await ascript(AsyncLimiter(client), uniq("acct"), plan))
        await client.aclose()
    assert results[0] == results[1]
