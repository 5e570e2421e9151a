"""`AsyncLimiter`: the asyncio client (over `redis.asyncio.Redis` or
`redis.asyncio.cluster.RedisCluster`). Same methods as `Limiter`, awaited."""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from . import _protocol as p
from ._transport import AsyncTransport
from ._types import CreditBlock, Decision, Deduction, Refund, Release, Usage
from .errors import Denied
from .limiter import heartbeat_interval_ms, lease_ttl_ms, new_request_id

Key = Union[str, bytes]


class AsyncCredits:
    """Prepaid credits (`RL.CREDITS.*`): `limiter.credits`."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def grant(
        self,
        key: Key,
        amount: int,
        *,
        ttl_ms: Optional[int] = None,
        expire_at_ms: Optional[int] = None,
        id: Optional[str] = None,
    ) -> int:
        args: List[Any] = ["RL.CREDITS.GRANT", key, amount]
        if ttl_ms is not None:
            args.extend(("TTL", ttl_ms))
        if expire_at_ms is not None:
            args.extend(("EXPIREAT", expire_at_ms))
        if id is not None:
            args.extend(("ID", id))
        return p.as_int(await self._t.keyed(key, args, idempotent=id is not None))

    async def deduct(
        self, key: Key, amount: int, *, partial: bool = False, id: Optional[str] = None
    ) -> Deduction:
        args: List[Any] = ["RL.CREDITS.DEDUCT", key, amount]
        if partial:
            args.append("PARTIAL")
        if id is not None:
            args.extend(("ID", id))
        return Deduction(*p.parse_pair(await self._t.keyed(key, args, idempotent=id is not None)))

    async def refund(self, key: Key, id: str) -> Refund:
        reply = await self._t.keyed(key, ["RL.CREDITS.REFUND", key, id], idempotent=True)
        return Refund(*p.parse_pair(reply))

    async def balance(self, key: Key) -> int:
        return p.as_int(await self._t.keyed(key, ["RL.CREDITS.BALANCE", key], idempotent=True))

    async def has(self, key: Key, minimum: int) -> bool:
        reply = await self._t.keyed(key, ["RL.CREDITS.BALANCE", key, "MIN", minimum], idempotent=True)
        return bool(p.as_int(reply))

    async def blocks(self, key: Key) -> List[CreditBlock]:
        return p.parse_blocks(await self._t.keyed(key, ["RL.CREDITS.BLOCKS", key], idempotent=True))

    async def revoke(self, key: Key, block_id: str) -> int:
        reply = await self._t.keyed(key, ["RL.CREDITS.REVOKE", key, block_id], idempotent=True)
        return p.as_int(reply)


class AsyncPlans:
    """Plan administration: `limiter.plans` (changes go to every primary)."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def set(self, plan: str, limits: Mapping[str, str]) -> int:
        args: List[Any] = ["RL.PLAN.SET", plan]
        for name, spec in limits.items():
            args.extend((name, spec))
        return p.as_int((await self._t.every_primary(args))[0])

    async def get(self, plan: str) -> Dict[str, str]:
        return p.parse_plan(await self._t.any(["RL.PLAN.GET", plan]))

    async def delete(self, plan: str, *limits: str) -> int:
        return p.as_int((await self._t.every_primary(["RL.PLAN.DEL", plan, *limits]))[0])

    async def list(self) -> List[str]:
        return [str(p.text(x)) for x in await self._t.any(["RL.PLAN.LIST"])]

    async def default(self, plan: Optional[str] = None) -> Optional[str]:
        if plan is None:
            return p.opt_text(await self._t.any(["RL.PLAN.DEFAULT"]))
        await self._t.every_primary(["RL.PLAN.DEFAULT", plan])
        return plan

    async def apply(
        self, plans: Mapping[str, Mapping[str, str]], default: Optional[str] = None
    ) -> None:
        for name, limits in plans.items():
            await self.set(name, limits)
        if default is not None:
            await self.default(default)

    async def assign(self, key: Key, plan: str) -> None:
        await self._t.keyed(key, ["RL.ASSIGN", key, plan], idempotent=True)

    async def assigned(self, key: Key) -> Optional[str]:
        return p.opt_text(await self._t.keyed(key, ["RL.ASSIGN", key], idempotent=True))

    async def unassign(self, key: Key) -> bool:
        return bool(p.as_int(await self._t.keyed(key, ["RL.UNASSIGN", key], idempotent=True)))


