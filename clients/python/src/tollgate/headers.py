"""HTTP headers from a decision.

The rule for which limit feeds which header, when a plan has several:

* `x-ratelimit-{limit,remaining,reset}-requests`: of the rate limits (`fixed`,
  `sliding`, `bucket`) counting the unit `request`, the one with the least
  `remaining` (ties: the longer `reset_ms`) -- the one a client will hit first.
* `x-ratelimit-{limit,remaining,reset}-tokens`: the same among the rate limits
  counting `token`.
  Limits of every `ALSO` pair take part (an org's budget can be the tightest).
  The reset is in OpenAI's duration format (`1s`, `6m0s`, `20ms`, `1h2m3.5s`).
* `Retry-After` (whole seconds, rounded up) and `retry-after-ms` (exact, as the
  OpenAI SDKs read it): only on a denial that can succeed later; the decision's
  `retry_after_ms`, except for a denial by a `concurrency` limit: at most
  `CONCURRENCY_RETRY_HINT_MS` (1 s), since its `retry_after_ms` is when the
  oldest lease *expires* while leases are mostly released long before (a
  response ends), and an SDK would sleep the whole lease TTL.
* `RateLimit-Policy` / `RateLimit` (IETF draft-ietf-httpapi-ratelimit-headers):
  one item per limit of the subject's plan, except `cap`: `"rpm";q=60;w=60` and
  `"rpm";r=59;t=1`, `w` from `window_ms` (omitted when 0 or unknown), `t` the
  reset rounded up to seconds; `qu="concurrent-requests"` for concurrency and
  `qu="<unit>"` for units other than `request`. Limits of `ALSO` pairs are named
  `"<plan>.<limit>"`.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

from ._types import Decision, Limit, ceil_seconds


def openai_duration(ms: int) -> str:
    """Milliseconds in the duration format of OpenAI's `x-ratelimit-reset-*`
    headers (Go's `time.Duration` notation): `0s`, `20ms`, `1s`, `1.5s`,
    `6m0s`, `1h0m0s`."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    sec = str(seconds) if not millis else f"{seconds}.{millis:03d}".rstrip("0")
    if hours:
        return f"{hours}h{minutes}m{sec}s"
    if minutes:
        return f"{minutes}m{sec}s"
    return f"{sec}s"


#: The longest retry hint for a denial by a `concurrency` limit (see above).
CONCURRENCY_RETRY_HINT_MS = 1000


def _denying_limit(decision: Decision) -> Optional[Limit]:
    """The limit named by `denied_by`, on the key that denied (`denied_key`,
    with `ALSO`), if the reply lists it."""
    limits: Iterable[Limit] = decision.limits
    if decision.denied_key is not None and decision.denied_key != decision.key:
        pair = next((p for p in decision.also if p.key == decision.denied_key), None)
        limits = pair.limits if pair is not None else decision.all_limits()
    return next((lim for lim in limits if lim.name == decision.denied_by), None)


def retry_hint_ms(decision: Decision) -> int:
    """The wait a denied client is told (`Retry-After`): `retry_after_ms`, at
    most `CONCURRENCY_RETRY_HINT_MS` when a concurrency limit denied."""
    ms = decision.retry_after_ms
    if ms <= CONCURRENCY_RETRY_HINT_MS or decision.allowed:
        return ms
    lim = _denying_limit(decision)
    if lim is not None and (lim.kind == "concurrency" or (lim.kind is None and lim.unit == "lease")):
        return CONCURRENCY_RETRY_HINT_MS
    return ms


def tightest(limits: Iterable[Limit], unit: str) -> Optional[Limit]:
    """The rate limit counting `unit` with the least remaining (ties: longest
    reset), or None."""
    best: Optional[Limit] = None
    for lim in limits:
        if lim.unit != unit or not lim.is_rate:
            continue
        if (
            best is None
            or lim.remaining < best.remaining
            or (lim.remaining == best.remaining and lim.reset_ms > best.reset_ms)
        ):
            best = lim
    return best


_QUOTED: Dict[str, str] = {}


def _quote(name: str) -> str:
    """An RFC 8941 string (names repeat: each is quoted once)."""
    out = _QUOTED.get(name)
    if out is None:
        out = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if len(_QUOTED) < 4096:
            _QUOTED[name] = out
    return out


def _ietf_items(decision: Decision) -> List[Tuple[str, Limit]]:
    items = [(lim.name, lim) for lim in decision.limits]
    for pair in decision.also:
        items.extend((f"{pair.plan}.{lim.name}", lim) for lim in pair.limits)
    return [(name, lim) for name, lim in items if lim.kind != "cap"]


def decision_headers(
    decision: Decision, *, token_unit: str = "token", request_unit: str = "request"
) -> Dict[str, str]:
    """The headers for `decision` (see the module docs for the rule)."""
    out: Dict[str, str] = {}
    every = decision.all_limits()
    for suffix, unit in (("requests", request_unit), ("tokens", token_unit)):
        lim = tightest(every, unit)
        if lim is not None:
            out[f"x-ratelimit-limit-{suffix}"] = str(lim.limit)
            out[f"x-ratelimit-remaining-{suffix}"] = str(lim.remaining)
            out[f"x-ratelimit-reset-{suffix}"] = openai_duration(lim.reset_ms)
    if not decision.allowed and decision.retry_after_ms > 0:
        hint = retry_hint_ms(decision)
        out["retry-after"] = str(ceil_seconds(hint))
        out["retry-after-ms"] = str(hint)
    policies = []
    states = []
    for name, lim in _ietf_items(decision):
        policy = f"{_quote(name)};q={lim.limit}"
        if lim.window_ms:
            policy += f";w={ceil_seconds(lim.window_ms)}"
        if lim.kind == "concurrency" or lim.unit == "lease":
            policy += ';qu="concurrent-requests"'
        elif lim.unit != request_unit:
            policy += f";qu={_quote(lim.unit)}"
        policies.append(policy)
        states.append(f"{_quote(name)};r={lim.remaining};t={ceil_seconds(lim.reset_ms)}")
    if policies:
        out["ratelimit-policy"] = ", ".join(policies)
        out["ratelimit"] = ", ".join(states)
    return out
