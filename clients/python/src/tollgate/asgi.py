"""ASGI middleware for Starlette and FastAPI: meter every request with Tollgate.

    app.add_middleware(TollgateMiddleware, limiter=AsyncLimiter(redis), identify=who)

For each HTTP request (under `paths`) it

1. reads the body (at most `max_body_bytes`, 1 MiB by default: a larger one is
   answered 413 with a JSON error before anything is charged; None: no bound)
   and asks `identify(request)` who pays: a `Subject` (key, plan,
   endpoint, `also` levels, credits, priority), or None to let the request
   through unmetered;
2. estimates the cost with `costs.estimate(body)` (default `LLMCosts`: prompt
   characters / 4 + `max_tokens`, in `token`; a `Subject` may carry its own
   `costs` instead) and calls `RL.ACQUIRE` with one
   request, those costs and a fresh request id;
3. on a denial answers with a JSON error (OpenAI's error shape): 429 with
   `Retry-After` when it can succeed later, 413 when the cost can never fit the
   plan, 403 when the plan does not allow the endpoint, 402 when the credits
   key is short; with `enforce="queue"` it first waits up to `queue_ms`
   (`WAIT`, with the subject's priority; a client that disconnects meanwhile
   leaves the queue, and whatever was granted is released); with `enforce="degrade"` a denied
   call is tried once more under `degrade_plan` (plans' own `fallback` chains
   work in every mode);
4. runs the app with the decision in `request.state.tollgate` (its `plan` says
   which plan admitted the call, `degraded` whether it was a fallback), adds
   the rate-limit headers (`Decision.headers()`) and `x-tollgate-plan` to the
   response, heartbeats the lease while the response runs;
5. settles when the response ends: on the upstream's `usage` found in a JSON
   body or in an SSE stream, plain or `gzip`/`deflate` (decompressed for
   reading only; the response goes out as it came) (`costs.actual(usage,
   body)`); without usage, an
   error response (status >= 400) refunds the estimate (and the credits) and a
   success keeps it;
   a client that disconnects mid-stream releases the lease at once (keeping
   the estimate unless usage was already seen).

When Redis cannot be reached or cannot serve now (`errors.is_unavailable`: a
lost connection, a timeout, no cluster node reachable, or an `OOM`, `READONLY`,
`CLUSTERDOWN`, `MASTERDOWN`, `TRYAGAIN`, `LOADING`, `BUSY` reply) it logs one line
(logger `tollgate`) and fails closed (503) by default, or open (`fail_open=True`:
the request goes through unmetered). Any other error reply of the server (an
unknown plan, say) is logged and answered 500, whatever `fail_open` says.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import sys
import uuid
import zlib
from typing import Any, Awaitable, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

from redis.exceptions import ResponseError as RedisResponseError

from ._types import Decision, Subject
from .aio import AsyncLimiter
from .costs import LLMCosts
from .errors import is_unavailable
from .headers import retry_hint_ms
from .limiter import heartbeat_interval_ms, lease_ttl_ms

logger = logging.getLogger("tollgate")
T = TypeVar("T")

Scope = Dict[str, Any]
Message = Dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Identify = Callable[[Any], Union[Optional[Subject], Awaitable[Optional[Subject]]]]
DegradePlan = Union[None, str, Mapping[str, str], Callable[[Subject], Optional[str]]]

MAX_USAGE_BODY = 8 * 1024 * 1024
#: The default bound of a request body the middleware reads (it holds it whole).
MAX_BODY_BYTES = 1024 * 1024


def decision_of(request: Any) -> Optional[Decision]:
    """The decision that admitted this request (`request.state.tollgate`)."""
    return getattr(getattr(request, "state", None), "tollgate", None)


class _Inflate:
    """Decompresses a `gzip` or `deflate` body as it streams past, in pieces of
    at most `PIECE` bytes (a small body must not inflate into gigabytes at
    once). `deflate` is zlib-wrapped (RFC 9110); raw deflate, which some
    servers send, is taken too."""

    PIECE = 64 * 1024

    def __init__(self) -> None:
        # MAX_WBITS | 32: a gzip or a zlib header, whichever comes.
        self.d = zlib.decompressobj(zlib.MAX_WBITS | 32)
        self.start: Optional[bytearray] = bytearray()  # the input until output comes

    def pieces(self, data: bytes) -> Iterator[bytes]:
        if self.start is not None:
            self.start += data
        while data:
            try:
                out = self.d.decompress(data, self.PIECE)
            except zlib.error:
                if self.start is None:
                    raise
                # No header at all: raw deflate, from the first byte.
                self.d, data, self.start = zlib.decompressobj(-zlib.MAX_WBITS), bytes(self.start), None
                continue
            if out:
                self.start = None
                yield out
            data = self.d.unconsumed_tail
            if self.d.eof and self.d.unused_data:  # a gzip body of several members
                data, self.d = self.d.unused_data, zlib.decompressobj(zlib.MAX_WBITS | 32)


class _Usage:
    """Finds `usage` in a response as it streams past: a JSON body, or SSE
    events (OpenAI's last chunk with `stream_options.include_usage`, Anthropic's
    `message_start` / `message_delta`); a `gzip` or `deflate` body is
    decompressed for this reading only. Other encodings are not read (the
    estimate stays charged)."""

    def __init__(self, content_type: str, content_encoding: str = "") -> None:
        encoding = content_encoding.strip().lower()
        readable = encoding in ("", "identity", "gzip", "x-gzip", "deflate")
        self.sse = readable and "text/event-stream" in content_type
        self.json = readable and "json" in content_type
        self.inflate = _Inflate() if encoding in ("gzip", "x-gzip", "deflate") else None
        self.buffer = bytearray()
        self.usage: Dict[str, Any] = {}
        self.model: Optional[str] = None

    def feed(self, chunk: bytes) -> None:
        if not (self.sse or self.json) or not chunk:
            return
        if self.inflate is None:
            self._feed_plain(chunk)
            return
        try:
            for piece in self.inflate.pieces(chunk):
                self._feed_plain(piece)
                if not (self.sse or self.json):
                    return
        except zlib.error:
            self._give_up()  # not what its header says: no usage from it

    def _give_up(self) -> None:
        self.sse = self.json = False
        self.buffer = bytearray()

    def _feed_plain(self, chunk: bytes) -> None:
        if self.sse:
            self.buffer += chunk
            while True:
                cut = self.buffer.find(b"\n")
                if cut < 0:
                    break
                line = bytes(self.buffer[:cut]).strip()
                del self.buffer[: cut + 1]
                if line.startswith(b"data:"):
                    self._event(line[5:].strip())
            if len(self.buffer) > MAX_USAGE_BODY:
                self.buffer = bytearray()  # one endless line: no usage event is that long
        elif self.json:
            if len(self.buffer) + len(chunk) > MAX_USAGE_BODY:
                self._give_up()  # too big to parse: and no need to inflate the rest
                return
            self.buffer += chunk

    def finish(self) -> None:
        if self.sse and self.buffer.strip().startswith(b"data:"):
            self._event(bytes(self.buffer).strip()[5:].strip())
        elif self.json and self.buffer:
            self._event(bytes(self.buffer))
        self.buffer = bytearray()

    def _event(self, data: bytes) -> None:
        if not data or data == b"[DONE]":
            return
        try:
            obj = json.loads(data)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        if isinstance(obj.get("model"), str):
            self.model = obj["model"]
        for holder in (obj, obj.get("message"), obj.get("response")):
            if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
                self.usage.update({k: v for k, v in holder["usage"].items() if v is not None})
                if isinstance(holder.get("model"), str):
                    self.model = holder["model"]

    def found(self) -> Optional[Dict[str, Any]]:
        if not self.usage:
            return None
        usage = dict(self.usage)
        if self.model and "model" not in usage:
            usage["model"] = self.model
        return usage


class TollgateMiddleware:
    """See the module documentation."""

    def __init__(
        self,
        app: Any,
        *,
        limiter: AsyncLimiter,
        identify: Identify,
        costs: Optional[Any] = None,
        enforce: str = "reject",
        queue_ms: int = 5000,
        degrade_plan: DegradePlan = None,
        fail_open: bool = False,
        paths: Sequence[str] = ("/",),
        ttl_ms: Optional[int] = None,
        heartbeat_ms: Optional[int] = None,
        redis_timeout_s: float = 5.0,
        max_body_bytes: Optional[int] = MAX_BODY_BYTES,
    ) -> None:
        if enforce not in ("reject", "queue", "degrade"):
            raise ValueError("enforce must be 'reject', 'queue' or 'degrade'")
        self.app = app
        self.limiter = limiter
        self.identify = identify
        self.costs = costs if costs is not None else LLMCosts()
        self.enforce = enforce
        self.queue_ms = queue_ms
        self.degrade_plan = degrade_plan
        self.fail_open = fail_open
        self.paths = tuple(paths)
        self.ttl_ms = ttl_ms
        self.heartbeat_ms = heartbeat_ms
        self.redis_timeout_s = redis_timeout_s
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith(self.paths):
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        if limit is not None and _declared_length(scope) > limit:
            await _body_too_large(send, limit)  # said up front: not even read
            return
        body, disconnected = await _read_body(receive, limit)
        if body is None:
            await _body_too_large(send, limit)
            return
        replay = _replay(body, receive, disconnected)
        from starlette.requests import Request

        request = Request(scope, replay)
        subject = self.identify(request)
        if inspect.isawaitable(subject):
            subject = await subject
        if subject is None:
            await self.app(scope, replay, send)
            return
        parsed = _json(body)
        costs = dict(subject.costs) if subject.costs is not None else self.costs.estimate(parsed)
        request_id = uuid.uuid4().hex
        try:
            if self.enforce == "queue" and not disconnected:
                decision = await self._decide_unless_gone(subject, costs, request_id, receive)
                if decision is None:
                    return  # the client left while queued: nothing is held, nothing to answer
            else:
                decision = await self._decide(subject, costs, request_id)
        except Exception as exc:
            if is_unavailable(exc):
                await self._unavailable(exc, scope, replay, send)
                return
            if not isinstance(exc, RedisResponseError):
                raise
            # The server refused the call (an unknown plan, a bad option): a
            # configuration error, never a reason to let the request through.
            logger.error("tollgate: the server refused the call for %s under plan %r: %s", subject.key, subject.plan, exc)
            await _error(send, 500, "limiter_error", "The rate limiter refused this request's configuration.", {})
            return
        if not decision.allowed:
            await _deny(send, decision)
            return
        await self._run(scope, replay, send, subject, decision, parsed, costs)

    async def _unavailable(self, exc: BaseException, scope: Scope, receive: Receive, send: Send) -> None:
        """Redis cannot be reached or cannot serve now: the `fail_open` policy."""
        what = f"{type(exc).__name__}: {exc}"
        if self.fail_open:
            logger.error("tollgate: Redis unreachable or not serving (%s): failing open, request not metered", what)
            await self.app(scope, receive, send)
            return
        logger.error("tollgate: Redis unreachable or not serving (%s): failing closed with 503", what)
        await _error(send, 503, "limiter_unavailable", "The rate limiter is unavailable; try again later.", {})

    async def _decide_unless_gone(
        self, subject: Subject, costs: Mapping[str, int], request_id: str, receive: Receive
    ) -> Optional[Decision]:
        """Queue mode: wait for admission, but give up (and release whatever
        the server may have granted) when the client disconnects meanwhile."""
        deciding = asyncio.ensure_future(self._decide(subject, costs, request_id))
        watching = asyncio.ensure_future(receive())
        try:
            await asyncio.wait({deciding, watching}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            deciding.cancel()
            raise
        finally:
            if not watching.done():
                watching.cancel()
        if deciding.done():
            return deciding.result()
        if watching.result().get("type") == "http.disconnect":
            deciding.cancel()
            return None
        return await deciding

    async def _decide(self, subject: Subject, costs: Mapping[str, int], request_id: str) -> Decision:
        kwargs: Dict[str, Any] = dict(
            costs=costs,
            endpoint=subject.endpoint,
            id=request_id,
            ttl_ms=self.ttl_ms,
            credits=subject.credits,
            also=list(subject.also) or None,
        )
        if self.enforce == "queue":
            kwargs["wait_ms"] = self.queue_ms
            kwargs["priority"] = subject.priority
        timeout = self.redis_timeout_s + (self.queue_ms / 1000.0 if self.enforce == "queue" else 0)
        acquire = self.limiter.acquire_or_forget
        decision = await _bounded(acquire(subject.key, subject.plan, **kwargs), timeout)
        if not decision.allowed and self.enforce == "degrade" and not decision.never:
            plan = self._degrade_plan(subject)
            if plan and plan != subject.plan and plan != decision.plan:
                second = await _bounded(acquire(subject.key, plan, **kwargs), timeout)
                if second.allowed:
                    decision = dataclasses.replace(second, requested_plan=subject.plan)
        return decision

    def _degrade_plan(self, subject: Subject) -> Optional[str]:
        d = self.degrade_plan
        if d is None or isinstance(d, str):
            return d
        if callable(d):
            return d(subject)
        return d.get(subject.plan)

    async def _run(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        subject: Subject,
        decision: Decision,
        body: Any,
        estimate: Mapping[str, int],
    ) -> None:
        scope.setdefault("state", {})
        scope["state"]["tollgate"] = decision
        scope["state"]["tollgate_subject"] = subject
        headers = _header_list(decision)
        state: Dict[str, Any] = {"status": 500, "usage": None, "ended": False}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                content_type = content_encoding = ""
                for k, v in message.get("headers", ()):
                    field = k.lower()
                    if field == b"content-type":
                        content_type = v.decode("latin-1").lower()
                    elif field == b"content-encoding":
                        content_encoding = v.decode("latin-1")
                state["usage"] = _Usage(content_type, content_encoding)
                message = dict(message)
                message["headers"] = list(message.get("headers", ())) + headers
            elif message["type"] == "http.response.body":
                tracker = state["usage"]
                if tracker is not None:
                    tracker.feed(message.get("body", b""))
                if not message.get("more_body", False):
                    state["ended"] = True
            await send(message)

        beat = self._heartbeat(subject, decision)
        failed = True
        try:
            await self.app(scope, receive, send_with_headers)
            failed = False
        finally:
            if beat is not None:
                beat.stop()
            settle = asyncio.ensure_future(self._settle(subject, decision, body, estimate, state, failed))
            try:
                await asyncio.shield(settle)
            except asyncio.CancelledError:
                # The request task was cancelled: the settlement still runs to
                # its end in the background.
                raise

    def _heartbeat(self, subject: Subject, decision: Decision) -> Optional["_Heartbeat"]:
        ttl = lease_ttl_ms(decision, self.ttl_ms)
        interval = heartbeat_interval_ms(ttl, self.heartbeat_ms)
        if not interval or decision.id is None:
            return None
        return _Heartbeat(self.limiter, subject.key, decision.id, interval, ttl)

    async def _settle(
        self,
        subject: Subject,
        decision: Decision,
        body: Any,
        estimate: Mapping[str, int],
        state: Dict[str, Any],
        failed: bool,
    ) -> None:
        if decision.id is None:
            return
        tracker = state["usage"]
        usage = None
        if tracker is not None:
            if state["ended"]:
                tracker.finish()
            usage = tracker.found()
        if usage is not None:
            actual: Optional[Mapping[str, int]] = self.costs.actual(usage, body)
        elif (failed or state["status"] >= 400) and not (tracker is not None and tracker.sse and not state["ended"]):
            actual = {unit: 0 for unit in estimate}  # nothing was served: refund
        else:
            actual = None  # served, usage unknown (or the client left): keep the estimate
        refund_credits = actual is not None and usage is None and subject.credits is not None
        try:
            await _bounded(self.limiter.release(subject.key, decision.id, actual), self.redis_timeout_s)
            if refund_credits:
                ckey = subject.credits[0]  # type: ignore[index]
                await _bounded(self.limiter.credits.refund(ckey, decision.id), self.redis_timeout_s)
        except Exception as exc:
            logger.error(
                "tollgate: settling %s on %s failed (%s): the lease expires by itself", decision.id, subject.key, exc
            )


class _Heartbeat:
    """`RL.TOUCH` every `interval_ms` while a response runs: a timer, and a task
    only when it fires (most requests end before the first beat)."""

    def __init__(self, limiter: AsyncLimiter, key: Any, request_id: str, interval_ms: int, ttl_ms: int) -> None:
        self.limiter = limiter
        self.key = key
        self.request_id = request_id
        self.interval_s = interval_ms / 1000.0
        self.ttl_ms = ttl_ms
        self.loop = asyncio.get_running_loop()
        self.task: Optional["asyncio.Future[None]"] = None
        self.stopped = False
        self.handle: Optional[asyncio.TimerHandle] = self.loop.call_later(self.interval_s, self._fire)

    def _fire(self) -> None:
        if not self.stopped:
            self.task = asyncio.ensure_future(self._touch())

    async def _touch(self) -> None:
        try:
            await _bounded(self.limiter.touch(self.key, self.request_id, self.ttl_ms), max(self.interval_s, 1.0))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a missed beat is retried at the next one
            logger.warning("tollgate: heartbeat of %s failed: %s", self.request_id, exc)
        self.task = None
        if not self.stopped:
            self.handle = self.loop.call_later(self.interval_s, self._fire)

    def stop(self) -> None:
        self.stopped = True
        if self.handle is not None:
            self.handle.cancel()
        if self.task is not None:
            self.task.cancel()


if sys.version_info >= (3, 11):

    async def _bounded(aw: Awaitable[T], seconds: float) -> T:
        """`aw`, or TimeoutError after `seconds` (no extra task on 3.11+)."""
        async with asyncio.timeout(seconds):
            return await aw

else:

    async def _bounded(aw: Awaitable[T], seconds: float) -> T:
        return await asyncio.wait_for(aw, seconds)


def _header_list(decision: Decision) -> List[Tuple[bytes, bytes]]:
    out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in decision.headers().items()]
    out.append((b"x-tollgate-plan", decision.plan.encode("utf-8")))
    return out


def status_of(decision: Decision) -> Tuple[int, str]:
    """The HTTP status and error type for a denial: 403 endpoint, 402 credits,
    413 never, else 429."""
    if decision.denied_by == "endpoint":
        return 403, "endpoint_not_allowed"
    if decision.denied_by == "credits":
        return 402, "insufficient_credits"
    if decision.never:
        return 413, "request_too_large"
    return 429, "rate_limit_exceeded"


async def _deny(send: Send, decision: Decision) -> None:
    status, kind = status_of(decision)
    retry_after_ms = retry_hint_ms(decision)  # the headers' hint, not a lease's whole TTL
    if status == 429:
        message = f"Rate limit reached: limit '{decision.denied_by}' of plan '{decision.plan}'. Retry after {retry_after_ms} ms."
    elif status == 413:
        message = f"This request can never fit limit '{decision.denied_by}' of plan '{decision.plan}'."
    elif status == 403:
        message = f"Plan '{decision.plan}' does not allow this endpoint."
    else:
        message = "Not enough credits for this request."
    extra = {
        "limit": decision.denied_by,
        "key": decision.denied_key,
        "plan": decision.plan,
        "retry_after_ms": retry_after_ms,
    }
    headers = _header_list(decision)
    if status != 429:
        headers.append((b"x-should-retry", b"false"))
    await _error(send, status, kind, message, extra, headers)


async def _error(
    send: Send,
    status: int,
    kind: str,
    message: str,
    extra: Mapping[str, Any],
    headers: Optional[List[Tuple[bytes, bytes]]] = None,
) -> None:
    payload = {"error": {"message": message, "type": kind, "code": kind, "param": None, **extra}}
    body = json.dumps(payload).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
            + (headers or []),
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive, limit: Optional[int]) -> Tuple[Optional[bytes], bool]:
    """The whole body and whether the client left; None for the body as soon as
    it grows past `limit` (the rest is not read)."""
    chunks: List[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), True
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            return None, False
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), False


def _declared_length(scope: Scope) -> int:
    """The request's Content-Length, or -1 when absent or not a number."""
    for k, v in scope.get("headers", ()):
        if k.lower() == b"content-length":
            try:
                return int(v)
            except ValueError:
                return -1
    return -1


async def _body_too_large(send: Send, limit: Optional[int]) -> None:
    message = f"The request body is larger than {limit} bytes."
    extra = {"max_body_bytes": limit}
    await _error(send, 413, "request_body_too_large", message, extra, [(b"x-should-retry", b"false")])


def _replay(body: bytes, receive: Receive, disconnected: bool) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            if disconnected:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _json(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None
