"""Every method of `Limiter` (sync) against real servers: standalone and 3+3
cluster, RESP2 and RESP3 (the `limiter` fixture runs each test four times)."""

from __future__ import annotations

import re
import threading
import time

import pytest
from redis.exceptions import ResponseError

from conftest import uniq
from tollgate import Denied, Limiter

DEMO = {"rpm": "sliding 3/1m", "tpm": "bucket 1000 token/1m", "jobs": "concurrency 2 ttl 30s"}


def demo_plan(limiter: Limiter, **extra: str) -> str:
    plan = uniq("plan")
    limiter.plans.set(plan, {**DEMO, **extra})
    return plan


def test_acquire_admits_until_a_limit_denies_and_says_when_to_retry(limiter: Limiter) -> None:
    plan = demo_plan(limiter)
    key = uniq("user")
    first = limiter.acquire(key, plan, costs={"token": 400}, id="chat-1")
    assert first.allowed and bool(first)
    assert (first.retry_after_ms, first.denied_by, first.plan, first.id) == (0, None, plan, "chat-1")
    assert first.retry_after == 0.0 and not first.never
    by_name = {lim.name: lim for lim in first.limits}
    assert [lim.name for lim in first.limits] == ["rpm", "tpm", "jobs"]
    assert (by_name["rpm"].unit, by_name["rpm"].limit, by_name["rpm"].remaining) == ("request", 3, 2)
    assert (by_name["tpm"].unit, by_name["tpm"].limit, by_name["tpm"].remaining) == ("token", 1000, 600)
    assert (by_name["jobs"].unit, by_name["jobs"].remaining, by_name["jobs"].kind) == ("lease", 1, "concurrency")
    assert 0 < by_name["jobs"].reset_ms <= 30000

    denied = limiter.acquire(key, plan, costs={"token": 700})
    assert not denied.allowed and not bool(denied)
    assert denied.denied_by == "tpm"
    assert 0 < denied.retry_after_ms <= 60000 and denied.retry_after == denied.retry_after_ms / 1000
    assert denied.id is None
    # Nothing was charged by the denial.
    again = limiter.peek(key, plan, costs={"token": 600})
    assert again.allowed


def test_peek_answers_what_acquire_would_and_charges_nothing(limiter: Limiter) -> None:
    plan = demo_plan(limiter)
    key = uniq("user")
    for _ in range(5):
        d = limiter.peek(key, plan, costs={"token": 100})
        assert d.allowed and d.limit("rpm").remaining == 2 and d.limit("tpm").remaining == 900
    assert limiter.peek(key, plan, costs={"token": 1001}).never


def test_release_settles_on_the_actual_cost_and_an_unknown_id_is_harmless(limiter: Limiter) -> None:
    plan = demo_plan(limiter)
    key = uniq("user")
    limiter.acquire(key, plan, costs={"token": 400}, id="chat-1")
    assert not limiter.acquire(key, plan, costs={"token": 700}).allowed
    rel = limiter.release(key, "chat-1", costs={"token": 120})
    assert rel.released and bool(rel) and rel.plan == plan
    by_name = {lim.name: lim for lim in rel.limits}
    assert by_name["tpm"].remaining >= 880 and by_name["jobs"].remaining == 2
    assert limiter.acquire(key, plan, costs={"token": 700}).allowed
    gone = limiter.release(key, "chat-1")
    assert not gone.released and not bool(gone) and gone.limits == ()


def test_touch_extends_a_live_lease_and_says_when_there_is_none(limiter: Limiter) -> None:
    plan = demo_plan(limiter)
    key = uniq("user")
    limiter.acquire(key, plan, id="job-1", ttl_ms=300)
    assert limiter.touch(key, "job-1", 5000) is True
    time.sleep(0.4)
    assert limiter.release(key, "job-1").released  # it would have expired without the touch
    assert limiter.touch(key, "job-1", 5000) is False


def test_a_cost_above_a_cap_or_capacity_is_never_admitted(limiter: Limiter) -> None:
    plan = demo_plan(limiter, big="cap 500 token")
    d = limiter.acquire(uniq("user"), plan, costs={"token": 501})
    assert not d.allowed and d.never and d.retry_after is None and d.retry_after_ms == -1
    assert d.denied_by == "big"


def test_an_endpoint_the_plan_never_names_is_denied_for_good(limiter: Limiter) -> None:
    plan = uniq("plan")
    limiter.plans.set(plan, {"chat": "sliding 5/1m for chat", "all": "sliding 100/1m"})
    key = uniq("user")
    assert limiter.acquire(key, plan, endpoint="chat").allowed
    d = limiter.acquire(key, plan, endpoint="images")
    assert (d.allowed, d.denied_by, d.retry_after_ms) == (False, "endpoint", -1)


