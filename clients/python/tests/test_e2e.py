"""End to end: a FastAPI gateway with TollgateMiddleware under uvicorn, in front
of a fake OpenAI-compatible upstream, called with the official `openai` SDK."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Optional

import httpx
import openai
import pytest
import redis
import redis.asyncio as aredis

from conftest import uniq
from e2e import USERS, Upstream, gateway, serve, wait_until
from tollgate import AsyncLimiter, Limiter, Subject


@pytest.fixture(scope="module")
def upstream():
    u = Upstream()
    yield u
    u.stop()


@pytest.fixture
def admin(standalone):
    client = redis.Redis(port=standalone.port)
    yield Limiter(client)
    client.close()


class Tiers:
    """Test plans per tier, fresh names and keys per test."""

    def __init__(self, admin: Limiter, plans: Dict[str, Dict[str, str]]) -> None:
        self.admin = admin
        self.names = {}
        for tier, spec in plans.items():
            self.names[tier] = uniq(tier)
        for tier, spec in plans.items():
            spec = dict(spec)
            if "fallback" in spec:
                spec["fallback"] = self.names.get(spec["fallback"], spec["fallback"])
            admin.plans.set(self.names[tier], spec)
        self.prefix = uniq("gw")

    def key(self, user: str) -> str:
        return f"{{{self.prefix}:{user}}}:rl"

    def identify(self, endpoint: Optional[str] = None, credits: Optional[int] = None):
        def identify(request) -> Optional[Subject]:
            auth = request.headers.get("authorization", "")
            found = USERS.get(auth[len("Bearer "):])
            if found is None:
                return None
            user, tier = found
            ckey = f"{{{self.prefix}:{user}}}:credits"
            return Subject(
                key=self.key(user),
                plan=self.names[tier],
                endpoint=endpoint,
                credits=(ckey, credits) if credits else None,
                priority=0,
                info={"user": f"{self.prefix}:{user}", "tier": tier},
            )

        return identify


def app_for(standalone, upstream, tiers: Tiers, identify=None, **kw: Any):
    # The client is made by the limiter at first use, inside uvicorn's event loop.
    limiter = AsyncLimiter.from_url(f"redis://127.0.0.1:{standalone.port}")
    return gateway(upstream.url, limiter=limiter, identify=identify or tiers.identify(), **kw)


def client(url: str, api_key: str = "key_free_001", retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=retries, timeout=20)


def chat(c: openai.OpenAI, content: str = "hi", max_tokens: int = 50, **fake: Any):
    return c.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        extra_body={"fake": fake},
    )


def test_each_tier_admits_exactly_its_limit(standalone, upstream, admin) -> None:
    limits = {"free": 3, "pro": 5, "premium": 8}
    tiers = Tiers(admin, {t: {"rpm": f"sliding {n}/1m", "tpm": "bucket 100000 token/1m"} for t, n in limits.items()})
    with serve(app_for(standalone, upstream, tiers)) as url:
        for api_key, (user, tier) in USERS.items():
            c = client(url, api_key)
            ok = denied = 0
            for _ in range(limits[tier] + 3):
                try:
                    chat(c)
                    ok += 1
                except openai.RateLimitError as e:
                    assert e.status_code == 429
                    denied += 1
            assert (ok, denied) == (limits[tier], 3), tier


def test_a_denied_call_gets_429_with_headers_and_the_sdk_retry_honours_retry_after(standalone, upstream, admin) -> None:
    tiers = Tiers(admin, {"free": {"rps": "bucket 1/2s", "tpm": "sliding 10000 token/1m"}})
    with serve(app_for(standalone, upstream, tiers)) as url:
        c = client(url)
        raw = c.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=50, extra_body={"fake": {}}
        )
        admitted_at = time.monotonic()
        h = raw.headers
        assert raw.http_response.status_code == 200
        assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("1", "0")
        assert h["x-ratelimit-reset-requests"] in ("2s", "1.999s", "1.998s") or h["x-ratelimit-reset-requests"].startswith("1.")
        assert (h["x-ratelimit-limit-tokens"], h["x-ratelimit-remaining-tokens"]) == ("10000", str(10000 - 51))
        assert h["x-tollgate-plan"] == tiers.names["free"]
        assert '"rps";q=1' in h["ratelimit-policy"] and '"tpm";q=10000' in h["ratelimit-policy"]
        assert '"rps";r=0;t=2' in h["ratelimit"]
        with pytest.raises(openai.RateLimitError) as denied:
            chat(c)
        r = denied.value.response
        assert r.status_code == 429
        assert r.headers["retry-after"] in ("1", "2") and 0 < int(r.headers["retry-after-ms"]) <= 2000
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        err = r.json()["error"]
        assert (err["type"], err["limit"], err["plan"]) == ("rate_limit_exceeded", "rps", tiers.names["free"])
        # The SDK's own retry waits what Retry-After says, then gets through.
        before = len(upstream.calls)
        started = time.monotonic()
        reply = chat(client(url, retries=2))
        elapsed = time.monotonic() - started
        assert reply.choices[0].message.content
        expected = 2.0 - (started - admitted_at)  # what Retry-After said, give or take
        assert expected > 0.5, "the machine is too slow for this test"
        assert expected - 0.2 < elapsed < expected + 1.5, (elapsed, expected)
        assert len(upstream.calls) == before + 1


def test_settlement_refunds_an_over_estimate_so_the_next_call_fits(standalone, upstream, admin) -> None:
    tiers = Tiers(admin, {"free": {"tpm": "fixed 1000 token/1m", "rpm": "sliding 100/1m"}})
    with serve(app_for(standalone, upstream, tiers)) as url:
        c = client(url)
        key, plan = tiers.key("user_001"), tiers.names["free"]
        # Each call is estimated at 1 + 700 tokens and really uses 1 + 50.
        assert 2 * 701 > 1000
        chat(c, max_tokens=700, out=50)
        assert wait_until(lambda: admin.peek(key, plan, requests=0).limit("tpm").remaining == 949)
        stream = c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=700,
            stream=True, extra_body={"fake": {"out": 50, "chunks": 3}},
        )
        chunks = list(stream)
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 51
        assert wait_until(lambda: admin.peek(key, plan, requests=0).limit("tpm").remaining == 898)
        chat(c, max_tokens=700, out=50)
        assert wait_until(lambda: admin.peek(key, plan, requests=0).limit("tpm").remaining == 847)
        # An estimate that no longer fits is refused.
        with pytest.raises(openai.RateLimitError):
            chat(c, max_tokens=900)


def test_a_cancelled_stream_releases_its_lease(standalone, upstream, admin) -> None:
    tiers = Tiers(admin, {"free": {"jobs": "concurrency 1 ttl 30s", "rpm": "sliding 100/1m"}})
    with serve(app_for(standalone, upstream, tiers)) as url:
        c = client(url)
        key, plan = tiers.key("user_001"), tiers.names["free"]
        done = upstream.completed_streams
        stream = c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=50,
            stream=True, extra_body={"fake": {"chunks": 50, "delay_ms": 100}},
        )
        first = next(iter(stream))
        assert first.choices[0].delta.content == "part0 "
        assert not admin.peek(key, plan).allowed  # the stream holds the one job slot
        with pytest.raises(openai.RateLimitError):
            chat(c)
        stream.close()  # the client goes away mid-stream
        assert wait_until(lambda: admin.peek(key, plan).allowed, 3.0), "the lease was not released"
        assert chat(c).choices[0].message.content
        assert upstream.completed_streams == done


def test_sixteen_concurrent_clients_never_exceed_rpm_tpm_or_concurrency(standalone, upstream, admin) -> None:
    tiers = Tiers(
        admin, {"free": {"rpm": "sliding 20/1m", "tpm": "fixed 1200 token/1m", "jobs": "concurrency 4 ttl 30s"}}
    )
    statuses: Dict[int, int] = {}
    with serve(app_for(standalone, upstream, tiers)) as url:
        user = f"{tiers.prefix}:user_001"

        def one_client(i: int) -> None:
            c = client(url)
            for _ in range(4):
                try:
                    chat(c, content="x" * 40, max_tokens=100, out=60, delay_ms=100)
                    code = 200
                except openai.APIStatusError as e:
                    code = e.status_code
                statuses[code] = statuses.get(code, 0) + 1

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(one_client, range(16)))
        served = [b for u, b in upstream.calls if u == user]
    assert set(statuses) <= {200, 429} and sum(statuses.values()) == 64
    assert statuses.get(200, 0) == len(served)
    assert 4 <= len(served) <= 20  # RPM
    assert upstream.max_in_flight[user] <= 4  # concurrency
    assert upstream.tokens[user] <= 1200  # TPM, on actual usage
    assert statuses.get(429, 0) >= 44


def test_degrade_mode_answers_through_the_fallback_plan(standalone, upstream, admin) -> None:
    tiers = Tiers(
        admin,
        {
            "free": {"rpm": "sliding 100/1m"},
            "pro": {"rpm": "sliding 2/1m", "fallback": "free"},
            "premium": {"rpm": "sliding 1/1m"},
        },
    )
    cheap = tiers.names["free"]
    app = app_for(standalone, upstream, tiers, enforce="degrade", degrade_plan={tiers.names["premium"]: cheap})
    with serve(app) as url:
        pro = client(url, "key_pro_001")
        for _ in range(2):
            r = pro.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=10, extra_body={"fake": {}}
            )
            assert r.parse().model == "gpt-4o-mini" and r.headers["x-tollgate-plan"] == tiers.names["pro"]
        r = pro.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=10, extra_body={"fake": {}}
        )
        assert r.parse().model == "cheap-model" and r.headers["x-tollgate-plan"] == cheap
        # A plan without a fallback of its own degrades to the middleware's degrade_plan.
        premium = client(url, "key_prm_001")
        assert chat(premium).model == "gpt-4o-mini"
        assert chat(premium).model == "cheap-model"


def test_queue_mode_waits_for_a_slot_within_its_bound(standalone, upstream, admin) -> None:
    tiers = Tiers(admin, {"free": {"jobs": "concurrency 1 ttl 30s"}})
    with serve(app_for(standalone, upstream, tiers, enforce="queue", queue_ms=3000)) as url:
        started = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda _: chat(client(url), delay_ms=400).model, range(2)))
        assert replies == ["gpt-4o-mini"] * 2
        assert time.monotonic() - started >= 0.75  # the second waited for the first
    with serve(app_for(standalone, upstream, tiers, enforce="queue", queue_ms=100)) as url:
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(lambda: chat(client(url), delay_ms=1000))
            time.sleep(0.3)
            with pytest.raises(openai.RateLimitError):
                chat(client(url))
            slow.result()


def test_denials_map_to_413_403_and_402_with_a_json_error(standalone, upstream, admin) -> None:
    tiers = Tiers(admin, {"free": {"big": "cap 500 token", "rpm": "sliding 100/1m for chat"}})
    calls = len(upstream.calls)
    with serve(app_for(standalone, upstream, tiers, identify=tiers.identify(endpoint="chat"))) as url:
        with pytest.raises(openai.APIStatusError) as e:
            chat(client(url, retries=2), max_tokens=1000)
        assert e.value.status_code == 413
        assert e.value.response.json()["error"]["type"] == "request_too_large"
        assert e.value.response.headers["x-should-retry"] == "false"
    with serve(app_for(standalone, upstream, tiers, identify=tiers.identify(endpoint="images"))) as url:
        with pytest.raises(openai.PermissionDeniedError) as e:
            chat(client(url))
        assert e.value.response.json()["error"]["type"] == "endpoint_not_allowed"
    credits = Tiers(admin, {"free": {"rpm": "sliding 100/1m"}})
    with serve(app_for(standalone, upstream, credits, identify=credits.identify(credits=25))) as url:
        ckey = f"{{{credits.prefix}:user_001}}:credits"
        admin.credits.grant(ckey, 30)
        assert chat(client(url)).choices
        with pytest.raises(openai.APIStatusError) as e:
            chat(client(url))
        assert e.value.status_code == 402
        assert e.value.response.json()["error"]["type"] == "insufficient_credits"
        assert admin.credits.balance(ckey) == 5
    assert len(upstream.calls) == calls + 1
    # Unidentified requests and other paths pass through unmetered.
    with serve(app_for(standalone, upstream, tiers)) as url:
        r = httpx.get(f"{url}/health")
        assert r.status_code == 200 and "x-tollgate-plan" not in r.headers


def test_unreachable_redis_fails_closed_by_default_or_open_with_a_log_line(upstream, admin, caplog) -> None:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from servers import free_port

    dead = free_port()
    tiers = Tiers(admin, {"free": {"rpm": "sliding 100/1m"}})
    caplog.set_level(logging.ERROR, logger="tollgate")
    for fail_open in (False, True):
        no_retry = Retry(NoBackoff(), 0)
        limiter = AsyncLimiter(lambda: aredis.Redis(port=dead, socket_connect_timeout=0.5, retry=no_retry))
        app = gateway(upstream.url, limiter=limiter, identify=tiers.identify(), fail_open=fail_open)
        with serve(app) as url:
            r = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
                headers={"authorization": "Bearer key_free_001"},
            )
        if fail_open:
            assert r.status_code == 200 and "x-ratelimit-limit-requests" not in r.headers
            assert any("failing open" in m for m in caplog.messages)
        else:
            assert r.status_code == 503 and r.json()["error"]["type"] == "limiter_unavailable"
            assert any("failing closed" in m for m in caplog.messages)


def test_a_plan_the_server_does_not_know_is_a_logged_500(standalone, upstream, admin, caplog) -> None:
    tiers = Tiers(admin, {"free": {"rpm": "sliding 100/1m"}})
    tiers.names["free"] = uniq("missing")
    caplog.set_level(logging.ERROR, logger="tollgate")
    calls = len(upstream.calls)
    with serve(app_for(standalone, upstream, tiers, fail_open=True)) as url:
        with pytest.raises(openai.InternalServerError) as e:
            chat(client(url))
    assert e.value.response.json()["error"]["type"] == "limiter_error"
    assert any("unknown plan" in m for m in caplog.messages)
    assert len(upstream.calls) == calls


def test_a_client_that_leaves_while_queued_is_never_charged(standalone, upstream, admin) -> None:
    tiers = Tiers(admin, {"free": {"jobs": "concurrency 1 ttl 30s", "rpm": "sliding 100/1m"}})
    key, plan = tiers.key("user_001"), tiers.names["free"]
    with serve(app_for(standalone, upstream, tiers, enforce="queue", queue_ms=5000)) as url:
        calls = len(upstream.calls)
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(lambda: chat(client(url), delay_ms=1500))
            assert wait_until(lambda: not admin.peek(key, plan).allowed)
            impatient = openai.OpenAI(base_url=f"{url}/v1", api_key="key_free_001", max_retries=0, timeout=0.3)
            with pytest.raises(openai.APITimeoutError):
                chat(impatient)
            slow.result()
        # Only the first call was ever charged or sent upstream; the slot is free.
        assert wait_until(lambda: admin.peek(key, plan).allowed)
        assert admin.peek(key, plan, requests=0).limit("rpm").remaining == 99
        assert len(upstream.calls) == calls + 1


def test_a_stream_longer_than_its_lease_is_kept_alive_by_the_heartbeat(standalone, upstream, admin) -> None:
    tiers = Tiers(admin, {"free": {"jobs": "concurrency 1 ttl 500ms", "rpm": "sliding 100/1m"}})
    key, plan = tiers.key("user_001"), tiers.names["free"]
    with serve(app_for(standalone, upstream, tiers)) as url:
        stream = client(url).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=50,
            stream=True, extra_body={"fake": {"chunks": 15, "delay_ms": 100}},
        )
        chunks = iter(stream)
        for _ in range(12):  # 1.2 s: more than twice the lease's 500 ms
            next(chunks)
        assert not admin.peek(key, plan).allowed, "the lease expired under a running stream"
        assert chunks and len(list(chunks)) >= 3
        assert wait_until(lambda: admin.peek(key, plan).allowed)
