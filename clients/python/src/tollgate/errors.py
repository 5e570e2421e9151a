"""Exceptions raised by the tollgate client."""

from __future__ import annotations

from typing import TYPE_CHECKING

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
