"""The README's FastAPI example runs as written: the file in examples/ is the
README's code verbatim, started as its docstring says (`uvicorn app:app`, a
real process) against a real server and the fake upstream, and called with
the openai SDK."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import redis

from servers import free_port
from tollgate import Limiter

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "app.py"
README = HERE.parent / "README.md"


def test_the_readme_shows_the_example_verbatim() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert EXAMPLE.read_text() in blocks


@pytest.fixture
def example(standalone, upstream_server):
    port = free_port()
    env = dict(
        os.environ,
        REDIS_URL=f"redis://127.0.0.1:{standalone.port}",
        UPSTREAM_URL=upstream_server.url,
        OPENAI_API_KEY="sk-test",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app:app", "--port", str(port), "--log-level", "warning"],
        cwd=EXAMPLE.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the example did not start:\n" + proc.stdout.read().decode())
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stdout.close()


@pytest.fixture(scope="module")
def upstream_server():
    from e2e import Upstream

    u = Upstream()
    yield u
    u.stop()


def test_the_example_meters_tiers_streams_credits_warnings_and_degrades(standalone, example) -> None:
    r = redis.Redis(port=standalone.port)
    r.delete(*[f"{{user:{u}}}:{k}" for u in ("user_001", "user_002", "user_003") for k in ("rl", "credits")])
    admin = Limiter(r)
    free = openai.OpenAI(base_url=f"{example}/v1", api_key="key_free_001", max_retries=0)

    raw = free.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello there"}], max_tokens=100,
        extra_body={"fake": {"out": 20}},
    )
    assert raw.http_response.status_code == 200 and raw.parse().choices
    assert raw.headers["x-tollgate-plan"] == "free"
    assert raw.headers["x-ratelimit-limit-requests"] == "10"
    assert raw.headers["x-ratelimit-remaining-requests"] == "9"
    assert "x-budget-warning" not in raw.headers

    stream = free.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello there"}], max_tokens=100,
        stream=True, extra_body={"fake": {"out": 20}},
    )
    assert [c for c in stream][-1].usage.total_tokens == 23
    # Both calls settled on their real usage: 2 x 23 of the free tier's 10,000 a day.
    deadline = time.monotonic() + 3
    while admin.peek("{user:user_001}:rl", "free", requests=0).limit("tpd").remaining != 10000 - 46:
        assert time.monotonic() < deadline
        time.sleep(0.02)

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{example}/v1", api_key="nope", max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )

    # Images are paid with prepaid credits: 402 without, then a payment webhook.
    with pytest.raises(openai.APIStatusError) as e:
        free.images.generate(prompt="a cat", model="dall-e-3")
    assert e.value.status_code == 402
    for _ in range(2):  # a retried webhook grants once
        grant = httpx.post(f"{example}/billing/credits", json={"user": "user_001", "credits": 100, "invoice": "inv-1"})
        assert grant.json() == {"balance": 100}
    assert free.images.generate(prompt="a cat", model="dall-e-3").data[0].url
    assert admin.credits.balance("{user:user_001}:credits") == 75

    # Past 80% of the monthly dollar budget, responses carry a warning.
    # (Other pods spent $0.80 of the user's $1: charged through a plan holding only
    # the same `spend` limit, so no request or lease is taken.)
    admin.plans.set("spend-only", {"spend": "fixed 1000000 usd_micros/1mo warn 80%"})
    assert admin.acquire("{user:user_001}:rl", "spend-only", requests=0, costs={"usd_micros": 800_000}).allowed
    raw = free.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=10, extra_body={"fake": {}}
    )
    assert raw.headers["x-budget-warning"] == "80% of a budget is used"

    # A pro user past the daily token budget gets the cheap model, not a 429.
    pro = openai.OpenAI(base_url=f"{example}/v1", api_key="key_pro_001", max_retries=0)
    assert pro.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=10, extra_body={"fake": {}}
    ).model == "gpt-4o"
    # (Other traffic used 499,000 of the 500,000 tokens: a plan holding only a `tpd`
    # of the same shape charges the same counter.)
    admin.plans.set("tpd-only", {"tpd": "fixed 500000 token/1d"})
    assert admin.acquire("{user:user_002}:rl", "tpd-only", requests=0, costs={"token": 499_000}).allowed
    raw = pro.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2000, extra_body={"fake": {}}
    )
    assert raw.parse().model == "gpt-4o-mini" and raw.headers["x-tollgate-plan"] == "pro-degraded"

    # What a user sees of their standing (RL.USAGE: nothing charged by looking).
    for _ in range(2):
        standing = httpx.get(f"{example}/v1/usage", headers={"authorization": "Bearer key_free_001"}).json()
    assert standing["plan"] == "free" and standing["credits"] == 75
    assert standing["limits"]["rpm"]["used"] == 4 and standing["limits"]["rpm"]["limit"] == 10
    assert standing["limits"]["ipm"]["used"] == 1 and standing["limits"]["jobs"]["used"] == 0
    assert standing["limits"]["spend"]["used"] >= 800_000
    r.close()
