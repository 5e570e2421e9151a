"""WAIT holds the connection it is sent on. redis-py takes a pooled connection per
call, so an unrelated call sent during `WAIT 2000` — from another thread or task of
the same client — answers at once (sync, asyncio, cluster); a socket_timeout below
the WAIT fails the call. docs/clients.md's py-wait snippet works as written."""

import asyncio
import threading
import time

import pytest
import redis
import redis.asyncio

from conftest import CLUSTER, STANDALONE, as_map, run_snippet


def unrelated_during_wait(client, key, waiting):
    """Holds the gate's one lease on `key`, runs `waiting()` in a thread (it must wait
    for the lease), times an unrelated call on `client`, releases the lease; returns
    (unrelated seconds, the waiter's reply)."""
    assert as_map(client.execute_command("RL.ACQUIRE", key, "gate", "ID", "holder"))["allowed"]
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("reply", waiting()))
    thread.start()
    time.sleep(0.15)  # the WAIT is on the server
    started = time.monotonic()
    client.execute_command("RL.PEEK", "{wait}:other", "clients")
    elapsed = time.monotonic() - started
    client.execute_command("RL.RELEASE", key, "holder")
    thread.join(5)
    reply = as_map(result["reply"])
    if reply["allowed"]:
        client.execute_command("RL.RELEASE", key, reply["id"])
    return elapsed, reply


def test_the_snippet_s_waiters_leave_the_main_client_free():
    scope = run_snippet("py-wait")
    r, waiters = scope["r"], scope["waiters"]
    try:
        elapsed, reply = unrelated_during_wait(
            r, "{wait}:py-snippet", lambda: scope["acquire_waiting"]("{wait}:py-snippet", "gate", 2000))
    finally:
        r.close()
        waiters.close()
    assert elapsed < 1.0
    assert reply["allowed"] == 1


@pytest.mark.parametrize("topology", ["standalone", "cluster"])
def test_one_sync_client_serves_other_threads_during_a_wait(topology):
    client = (redis.Redis(port=STANDALONE, decode_responses=True) if topology == "standalone"
              else redis.RedisCluster(host="127.0.0.1", port=CLUSTER[0], decode_responses=True))
    key = f"{{wait}}:py-{topology}"
    try:
        elapsed, reply = unrelated_during_wait(
            client, key,
            lambda: client.execute_command("RL.ACQUIRE", key, "gate", "WAIT", "2000"))
    finally:
        client.close()
    assert elapsed < 1.0
    assert reply["allowed"] == 1


def test_one_asyncio_client_serves_other_tasks_during_a_wait():
    async def main():
        client = redis.asyncio.Redis(port=STANDALONE, decode_responses=True)
        key = "wait:py-asyncio"
        try:
            await client.execute_command("RL.ACQUIRE", key, "gate", "ID", "holder")
            waiter = asyncio.create_task(
                client.execute_command("RL.ACQUIRE", key, "gate", "WAIT", "2000"))
            await asyncio.sleep(0.15)
            started = time.monotonic()
            await client.execute_command("RL.PEEK", "wait:other", "clients")
            elapsed = time.monotonic() - started
            await client.execute_command("RL.RELEASE", key, "holder")
            reply = as_map(await waiter)
            await client.execute_command("RL.RELEASE", key, reply["id"])
            return elapsed, reply
        finally:
            await client.aclose()

    elapsed, reply = asyncio.run(main())
    assert elapsed < 1.0
    assert reply["allowed"] == 1


def test_a_socket_timeout_below_the_wait_fails_the_call():
    r = redis.Redis(port=STANDALONE, decode_responses=True)
    short = redis.Redis(port=STANDALONE, decode_responses=True, socket_timeout=0.3)
    try:
        r.execute_command("RL.ACQUIRE", "wait:py-timeout", "gate", "ID", "holder")
        with pytest.raises(redis.TimeoutError):
            short.execute_command("RL.ACQUIRE", "wait:py-timeout", "gate", "WAIT", "2000")
    finally:
        r.execute_command("RL.RELEASE", "wait:py-timeout", "holder")
        r.close()
        short.close()
