"""Every method of `AsyncLimiter` against real servers: standalone and 3+3
cluster, RESP2 and RESP3 (the `alimiter` fixture runs each test four times)."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.exceptions import ResponseError

from conftest import uniq
from test_limiter import DEMO, strip_time
from tollgate import AsyncLimiter, Denied


async def demo_plan(limiter: AsyncLimiter, **extra: str) -> str:
    plan = uniq("plan")
    await limiter.plans.set(plan, {**DEMO, **extra})
    return plan


async def test_acquire_peek_release_touch(alimiter: AsyncLimiter) -> None:
    plan = await demo_plan(alimiter, big="cap 900 token")
    key = uniq("user")
    first = await alimiter.acquire(key, plan, costs={"token": 400}, id="chat-1", ttl_ms=300)
    assert first.allowed and first.id == "chat-1" and first.limit("tpm").remaining == 600
    denied = await alimiter.acquire(key, plan, costs={"token": 700})
    assert not denied.allowed and denied.denied_by == "tpm" and denied.retry_after_ms > 0
    assert "retry-after" in denied.headers()
    assert (await alimiter.peek(key, plan, costs={"token": 901})).never
    assert (await alimiter.peek(key, plan, costs={"token": 600})).allowed
    assert await alimiter.touch(key, "chat-1", 5000)
    await asyncio.sleep(0.4)
    rel = await alimiter.release(key, "chat-1", costs={"token": 100})
    assert rel.released and rel.plan == plan
    assert {x.name: x.remaining for x in rel.limits}["jobs"] == 2
    assert (await alimiter.acquire(key, plan, costs={"token": 700})).allowed
    assert not (await alimiter.release(key, "chat-1")).released
    assert await alimiter.touch(key, "chat-1", 5000) is False


async def test_endpoint_and_fallback(alimiter: AsyncLimiter) -> None:
    cheap = uniq("cheap")
    await alimiter.plans.set(cheap, {"rpm": "sliding 100/1m"})
    main = uniq("main")
    await alimiter.plans.set(main, {"rpm": "sliding 1/1m for chat", "fallback": cheap})
    key = uniq("user")
    d = await alimiter.acquire(key, main, endpoint="chat")
    assert d.allowed and not d.degraded
    d = await alimiter.acquire(key, main, endpoint="chat")
    assert d.allowed and d.degraded and d.plan == cheap
    d = await alimiter.acquire(key, main, endpoint="images")
    assert d.denied_by == "endpoint" or d.plan == cheap


async def test_wait_is_admitted_on_release_and_never_blocks_other_calls(alimiter: AsyncLimiter) -> None:
    plan = uniq("plan")
    await alimiter.plans.set(plan, {"jobs": "concurrency 1 ttl 30s"})
    key = uniq("user")
    assert (await alimiter.acquire(key, plan, id="a")).allowed
    started = time.monotonic()
    waiter = asyncio.ensure_future(alimiter.acquire(key, plan, id="b", wait_ms=5000, priority=-1))
    await asyncio.sleep(0.2)
    t = time.monotonic()
    assert (await alimiter.peek(uniq("user"), plan)).allowed
    assert not (await alimiter.acquire(key, plan, id="c")).allowed
    assert time.monotonic() - t < 0.5
    await alimiter.release(key, "a")
    d = await asyncio.wait_for(waiter, 5)
    assert d.allowed and d.id == "b" and time.monotonic() - started < 3


async def test_a_cancelled_wait_leaves_the_limiter_usable(alimiter: AsyncLimiter) -> None:
    plan = uniq("plan")
    await alimiter.plans.set(plan, {"jobs": "concurrency 1 ttl 30s"})
    key = uniq("user")
    await alimiter.acquire(key, plan, id="a")
    waiter = asyncio.ensure_future(alimiter.acquire(key, plan, id="b", wait_ms=5000))
    await asyncio.sleep(0.1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await alimiter.release(key, "a")
    d = await alimiter.acquire(key, plan, id="d", wait_ms=1000)
    assert d.allowed and d.id == "d"


async def test_credits(alimiter: AsyncLimiter) -> None:
    c = alimiter.credits
    tag = uniq("acct")
    key = "{%s}:credits" % tag
    assert await c.grant(key, 100, id="g1", ttl_ms=3_600_000) == 100
    assert await c.grant(key, 100, id="g1", ttl_ms=3_600_000) == 100
    assert await c.grant(key, 10, expire_at_ms=int(time.time() * 1000) + 3_600_000, id="g2") == 110
    assert await c.has(key, 110) and not await c.has(key, 111)
    d = await c.deduct(key, 30, id="r1")
    assert (d.deducted, d.balance) == (30, 80)
    assert (await c.deduct(key, 500)).deducted == 0
    assert (await c.deduct(key, 500, partial=True)).deducted == 80
    assert (await c.refund(key, "r1")).refunded == 30
    assert await c.balance(key) == 30
    blocks = await c.blocks(key)
    assert sum(b.left for b in blocks) == 30
    left = {b.id: b.left for b in blocks}
    assert await c.revoke(key, "g1") == left.get("g1", 0)
    plan = await demo_plan(alimiter)
    d = await alimiter.acquire("{%s}:rl" % tag, plan, credits=(key, 1000))
    assert not d.allowed and d.denied_by == "credits"


async def test_plans(alimiter: AsyncLimiter) -> None:
    plan = uniq("plan")
    assert await alimiter.plans.set(plan, {"rpm": "sliding 10/1m"}) == 1
    assert await alimiter.plans.get(plan) == {"rpm": "sliding 10/1m"}
    assert plan in await alimiter.plans.list()
    key = uniq("user")
    await alimiter.plans.assign(key, plan)
    assert await alimiter.plans.assigned(key) == plan
    assert (await alimiter.acquire(key, "*")).plan == plan
    assert await alimiter.plans.unassign(key)
    await alimiter.plans.apply({plan: {"tpm": "bucket 5 token/1s"}})
    assert await alimiter.plans.get(plan) == {"rpm": "sliding 10/1m", "tpm": "bucket 5 token/1s"}
    with pytest.raises(ResponseError):
        await alimiter.acquire(key, uniq("nosuch"))
    previous = await alimiter.plans.default()
    try:
        assert await alimiter.plans.default(plan) == plan
        assert await alimiter.plans.default() == plan
        assert (await alimiter.acquire(uniq("user"), "*")).plan == plan
    finally:
        if previous:
            await alimiter.plans.default(previous)
    await alimiter.plans.delete(plan, "tpm")
    assert await alimiter.plans.get(plan) == {"rpm": "sliding 10/1m"}


async def test_reserve_settles_releases_and_heartbeats(alimiter: AsyncLimiter) -> None:
    plan = await demo_plan(alimiter)
    key = uniq("user")
    async with alimiter.reserve(key, plan, costs={"token": 900}) as r:
        assert r.decision.allowed
        assert not (await alimiter.peek(key, plan, costs={"token": 200})).allowed
        assert (await r.settle(token=100)).released
    assert (await alimiter.peek(key, plan, costs={"token": 800})).allowed
    # As the issue writes it: settle without await; the block's end waits for it.
    async with alimiter.reserve(key, plan, costs={"token": 900}) as r:
        r.settle(token=50)
    assert r.release_result is not None and r.release_result.released
    assert (await alimiter.peek(key, plan, costs={"token": 800})).allowed

    one = uniq("plan")
    await alimiter.plans.set(one, {"jobs": "concurrency 1 ttl 500ms"})
    with pytest.raises(RuntimeError):
        async with alimiter.reserve(key, one):
            with pytest.raises(Denied):
                async with alimiter.reserve(key, one):
                    pass  # pragma: no cover
            raise RuntimeError("boom")
    async with alimiter.reserve(key, one, heartbeat_ms=100) as r:
        await asyncio.sleep(1.2)
        assert not (await alimiter.peek(key, one)).allowed
    assert (await alimiter.peek(key, one)).allowed


async def test_a_cancelled_reservation_releases_its_lease(alimiter: AsyncLimiter) -> None:
    plan = uniq("plan")
    await alimiter.plans.set(plan, {"jobs": "concurrency 1 ttl 30s"})
    key = uniq("user")
    entered = asyncio.Event()

    async def job() -> None:
        async with alimiter.reserve(key, plan):
            entered.set()
            await asyncio.sleep(30)

    task = asyncio.ensure_future(job())
    await entered.wait()
    assert not (await alimiter.peek(key, plan)).allowed
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await alimiter.peek(key, plan)).allowed


async def test_async_and_sync_answer_identically(request: pytest.FixtureRequest, alimiter: AsyncLimiter) -> None:
    from conftest import sync_client
    from tollgate import Limiter

    topology, protocol = request.node.callspec.params["alimiter"]
    sync = Limiter(sync_client(request, topology, protocol))
    plan = await demo_plan(alimiter)
    k1, k2 = uniq("user"), uniq("user")
    for costs in ({"token": 300}, {"token": 800}, {"token": 2000}):
        a = await alimiter.acquire(k1, plan, costs=costs)
        b = sync.acquire(k2, plan, costs=costs)
        assert strip_time(a, k1) == strip_time(b, k2)
    sync.client.close()


async def test_the_readme_stream_pattern_settles_at_the_end_and_releases_when_dropped(alimiter: AsyncLimiter) -> None:
    plan = uniq("plan")
    await alimiter.plans.set(plan, {"tpm": "fixed 1000 token/1m", "jobs": "concurrency 1 ttl 30s"})
    key = uniq("user")

    async def model_stream():
        for i in range(5):
            yield {"delta": f"part{i}", "usage": None}
        yield {"delta": "", "usage": 40}

    async def tokens():
        async with alimiter.reserve(key, plan, costs={"token": 500}) as r:
            async for chunk in model_stream():
                if chunk["usage"]:
                    await r.settle(token=chunk["usage"])
                yield chunk

    assert len([c async for c in tokens()]) == 6
    after = await alimiter.peek(key, plan, requests=0)
    assert after.allowed and after.limit("tpm").remaining == 960
    # A client that goes away mid-stream: the generator is closed, the lease freed,
    # the estimate kept.
    gen = tokens()
    assert (await gen.__anext__())["delta"] == "part0"
    assert not (await alimiter.peek(key, plan, requests=0)).allowed
    await gen.aclose()
    after = await alimiter.peek(key, plan, requests=0)
    assert after.allowed and after.limit("tpm").remaining == 460


@pytest.mark.parametrize("protocol", [2, 3])
async def test_from_url_makes_its_client_at_first_use_and_closes_it(request: pytest.FixtureRequest, protocol: int) -> None:
    for topology in ("standalone", "cluster"):
        server = request.getfixturevalue(topology)
        port = server.port if topology == "standalone" else server.ports[0]
        limiter = AsyncLimiter.from_url(f"redis://127.0.0.1:{port}", cluster=topology == "cluster", protocol=protocol)
        assert limiter._t._client is None  # nothing made yet
        plan = uniq("plan")
        await limiter.plans.set(plan, {"rpm": "sliding 100/1m"})
        key = uniq("user")
        decisions = await asyncio.gather(*(limiter.acquire(key, plan) for _ in range(20)))
        assert sorted(d.limit("rpm").remaining for d in decisions) == list(range(80, 100))
        made = limiter.client
        await limiter.close()
        if topology == "standalone":
            assert not any(c.is_connected for c in made.connection_pool._available_connections)