def test_wait_is_admitted_when_a_lease_frees_and_never_blocks_other_calls(limiter: Limiter) -> None:
    plan = uniq("plan")
    limiter.plans.set(plan, {"jobs": "concurrency 1 ttl 30s"})
    key = uniq("user")
    assert limiter.acquire(key, plan, id="a").allowed
    result = {}

    def waiter() -> None:
        result["d"] = limiter.acquire(key, plan, id="b", wait_ms=5000, priority=1)

    t = threading.Thread(target=waiter)
    started = time.monotonic()
    t.start()
    time.sleep(0.2)
    # Other calls go on while the waiter blocks on its own connection.
    other = time.monotonic()
    assert limiter.peek(uniq("user"), plan).allowed
    assert limiter.acquire(key, plan, id="c").allowed is False
    assert time.monotonic() - other < 0.5
    limiter.release(key, "a")
    t.join(5)
    assert result["d"].allowed and result["d"].id == "b"
    assert time.monotonic() - started < 3


def test_wait_times_out_denied(limiter: Limiter) -> None:
    plan = uniq("plan")
    limiter.plans.set(plan, {"jobs": "concurrency 1 ttl 30s"})
    key = uniq("user")
    limiter.acquire(key, plan, id="a")
    started = time.monotonic()
    d = limiter.acquire(key, plan, id="b", wait_ms=300)
    assert not d.allowed and d.denied_by == "jobs"
    assert 0.25 < time.monotonic() - started < 3


def test_credits_grant_deduct_refund_balance_blocks_revoke(limiter: Limiter) -> None:
    c = limiter.credits
    key = "{%s}:credits" % uniq("acct")
    assert c.grant(key, 1000, ttl_ms=3_600_000, id="invoice-1") == 1000
    assert c.grant(key, 1000, ttl_ms=3_600_000, id="invoice-1") == 1000  # idempotent
    assert c.grant(key, 50, id="gift") == 1050
    assert c.has(key, 1050) is True and c.has(key, 1051) is False
    d = c.deduct(key, 200, id="req-1")
    assert (d.deducted, d.balance) == (200, 850)
    assert (c.deduct(key, 5000).deducted, c.balance(key)) == (0, 850)
    assert c.deduct(key, 5000, partial=True, id="req-2").deducted == 850
    assert c.balance(key) == 0
    r = c.refund(key, "req-1")
    assert (r.refunded, r.balance) == (200, 200)
    assert c.refund(key, "req-1").refunded == 0
    blocks = c.blocks(key)
    assert {b.id for b in blocks} <= {"invoice-1", "gift"} and sum(b.left for b in blocks) == 200
    inv = [b for b in blocks if b.id == "invoice-1"][0]
    assert inv.granted == 1000 and inv.expires_at_ms is not None and inv.expires_at_ms > time.time() * 1000
    assert c.revoke(key, "invoice-1") == inv.left
    assert c.balance(key) == 200 - inv.left


def test_acquire_deducts_credits_in_the_same_step_and_402s_without(limiter: Limiter) -> None:
    plan = demo_plan(limiter)
    tag = uniq("acct")
    key, ckey = "{%s}:rl" % tag, "{%s}:credits" % tag
    limiter.credits.grant(ckey, 30)
    d = limiter.acquire(key, plan, credits=(ckey, 25), id="img-1")
    assert d.allowed and d.credits == 5
    short = limiter.acquire(key, plan, credits=(ckey, 25), id="img-2")
    assert not short.allowed and short.denied_by == "credits"
    assert limiter.credits.refund(ckey, "img-1").balance == 30


def test_plans_are_set_read_listed_deleted_defaulted_and_assigned(limiter: Limiter) -> None:
    plan = uniq("plan")
    assert limiter.plans.set(plan, {"rpm": "sliding 10/1m", "tpm": "bucket 100 token/1m"}) == 2
    assert limiter.plans.get(plan) == {"rpm": "sliding 10/1m", "tpm": "bucket 100 token/1m"}
    assert plan in limiter.plans.list()
    assert limiter.plans.delete(plan, "tpm") == 1
    assert limiter.plans.get(plan) == {"rpm": "sliding 10/1m"}
    key = uniq("user")
    assert limiter.plans.assigned(key) is None
    limiter.plans.assign(key, plan)
    assert limiter.plans.assigned(key) == plan
    assert limiter.acquire(key, "*").plan == plan
    assert limiter.plans.unassign(key) is True
    with pytest.raises(ResponseError, match="plan 'x' field 'rpm'"):
        limiter.plans.set("x", {"rpm": "sliding ten/1m"})
    other = uniq("plan")
    limiter.plans.apply({plan: {"tpm": "bucket 5 token/1s"}, other: {"rpm": "fixed 1/1s"}})
    assert limiter.plans.get(plan) == {"rpm": "sliding 10/1m", "tpm": "bucket 5 token/1s"}
    assert limiter.plans.get(other) == {"rpm": "fixed 1/1s"}
    assert limiter.plans.delete(other) == 1
    assert limiter.plans.delete(plan) == 1
    assert limiter.plans.get(plan) == {} and plan not in limiter.plans.list()