class AsyncLimiter:
    """Tollgate over an asyncio redis-py client (see `Limiter`).

    `client` is a `redis.asyncio.Redis` or `RedisCluster`, or a function that
    makes one when the limiter is first used (inside the running event loop:
    what `from_url` does, and what a client shared with a server's event loop
    needs on Python 3.9)."""

    def __init__(self, client: Any) -> None:
        self._t = AsyncTransport(client)
        self.credits = AsyncCredits(self._t)
        self.plans = AsyncPlans(self._t)
        self._background: "set[asyncio.Future[None]]" = set()

    @classmethod
    def from_url(cls, url: str, *, cluster: bool = False, **kwargs: Any) -> "AsyncLimiter":
        """A limiter whose client (`redis.asyncio.from_url`, or
        `RedisCluster.from_url` with `cluster=True`) is made at first use, in
        the event loop that uses it; `close()` closes it."""

        def make() -> Any:
            if cluster:
                from redis.asyncio.cluster import RedisCluster

                return RedisCluster.from_url(url, **kwargs)
            import redis.asyncio as aredis

            return aredis.from_url(url, **kwargs)

        return cls(make)

    @property
    def client(self) -> Any:
        """The redis-py client (made now, if the limiter was given a factory)."""
        return self._t.client

    async def acquire(
        self,
        subject: Key,
        plan: str,
        *,
        requests: int = 1,
        costs: Optional[Mapping[str, int]] = None,
        endpoint: Optional[str] = None,
        id: Optional[str] = None,
        ttl_ms: Optional[int] = None,
        wait_ms: Optional[int] = None,
        priority: Optional[int] = None,
        credits: Optional[Tuple[Key, int]] = None,
        also: Optional[Sequence[Tuple[Key, str]]] = None,
    ) -> Decision:
        args = p.decision_args(
            "RL.ACQUIRE", subject, plan, requests=requests, costs=costs, endpoint=endpoint,
            id=id, ttl_ms=ttl_ms, wait_ms=wait_ms, priority=priority, credits=credits, also=also,
        )
        if wait_ms:
            reply = await self._t.keyed_wait(subject, args, idempotent=id is not None)
        else:
            reply = await self._t.keyed(subject, args, idempotent=id is not None)
        return p.parse_decision(reply, subject, plan)

    async def peek(
        self,
        subject: Key,
        plan: str,
        *,
        requests: int = 1,
        costs: Optional[Mapping[str, int]] = None,
        endpoint: Optional[str] = None,
        also: Optional[Sequence[Tuple[Key, str]]] = None,
    ) -> Decision:
        args = p.decision_args(
            "RL.PEEK", subject, plan, requests=requests, costs=costs, endpoint=endpoint, also=also
        )
        return p.parse_decision(await self._t.keyed(subject, args, idempotent=True), subject, plan)

    async def usage(self, subject: Key, plan: str, *, endpoint: Optional[str] = None) -> Usage:
        args: List[Any] = ["RL.USAGE", subject, plan]
        if endpoint is not None:
            args.extend(("ENDPOINT", endpoint))
        return p.parse_usage(await self._t.keyed(subject, args, idempotent=True), subject, plan)

    async def release(
        self, subject: Key, id: str, costs: Optional[Mapping[str, int]] = None
    ) -> Release:
        return p.parse_release(await self._t.keyed(subject, p.release_args(subject, id, costs), idempotent=True))

    async def touch(self, subject: Key, id: str, ttl_ms: int) -> bool:
        reply = await self._t.keyed(subject, ["RL.TOUCH", subject, id, ttl_ms], idempotent=True)
        return bool(p.as_int(reply))

    def reserve(
        self,
        subject: Key,
        plan: str,
        *,
        heartbeat_ms: Optional[int] = None,
        **acquire_kwargs: Any,
    ) -> "AsyncReservation":
        """An async context manager around `acquire` ... `release`:

            async with limiter.reserve("user:42", "pro", costs={"token": 1200}) as r:
                reply = await call_the_model()
                r.settle(token=reply.usage.total_tokens)  # or await it for the Release

        Raises `Denied` when not admitted. Leaving the block without `settle`
        -- an exception, or cancellation (a client that disconnected from a
        stream) included -- releases the lease and keeps the estimate charged.
        `RL.TOUCH` keeps long jobs alive every `heartbeat_ms` (default: a third
        of the lease's time to live; 0 turns it off)."""
        return AsyncReservation(self, subject, plan, heartbeat_ms, acquire_kwargs)

    async def acquire_or_forget(self, subject: Key, plan: str, **kwargs: Any) -> Decision:
        """`acquire` with an `id`, which is released if the call is cancelled
        before its reply arrives (the server may have admitted it: a client
        that gave up while queued in WAIT must not hold a lease until it
        expires)."""
        request_id = kwargs.get("id")
        if request_id is None:
            raise ValueError("acquire_or_forget needs an id")
        try:
            return await self.acquire(subject, plan, **kwargs)
        except asyncio.CancelledError:
            task = asyncio.ensure_future(self._forget(subject, request_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            raise

    async def _forget(self, subject: Key, request_id: str) -> None:
        try:
            await self.release(subject, request_id)
        except Exception:  # the lease expires by itself
            pass

    async def close(self) -> None:
        """Close the WAIT connections this limiter opened, and the client if
        the limiter made it (`from_url`, a factory); a client it was given is
        left open."""
        await self._t.close()
        if self._t.made:
            await self._t.client.aclose()


class AsyncReservation:
    """An admitted call whose estimate is settled on exit (see
    `AsyncLimiter.reserve`)."""

    def __init__(
        self,
        limiter: AsyncLimiter,
        subject: Key,
        plan: str,
        heartbeat_ms: Optional[int],
        acquire_kwargs: Dict[str, Any],
    ) -> None:
        self.limiter = limiter
        self.subject = subject
        self.plan = plan
        self._kwargs = acquire_kwargs
        self._heartbeat_ms = heartbeat_ms
        self.decision: Optional[Decision] = None
        self.release_result: Optional[Release] = None
        self._task: Optional["asyncio.Task[None]"] = None
        self._finishing: Optional["asyncio.Future[Release]"] = None

    @property
    def id(self) -> str:
        assert self.decision is not None and self.decision.id is not None
        return self.decision.id

    async def __aenter__(self) -> "AsyncReservation":
        kwargs = dict(self._kwargs)
        if kwargs.get("id") is None:
            kwargs["id"] = new_request_id()
        decision = await self.limiter.acquire_or_forget(self.subject, self.plan, **kwargs)
        if not decision.allowed:
            raise Denied(decision)
        self.decision = decision
        ttl = lease_ttl_ms(decision, kwargs.get("ttl_ms"))
        interval = heartbeat_interval_ms(ttl, self._heartbeat_ms)
        if interval:
            self._task = asyncio.ensure_future(self._beat(interval, ttl))
        return self

    async def _beat(self, interval_ms: int, ttl_ms: int) -> None:
        while True:
            await asyncio.sleep(interval_ms / 1000.0)
            try:
                if not await self.limiter.touch(self.subject, self.id, ttl_ms):
                    return
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed heartbeat is retried at the next beat
                continue

    def settle(self, costs: Optional[Mapping[str, int]] = None, **units: int) -> "asyncio.Future[Release]":
        """Settle on the actual amounts (`r.settle(token=310)` or
        `r.settle({"usd_micros": 2630})`) and free the lease. The release starts
        at once; await the result for the `Release`, or leave it to the end of
        the `async with` block, which waits for it."""
        actual = dict(costs or {})
        actual.update(units)
        return self._start(actual)

    def release(self) -> "asyncio.Future[Release]":
        """Free the lease now, keeping what was charged (awaitable)."""
        return self._start(None)

    def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _start(self, costs: Optional[Mapping[str, int]]) -> "asyncio.Future[Release]":
        if self._finishing is None:
            self._stop()
            self._finishing = asyncio.ensure_future(self._finish(costs))
        return self._finishing

    async def _finish(self, costs: Optional[Mapping[str, int]]) -> Release:
        self.release_result = await self.limiter.release(self.subject, self.id, costs)
        return self.release_result

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._stop()
        if self.decision is None:
            return
        # Cancelled (e.g. the HTTP client went away) or not, the release must
        # reach the server: it runs shielded from the cancellation.
        await asyncio.shield(self._start(None))
