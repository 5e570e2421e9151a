"""Pure parts, no server: reply normalisation, the header rule, OpenAI durations,
cost estimates for OpenAI/Anthropic bodies, and usage found in JSON and SSE."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest

from tollgate import Decision, Limit, SubjectLimits, openai_duration
from tollgate._protocol import decision_args, parse_decision, parse_release
from tollgate.asgi import MAX_USAGE_BODY, _Usage, status_of
from tollgate.costs import LLMCosts, usage_tokens


@pytest.mark.parametrize(
    "ms, text",
    [(0, "0s"), (-5, "0s"), (20, "20ms"), (999, "999ms"), (1000, "1s"), (1500, "1.5s"), (6000, "6s"),
     (60_000, "1m0s"), (90_500, "1m30.5s"), (360_000, "6m0s"), (3_600_000, "1h0m0s"), (3_723_004, "1h2m3.004s")],
)
def test_openai_duration(ms: int, text: str) -> None:
    assert openai_duration(ms) == text


RESP3 = {
    b"allowed": 0,
    b"retry_after_ms": 1500,
    b"denied_by": b"tpm",
    b"denied_key": b"{o}:u",
    b"plan": b"pro",
    b"limits": [
        {b"name": b"rpm", b"kind": b"sliding", b"unit": b"request", b"limit": 60, b"window_ms": 60000,
         b"remaining": 10, b"reset_ms": 30000, b"warn": 0},
        {b"name": b"rpd", b"kind": b"fixed", b"unit": b"request", b"limit": 1000, b"window_ms": 86400000,
         b"remaining": 10, b"reset_ms": 3600000, b"warn": 1},
        {b"name": b"tpm", b"kind": b"bucket", b"unit": b"token", b"limit": 1000, b"window_ms": 60000,
         b"remaining": 5, b"reset_ms": 59000, b"warn": 0},
        {b"name": b"jobs", b"kind": b"concurrency", b"unit": b"lease", b"limit": 2, b"window_ms": 0,
         b"remaining": 0, b"reset_ms": 20000, b"warn": 0},
        {b"name": b"big", b"kind": b"cap", b"unit": b"token", b"limit": 500, b"window_ms": 0,
         b"remaining": 500, b"reset_ms": 0, b"warn": 0},
    ],
    b"also": [{b"key": b"{o}", b"plan": b"org", b"limits": [
        {b"name": b"spend", b"kind": b"fixed", b"unit": b"token", b"limit": 100, b"window_ms": 2592000000,
         b"remaining": 3, b"reset_ms": 100, b"warn": 1}]}],
}


def to_resp2(value):
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            out.extend((k, to_resp2(v)))
        return out
    if isinstance(value, list):
        return [to_resp2(v) for v in value]
    return value


def to_text(value):
    if isinstance(value, dict):
        return {to_text(k): to_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_text(v) for v in value]
    return value.decode() if isinstance(value, bytes) else value


def test_resp2_resp3_bytes_and_str_replies_normalise_identically() -> None:
    shapes = [RESP3, to_resp2(RESP3), to_text(RESP3), to_text(to_resp2(RESP3))]
    decisions = [parse_decision(s, "{o}:u", "pro") for s in shapes]
    assert all(d == decisions[0] for d in decisions)
    d = decisions[0]
    assert (d.allowed, d.retry_after_ms, d.denied_by, d.denied_key, d.plan) == (False, 1500, "tpm", "{o}:u", "pro")
    assert d.limit("rpd") == Limit("rpd", "request", 1000, 10, 3600000, True, "fixed", 86400000)
    assert d.also == (SubjectLimits("{o}", "org", (Limit("spend", "token", 100, 3, 100, True, "fixed", 2592000000),)),)
    assert d.warn and d.retry_after == 1.5 and not d.never and not d.degraded


def test_the_header_rule_takes_the_tightest_rate_limit_of_each_unit() -> None:
    h = parse_decision(RESP3, "{o}:u", "pro").headers()
    # requests: rpm and rpd both have 10 left; the longer reset (rpd) wins.
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"], h["x-ratelimit-reset-requests"]) == (
        "1000", "10", "1h0m0s")
    # tokens: the org's spend (3 left) is tighter than tpm (5); the cap is no rate limit.
    assert (h["x-ratelimit-limit-tokens"], h["x-ratelimit-remaining-tokens"], h["x-ratelimit-reset-tokens"]) == (
        "100", "3", "100ms")
    assert (h["retry-after"], h["retry-after-ms"]) == ("2", "1500")
    assert h["ratelimit-policy"] == (
        '"rpm";q=60;w=60, "rpd";q=1000;w=86400, "tpm";q=1000;w=60;qu="token", '
        '"jobs";q=2;qu="concurrent-requests", "org.spend";q=100;w=2592000;qu="token"'
    )
    assert h["ratelimit"] == '"rpm";r=10;t=30, "rpd";r=10;t=3600, "tpm";r=5;t=59, "jobs";r=0;t=20, "org.spend";r=3;t=1'


def test_an_admitted_decision_has_no_retry_after_and_never_has_none_either() -> None:
    ok = Decision(True, 0, None, "p", (Limit("rpm", "request", 5, 4, 1000),))
    assert "retry-after" not in ok.headers() and ok.headers()["x-ratelimit-remaining-requests"] == "4"
    never = Decision(False, -1, "big", "p", ())
    assert never.never and never.retry_after is None and "retry-after" not in never.headers()


def test_a_concurrency_denial_hints_a_short_retry_not_the_lease_ttl() -> None:
    jobs = Limit("jobs", "lease", 2, 0, 60_000, kind="concurrency", window_ms=0)
    rpm = Limit("rpm", "request", 60, 10, 30_000, kind="sliding", window_ms=60_000)
    h = Decision(False, 60_000, "jobs", "p", (rpm, jobs), key="u").headers()
    assert (h["retry-after"], h["retry-after-ms"]) == ("1", "1000")
    h = Decision(False, 400, "jobs", "p", (rpm, jobs), key="u").headers()
    assert (h["retry-after"], h["retry-after-ms"]) == ("1", "400")  # a shorter wait is kept
    old_server = Limit("jobs", "lease", 2, 0, 60_000)  # no `kind`: the unit says it
    assert Decision(False, 60_000, "jobs", "p", (old_server,)).headers()["retry-after-ms"] == "1000"
    h = Decision(False, 30_000, "rpm", "p", (rpm, jobs), key="u").headers()
    assert (h["retry-after"], h["retry-after-ms"]) == ("30", "30000")  # a rate limit's wait is exact
    # With ALSO, the limit is looked up on the key that denied: the org's `jobs`
    # is a rate limit here, the user's `jobs` a concurrency limit.
    org_jobs = Limit("jobs", "request", 100, 0, 45_000, kind="fixed", window_ms=60_000)
    also = (SubjectLimits("org", "org-plan", (org_jobs,)),)
    d = Decision(False, 45_000, "jobs", "p", (rpm, jobs), denied_key="org", also=also, key="u")
    assert d.headers()["retry-after-ms"] == "45000"
    d = Decision(False, 60_000, "jobs", "p", (rpm, jobs), denied_key="u", also=also, key="u")
    assert d.headers()["retry-after-ms"] == "1000"


def test_denials_map_to_statuses() -> None:
    assert status_of(Decision(False, -1, "endpoint", "p"))[0] == 403
    assert status_of(Decision(False, 0, "credits", "p"))[0] == 402
    assert status_of(Decision(False, -1, "big", "p"))[0] == 413
    assert status_of(Decision(False, 10, "rpm", "p"))[0] == 429


def test_release_replies_normalise() -> None:
    assert parse_release([b"released", 0, b"reason", b"expired"]).reason == "expired"
    assert not parse_release({"released": 0})
    r = parse_release({"released": 1, "plan": "p", "limits": []})
    assert r.released and r.plan == "p"


def test_decision_args_follow_the_spec_order_and_refuse_bad_amounts() -> None:
    args = decision_args(
        "RL.ACQUIRE", "k", "p", requests=2, costs={"token": 5}, endpoint="chat", id="r", ttl_ms=100,
        wait_ms=50, priority=-1, credits=("c", 3), also=[("o", "org")],
    )
    assert args == ["RL.ACQUIRE", "k", "p", 2, "COST", "token", 5, "ENDPOINT", "chat", "ID", "r", "TTL", 100,
                    "WAIT", 50, "PRIORITY", -1, "CREDITS", "c", 3, "ALSO", 1, "o", "org"]
    assert decision_args("RL.PEEK", "k", "p") == ["RL.PEEK", "k", "p"]
    with pytest.raises(ValueError):
        decision_args("RL.ACQUIRE", "k", "p", costs={"token": -1})
    with pytest.raises(TypeError):
        decision_args("RL.ACQUIRE", "k", "p", costs={"token": 1.5})
    with pytest.raises(ValueError):
        decision_args("RL.ACQUIRE", "k", "p", priority=1)


def test_estimates_of_openai_and_anthropic_bodies() -> None:
    costs = LLMCosts({"gpt-4o": (2.5, 10.0)})
    openai_body = {"model": "gpt-4o", "max_tokens": 100,
                   "messages": [{"role": "system", "content": "x" * 40},
                                {"role": "user", "content": [{"type": "text", "text": "y" * 41}]}]}
    assert costs.estimate(openai_body) == {"token": 21 + 100, "usd_micros": 53 + 1000}
    anthropic_body = {"model": "claude", "max_tokens": 10, "system": [{"type": "text", "text": "s" * 8}],
                      "messages": [{"role": "user", "content": "hello world!"}]}
    assert costs.estimate(anthropic_body) == {"token": 5 + 10}
    assert LLMCosts(default_max_tokens=7).estimate({"prompt": "abcd", "n": 2}) == {"token": 1 + 14}
    assert LLMCosts().estimate(None) == {"token": 1024}
    assert costs.actual({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}, openai_body) == {
        "token": 15, "usd_micros": 75}
    assert usage_tokens({"input_tokens": 3, "cache_read_input_tokens": 4, "output_tokens": 2}) == (7, 2)
    assert usage_tokens({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 9}) == (3, 6)


def test_settlement_prices_a_dated_snapshot_by_the_requested_model_or_the_longest_prefix() -> None:
    costs = LLMCosts({"gpt-4o": (2.5, 10.0), "gpt-4o-mini": (0.15, 0.6)})
    usage = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100, "model": "gpt-4o-2024-08-06"}
    assert costs.actual(usage, {"model": "gpt-4o"}) == {"token": 1100, "usd_micros": 2500 + 1000}
    # An alias the table does not know: the response's snapshot, by its longest priced prefix.
    assert costs.actual(usage, {"model": "my-alias"})["usd_micros"] == 3500
    assert costs.actual(usage, None)["usd_micros"] == 3500
    mini = dict(usage, model="gpt-4o-mini-2024-07-18")
    assert costs.actual(mini, None)["usd_micros"] == 150 + 60
    assert costs.actual(mini, {"model": "gpt-4o"})["usd_micros"] == 3500  # what was asked for wins
    assert costs.estimate({"model": "gpt-4o-2024-08-06", "max_tokens": 10})["usd_micros"] == 100
    assert costs.actual(dict(usage, model="claude-x"), None) == {"token": 1100}
    # A prefix counts only up to a separator: gpt-4's price is not gpt-4o's.
    assert "usd_micros" not in LLMCosts({"gpt-4": (30.0, 60.0)}).actual(usage, None)
    assert LLMCosts({"claude-3-5-sonnet": (3.0, 15.0)}).price("claude-3-5-sonnet@20240620") is not None


def sse(*events: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def feed_in_pieces(tracker: _Usage, data: bytes, size: int = 7) -> None:
    for i in range(0, len(data), size):
        tracker.feed(data[i:i + size])
    tracker.finish()


def test_usage_is_found_in_openai_and_anthropic_streams_split_anywhere() -> None:
    openai_stream = sse(
        {"model": "gpt-4o", "choices": [{"delta": {"content": "hi"}}], "usage": None},
        {"model": "gpt-4o", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
    )
    t = _Usage("text/event-stream; charset=utf-8")
    feed_in_pieces(t, openai_stream)
    assert t.found() == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "model": "gpt-4o"}
    anthropic_stream = (
        b"event: message_start\n"
        + b"data: " + json.dumps({"type": "message_start", "message": {"model": "claude", "usage": {
            "input_tokens": 12, "output_tokens": 1}}}).encode() + b"\n\n"
        + b"event: content_block_delta\ndata: {\"type\": \"content_block_delta\"}\n\n"
        + b"event: message_delta\ndata: " + json.dumps({"type": "message_delta", "usage": {"output_tokens": 30}}).encode()
        + b"\n\n"
    )
    t = _Usage("text/event-stream")
    feed_in_pieces(t, anthropic_stream, 5)
    assert usage_tokens(t.found()) == (12, 30) and t.found()["model"] == "claude"


def test_usage_is_found_in_a_json_body_and_absent_otherwise() -> None:
    t = _Usage("application/json")
    feed_in_pieces(t, json.dumps({"usage": {"input_tokens": 1, "output_tokens": 2}}).encode())
    assert usage_tokens(t.found()) == (1, 2)
    t = _Usage("application/json")
    feed_in_pieces(t, b'{"error": "upstream down"}')
    assert t.found() is None
    t = _Usage("text/plain")
    feed_in_pieces(t, b'{"usage": {"total_tokens": 5}}')
    assert t.found() is None


def deflate_raw(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def test_usage_is_found_in_gzip_and_deflate_bodies_and_streams_split_anywhere() -> None:
    body = json.dumps({"model": "gpt-4o", "usage": {"prompt_tokens": 3, "completion_tokens": 2}}).encode()
    for encoding, packed in [("gzip", gzip.compress(body)), ("x-gzip", gzip.compress(body)),
                             ("deflate", zlib.compress(body)), ("deflate", deflate_raw(body))]:
        t = _Usage("application/json", encoding)
        feed_in_pieces(t, packed, 3)
        assert t.found() == {"prompt_tokens": 3, "completion_tokens": 2, "model": "gpt-4o"}, encoding
    stream = sse({"model": "gpt-4o", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 6}})
    t = _Usage("text/event-stream", "gzip")
    feed_in_pieces(t, gzip.compress(stream[:20]) + gzip.compress(stream[20:]), 5)  # two gzip members
    assert usage_tokens(t.found()) == (4, 6)
    t = _Usage("application/json", "br")  # not decoded here: no usage, the estimate stays
    feed_in_pieces(t, body)
    assert t.found() is None
    t = _Usage("application/json", "gzip")  # says gzip, is not
    feed_in_pieces(t, body)
    assert t.found() is None


def test_a_compressed_body_that_inflates_past_the_bound_is_not_inflated_further() -> None:
    bomb = gzip.compress(b"{" + b" " * (4 * MAX_USAGE_BODY))
    assert len(bomb) < MAX_USAGE_BODY // 100
    t = _Usage("application/json", "gzip")
    t.feed(bomb)
    assert not t.json and len(t.buffer) == 0
    t.finish()
    assert t.found() is None
