"""Command arguments and reply normalisation, shared by the sync and async clients.

Pure functions: no I/O. Replies arrive as RESP3 maps (dicts) or RESP2 flat
key/value arrays, as bytes or str depending on the client's `decode_responses`;
everything here turns them into the same dataclasses.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ._types import (
    CreditBlock,
    Decision,
    Deduction,
    Limit,
    Refund,
    Release,
    SubjectLimits,
    Usage,
)
from .errors import TollgateError

Key = Union[str, bytes]
Costs = Optional[Mapping[str, int]]
Pairs = Optional[Sequence[Tuple[Key, str]]]


_NAMES: Dict[Any, str] = {}
_NAMES_MAX = 4096


def name(value: Any) -> str:
    """A reply's field name or short string (a limit, unit or plan name) as
    str; the few distinct ones are decoded once and remembered."""
    try:
        return _NAMES[value]
    except KeyError:
        pass
    except TypeError:  # unhashable: not a name
        raise TollgateError(f"malformed reply: expected a name, got {value!r}") from None
    out = bytes(value).decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)
    if len(_NAMES) < _NAMES_MAX and isinstance(value, (bytes, str)):
        _NAMES[value] = out
    return out


def text(value: Any) -> Any:
    """bytes -> str (UTF-8, undecodable bytes replaced); anything else as is."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return value


def opt_text(value: Any) -> Optional[str]:
    if value is None or value == "" or value == b"":
        return None
    return name(value)


def as_map(reply: Any) -> Dict[str, Any]:
    """A RESP3 map or a RESP2 flat key/value array as a dict with str keys."""
    if isinstance(reply, dict):
        return {name(k): v for k, v in reply.items()}
    if isinstance(reply, (list, tuple)):
        if len(reply) % 2:
            raise TollgateError(f"malformed reply: odd-length key/value array {reply!r}")
        it = iter(reply)
        return {name(k): v for k, v in zip(it, it)}
    raise TollgateError(f"malformed reply: expected a map, got {reply!r}")


def as_int(value: Any, default: int = 0) -> int:
    if type(value) is int:
        return value
    if value is None:
        return default
    if isinstance(value, (bytes, bytearray, str)):
        return int(text(value))
    return int(value)


def parse_limit(reply: Any) -> Limit:
    m = as_map(reply)
    get = m.get
    unit_raw = get("unit")
    unit = "request" if unit_raw is None else name(unit_raw)
    kind_raw = get("kind")
    kind = None if kind_raw is None else name(kind_raw)
    if kind is None and unit == "lease":
        kind = "concurrency"
    window = get("window_ms")
    used = get("used")
    return Limit(
        name("" if get("name") is None else get("name")),
        unit,
        as_int(get("limit")),
        as_int(get("remaining")),
        as_int(get("reset_ms")),
        bool(as_int(get("warn"))),
        kind,
        None if window is None else as_int(window),
        None if used is None else as_int(used),
    )


def parse_limits(reply: Any) -> Tuple[Limit, ...]:
    if not reply:
        return ()
    return tuple(parse_limit(item) for item in reply)


def parse_decision(reply: Any, key: Key = "", requested_plan: str = "") -> Decision:
    m = as_map(reply)
    also = tuple(
        SubjectLimits(
            key=str(text(p.get("key", ""))),
            plan=str(text(p.get("plan", ""))),
            limits=parse_limits(p.get("limits")),
        )
        for p in (as_map(item) for item in (m.get("also") or ()))
    )
    credits = m.get("credits")
    return Decision(
        allowed=bool(as_int(m.get("allowed"))),
        retry_after_ms=as_int(m.get("retry_after_ms")),
        denied_by=opt_text(m.get("denied_by")),
        plan=name(m.get("plan", requested_plan)),
        limits=parse_limits(m.get("limits")),
        id=None if m.get("id") is None else str(text(m["id"])),
        credits=None if credits is None else as_int(credits),
        denied_key=opt_text(m.get("denied_key")),
        also=also,
        shadow_denied_by=opt_text(m.get("shadow_denied_by")),
        key=key if isinstance(key, str) else str(text(key)),
        requested_plan=requested_plan,
    )


