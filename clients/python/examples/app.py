"""An OpenAI-compatible gateway with per-user tiers, metered by Tollgate.

Run:  REDIS_URL=redis://127.0.0.1:6479 OPENAI_API_KEY=sk-... uvicorn app:app --port 8000
Call: any OpenAI SDK with base_url="http://127.0.0.1:8000/v1" and api_key="key_pro_001".
"""

import os
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tollgate import AsyncLimiter, Subject
from tollgate.asgi import TollgateMiddleware, decision_of
from tollgate.costs import LLMCosts

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6479")
UPSTREAM_URL = os.environ.get("UPSTREAM_URL", "https://api.openai.com/v1")
UPSTREAM_KEY = os.environ.get("OPENAI_API_KEY", "")
CHEAP_MODEL = "gpt-4o-mini"

# Tiers: requests per minute, tokens per minute and per day, jobs in flight, a
# monthly dollar budget (in micro-dollars) that warns at 80%, images per minute.
# A pro user past the daily token budget is served by the cheap model instead
# (the "pro-degraded" fallback plan) rather than refused.
PLANS = {
    "free": {
        "rpm": "sliding 10/1m",
        "tpm": "bucket 40000 token/1m",
        "tpd": "fixed 10000 token/1d",
        "jobs": "concurrency 2 ttl 60s",
        "spend": "fixed 1000000 usd_micros/1mo warn 80%",
        "ipm": "fixed 2 image/1m",
    },
    "pro": {
        "rpm": "sliding 60/1m",
        "tpm": "bucket 400000 token/1m",
        "tpd": "fixed 500000 token/1d",
        "jobs": "concurrency 10 ttl 60s",
        "spend": "fixed 20000000 usd_micros/1mo warn 80%",
        "ipm": "fixed 10 image/1m",
        "fallback": "pro-degraded",
    },
    "pro-degraded": {
        "rpm": "sliding 60/1m",
        "mini_tpd": "fixed 1000000 token/1d",
        "jobs": "concurrency 10 ttl 60s",
        "spend": "fixed 20000000 usd_micros/1mo warn 80%",
    },
    "premium": {
        "rpm": "sliding 300/1m",
        "tpm": "bucket 4000000 token/1m",
        "tpd": "fixed 5000000 token/1d",
        "jobs": "concurrency 50 ttl 120s",
        "spend": "fixed 200000000 usd_micros/1mo warn 80%",
        "ipm": "fixed 60 image/1m",
    },
}

# US dollars per million tokens (input, output) = micro-dollars per token.
PRICES = {"gpt-4o-mini": (0.15, 0.60), "gpt-4o": (2.50, 10.00)}
IMAGE_CREDITS = 25

# API key -> (user id, tier). In production: a database lookup or token claims.
USERS = {
    "key_free_001": ("user_001", "free"),
    "key_pro_001": ("user_002", "pro"),
    "key_prm_001": ("user_003", "premium"),
}


def identify(request: Request):
    """Who pays for this request: one subject key per user (hash-tagged, so the
    user's credits key shares its cluster slot), the user's tier as the plan."""
    api_key = request.headers.get("authorization", "").replace("Bearer ", "", 1)
    if api_key not in USERS or request.method == "GET":
        return None  # not metered: unknown keys get a 401, reads are free
    user_id, tier = USERS[api_key]
    if request.url.path.endswith("/images/generations"):
        # Images are paid with prepaid credits, and count against images per minute.
        credits = (f"{{user:{user_id}}}:credits", IMAGE_CREDITS)
        return Subject(key=f"{{user:{user_id}}}:rl", plan=tier, costs={"image": 1}, credits=credits)
    return Subject(key=f"{{user:{user_id}}}:rl", plan=tier)


limiter = AsyncLimiter.from_url(REDIS_URL)  # the client is made in the server's event loop
auth = {"authorization": f"Bearer {UPSTREAM_KEY}"} if UPSTREAM_KEY else {}
upstream = httpx.AsyncClient(base_url=UPSTREAM_URL, headers=auth, timeout=600)


@asynccontextmanager
async def lifespan(app: FastAPI):
    await limiter.plans.apply(PLANS)  # on every primary, in a cluster
    yield
    await upstream.aclose()


app = FastAPI(lifespan=lifespan)


async def relay(request: Request, path: str) -> StreamingResponse:
    """Forward the call upstream and stream the answer back (JSON or SSE)."""
    body = await request.json()
    decision = decision_of(request)
    if decision.degraded:
        body["model"] = CHEAP_MODEL  # admitted by the fallback plan
    if body.get("stream"):
        # Ask for the usage chunk, so the middleware settles on real tokens.
        body.setdefault("stream_options", {})["include_usage"] = True
    reply = await upstream.send(upstream.build_request("POST", path, json=body), stream=True)

    async def chunks():
        try:
            async for chunk in reply.aiter_bytes():  # decoded, should the upstream gzip
                yield chunk
        finally:
            await reply.aclose()

    response = StreamingResponse(
        chunks(), status_code=reply.status_code, media_type=reply.headers.get("content-type")
    )
    if decision.warn:
        response.headers["x-budget-warning"] = "80% of a budget is used"
    return response


@app.post("/v1/chat/completions")
async def chat(request: Request):
    if decision_of(request) is None:
        return JSONResponse({"error": {"message": "unknown API key"}}, status_code=401)
    return await relay(request, "/chat/completions")


@app.post("/v1/images/generations")
async def images(request: Request):
    if decision_of(request) is None:
        return JSONResponse({"error": {"message": "unknown API key"}}, status_code=401)
    return await relay(request, "/images/generations")


@app.get("/v1/usage")
async def usage(request: Request):
    """The caller's standing in every limit of their tier, charging nothing."""
    api_key = request.headers.get("authorization", "").replace("Bearer ", "", 1)
    if api_key not in USERS:
        return JSONResponse({"error": {"message": "unknown API key"}}, status_code=401)
    user_id, tier = USERS[api_key]
    standing = await limiter.usage(f"{{user:{user_id}}}:rl", tier)
    credits = await limiter.credits.balance(f"{{user:{user_id}}}:credits")
    limits = {
        lim.name: {"unit": lim.unit, "limit": lim.limit, "used": lim.used,
                   "remaining": lim.remaining, "resets_in_ms": lim.reset_ms}
        for lim in standing.limits
    }
    return {"plan": standing.plan, "limits": limits, "credits": credits}


@app.post("/billing/credits")
async def grant_credits(request: Request):
    """A payment webhook: grant credits for 30 days; a retried webhook (same
    invoice) grants once."""
    event = await request.json()
    balance = await limiter.credits.grant(
        f"{{user:{event['user']}}}:credits",
        event["credits"],
        ttl_ms=30 * 86_400_000,
        id=event["invoice"],
    )
    return {"balance": balance}


app.add_middleware(
    TollgateMiddleware,
    limiter=limiter,
    identify=identify,
    costs=LLMCosts(PRICES),  # tokens: prompt/4 + max_tokens; dollars at these prices
    enforce=os.environ.get("TOLLGATE_ENFORCE", "reject"),  # or "queue", "degrade"
    paths=("/v1/",),
)
