"""The results of Tollgate calls, as plain frozen dataclasses.

Every reply is normalised to these types, so a result is identical whether the
connection speaks RESP2 (flat key/value arrays) or RESP3 (maps), and whether the
client decodes responses or not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

#: The kinds of limit a plan can hold (SPEC: `fixed`, `sliding`, `bucket`,
#: `concurrency`, `cap`).
KINDS = ("fixed", "sliding", "bucket", "concurrency", "cap")


@dataclass(frozen=True)
class Limit:
    """One limit of a plan as it stands after (or, for `peek`, as it would stand
    after) the call.

    `kind` and `window_ms` come from the server; a server that predates them
    leaves `window_ms` as None and `kind` inferred from the unit
    (`lease` -> `concurrency`, else None).
    """

    name: str
    unit: str
    limit: int
    remaining: int
    reset_ms: int
    warn: bool = False
    kind: Optional[str] = None
    window_ms: Optional[int] = None
    #: Only from `usage`: what is used now (concurrency: leases held).
    used: Optional[int] = None

    @property
    def reset(self) -> float:
        """Seconds until the limit is back to full with no further use."""
        return self.reset_ms / 1000.0

    @property
    def window(self) -> Optional[float]:
        """The window in seconds (0 for concurrency and cap), if the server says."""
        return None if self.window_ms is None else self.window_ms / 1000.0

    @property
    def is_rate(self) -> bool:
        """True for limits that count over time (fixed, sliding, bucket)."""
        if self.kind is not None:
            return self.kind in ("fixed", "sliding", "bucket")
        return self.unit != "lease"


@dataclass(frozen=True)
class SubjectLimits:
    """The limits of one extra `(key, plan)` pair of an `ALSO` call."""

    key: str
    plan: str
    limits: Tuple[Limit, ...] = ()


@dataclass(frozen=True)
class Decision:
    """What `RL.ACQUIRE` / `RL.PEEK` decided.

    `retry_after_ms` is 0 when allowed, the wait after which the same call would
    fit when denied, and -1 when it never can under this plan (`never`).
    """

    allowed: bool
    retry_after_ms: int
    denied_by: Optional[str]
    plan: str
    limits: Tuple[Limit, ...] = ()
    id: Optional[str] = None
    credits: Optional[int] = None
    denied_key: Optional[str] = None
    also: Tuple[SubjectLimits, ...] = ()
    shadow_denied_by: Optional[str] = None
    #: The subject key the call was made on, and the plan asked for.
    key: str = ""
    requested_plan: str = ""

    def __bool__(self) -> bool:
        return self.allowed

    @property
    def never(self) -> bool:
        """True when this cost can never be admitted under the plan."""
        return not self.allowed and self.retry_after_ms < 0

    @property
    def retry_after(self) -> Optional[float]:
        """Seconds to wait before the same call would fit: 0.0 when allowed,
        None when it never can."""
        if self.retry_after_ms < 0:
            return None
        return self.retry_after_ms / 1000.0

    @property
    def degraded(self) -> bool:
        """True when a fallback plan admitted the call (`plan` differs from the
        plan asked for; `*` is resolved by the server, so it never counts)."""
        return (
            self.allowed
            and self.requested_plan not in ("", "*")
            and self.plan != self.requested_plan
        )

    @property
    def warn(self) -> bool:
        """True once any limit (of any pair) has crossed its warn threshold."""
        return any(lim.warn for lim in self.all_limits())

    def all_limits(self) -> Tuple[Limit, ...]:
        """The limits of the subject and of every `ALSO` pair, in call order."""
        out = list(self.limits)
        for pair in self.also:
            out.extend(pair.limits)
        return tuple(out)

    def limit(self, name: str) -> Optional[Limit]:
        """The subject's limit of that name, if the plan has it."""
        for lim in self.limits:
            if lim.name == name:
                return lim
        return None

    def headers(self) -> Dict[str, str]:
        """HTTP headers for this decision: see `tollgate.headers.decision_headers`."""
        from .headers import decision_headers

        return decision_headers(self)


@dataclass(frozen=True)
class Usage:
    """How a subject stands now (`RL.USAGE`), charging nothing."""

    key: str
    plan: str
    limits: Tuple[Limit, ...] = ()

    def limit(self, name: str) -> Optional[Limit]:
        for lim in self.limits:
            if lim.name == name:
                return lim
        return None


@dataclass(frozen=True)
class Release:
    """What `RL.RELEASE` did. `released` False is harmless; `reason` then says
    why (`unknown`, `expired`, `released`) on servers that report it."""

    released: bool
    plan: Optional[str] = None
    limits: Tuple[Limit, ...] = ()
    reason: Optional[str] = None

    def __bool__(self) -> bool:
        return self.released


@dataclass(frozen=True)
class Deduction:
    """`RL.CREDITS.DEDUCT`: what was taken and the balance after."""

    deducted: int
    balance: int


@dataclass(frozen=True)
class Refund:
    """`RL.CREDITS.REFUND`: what came back and the balance after."""

    refunded: int
    balance: int


@dataclass(frozen=True)
class CreditBlock:
    """One live credits block; `expires_at_ms` is None for a block that never
    expires."""

    id: str
    left: int
    granted: int
    expires_at_ms: Optional[int]


@dataclass(frozen=True)
class Subject:
    """Who a request is metered as, for the ASGI middleware and `reserve`.

    `also` adds hierarchy levels (org, team, key) decided in the same atomic
    step; `credits` is `(credits_key, amount)` deducted with the call.
    """

    key: str
    plan: str
    endpoint: Optional[str] = None
    also: Tuple[Tuple[str, str], ...] = ()
    credits: Optional[Tuple[str, int]] = None
    priority: Optional[int] = None
    #: Costs of this call, when the identify step knows them (e.g. one image):
    #: the middleware then skips its estimate and charges these.
    costs: Optional[Mapping[str, int]] = None
    #: Free-form data for the application (user id, tier, org), not sent.
    info: Mapping[str, object] = field(default_factory=dict)


def ceil_seconds(ms: int) -> int:
    """Milliseconds to whole seconds, rounded up (never below 0)."""
    if ms <= 0:
        return 0
    return int(math.ceil(ms / 1000.0))
