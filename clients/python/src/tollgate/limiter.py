"""`Limiter`: the synchronous client (over `redis.Redis` or
`redis.cluster.RedisCluster`)."""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from . import _protocol as p
from ._transport import SyncTransport
from ._types import CreditBlock, Decision, Deduction, Refund, Release, Usage
from .errors import Denied

Key = Union[str, bytes]


class Credits:
    """Prepaid credits (`RL.CREDITS.*`) on a credits key. Reached as
    `limiter.credits`."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    def grant(
        self,
        key: Key,
        amount: int,
        *,
        ttl_ms: Optional[int] = None,
        expire_at_ms: Optional[int] = None,
        id: Optional[str] = None,
    ) -> int:
        """Add a block of `amount` (expiring after `ttl_ms` or at `expire_at_ms`,
        else never); an `id` makes a retried grant change nothing. Returns the
        balance."""
        args: List[Any] = ["RL.CREDITS.GRANT", key, amount]
        if ttl_ms is not None:
            args.extend(("TTL", ttl_ms))
        if expire_at_ms is not None:
            args.extend(("EXPIREAT", expire_at_ms))
        if id is not None:
            args.extend(("ID", id))
        return p.as_int(self._t.keyed(key, args, idempotent=id is not None))

    def deduct(
        self, key: Key, amount: int, *, partial: bool = False, id: Optional[str] = None
    ) -> Deduction:
        """Take `amount` (all or nothing unless `partial`)."""
        args: List[Any] = ["RL.CREDITS.DEDUCT", key, amount]
        if partial:
            args.append("PARTIAL")
        if id is not None:
            args.extend(("ID", id))
        return Deduction(*p.parse_pair(self._t.keyed(key, args, idempotent=id is not None)))

    def refund(self, key: Key, id: str) -> Refund:
        """Return a deduction made with `id` (once)."""
        return Refund(*p.parse_pair(self._t.keyed(key, ["RL.CREDITS.REFUND", key, id], idempotent=True)))

    def balance(self, key: Key) -> int:
        return p.as_int(self._t.keyed(key, ["RL.CREDITS.BALANCE", key], idempotent=True))

    def has(self, key: Key, minimum: int) -> bool:
        """True if the balance is at least `minimum` (`HasMinBalance`)."""
        reply = self._t.keyed(key, ["RL.CREDITS.BALANCE", key, "MIN", minimum], idempotent=True)
        return bool(p.as_int(reply))

    def blocks(self, key: Key) -> List[CreditBlock]:
        return p.parse_blocks(self._t.keyed(key, ["RL.CREDITS.BLOCKS", key], idempotent=True))

    def revoke(self, key: Key, block_id: str) -> int:
        """Remove a block; returns what it still held."""
        return p.as_int(self._t.keyed(key, ["RL.CREDITS.REVOKE", key, block_id], idempotent=True))


class Plans:
    """Plan administration (`RL.PLAN.*`, `RL.ASSIGN`). In a cluster, changes go
    to every primary. Reached as `limiter.plans`."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    def set(self, plan: str, limits: Mapping[str, str]) -> int:
        """Set fields of `plan` (`{"rpm": "sliding 60/1m", ...}`); returns the
        number of fields added (on the first primary)."""
        args: List[Any] = ["RL.PLAN.SET", plan]
        for name, spec in limits.items():
            args.extend((name, spec))
        return p.as_int(self._t.every_primary(args)[0])

    def get(self, plan: str) -> Dict[str, str]:
        return p.parse_plan(self._t.any(["RL.PLAN.GET", plan]))

    def delete(self, plan: str, *limits: str) -> int:
        return p.as_int(self._t.every_primary(["RL.PLAN.DEL", plan, *limits])[0])

    def list(self) -> List[str]:
        return [str(p.text(x)) for x in self._t.any(["RL.PLAN.LIST"])]

    def default(self, plan: Optional[str] = None) -> Optional[str]:
        """Set the default plan (with `plan`), or show it."""
        if plan is None:
            return p.opt_text(self._t.any(["RL.PLAN.DEFAULT"]))
        self._t.every_primary(["RL.PLAN.DEFAULT", plan])
        return plan

    def apply(self, plans: Mapping[str, Mapping[str, str]], default: Optional[str] = None) -> None:
        """Set several plans (the `plans` object of a plans file) and the default."""
        for name, limits in plans.items():
            self.set(name, limits)
        if default is not None:
            self.default(default)

    def assign(self, key: Key, plan: str) -> None:
        self._t.keyed(key, ["RL.ASSIGN", key, plan], idempotent=True)

    def assigned(self, key: Key) -> Optional[str]:
        return p.opt_text(self._t.keyed(key, ["RL.ASSIGN", key], idempotent=True))

    def unassign(self, key: Key) -> bool:
        return bool(p.as_int(self._t.keyed(key, ["RL.UNASSIGN", key], idempotent=True)))


