"""End to end with hierarchies (`ALSO`): the middleware charges a user and the
user's organisation in one step; concurrent users never exceed the org's
concurrency, and a denial names the org key."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Dict

import openai
import redis
import redis.asyncio as aredis

from conftest import uniq
from e2e import USERS, Upstream, gateway, serve
from tollgate import AsyncLimiter, Limiter, Subject


def test_an_org_limit_holds_across_its_users_through_the_middleware(standalone) -> None:
    upstream = Upstream()
    admin = Limiter(redis.Redis(port=standalone.port))
    org_plan, user_plan = uniq("org"), uniq("user")
    admin.plans.set(org_plan, {"jobs": "concurrency 2 ttl 30s", "tpm": "fixed 100000 token/1m"})
    admin.plans.set(user_plan, {"rpm": "sliding 100/1m", "jobs": "concurrency 3 ttl 30s"})
    org = "{%s}" % uniq("acme")
    label = org.strip("{}")

    def identify(request):
        found = USERS.get(request.headers.get("authorization", "")[len("Bearer "):])
        if found is None:
            return None
        user, _tier = found
        return Subject(key=f"{org}:user:{user}", plan=user_plan, also=((org, org_plan),), info={"user": label})

    statuses: Dict[int, int] = {}
    denied_keys = set()
    limiter = AsyncLimiter(lambda: aredis.Redis(port=standalone.port))
    try:
        with serve(gateway(upstream.url, limiter=limiter, identify=identify)) as url:

            def one(api_key: str) -> None:
                c = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)
                for _ in range(3):
                    try:
                        c.chat.completions.create(
                            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=10,
                            extra_body={"fake": {"delay_ms": 200}},
                        )
                        statuses[200] = statuses.get(200, 0) + 1
                    except openai.RateLimitError as e:
                        statuses[429] = statuses.get(429, 0) + 1
                        denied_keys.add(e.response.json()["error"]["key"])

            with ThreadPoolExecutor(12) as pool:
                list(pool.map(one, [k for k in USERS for _ in range(4)]))
    finally:
        upstream.stop()
    assert statuses.get(200, 0) >= 2 and statuses.get(429, 0) > 0
    assert upstream.max_in_flight[label] <= 2
    assert denied_keys <= {org, f"{org}:user:user_001", f"{org}:user:user_002", f"{org}:user:user_003"}
    assert org in denied_keys
    admin.client.close()