def parse_usage(reply: Any, key: Key, plan: str) -> Usage:
    if isinstance(reply, (list, tuple)) and reply and not isinstance(
        reply[0], (bytes, str)
    ):
        # A bare array of limits.
        return Usage(key=str(text(key)), plan=plan, limits=parse_limits(reply))
    m = as_map(reply)
    return Usage(
        key=str(text(key)),
        plan=str(text(m.get("plan", plan))),
        limits=parse_limits(m.get("limits")),
    )


def parse_release(reply: Any) -> Release:
    m = as_map(reply)
    plan = m.get("plan")
    return Release(
        released=bool(as_int(m.get("released"))),
        plan=opt_text(plan),
        limits=parse_limits(m.get("limits")),
        reason=opt_text(m.get("reason")),
    )


def parse_pair(reply: Any) -> Tuple[int, int]:
    if not isinstance(reply, (list, tuple)) or len(reply) != 2:
        raise TollgateError(f"malformed reply: expected two integers, got {reply!r}")
    return as_int(reply[0]), as_int(reply[1])


def parse_blocks(reply: Any) -> List[CreditBlock]:
    out = []
    for item in reply or ():
        m = as_map(item)
        expires = as_int(m.get("expires_at"), -1)
        out.append(
            CreditBlock(
                id=str(text(m.get("id", ""))),
                left=as_int(m.get("left")),
                granted=as_int(m.get("granted")),
                expires_at_ms=None if expires < 0 else expires,
            )
        )
    return out


def parse_plan(reply: Any) -> Dict[str, str]:
    return {str(k): str(text(v)) for k, v in as_map(reply or []).items()}


def _amount(name: str, n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int, got {n!r}")
    if n < 0:
        raise ValueError(f"{name} must be non-negative, got {n}")
    return n


def decision_args(
    command: str,
    key: Key,
    plan: str,
    *,
    requests: int = 1,
    costs: Costs = None,
    endpoint: Optional[str] = None,
    id: Optional[str] = None,
    ttl_ms: Optional[int] = None,
    wait_ms: Optional[int] = None,
    priority: Optional[int] = None,
    credits: Optional[Tuple[Key, int]] = None,
    also: Pairs = None,
) -> List[Any]:
    """Arguments of `RL.ACQUIRE` / `RL.PEEK` in the SPEC's order."""
    args: List[Any] = [command, key, plan]
    cost_items = list((costs or {}).items())
    if any(unit == "request" for unit, _ in cost_items):
        if requests != 1:
            raise ValueError("give the request cost once: requests= or costs['request']")
    elif requests != 1:
        args.append(_amount("requests", requests))
    if cost_items:
        args.append("COST")
        for unit, n in cost_items:
            args.extend((unit, _amount(f"cost of {unit!r}", n)))
    if endpoint is not None:
        args.extend(("ENDPOINT", endpoint))
    if id is not None:
        args.extend(("ID", id))
    if ttl_ms is not None:
        args.extend(("TTL", _amount("ttl_ms", ttl_ms)))
    if wait_ms is not None:
        args.extend(("WAIT", _amount("wait_ms", wait_ms)))
        if priority is not None:
            args.extend(("PRIORITY", int(priority)))
    elif priority is not None:
        raise ValueError("priority only applies with wait_ms")
    if credits is not None:
        ckey, n = credits
        args.extend(("CREDITS", ckey, _amount("credits amount", n)))
    if also:
        args.extend(("ALSO", len(also)))
        for akey, aplan in also:
            args.extend((akey, aplan))
    return args


def release_args(key: Key, id: str, costs: Costs = None) -> List[Any]:
    args: List[Any] = ["RL.RELEASE", key, id]
    if costs:
        args.append("COST")
        for unit, n in costs.items():
            args.extend((unit, _amount(f"cost of {unit!r}", n)))
    return args
