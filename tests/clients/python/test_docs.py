"""The redis-py snippets of docs/clients.md run as written (against the test servers'
ports) and do what the text says."""

import asyncio

import pytest
import redis

from conftest import CLUSTER, Traffic, as_map, commands, errors, run_snippet


def test_the_standalone_snippet_acquires_and_settles():
    scope = run_snippet("py-standalone")
    r = scope["r"]
    try:
        assert scope["reply"]["allowed"] == 1
        usage = r.execute_command("RL.USAGE", "user:42", "pro")
        jobs = next(x for x in usage["limits"] if x["name"] == "jobs")
        assert jobs["used"] == 0  # released
    finally:
        r.execute_command("DEL", "user:42")
        r.close()


def test_the_cluster_snippet_routes_credits_plans_and_decisions():
    traffic = Traffic(CLUSTER)
    scope = run_snippet("py-cluster-client")
    traffic.reset()
    scope = run_snippet("py-cluster-calls", **scope)
    seen = traffic.read()
    rc = scope["rc"]
    try:
        assert as_map(scope["reply"])["allowed"] == 1
        assert scope["balance"] == 995
        assert "pro" in scope["plans"]
    finally:
        rc.execute_command("DEL", "{acct:42}:user")
        rc.close()
        traffic.close()
    # Five calls, five commands (after the connection handshakes); never COMMAND
    # GETKEYS, never MOVED.
    assert {k: v for k, v in commands(seen).items() if k.startswith("rl.")} == {
        "rl.credits.grant": 1, "rl.acquire": 1, "rl.release": 1, "rl.credits.balance": 1,
        "rl.plan.list": 1}, seen
    assert "command|getkeys" not in seen
    assert "errorstat_MOVED" not in errors(seen)


def test_the_asyncio_cluster_snippet_routes_credits_and_decisions():
    scope = run_snippet("py-cluster-asyncio")
    balance, reply = asyncio.run(scope["main"]())
    assert balance == 995
    assert as_map(reply)["allowed"] == 1


def test_a_credits_key_in_another_slot_is_refused_with_crossslot_and_charges_nothing():
    rc = run_snippet("py-cluster-client")["rc"]
    traffic = Traffic(CLUSTER)
    try:
        rc.execute_command("RL.PEEK", "{a}:user", "clients")
        traffic.reset()
        # redis-py raises CROSSSLOT replies as ClusterCrossSlotError.
        with pytest.raises(redis.exceptions.ClusterCrossSlotError,
                           match="Keys in request don't hash to the same slot"):
            rc.execute_command("RL.ACQUIRE", "{a}:user", "clients", "CREDITS", "{b}:credits",
                               "1")
        seen = traffic.read()
        usage = as_map(rc.execute_command("RL.USAGE", "{a}:user", "clients"))
        assert [as_map(x)["used"] for x in usage["limits"]] == [0, 0, 0]
    finally:
        rc.close()
        traffic.close()
    # One call, answered once by the node serving {a}: not retried, not redirected.
    assert commands(seen) == {"rl.acquire": 1}, seen
    assert errors(seen) == {"errorstat_CROSSSLOT": 1}, seen
