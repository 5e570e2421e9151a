"""The middleware over a real server, driven in-process (httpx's ASGI
transport): the retry hint of a concurrency denial, settlement of compressed
responses, and the request body bound."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, List, Optional

import httpx
import pytest
import redis
import redis.asyncio as aredis

from conftest import uniq
from tollgate import AsyncLimiter, Limiter, Subject
from tollgate.asgi import TollgateMiddleware

App = Callable[[Dict[str, Any], Any, Any], Awaitable[None]]
BODY = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 90}  # estimate: 100 tokens


async def drain(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def answering(chunks: List[bytes], headers: Dict[str, str], gate: Optional[asyncio.Event] = None) -> App:
    """An app that answers 200 with `chunks` as the body (after `gate`)."""

    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        await drain(receive)
        if gate is not None:
            await gate.wait()
        raw = [(k.encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": 200, "headers": raw})
        for i, chunk in enumerate(chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1})

    return app


class Gateway:
    """The middleware in front of `app`, metering every call as `key` under a
    fresh plan made of `limits`."""

    def __init__(self, standalone: Any, limits: Dict[str, str], app: App, **middleware: Any) -> None:
        self.admin = Limiter(redis.Redis(port=standalone.port))
        self.plan, self.key = uniq("plan"), uniq("user")
        self.admin.plans.set(self.plan, limits)
        self.limiter = AsyncLimiter(aredis.Redis(port=standalone.port))
        identify = lambda request: Subject(key=self.key, plan=self.plan)  # noqa: E731
        self.app = TollgateMiddleware(app, limiter=self.limiter, identify=identify, **middleware)

    async def post(self, content: bytes, headers: Optional[Dict[str, str]] = None) -> httpx.Response:
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            return await c.post("/v1/chat/completions", content=content, headers=headers or {})

    def used(self, name: str) -> Optional[int]:
        lim = self.admin.usage(self.key, self.plan).limit(name)
        assert lim is not None
        return lim.used

    async def close(self) -> None:
        await self.limiter.close()
        await self.limiter._t.client.aclose()
        self.admin.client.close()


@pytest.fixture
async def gateways(standalone: Any) -> AsyncIterator[Callable[..., Gateway]]:
    made: List[Gateway] = []

    def make(limits: Dict[str, str], app: App, **middleware: Any) -> Gateway:
        made.append(Gateway(standalone, limits, app, **middleware))
        return made[-1]

    yield make
    for g in made:
        await g.close()


async def test_a_concurrency_denial_tells_the_client_to_retry_within_a_second(gateways) -> None:
    gate = asyncio.Event()
    usage = json.dumps({"usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
    g = gateways({"jobs": "concurrency 1 ttl 60s"}, answering([usage], {"content-type": "application/json"}, gate))
    first = asyncio.ensure_future(g.post(json.dumps(BODY).encode()))
    for _ in range(100):  # until the first call holds the one lease
        if g.used("jobs") == 1:
            break
        await asyncio.sleep(0.01)
    denied = await g.post(json.dumps(BODY).encode())
    gate.set()
    assert (await first).status_code == 200
    assert denied.status_code == 429
    assert float(denied.headers["retry-after-ms"]) <= 1000 and denied.headers["retry-after"] == "1"
    assert denied.json()["error"]["retry_after_ms"] <= 1000


async def test_a_gzip_json_response_is_settled_on_its_usage_and_passed_through_untouched(gateways) -> None:
    payload = {"model": "m", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    packed = gzip.compress(json.dumps(payload).encode())
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    g = gateways({"tpm": "sliding 10000 token/1m"}, answering([packed[:10], packed[10:]], headers))
    r = await g.post(json.dumps(BODY).encode())
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    assert r.json() == payload  # httpx inflated the very bytes the app sent
    assert g.used("tpm") == 5, "settled on the usage, not the estimate of 100"


async def test_a_gzip_event_stream_is_settled_on_its_usage(gateways) -> None:
    events = [{"model": "m", "choices": [{"delta": {"content": "hi"}}]},
              {"model": "m", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}]
    z = zlib.compressobj(wbits=31)  # one gzip stream, flushed per event
    chunks = [z.compress(b"data: " + json.dumps(e).encode() + b"\n\n") + z.flush(zlib.Z_SYNC_FLUSH) for e in events]
    chunks.append(z.compress(b"data: [DONE]\n\n") + z.flush())
    headers = {"content-type": "text/event-stream", "content-encoding": "gzip"}
    g = gateways({"tpm": "sliding 10000 token/1m"}, answering(chunks, headers))
    r = await g.post(json.dumps(BODY).encode())
    assert r.status_code == 200 and b"[DONE]" in r.content
    assert g.used("tpm") == 7


async def test_a_body_over_max_body_bytes_is_413_and_charges_nothing(gateways) -> None:
    calls: List[int] = []
    ok = json.dumps({"usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
    plain = answering([ok], {"content-type": "application/json"})

    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        calls.append(1)
        await plain(scope, receive, send)

    g = gateways({"rpm": "sliding 100/1m"}, app, max_body_bytes=1000)
    big = json.dumps(dict(BODY, messages=[{"role": "user", "content": "x" * 1000}])).encode()
    r = await g.post(big)  # Content-Length says it: answered before reading
    assert r.status_code == 413 and r.headers["x-should-retry"] == "false"
    assert r.json()["error"]["type"] == "request_body_too_large" and r.json()["error"]["max_body_bytes"] == 1000

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
        for i in range(0, len(big), 100):
            yield big[i : i + 100]

    transport = httpx.ASGITransport(app=g.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        r = await c.post("/v1/chat/completions", content=chunked())
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_body_too_large"
    assert calls == [] and g.used("rpm") == 0
    exact = json.dumps(BODY).encode().ljust(1000)  # at the bound: served
    assert (await g.post(exact)).status_code == 200 and calls == [1] and g.used("rpm") == 1


def test_the_body_bound_is_one_mebibyte_by_default() -> None:
    assert TollgateMiddleware(None, limiter=None, identify=lambda r: None).max_body_bytes == 1024 * 1024  # type: ignore[arg-type]