def test_default_plan_is_set_and_shown(limiter: Limiter) -> None:
    plan = uniq("plan")
    limiter.plans.set(plan, {"rpm": "sliding 10/1m"})
    previous = limiter.plans.default()
    try:
        assert limiter.plans.default(plan) == plan
        assert limiter.plans.default() == plan
        assert limiter.acquire(uniq("user"), "*").plan == plan
    finally:
        if previous:
            limiter.plans.default(previous)


def test_a_fallback_plan_admits_when_the_plan_denies(limiter: Limiter) -> None:
    cheap = uniq("cheap")
    limiter.plans.set(cheap, {"rpm": "sliding 100/1m", "big": "cap 100000 token"})
    main = uniq("main")
    limiter.plans.set(main, {"tpd": "fixed 1000 token/1d", "fallback": cheap})
    key = uniq("user")
    d = limiter.acquire(key, main, costs={"token": 900})
    assert d.allowed and d.plan == main and not d.degraded
    d = limiter.acquire(key, main, costs={"token": 900})
    assert d.allowed and d.plan == cheap and d.degraded and d.requested_plan == main


def test_reserve_settles_on_success(limiter: Limiter) -> None:
    plan = demo_plan(limiter)
    key = uniq("user")
    with limiter.reserve(key, plan, costs={"token": 900}) as r:
        assert r.decision is not None and r.decision.allowed and r.id
        assert not limiter.peek(key, plan, costs={"token": 200}).allowed
        rel = r.settle(token=100)
        assert rel.released
    assert limiter.peek(key, plan, costs={"token": 800}).allowed
    assert {lim.name: lim.remaining for lim in rel.limits}["jobs"] == 2


def test_reserve_releases_on_an_exception_and_raises_denied(limiter: Limiter) -> None:
    plan = uniq("plan")
    limiter.plans.set(plan, {"jobs": "concurrency 1 ttl 30s"})
    key = uniq("user")
    with pytest.raises(RuntimeError):
        with limiter.reserve(key, plan):
            with pytest.raises(Denied) as denied:
                with limiter.reserve(key, plan):
                    pass  # pragma: no cover
            assert denied.value.decision.denied_by == "jobs"
            raise RuntimeError("upstream failed")
    with limiter.reserve(key, plan) as r:  # the lease was freed
        assert r.decision.allowed


def test_reserve_heartbeats_a_long_job(limiter: Limiter) -> None:
    plan = uniq("plan")
    limiter.plans.set(plan, {"jobs": "concurrency 1 ttl 500ms"})
    key = uniq("user")
    with limiter.reserve(key, plan, heartbeat_ms=100) as r:
        time.sleep(1.2)  # more than twice the lease's ttl
        assert not limiter.peek(key, plan).allowed  # still held
        assert r.release().released


def test_decode_responses_gives_the_same_results(request: pytest.FixtureRequest, limiter: Limiter) -> None:
    from conftest import sync_client

    topology, protocol = request.node.callspec.params["limiter"]
    decoded = Limiter(sync_client(request, topology, protocol, decode_responses=True))
    plan = demo_plan(limiter)
    k1, k2 = uniq("user"), uniq("user")
    a = limiter.acquire(k1, plan, costs={"token": 10}, id="x")
    b = decoded.acquire(k2, plan, costs={"token": 10}, id="x")
    assert strip_time(a, k1) == strip_time(b, k2)
    assert decoded.plans.get(plan) == limiter.plans.get(plan)
    decoded.client.close()


def strip_time(d, key):
    """A decision with the time-dependent fields zeroed, for comparisons."""
    import dataclasses

    limits = tuple(dataclasses.replace(lim, reset_ms=0) for lim in d.limits)
    also = tuple(
        dataclasses.replace(p, limits=tuple(dataclasses.replace(lim, reset_ms=0) for lim in p.limits))
        for p in d.also
    )
    generated = d.id is not None and re.fullmatch(r"\d+-\d+", d.id)
    return dataclasses.replace(
        d,
        limits=limits,
        also=also,
        key="",
        retry_after_ms=min(d.retry_after_ms, 0),
        id="<generated>" if generated else d.id,
    )
