"""Cluster routing: every call reaches the node owning its key in one round trip
-- no `COMMAND GETKEYS`, no `MOVED` -- the three-part names redis-py 8's cluster
client refuses included; plan changes reach every primary; and RESP2 and RESP3
answer identically."""

from __future__ import annotations

import pytest
import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from conftest import uniq
from test_limiter import strip_time
from tollgate import AsyncLimiter, Limiter


def counters(cluster) -> dict:
    """Per-server totals of the calls that matter, from INFO commandstats/errorstats."""
    out = {"getkeys": 0, "moved": 0, "ask": 0}
    for port in cluster.ports:
        with redis.Redis(port=port, decode_responses=True) as r:
            stats = r.info("commandstats")
            for name, v in stats.items():
                cmd = name[len("cmdstat_"):]
                out[cmd] = out.get(cmd, 0) + v["calls"]
            errs = r.info("errorstats")
            out["moved"] += errs.get("errorstat_MOVED", {}).get("count", 0)
            out["ask"] += errs.get("errorstat_ASK", {}).get("count", 0)
    out["getkeys"] = out.get("command|getkeys", 0)
    return out


def keys_on_every_primary(cluster, n: int = 30):
    from redis.crc import key_slot

    keys = [uniq("user") for _ in range(n)]
    slots = {key_slot(k.encode()) for k in keys}
    assert len(slots) > 3
    return keys


def test_every_call_is_one_round_trip_to_the_owning_node(cluster) -> None:
    for protocol in (2, 3):
        rc = RedisCluster(host="127.0.0.1", port=cluster.ports[0], protocol=protocol)
        limiter = Limiter(rc)
        plan = uniq("plan")
        limiter.plans.set(plan, {"rpm": "sliding 100/1m", "jobs": "concurrency 5 ttl 30s"})
        keys = keys_on_every_primary(cluster)
        ckeys = ["{%s}:credits" % k for k in keys]
        before = counters(cluster)
        for key, ckey in zip(keys, ckeys):
            limiter.credits.grant(ckey, 10)
            d = limiter.acquire("{%s}:rl" % key, plan, id="r1", credits=(ckey, 1))
            assert d.allowed and d.credits == 9
            limiter.peek("{%s}:rl" % key, plan)
            limiter.touch("{%s}:rl" % key, "r1", 1000)
            limiter.release("{%s}:rl" % key, "r1")
            assert limiter.credits.balance(ckey) == 9
        after = counters(cluster)
        n = len(keys)
        assert after["getkeys"] == before["getkeys"], "COMMAND GETKEYS was sent"
        assert after["moved"] == before["moved"] and after["ask"] == before["ask"], "a call was redirected"
        for cmd in ("rl.acquire", "rl.peek", "rl.touch", "rl.release", "rl.credits.grant", "rl.credits.balance"):
            assert after.get(cmd, 0) - before.get(cmd, 0) == n, cmd
        limiter.close()
        rc.close()


async def test_async_calls_are_one_round_trip_to_the_owning_node(cluster) -> None:
    for protocol in (2, 3):
        rc = AsyncRedisCluster(host="127.0.0.1", port=cluster.ports[0], protocol=protocol)
        limiter = AsyncLimiter(rc)
        plan = uniq("plan")
        await limiter.plans.set(plan, {"rpm": "sliding 100/1m"})
        keys = keys_on_every_primary(cluster)
        before = counters(cluster)
        for key in keys:
            assert (await limiter.acquire(key, plan)).allowed
            await limiter.credits.grant("{%s}:c" % key, 5)
            assert (await limiter.credits.blocks("{%s}:c" % key))[0].left == 5
        after = counters(cluster)
        assert after["getkeys"] == before["getkeys"]
        assert after["moved"] == before["moved"]
        assert after["rl.acquire"] - before.get("rl.acquire", 0) == len(keys)
        assert after["rl.credits.blocks"] - before.get("rl.credits.blocks", 0) == len(keys)
        await limiter.close()
        await rc.aclose()


