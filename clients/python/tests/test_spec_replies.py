"""SPEC reply features the client exposes: `kind` and `window_ms` per limit (and
the `RateLimit-Policy` windows they feed), `RL.USAGE`, the `reason` of a release
that released nothing, a retried ACQUIRE answering the original decision, and
`ALSO` hierarchies with `denied_key` and `also`. Sync and async, every
topology and protocol."""

from __future__ import annotations

import calendar
import datetime
import time

from conftest import uniq
from tollgate import AsyncLimiter, Limiter

KINDS_PLAN = {
    "rpm": "fixed 10/1m",
    "rph": "sliding 5/1h",
    "tpm": "bucket 1000 token/1m",
    "jobs": "concurrency 2 ttl 30s",
    "big": "cap 500 token",
    "spend": "fixed 100 usd_micros/1mo warn 80%",
}


def month_ms() -> int:
    now = datetime.datetime.now(datetime.timezone.utc)
    return calendar.monthrange(now.year, now.month)[1] * 86_400_000


def check_kinds(d) -> None:
    got = {lim.name: (lim.kind, lim.window_ms) for lim in d.limits}
    assert got == {
        "rpm": ("fixed", 60_000),
        "rph": ("sliding", 3_600_000),
        "tpm": ("bucket", 60_000),
        "jobs": ("concurrency", 0),
        "big": ("cap", 0),
        "spend": ("fixed", month_ms()),
    }
    h = d.headers()
    assert h["ratelimit-policy"] == (
        '"rpm";q=10;w=60, "rph";q=5;w=3600, "tpm";q=1000;w=60;qu="token", '
        '"jobs";q=2;qu="concurrent-requests", "spend";q=100;w=%d;qu="usd_micros"'
        % (month_ms() // 1000)
    )
    # The tightest request limit feeds x-ratelimit-*-requests: rph (4 left).
    assert h["x-ratelimit-limit-requests"] == "5" and h["x-ratelimit-remaining-requests"] == "4"


def test_limits_carry_kind_and_window(limiter: Limiter) -> None:
    plan = uniq("plan")
    limiter.plans.set(plan, KINDS_PLAN)
    check_kinds(limiter.acquire(uniq("user"), plan, costs={"token": 10}))


async def test_limits_carry_kind_and_window_async(alimiter: AsyncLimiter) -> None:
    plan = uniq("plan")
    await alimiter.plans.set(plan, KINDS_PLAN)
    check_kinds(await alimiter.acquire(uniq("user"), plan, costs={"token": 10}))


def check_usage(fresh, used) -> None:
    f = {lim.name: (lim.used, lim.remaining) for lim in fresh.limits}
    assert f["jobs"] == (0, 2) and f["rpm"] == (0, 10) and f["tpm"] == (0, 1000)
    u = {lim.name: (lim.used, lim.remaining) for lim in used.limits}
    assert u["jobs"] == (1, 1) and u["rpm"] == (1, 9)
    used_tokens, left = u["tpm"]  # a bucket drains 1000 tokens a minute: a few may be back
    assert 290 <= used_tokens <= 300 and left == 1000 - used_tokens
    assert used.limit("rpm").kind == "fixed"


def test_usage_reports_the_standing_without_assuming_a_call(limiter: Limiter) -> None:
    plan = uniq("plan")
    limiter.plans.set(plan, KINDS_PLAN)
    key = uniq("user")
    fresh = limiter.usage(key, plan)
    limiter.acquire(key, plan, costs={"token": 300}, id="a")
    used = limiter.usage(key, plan)
    assert used.plan == plan and used.key == key
    check_usage(fresh, used)


async def test_usage_reports_the_standing_async(alimiter: AsyncLimiter) -> None:
    plan = uniq("plan")
    await alimiter.plans.set(plan, KINDS_PLAN)
    key = uniq("user")
    fresh = await alimiter.usage(key, plan)
    await alimiter.acquire(key, plan, costs={"token": 300}, id="a")
    check_usage(fresh, await alimiter.usage(key, plan))


# The rate limit keeps the subject key alive after its requests end: a key whose
# state is all idle is deleted, and its memory of ended requests with it (then any
# id is `unknown`).
RELEASE_PLAN = {"rpm": "sliding 100/1m", "jobs": "concurrency 2 ttl 30s"}


def test_a_release_that_releases_nothing_says_why(limiter: Limiter) -> None:
    plan = uniq("plan")
    limiter.plans.set(plan, RELEASE_PLAN)
    key = uniq("user")
    limiter.acquire(key, plan, id="a")
    limiter.acquire(key, plan, id="short", ttl_ms=100)
    assert limiter.release(key, "a").released
    again = limiter.release(key, "a")
    assert (again.released, again.reason) == (False, "released")
    assert limiter.release(key, "nope").reason == "unknown"
    time.sleep(0.25)
    assert limiter.release(key, "short").reason == "expired"


async def test_a_release_that_releases_nothing_says_why_async(alimiter: AsyncLimiter) -> None:
    plan = uniq("plan")
    await alimiter.plans.set(plan, RELEASE_PLAN)
    key = uniq("user")
    await alimiter.acquire(key, plan, id="a")
    await alimiter.release(key, "a")
    assert (await alimiter.release(key, "a")).reason == "released"
    assert (await alimiter.release(key, "nope")).reason == "unknown"


def test_a_retried_acquire_with_a_live_id_answers_the_original_decision(limiter: Limiter) -> None:
    plan = uniq("plan")
    limiter.plans.set(plan, {"rpm": "sliding 5/1m", "tpm": "bucket 1000 token/1m", "jobs": "concurrency 3 ttl 30s"})
    key = uniq("user")
    first = limiter.acquire(key, plan, costs={"token": 400}, id="chat-1")
    retry = limiter.acquire(key, plan, costs={"token": 400}, id="chat-1")
    assert retry.allowed and retry.id == "chat-1"
    assert [(x.name, x.remaining) for x in retry.limits] == [(x.name, x.remaining) for x in first.limits]
    now = limiter.peek(key, plan, costs={"token": 0}, requests=0)
    assert now.limit("rpm").remaining == 4 and now.limit("tpm").remaining >= 600
    assert now.limit("tpm").remaining < 1000


def org_plans(limiter):
    org, team, user = uniq("org"), uniq("team"), uniq("user")
    return org, team, user, [
        (org, {"spend": "fixed 1000 usd_micros/1mo warn 80%", "jobs": "concurrency 3 ttl 30s"}),
        (team, {"tpd": "fixed 5000 token/1d"}),
        (user, {"rpm": "sliding 10/1m", "tpm": "bucket 100000 token/1m", "jobs": "concurrency 2 ttl 30s"}),
    ]


def test_also_decides_every_level_in_one_step(limiter: Limiter) -> None:
    org, team, user, plans = org_plans(limiter)
    for name, spec in plans:
        limiter.plans.set(name, spec)
    tag = uniq("acme")
    okey, tkey = "{%s}" % tag, "{%s}:team:research" % tag
    u1, u2 = "{%s}:user:1" % tag, "{%s}:user:2" % tag
    also = [(tkey, team), (okey, org)]
    costs = {"token": 1000, "usd_micros": 300}
    d = limiter.acquire(u1, user, costs=costs, id="r1", also=also)
    assert d.allowed and d.denied_key is None
    assert [(p.key, p.plan) for p in d.also] == [(tkey, team), (okey, org)]
    assert {lim.name: lim.remaining for lim in d.also[1].limits} == {"spend": 700, "jobs": 2}
    assert limiter.acquire(u2, user, costs=costs, id="r2", also=also).allowed
    assert limiter.acquire(u2, user, costs=costs, id="r3", also=also).allowed
    # The org's concurrency (3) denies the fourth, on the org key; nothing is charged.
    d4 = limiter.acquire(u1, user, costs={"token": 1, "usd_micros": 1}, id="r4", also=also)
    assert not d4.allowed and d4.denied_by == "jobs" and d4.denied_key == okey
    assert limiter.usage(u1, user).limit("rpm").used == 1
    # One release on the first key settles and frees every level.
    rel = limiter.release(u1, "r1", costs={"token": 10, "usd_micros": 3})
    assert rel.released
    after = limiter.peek(u1, user, costs={"token": 0, "usd_micros": 0}, requests=0, also=also)
    org_limits = {lim.name: lim.remaining for lim in after.also[1].limits}
    assert org_limits["spend"] == 1000 - 3 - 300 - 300 and org_limits["jobs"] == 0  # peek takes one lease
    # The org's budget is the tightest token/dollar view a client sees.
    assert "x-ratelimit-remaining-requests" in after.headers()


async def test_also_decides_every_level_in_one_step_async(alimiter: AsyncLimiter) -> None:
    org, team, user, plans = org_plans(alimiter)
    for name, spec in plans:
        await alimiter.plans.set(name, spec)
    tag = uniq("acme")
    okey, tkey, u1 = "{%s}" % tag, "{%s}:team" % tag, "{%s}:user:1" % tag
    also = [(tkey, team), (okey, org)]
    d = await alimiter.acquire(u1, user, costs={"token": 4000, "usd_micros": 1}, also=also)
    assert d.allowed and len(d.also) == 2
    d = await alimiter.acquire(u1, user, costs={"token": 2000, "usd_micros": 1}, also=also)
    assert not d.allowed and d.denied_by == "tpd" and d.denied_key == tkey
