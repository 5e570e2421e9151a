"""Benchmark of the Python client (`make bench-python`; not a timed test).

1. Client overhead per decision: `Limiter.acquire` + `Decision.headers()` against
   a raw `execute_command("RL.ACQUIRE", ...)` on the same server, sync and
   asyncio, RESP2 and RESP3; and the pure Python side (reply normalisation +
   headers on a recorded reply, no I/O).
2. Requests per second of the README's example app (examples/app.py under
   uvicorn, relaying to a fast fake upstream) with and without the middleware,
   same load (16 concurrent keep-alive clients), same run, interleaved.

    python bench.py [path/to/libtollgate.so]
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis
import redis.asyncio as aredis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from servers import Server, free_port  # noqa: E402

from tollgate import AsyncLimiter, Limiter  # noqa: E402
from tollgate import _protocol as proto  # noqa: E402

PLAN = {"rpm": "sliding 1000000000/1m", "tpm": "bucket 1000000000 token/1m", "tpd": "fixed 1000000000 token/1d"}
N = int(os.environ.get("BENCH_N", "5000"))


ROUNDS = 5


def interleaved(*fns, n: int):
    """Best µs per call of each function, over ROUNDS rounds run in turn (the
    machine is shared: turns spread its noise over every contender)."""
    best = [float("inf")] * len(fns)
    for _ in range(ROUNDS):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn(n)
            best[i] = min(best[i], (time.perf_counter() - t) / n * 1e6)
    return best


def sync_rows(port: int, protocol: int):
    r = redis.Redis(port=port, protocol=protocol)
    limiter = Limiter(r)
    limiter.plans.set("bench", PLAN)
    keys = [f"user:{i}" for i in range(1000)]

    def raw(n: int) -> None:
        for i in range(n):
            r.execute_command("RL.ACQUIRE", keys[i % 1000], "bench", "COST", "token", 100)

    def client(n: int) -> None:
        for i in range(n):
            limiter.acquire(keys[i % 1000], "bench", costs={"token": 100}).headers()

    raw(2000)
    client(2000)
    a, b = interleaved(raw, client, n=N)
    reply = r.execute_command("RL.ACQUIRE", "user:x", "bench", "COST", "token", 100)

    def parse(n: int) -> None:
        for _ in range(n):
            proto.parse_decision(reply, "user:x", "bench").headers()

    (c,) = interleaved(parse, n=N)
    r.close()
    return a, b, c


async def async_rows(port: int, protocol: int):
    r = aredis.Redis(port=port, protocol=protocol)
    limiter = AsyncLimiter(r)
    keys = [f"user:{i}" for i in range(1000)]

    async def raw(n: int) -> None:
        for i in range(n):
            await r.execute_command("RL.ACQUIRE", keys[i % 1000], "bench", "COST", "token", 100)

    async def client(n: int) -> None:
        for i in range(n):
            (await limiter.acquire(keys[i % 1000], "bench", costs={"token": 100})).headers()

    await raw(2000)
    await client(2000)
    best = [float("inf")] * 2
    for _ in range(ROUNDS):
        for i, fn in enumerate((raw, client)):
            t = time.perf_counter()
            await fn(N)
            best[i] = min(best[i], (time.perf_counter() - t) / N * 1e6)
    a, b = best
    await r.aclose()
    return a, b


def wait_port(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("a benchmark server did not start")
            time.sleep(0.05)


async def load(url: str, seconds: float, concurrency: int = 16) -> float:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
    headers = {"authorization": "Bearer key_prm_001"}
    done = 0
    codes: dict = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        stop = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < stop:
                r = await client.post("/v1/chat/completions", json=body, headers=headers)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
                done += 1

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - start
    if set(codes) != {200}:
        raise RuntimeError(f"unexpected statuses during the load: {codes}")
    return done / elapsed


def app_rows(redis_port: int) -> dict:
    procs = []
    try:
        up_port = free_port()
        up = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "upstream:app", "--port", str(up_port), "--log-level", "warning",
             "--no-access-log"],
            cwd=HERE,
        )
        procs.append(up)
        wait_port(up_port, up)
        env = dict(os.environ, OPENAI_API_KEY="sk-bench", REDIS_URL=f"redis://127.0.0.1:{redis_port}", UPSTREAM_URL=f"http://127.0.0.1:{up_port}/v1")
        ports = {}
        for mode in ("with", "without"):
            port = free_port()
            p = subprocess.Popen([sys.executable, str(HERE / "serve.py"), str(port), mode], cwd=HERE, env=env)
            procs.append(p)
            wait_port(port, p)
            ports[mode] = port
        # The example's plans are loaded at its start; make the premium tier
        # roomy enough that the benchmark measures admitted calls only.
        admin = Limiter(redis.Redis(port=redis_port))
        admin.plans.set(
            "premium",
            {"rpm": "sliding 1000000000/1m", "tpm": "bucket 1000000000 token/1m", "tpd": "fixed 1000000000 token/1d",
             "jobs": "concurrency 10000 ttl 120s", "spend": "fixed 1000000000000 usd_micros/1mo warn 80%"},
        )
        results: dict = {"with": [], "without": []}
        for mode in ("with", "without"):
            asyncio.run(load(f"http://127.0.0.1:{ports[mode]}", 1.0))  # warm up
        for _ in range(2):
            for mode in ("without", "with"):
                results[mode].append(asyncio.run(load(f"http://127.0.0.1:{ports[mode]}", 4.0)))
        return {m: max(v) for m, v in results.items()}
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> None:
    if len(sys.argv) > 1:
        os.environ["TOLLGATE_MODULE"] = sys.argv[1]
    workdir = tempfile.mkdtemp(prefix="tollgate-py-bench-")
    server = Server(free_port(), workdir)
    try:
        print(f"== Python client overhead per decision (µs per call, best of {ROUNDS} interleaved rounds of {N} calls, one connection)")
        print(f"{'client':<28}{'raw execute_command':>20}{'acquire+headers':>17}{'overhead':>10}")
        for protocol in (2, 3):
            raw, client, parse = sync_rows(server.port, protocol)
            print(f"{'sync RESP%d' % protocol:<28}{raw:>20.1f}{client:>17.1f}{client - raw:>10.1f}")
            araw, aclient = asyncio.run(async_rows(server.port, protocol))
            print(f"{'asyncio RESP%d' % protocol:<28}{araw:>20.1f}{aclient:>17.1f}{aclient - araw:>10.1f}")
            print(f"{'  parse + headers, no I/O':<28}{'':>20}{parse:>17.1f}")
        print()
        print("== The README example app (uvicorn, 1 worker) relaying to a fake upstream; 16 concurrent clients, 4 s")
        rps = app_rows(server.port)
        print(f"without the middleware   {rps['without']:>8.0f} requests/s")
        print(f"with the middleware      {rps['with']:>8.0f} requests/s   ({rps['with'] / rps['without']:.2f}x)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