class Limiter:
    """Tollgate over a synchronous redis-py client.

        limiter = Limiter(redis.Redis(port=6479))
        d = limiter.acquire("user:42", "pro", costs={"token": 1200}, id="req-1")
        if not d.allowed: ...  # d.headers(), d.retry_after
        limiter.release("user:42", "req-1", costs={"token": 310})

    Works the same over RESP2 and RESP3 and with or without
    `decode_responses`; over `RedisCluster` every call goes to the node that owns
    the key in one round trip.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self._t = SyncTransport(client)
        self.credits = Credits(self._t)
        self.plans = Plans(self._t)

    def acquire(
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
        """`RL.ACQUIRE`: admit and charge the call if every limit (of every
        `also` pair, and the credits) admits it; else charge nothing."""
        args = p.decision_args(
            "RL.ACQUIRE", subject, plan, requests=requests, costs=costs, endpoint=endpoint,
            id=id, ttl_ms=ttl_ms, wait_ms=wait_ms, priority=priority, credits=credits, also=also,
        )
        if wait_ms:
            reply = self._t.keyed_wait(subject, args, idempotent=id is not None)
        else:
            reply = self._t.keyed(subject, args, idempotent=id is not None)
        return p.parse_decision(reply, subject, plan)

    def peek(
        self,
        subject: Key,
        plan: str,
        *,
        requests: int = 1,
        costs: Optional[Mapping[str, int]] = None,
        endpoint: Optional[str] = None,
        also: Optional[Sequence[Tuple[Key, str]]] = None,
    ) -> Decision:
        """`RL.PEEK`: what `acquire` would answer, charging nothing."""
        args = p.decision_args(
            "RL.PEEK", subject, plan, requests=requests, costs=costs, endpoint=endpoint, also=also
        )
        return p.parse_decision(self._t.keyed(subject, args, idempotent=True), subject, plan)

    def usage(self, subject: Key, plan: str, *, endpoint: Optional[str] = None) -> Usage:
        """`RL.USAGE`: how the subject stands now (`GetRateLimitInfo`)."""
        args: List[Any] = ["RL.USAGE", subject, plan]
        if endpoint is not None:
            args.extend(("ENDPOINT", endpoint))
        return p.parse_usage(self._t.keyed(subject, args, idempotent=True), subject, plan)

    def release(
        self, subject: Key, id: str, costs: Optional[Mapping[str, int]] = None
    ) -> Release:
        """`RL.RELEASE`: end request `id`, settling each unit of `costs` on the
        actual amount (refund or overrun). Harmless for an unknown id."""
        return p.parse_release(self._t.keyed(subject, p.release_args(subject, id, costs), idempotent=True))

    def touch(self, subject: Key, id: str, ttl_ms: int) -> bool:
        """`RL.TOUCH`: extend a live lease; False if it is gone."""
        return bool(p.as_int(self._t.keyed(subject, ["RL.TOUCH", subject, id, ttl_ms], idempotent=True)))

    def reserve(
        self,
        subject: Key,
        plan: str,
        *,
        heartbeat_ms: Optional[int] = None,
        **acquire_kwargs: Any,
    ) -> "Reservation":
        """A context manager around `acquire` ... `release`:

            with limiter.reserve("user:42", "pro", costs={"token": 1200}) as r:
                reply = call_the_model()
                r.settle(token=reply.usage.total_tokens)

        Raises `Denied` when not admitted. Leaving the block without `settle`
        (an exception included) releases the lease and keeps the estimate
        charged. Long jobs are kept alive with `RL.TOUCH` every `heartbeat_ms`
        (default: a third of the lease's time to live; 0 turns it off)."""
        return Reservation(self, subject, plan, heartbeat_ms, acquire_kwargs)

    def close(self) -> None:
        """Close the WAIT connections this limiter opened (not the client)."""
        self._t.close()


class Reservation:
    """An admitted call whose estimate is settled on exit (see
    `Limiter.reserve`)."""

    def __init__(
        self,
        limiter: Limiter,
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
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._done = False

    @property
    def id(self) -> str:
        assert self.decision is not None and self.decision.id is not None
        return self.decision.id

    def __enter__(self) -> "Reservation":
        kwargs = dict(self._kwargs)
        if kwargs.get("id") is None:
            kwargs["id"] = new_request_id()
        decision = self.limiter.acquire(self.subject, self.plan, **kwargs)
        if not decision.allowed:
            raise Denied(decision)
        self.decision = decision
        ttl = lease_ttl_ms(decision, kwargs.get("ttl_ms"))
        interval = heartbeat_interval_ms(ttl, self._heartbeat_ms)
        if interval:
            self._thread = threading.Thread(target=self._beat, args=(interval, ttl), daemon=True)
            self._thread.start()
        return self

    def _beat(self, interval_ms: int, ttl_ms: int) -> None:
        while not self._stop.wait(interval_ms / 1000.0):
            try:
                if not self.limiter.touch(self.subject, self.id, ttl_ms):
                    return
            except Exception:  # a failed heartbeat is retried at the next beat
                continue

    def settle(self, costs: Optional[Mapping[str, int]] = None, **units: int) -> Release:
        """Settle on the actual amounts (`r.settle(token=310)` or
        `r.settle({"usd_micros": 2630})`) and free the lease, now."""
        actual = dict(costs or {})
        actual.update(units)
        return self._finish(actual)

    def release(self) -> Release:
        """Free the lease now, keeping what was charged."""
        return self._finish(None)

    def _finish(self, costs: Optional[Mapping[str, int]]) -> Release:
        if self._done:
            assert self.release_result is not None
            return self.release_result
        self._done = True
        self._stop.set()
        self.release_result = self.limiter.release(self.subject, self.id, costs)
        return self.release_result

    def __exit__(self, *exc: Any) -> None:
        if self.decision is not None and not self._done:
            self._finish(None)
        self._stop.set()


def new_request_id() -> str:
    import uuid

    return uuid.uuid4().hex


def lease_ttl_ms(decision: Decision, ttl_ms: Optional[int]) -> int:
    """The lease's time to live: the `ttl_ms` asked for, else the longest
    concurrency limit's reset right after the acquire, else the server's
    default."""
    if ttl_ms:
        return ttl_ms
    resets = [lim.reset_ms for lim in decision.all_limits() if lim.kind == "concurrency"]
    return max(resets) if resets else DEFAULT_TTL_MS


def heartbeat_interval_ms(ttl_ms: int, heartbeat_ms: Optional[int]) -> int:
    """How often a lease of `ttl_ms` is touched: `heartbeat_ms` when given (0:
    never), else a third of the time to live."""
    return heartbeat_ms if heartbeat_ms is not None else max(ttl_ms // 3, 1)


#: The server's default lease/reservation time to live (`tollgate.default-ttl-ms`).
DEFAULT_TTL_MS = 60_000