def test_plan_changes_reach_every_primary(cluster) -> None:
    limiter = Limiter(RedisCluster(host="127.0.0.1", port=cluster.ports[0]))
    plan = uniq("plan")
    limiter.plans.set(plan, {"rpm": "sliding 7/1m"})
    for port in cluster.primaries():
        with redis.Redis(port=port, decode_responses=True) as r:
            assert r.execute_command("RL.PLAN.GET", plan) in (["rpm", "sliding 7/1m"], {"rpm": "sliding 7/1m"})
    # Every user, on every shard, is served by the plan.
    for key in keys_on_every_primary(cluster):
        assert limiter.acquire(key, plan).limit("rpm").remaining == 6
    limiter.plans.delete(plan)
    for port in cluster.primaries():
        with redis.Redis(port=port) as r:
            assert not r.execute_command("RL.PLAN.GET", plan)
    limiter.client.close()


def test_resp2_and_resp3_answer_identically(request, cluster) -> None:
    from conftest import sync_client

    for topology in ("standalone", "cluster"):
        l2 = Limiter(sync_client(request, topology, 2))
        l3 = Limiter(sync_client(request, topology, 3))
        plan = uniq("plan")
        l2.plans.set(plan, {"rpm": "sliding 2/1m", "tpm": "bucket 1000 token/1m", "jobs": "concurrency 3 ttl 30s", "big": "cap 500 token"})
        tag = uniq("acct")
        k2, k3 = "{%s}:a" % tag, "{%s}:b" % tag
        c2, c3 = "{%s}:c2" % tag, "{%s}:c3" % tag
        for lim, c in ((l2, c2), (l3, c3)):
            assert lim.credits.grant(c, 100, id="g") == 100
        calls = [
            lambda lim, k, c: lim.acquire(k, plan, costs={"token": 100}, id="a", credits=(c, 10)),
            lambda lim, k, c: lim.acquire(k, plan, costs={"token": 100}),
            lambda lim, k, c: lim.acquire(k, plan, costs={"token": 100}),
            lambda lim, k, c: lim.peek(k, plan, costs={"token": 900}),
            lambda lim, k, c: lim.acquire(k, plan, costs={"token": 501}),
        ]
        for call in calls:
            assert strip_time(call(l2, k2, c2), k2) == strip_time(call(l3, k3, c3), k3)
        r2, r3 = l2.release(k2, "a", {"token": 5}), l3.release(k3, "a", {"token": 5})
        assert r2.released and r3.released and r2.plan == r3.plan
        assert [(x.name, x.remaining) for x in r2.limits] == [(x.name, x.remaining) for x in r3.limits]
        assert l2.release(k2, "a") == l3.release(k3, "a")
        assert l2.credits.blocks(c2)[0].left == l3.credits.blocks(c3)[0].left == 90
        assert l2.credits.deduct(c2, 1) == l3.credits.deduct(c3, 1)
        assert l2.plans.get(plan) == l3.plans.get(plan)
        for lim in (l2, l3):
            lim.client.close()


def move_an_empty_slot(cluster, finish: bool = True) -> tuple:
    """Pick a fresh key whose slot holds nothing, and move that slot to another
    primary (CLUSTER SETSLOT, as a resharding does; with `finish` False it stays
    migrating). Returns (key, new owner port, finish())."""
    from redis.crc import key_slot

    owners = {}
    for port in cluster.primaries():
        with redis.Redis(port=port, decode_responses=True) as r:
            owners[port] = r.execute_command("CLUSTER", "MYID")
    while True:
        key = uniq("moved")
        slot = key_slot(key.encode())
        with redis.Redis(port=cluster.ports[0], decode_responses=True) as r:
            if r.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0:
                break
    src = None
    for port in owners:
        with redis.Redis(port=port) as r:
            try:
                r.execute_command("EXISTS", key)
                src = port
            except redis.exceptions.ResponseError:
                pass
    dst = next(p for p in owners if p != src)
    with redis.Redis(port=dst) as r:
        r.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", owners[src])
    with redis.Redis(port=src) as r:
        r.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", owners[dst])

    def done() -> None:
        for port in owners:
            with redis.Redis(port=port) as r:
                r.execute_command("CLUSTER", "SETSLOT", slot, "NODE", owners[dst])

    if finish:
        done()
    return key, dst, done


