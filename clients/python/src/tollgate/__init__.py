"""Tollgate for Python: per-user, per-tier, per-unit limits for expensive APIs,
decided atomically inside Redis by the Tollgate module.

    import redis
    from tollgate import Limiter

    limiter = Limiter(redis.Redis(port=6479))
    d = limiter.acquire("user:42", "pro", costs={"token": 1200}, id="req-1")
    print(d.allowed, d.headers())

`AsyncLimiter` is the asyncio twin; `tollgate.asgi.TollgateMiddleware` puts it
in front of a Starlette/FastAPI app.
"""

from ._types import (
    CreditBlock,
    Decision,
    Deduction,
    Limit,
    Refund,
    Release,
    Subject,
    SubjectLimits,
    Usage,
)
from .aio import AsyncLimiter, AsyncReservation
from .errors import Denied, TollgateError
from .headers import decision_headers, openai_duration
from .limiter import Limiter, Reservation

__all__ = [
    "AsyncLimiter",
    "AsyncReservation",
    "CreditBlock",
    "Decision",
    "Deduction",
    "Denied",
    "Limit",
    "Limiter",
    "Refund",
    "Release",
    "Reservation",
    "Subject",
    "SubjectLimits",
    "TollgateError",
    "Usage",
    "decision_headers",
    "openai_duration",
]

__version__ = "0.1.0"
