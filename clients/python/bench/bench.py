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
    machine is shared: turns spread its noise over every contender): wall
    time, and this process's CPU time (what the Python side costs, whatever
    else the machine runs)."""
    wall = [float("inf")] * len(fns)
    cpu = [float("inf")] * len(fns)
    for _ in range(ROUNDS):
        for i, fn in enumerate(fns):
            t, c = time.perf_counter(), time.process_time()
            fn(n)
            wall[i] = min(wall[i], (time.perf_counter() - t) / n * 1e6)
            cpu[i] = min(cpu[i], (time.process_time() - c) / n * 1e6)
    return wall + cpu


def sync_rows(port: int, protocol: int, parser_class=None):
    kwargs = {} if parser_class is None else {"parser_class": parser_class}
    r = redis.Redis(connection_pool=redis.ConnectionPool(port=port, protocol=protocol, **kwargs))
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
    a, b, ca, cb = interleaved(raw, client, n=N)
    reply = r.execute_command("RL.ACQUIRE", "user:x", "bench", "COST", "token", 100)

    def parse(n: int) -> None:
        for _ in range(n):
            proto.parse_decision(reply, "user:x", "bench").headers()

    _, c = interleaved(parse, n=N)
    r.close()
    return a, b, ca, cb, c


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
    wall = [float("inf")] * 2
    cpu = [float("inf")] * 2
    for _ in range(ROUNDS):
        for i, fn in enumerate((raw, client)):
            t, c = time.perf_counter(), time.process_time()
            await fn(N)
            wall[i] = min(wall[i], (time.perf_counter() - t) / N * 1e6)
            cpu[i] = min(cpu[i], (time.process_time() - c) / N * 1e6)
    await r.aclose()
    return wall[0], wall[1], cpu[0], cpu[1]


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    return done / elapsed, done


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
        pids = {}
        for mode in ("with", "without"):
            port = free_port()
            p = subprocess.Popen([sys.executable, str(HERE / "serve.py"), str(port), mode], cwd=HERE, env=env)
            procs.append(p)
            wait_port(port, p)
            ports[mode] = port
            pids[mode] = p.pid
        # The example's plans are loaded at its start; make the premium tier
        # roomy enough that the benchmark measures admitted calls only.
        admin = Limiter(redis.Redis(port=redis_port))
        admin.plans.set(
            "premium",
            {"rpm": "sliding 1000000000/1m", "tpm": "bucket 1000000000 token/1m", "tpd": "fixed 1000000000 token/1d",
             "jobs": "concurrency 10000 ttl 120s", "spend": "fixed 1000000000000 usd_micros/1mo warn 80%"},
        )
        results: dict = {"with": [], "without": []}
        cpu: dict = {"with": [], "without": []}
        for mode in ("with", "without"):
            asyncio.run(load(f"http://127.0.0.1:{ports[mode]}", 1.0))  # warm up
        for _ in range(2):
            for mode in ("without", "with"):
                before = cpu_seconds(pids[mode])
                rps, done = asyncio.run(load(f"http://127.0.0.1:{ports[mode]}", 4.0))
                results[mode].append(rps)
                cpu[mode].append((cpu_seconds(pids[mode]) - before) / done * 1e6)
        return {m: (max(results[m]), min(cpu[m])) for m in results}
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
        print("   wall: elapsed time; cpu: this process's CPU time (the Python side, robust to a busy machine)")
        print(f"{'':<16}{'raw execute_command':>24}{'acquire + headers()':>24}{'overhead':>20}")
        print(f"{'client':<16}{'wall':>12}{'cpu':>12}{'wall':>12}{'cpu':>12}{'wall':>10}{'cpu':>10}")

        def row(label: str, raw: float, client: float, craw: float, cclient: float) -> None:
            print(f"{label:<16}{raw:>12.1f}{craw:>12.1f}{client:>12.1f}{cclient:>12.1f}"
                  f"{client - raw:>10.1f}{cclient - craw:>10.1f}")

        from redis._parsers import _RESP2Parser, _RESP3Parser
        from redis.utils import HIREDIS_AVAILABLE

        default = "hiredis" if HIREDIS_AVAILABLE else "python parser"
        parses = []
        for protocol in (2, 3):
            raw, client, craw, cclient, parse = sync_rows(server.port, protocol)
            row(f"sync RESP{protocol}", raw, client, craw, cclient)
            if HIREDIS_AVAILABLE:
                pure = _RESP2Parser if protocol == 2 else _RESP3Parser
                raw, client, craw, cclient, _ = sync_rows(server.port, protocol, pure)
                row(f"  python parser", raw, client, craw, cclient)
            row(f"asyncio RESP{protocol}", *asyncio.run(async_rows(server.port, protocol)))
            parses.append(parse)
        print(f"(redis-py parses with {default} unless the row says otherwise)")
        print(f"reply normalisation + headers() alone, no I/O (cpu): RESP2 {parses[0]:.1f} µs, RESP3 {parses[1]:.1f} µs")
        print()
        print("== The README example app (uvicorn, 1 worker) relaying to a fake upstream; 16 concurrent clients, 2 x 4 s each, interleaved")
        res = app_rows(server.port)
        for mode in ("without", "with"):
            rps, cpu = res[mode]
            print(f"{mode + ' the middleware':<24}{rps:>8.0f} requests/s   app process CPU {cpu:>7.0f} µs/request")
        ratio = res["with"][0] / res["without"][0]
        print(f"with/without: {ratio:.2f}x requests/s, +{res['with'][1] - res['without'][1]:.0f} µs CPU per request")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
