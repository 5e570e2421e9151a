"""Exceptions raised by the tollgate client."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from redis import exceptions as rex

if TYPE_CHECKING:
    from ._types import Decision


class TollgateError(Exception):
    """A reply the client could not understand, or a misuse of the client.
    Errors the server answers (`ERR ...`) are raised as redis-py's
    `redis.exceptions.ResponseError`, unchanged."""


class Denied(TollgateError):
    """Raised by `reserve()` when the call is not admitted; `decision` says why
    and when to retry (`decision.headers()` has the HTTP headers)."""

    def __init__(self, decision: "Decision") -> None:
        self.decision = decision
        if decision.never:
            what = "can never be admitted"
        else:
            what = f"retry after {decision.retry_after_ms} ms"
        where = f" on {decision.denied_key}" if decision.denied_key else ""
        super().__init__(
            f"denied by {decision.denied_by!r}{where} under plan {decision.plan!r}: {what}"
        )


#: Codes of error replies that say the server cannot serve now (out of memory, a
#: replica, the cluster or its primary down, a slot moving, loading, a busy
#: script, too few replicas, a failed save), not that the call is wrong.
UNAVAILABLE_CODES = frozenset(
    {"OOM", "READONLY", "CLUSTERDOWN", "MASTERDOWN", "TRYAGAIN", "LOADING", "BUSY", "NOREPLICAS", "MISCONF"}
)

_UNAVAILABLE_TYPES = (
    rex.ConnectionError,  # LOADING (BusyLoadingError) and max clients too
    rex.TimeoutError,
    rex.RedisClusterException,  # no node reachable, a slot no node covers
    rex.ClusterError,  # CLUSTERDOWN, MASTERDOWN, retries used up
    rex.OutOfMemoryError,
    rex.ReadOnlyError,
    rex.TryAgainError,
    OSError,
    asyncio.TimeoutError,
)


def is_unavailable(exc: BaseException) -> bool:
    """True when `exc` says the limiter cannot be reached or cannot serve now
    (a policy matter: fail open or closed), False when the server refused the
    call itself (an unknown plan, a bad option: a configuration error)."""
    if isinstance(exc, _UNAVAILABLE_TYPES):
        return True
    if isinstance(exc, rex.ResponseError):
        # redis-py maps some codes to classes and strips them; the rest keep
        # the code as the message's first word (`BUSY Redis is busy ...`).
        code = getattr(exc, "status_code", None) or str(exc).split(" ", 1)[0]
        return code in UNAVAILABLE_CODES
    return False
