"""The ACL recipes of docs/operating.md, applied as written on every node: redis-py
(sync, one server with health checks, and RedisCluster with the docs' resolver, also
reading from replicas) connects as the application user, decides, settles and spends
credits, and gets NOPERM for every administrator command and for keys outside its
patterns."""

import time

import pytest
import redis
from redis.cluster import LoadBalancingStrategy

from conftest import (CLUSTER, STANDALONE, apply_acl_recipe, as_map, run_snippet,
                      server_has_module_acl_categories)

RECIPES = ["acl-names"] + (["acl-categories"] if server_has_module_acl_categories() else [])

APP = {"username": "app", "password": "app-secret", "decode_responses": True}

RUNS = iter(range(1_000_000))


def app_calls(n):
    """What an application does, on keys its patterns allow (fresh ones each time)."""
    user, credits = f"{{acct:{n}}}:user", f"{{acct:{n}}}:credits"
    return [
        ["RL.ACQUIRE", user, "clients", "ID", "a1", "CREDITS", credits, "0"],
        ["RL.PEEK", user, "clients"],
        ["RL.USAGE", user, "clients"],
        ["RL.TOUCH", user, "a1", "10000"],
        ["RL.RELEASE", user, "a1"],
        ["RL.THROTTLE", f"user:{n}", "5", "10", "60"],
        ["RL.CREDITS.DEDUCT", credits, "1", "PARTIAL", "ID", "d1"],
        ["RL.CREDITS.REFUND", credits, "d1"],
        ["RL.CREDITS.BALANCE", credits],
        ["RL.CREDITS.BLOCKS", credits],
    ]


# What only administrators may do (RL.APPLY and RL.PLAN.MERGE refuse every client
# anyway; NOPERM comes first).
ADMIN_CALLS = [
    ["RL.PLAN.SET", "clients", "rpm", "fixed 1/1m"],
    ["RL.PLAN.DEL", "clients"],
    ["RL.PLAN.DEFAULT", "clients"],
    ["RL.CREDITS.GRANT", "{acct:1}:credits", "1000000"],
    ["RL.CREDITS.REVOKE", "{acct:1}:credits", "b1"],
    ["RL.ASSIGN", "{acct:1}:user", "clients"],
    ["RL.UNASSIGN", "{acct:1}:user"],
    ["RL.APPLY", "{acct:1}:user", "x"],
    ["RL.PLAN.MERGE", "x"],
    ["DEL", "{acct:1}:user"],
    ["FLUSHALL"],
    ["CONFIG", "SET", "tollgate.max-waiters", "0"],
]

# Keys outside ~user:* ~{acct:*}*: the first key, or a CREDITS key (in the first
# key's slot, checked by the module).
OTHER_KEYS = [
    ["RL.ACQUIRE", "other:1", "clients"],
    ["RL.ACQUIRE", "{acct:1}:user", "clients", "CREDITS", "other:{acct:1}", "1"],
]


@pytest.fixture(params=RECIPES)
def recipe(request):
    apply_acl_recipe(request.param, [STANDALONE] + CLUSTER)
    yield request.param


def check_confined(call):
    for args in app_calls(next(RUNS)):
        call(*args)
    assert as_map(call("RL.ACQUIRE", "user:2", "clients"))["allowed"] == 1
    for args in ADMIN_CALLS + OTHER_KEYS:
        with pytest.raises(redis.exceptions.NoPermissionError):
            call(*args)


def test_redis_py_connects_with_health_checks_decides_and_is_refused_admin_commands(recipe):
    r = redis.Redis(port=STANDALONE, health_check_interval=1, **APP)
    try:
        assert r.ping()
        check_confined(r.execute_command)
        time.sleep(1.1)  # the next call first PINGs (health check)
        assert as_map(r.execute_command("RL.PEEK", "user:2", "clients"))["allowed"] == 1
    finally:
        r.close()


@pytest.mark.parametrize("replicas", [False, True])
def test_redis_py_cluster_connects_decides_and_is_refused_admin_commands(recipe, replicas):
    scope = run_snippet("py-cluster-client")
    scope["rc"].close()
    extra = {"load_balancing_strategy": LoadBalancingStrategy.ROUND_ROBIN} if replicas else {}
    rc = scope["RedisCluster"](host="127.0.0.1", port=CLUSTER[0],
                               policy_resolver=scope["TollgatePolicies"](), **APP, **extra)
    try:
        assert rc.ping(target_nodes=rc.ALL_NODES)
        check_confined(rc.execute_command)
        if replicas:  # RL.PEEK is read-only: some go to replicas (after READONLY)
            for n in range(6):
                rc.execute_command("RL.PEEK", f"user:{n}", "clients")
    finally:
        rc.close()
