"""A limiter that cannot serve now -- unreachable, or a server answering OOM,
READONLY, MASTERDOWN, CLUSTERDOWN, BUSY, LOADING, TRYAGAIN -- is a policy
matter for the middleware (`fail_open`: through unmetered, else 503), never a
500 or a crash. Real servers put in each state where one can be; a fake
limiter only for LOADING and TRYAGAIN."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

import httpx
import pytest
import redis
import redis.asyncio as aredis
from redis import exceptions as rex
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from conftest import uniq
from servers import Server, free_port
from tollgate import AsyncLimiter, Subject
from tollgate.asgi import TollgateMiddleware
from tollgate.errors import is_unavailable

PLAN = "unavailable-test"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


async def upstream(scope: Any, receive: Any, send: Any) -> None:
    """The app behind the middleware: reads the request, answers 200 JSON."""
    while (await receive()).get("more_body"):
        pass
    body = json.dumps({"ok": True}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


async def post(limiter: Any, fail_open: bool) -> httpx.Response:
    app = TollgateMiddleware(
        upstream, limiter=limiter, identify=lambda request: Subject(key=uniq("u"), plan=PLAN), fail_open=fail_open
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        return await c.post("/v1/chat/completions", json=BODY)


async def assert_policy_applies(make_limiter: Callable[[], Any]) -> None:
    for fail_open in (False, True):
        limiter = make_limiter()
        try:
            r = await post(limiter, fail_open)
        finally:
            if isinstance(limiter, AsyncLimiter):
                await limiter.close()
        if fail_open:
            assert r.status_code == 200 and "x-tollgate-plan" not in r.headers, r.text
        else:
            assert r.status_code == 503 and r.json()["error"]["type"] == "limiter_unavailable", r.text


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """A server of this module's own: the tests below break it on purpose."""
    workdir = tempfile.mkdtemp(prefix="tollgate-py-unavailable-")
    s = Server(free_port(), workdir)
    with redis.Redis(port=s.port) as r:
        r.execute_command("RL.PLAN.SET", PLAN, "rpm", "sliding 1000/1m")
    yield s
    s.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def limiter_on(port: int) -> Callable[[], AsyncLimiter]:
    return lambda: AsyncLimiter(lambda: aredis.Redis(port=port, socket_timeout=2, retry=Retry(NoBackoff(), 0)))


@contextlib.contextmanager
def configured(port: int, **settings: Any) -> Iterator[None]:
    with redis.Redis(port=port, decode_responses=True) as r:
        before = {name: r.config_get(name)[name] for name in settings}
        for name, value in settings.items():
            r.config_set(name, value)
        try:
            yield
        finally:
            r.config_set("maxmemory", 0)  # first: nothing else is refused meanwhile
            for name, value in before.items():
                r.config_set(name, value)


async def test_a_server_out_of_memory_is_unavailable(server: Server) -> None:
    with configured(server.port, **{"maxmemory-policy": "noeviction", "maxmemory": 1}):
        with redis.Redis(port=server.port) as r:
            with pytest.raises(rex.OutOfMemoryError):
                r.execute_command("RL.ACQUIRE", uniq("u"), PLAN)
        await assert_policy_applies(limiter_on(server.port))


@contextlib.contextmanager
def replica_of_nothing(port: int) -> Iterator[None]:
    with redis.Redis(port=port) as r:
        r.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
        try:
            yield
        finally:
            r.execute_command("REPLICAOF", "NO", "ONE")


async def test_a_read_only_replica_is_unavailable(server: Server) -> None:
    with replica_of_nothing(server.port):
        await assert_policy_applies(limiter_on(server.port))


async def test_a_replica_cut_from_its_primary_is_unavailable(server: Server) -> None:
    settings = {"replica-read-only": "no", "replica-serve-stale-data": "no"}
    with configured(server.port, **settings), replica_of_nothing(server.port):
        with redis.Redis(port=server.port) as r:
            with pytest.raises(rex.MasterDownError):
                r.execute_command("RL.ACQUIRE", uniq("u"), PLAN)
        await assert_policy_applies(limiter_on(server.port))


BUSY_3S = """
local function now() local t = redis.call('TIME') return t[1] * 1000000 + t[2] end
local start = now()
while now() - start < 3000000 do end
return 1
"""


async def test_a_server_busy_running_a_script_is_unavailable(server: Server) -> None:
    with configured(server.port, **{"busy-reply-threshold": 50}):
        with redis.Redis(port=server.port, socket_timeout=10) as r:
            r.ping()
            thread = threading.Thread(target=r.eval, args=(BUSY_3S, 0), daemon=True)
            thread.start()
            # Until the script is past the threshold: every other call is then answered BUSY.
            with redis.Redis(port=server.port, socket_timeout=2) as other:
                deadline = time.monotonic() + 2
                while True:
                    try:
                        other.execute_command("RL.PEEK", uniq("u"), PLAN)
                    except rex.ResponseError as exc:
                        assert str(exc).startswith("BUSY"), exc
                        break
                    assert time.monotonic() < deadline, "the script never made the server busy"
                    time.sleep(0.02)
            await assert_policy_applies(limiter_on(server.port))
            thread.join(10)


async def test_a_cluster_node_serving_no_slot_is_unavailable() -> None:
    workdir = tempfile.mkdtemp(prefix="tollgate-py-clusterdown-")
    port = free_port(bus=True)
    node = Server(port, workdir, ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"])
    try:
        with redis.Redis(port=port) as r:
            with pytest.raises(rex.ClusterDownError):
                r.execute_command("RL.ACQUIRE", uniq("u"), PLAN)
        await assert_policy_applies(limiter_on(port))
    finally:
        node.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def test_a_cluster_that_cannot_be_reached_is_unavailable() -> None:
    dead = free_port()

    def make() -> AsyncLimiter:
        return AsyncLimiter(lambda: AsyncRedisCluster(host="127.0.0.1", port=dead, socket_connect_timeout=0.5))

    await assert_policy_applies(make)


class Refusing:
    """A limiter whose every acquire raises `exc` (states no test server can
    be put in on demand)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def acquire_or_forget(self, *args: Any, **kwargs: Any) -> Any:
        raise self.exc


@pytest.mark.parametrize(
    "exc",
    [
        rex.BusyLoadingError("Redis is loading the dataset in memory"),
        rex.ResponseError("LOADING Redis is loading the dataset in memory"),
        rex.TryAgainError("Multiple keys request during rehashing of slot"),
        rex.ResponseError("TRYAGAIN Multiple keys request during rehashing of slot"),
        rex.ResponseError("NOREPLICAS Not enough good replicas to write."),
        rex.RedisClusterException("Redis Cluster cannot be connected. Please provide at least one reachable node"),
        rex.SlotNotCoveredError("slot 12 is not covered by the cluster"),
        rex.ClusterError("TTL exhausted."),
    ],
    ids=lambda e: f"{type(e).__name__}:{str(e).split()[0]}",
)
async def test_states_no_test_server_takes_on_demand_are_unavailable(exc: BaseException) -> None:
    assert is_unavailable(exc)
    await assert_policy_applies(lambda: Refusing(exc))


def test_a_call_the_server_refuses_is_not_unavailable() -> None:
    assert not is_unavailable(rex.ResponseError("ERR unknown plan 'x'"))
    assert not is_unavailable(rex.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"))
    assert not is_unavailable(rex.ClusterCrossSlotError("Keys in request don't hash to the same slot"))
