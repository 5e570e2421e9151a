"""End-to-end pieces: a fake OpenAI-compatible upstream, a FastAPI gateway app
with the middleware, and uvicorn servers in threads on free loopback ports."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterator, Optional

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from servers import free_port
from tollgate.asgi import TollgateMiddleware, decision_of


class Upstream:
    """Answers POST /v1/chat/completions like OpenAI. The request's `fake`
    field sets `out` (completion tokens), `delay_ms` (per chunk or for the whole
    answer) and `chunks` (stream length). Prompt tokens are prompt characters
    / 4. It records every call and the most calls in flight per user."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list = []
        self.in_flight: Dict[str, int] = {}
        self.max_in_flight: Dict[str, int] = {}
        self.tokens: Dict[str, int] = {}
        self.completed_streams = 0
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                user = self.headers.get("x-user", "?")
                upstream._enter(user, body)
                try:
                    upstream._answer(self, body, user)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    upstream._leave(user)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _enter(self, user: str, body: Any) -> None:
        with self.lock:
            self.calls.append((user, body))
            self.in_flight[user] = self.in_flight.get(user, 0) + 1
            self.max_in_flight[user] = max(self.max_in_flight.get(user, 0), self.in_flight[user])

    def _leave(self, user: str) -> None:
        with self.lock:
            self.in_flight[user] -= 1

    def _answer(self, h: BaseHTTPRequestHandler, body: Dict[str, Any], user: str) -> None:
        fake = body.get("fake") or {}
        if h.path.endswith("/images/generations"):
            status = int(fake.get("status", 200))
            payload = json.dumps({"created": int(time.time()), "data": [{"url": "https://example.invalid/1.png"}]})
            h.send_response(status)
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload.encode())
            return
        out = int(fake.get("out", 10))
        delay = int(fake.get("delay_ms", 0)) / 1000.0
        chars = sum(len(m.get("content") or "") for m in body.get("messages", []))
        prompt = -(-chars // 4)
        usage = {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}
        with self.lock:
            self.tokens[user] = self.tokens.get(user, 0) + prompt + out
        model = body.get("model", "fake")
        if not body.get("stream"):
            time.sleep(delay)
            payload = json.dumps(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": "ok " * out}, "finish_reason": "stop"}
                    ],
                    "usage": usage,
                }
            ).encode()
            h.send_response(200)
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
            return
        h.send_response(200)
        h.send_header("content-type", "text/event-stream")
        h.end_headers()
        chunks = int(fake.get("chunks", 3))
        for i in range(chunks):
            chunk = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "delta": {"content": f"part{i} "}, "finish_reason": None}],
            }
            h.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            h.wfile.flush()
            time.sleep(delay)
        if (body.get("stream_options") or {}).get("include_usage"):
            last = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [],
                "usage": usage,
            }
            h.wfile.write(b"data: " + json.dumps(last).encode() + b"\n\n")
        h.wfile.write(b"data: [DONE]\n\n")
        h.wfile.flush()
        with self.lock:
            self.completed_streams += 1

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# API key -> (user, tier), as in the reference FastAPI middleware.
USERS = {"key_free_001": ("user_001", "free"), "key_pro_001": ("user_002", "pro"), "key_prm_001": ("user_003", "premium")}


def gateway(upstream_url: str, **middleware: Any) -> FastAPI:
    """A FastAPI app that relays /v1/chat/completions to the upstream (JSON and
    SSE alike), with the Tollgate middleware in front. A degraded call (a
    fallback plan admitted it) is answered by the cheap model."""
    app = FastAPI()
    http = httpx.AsyncClient(base_url=upstream_url, timeout=30)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        decision = decision_of(request)
        subject = getattr(request.state, "tollgate_subject", None)
        user = subject.info.get("user", "?") if subject is not None else "?"
        if decision is not None and decision.degraded:
            body["model"] = "cheap-model"
        if body.get("stream"):
            body.setdefault("stream_options", {})["include_usage"] = True
        req = http.build_request(
            "POST", "/chat/completions", json=body, headers={"x-user": str(user)}
        )
        upstream = await http.send(req, stream=True)

        async def relay() -> Any:
            try:
                async for chunk in upstream.aiter_bytes():
                    yield chunk
            finally:
                await upstream.aclose()

        return StreamingResponse(
            relay(), status_code=upstream.status_code, media_type=upstream.headers.get("content-type")
        )

    @app.get("/health")
    async def health() -> Any:
        return JSONResponse({"ok": True})

    app.add_middleware(TollgateMiddleware, paths=("/v1/",), **middleware)
    return app


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run `app` under uvicorn in a thread on a free port; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", loop="asyncio")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def wait_until(predicate: Any, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def run(coro: Any) -> Any:
    return asyncio.new_event_loop().run_until_complete(coro)


def opt(d: Optional[dict], **kw: Any) -> dict:
    out = dict(d or {})
    out.update(kw)
    return out