def test_a_resharded_slot_costs_one_redirect_then_calls_go_straight_to_its_new_owner(cluster) -> None:
    rc = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    limiter = Limiter(rc)
    plan = uniq("plan")
    limiter.plans.set(plan, {"rpm": "sliding 100/1m"})
    limiter.acquire(uniq("warm"), plan)  # the slot table is loaded before the move
    key, dst, _ = move_an_empty_slot(cluster)
    before = counters(cluster)
    for i in range(5):
        d = limiter.acquire(key, plan)
        assert d.allowed and d.limit("rpm").remaining == 99 - i
    after = counters(cluster)
    assert after["moved"] - before["moved"] == 1
    with redis.Redis(port=dst) as r:
        assert r.execute_command("EXISTS", key) == 1
    rc.close()


async def test_a_resharded_slot_is_followed_by_the_async_client(cluster) -> None:
    rc = AsyncRedisCluster(host="127.0.0.1", port=cluster.ports[0])
    limiter = AsyncLimiter(rc)
    plan = uniq("plan")
    await limiter.plans.set(plan, {"rpm": "sliding 100/1m"})
    await limiter.acquire(uniq("warm"), plan)
    key, dst, _ = move_an_empty_slot(cluster)
    before = counters(cluster)
    for i in range(5):
        assert (await limiter.acquire(key, plan)).limit("rpm").remaining == 99 - i
    assert counters(cluster)["moved"] - before["moved"] == 1
    await rc.aclose()


def exists_on(port: int, key: str) -> int:
    with redis.Redis(port=port) as r:
        pipe = r.pipeline(transaction=False)
        pipe.execute_command("ASKING")
        pipe.execute_command("EXISTS", key)
        return pipe.execute()[1]


def test_a_migrating_slot_is_followed_with_asking(cluster) -> None:
    rc = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    limiter = Limiter(rc)
    plan = uniq("plan")
    limiter.plans.set(plan, {"rpm": "sliding 100/1m"})
    key, dst, finish = move_an_empty_slot(cluster, finish=False)
    try:
        before = counters(cluster)
        for i in range(3):
            assert limiter.acquire(key, plan).limit("rpm").remaining == 99 - i
        after = counters(cluster)
        assert after["ask"] - before["ask"] == 3 and after["moved"] == before["moved"]
        assert exists_on(dst, key) == 1
    finally:
        finish()
    assert limiter.acquire(key, plan).limit("rpm").remaining == 96
    rc.close()


async def test_a_migrating_slot_is_followed_with_asking_async(cluster) -> None:
    rc = AsyncRedisCluster(host="127.0.0.1", port=cluster.ports[0])
    limiter = AsyncLimiter(rc)
    plan = uniq("plan")
    await limiter.plans.set(plan, {"rpm": "sliding 100/1m"})
    key, dst, finish = move_an_empty_slot(cluster, finish=False)
    try:
        for i in range(3):
            assert (await limiter.acquire(key, plan)).limit("rpm").remaining == 99 - i
        assert exists_on(dst, key) == 1
    finally:
        finish()
    await limiter.close()
    await rc.aclose()


def test_keys_in_different_slots_are_refused_with_crossslot_and_charge_nothing(cluster) -> None:
    limiter = Limiter(RedisCluster(host="127.0.0.1", port=cluster.ports[0]))
    plan = uniq("plan")
    limiter.plans.set(plan, {"rpm": "sliding 10/1m"})
    a, b = uniq("a"), uniq("b")
    limiter.credits.grant("{%s}:credits" % b, 10)
    with pytest.raises(redis.exceptions.ResponseError, match="CROSSSLOT|same slot"):
        limiter.acquire("{%s}:rl" % a, plan, credits=("{%s}:credits" % b, 1))
    assert limiter.credits.balance("{%s}:credits" % b) == 10
    assert limiter.peek("{%s}:rl" % a, plan).limit("rpm").remaining == 9
    limiter.client.close()
