"""Raw redis-py 8 (sync and asyncio, RESP2 and RESP3) against one server and a 3+3
cluster, set up as docs/clients.md shows: a stream of 100 calls of every application
command on ten subjects costs exactly 100 commands on the servers — no COMMAND
GETKEYS, no MOVED, no topology refresh, nothing else — and each reply is right."""

import asyncio
from collections import Counter

import pytest
import redis
import redis.asyncio

from conftest import CLUSTER, STANDALONE, Traffic, as_map, commands, errors, run_snippet

SUBJECTS = 10


def call_stream(tag):
    """(args, check) for ten calls on each of SUBJECTS subjects: every command an
    application sends, the credits ones included."""
    calls = []
    for i in range(SUBJECTS):
        user, credits, thr = (f"{{{tag}:{i}}}:{what}" for what in ("user", "credits", "thr"))
        calls += [
            (["RL.ACQUIRE", user, "clients", "COST", "token", "100", "ID", "r", "CREDITS",
              credits, "2"],
             lambda r: as_map(r)["allowed"] == 1 and as_map(r)["credits"] == 98),
            (["RL.PEEK", user, "clients"], lambda r: as_map(r)["allowed"] == 1),
            (["RL.USAGE", user, "clients"],
             lambda r: [as_map(x)["used"] for x in as_map(r)["limits"]] == [2, 100, 1]),
            (["RL.TOUCH", user, "r", "30000"], lambda r: r == 1),
            (["RL.RELEASE", user, "r", "COST", "token", "60"],
             lambda r: as_map(r)["released"] == 1),
            (["RL.THROTTLE", thr, "10", "100", "60"], lambda r: r[:3] == [0, 11, 10]),
            (["RL.CREDITS.DEDUCT", credits, "3", "ID", "d"], lambda r: r == [3, 95]),
            (["RL.CREDITS.REFUND", credits, "d"], lambda r: r == [3, 98]),
            (["RL.CREDITS.BALANCE", credits], lambda r: r == 98),
            (["RL.CREDITS.BLOCKS", credits],
             lambda r: len(r) == 1 and as_map(r[0])["left"] == 98),
        ]
    return calls


def setup(tag):
    """Before counting: credits granted, and each subject created by a call settled at
    once (the first ACQUIRE ... CREDITS on a subject that does not exist yet costs the
    node an internal CLUSTER NODES, which INFO commandstats would show)."""
    out = []
    for i in range(SUBJECTS):
        user, credits = f"{{{tag}:{i}}}:user", f"{{{tag}:{i}}}:credits"
        out += [["RL.CREDITS.GRANT", credits, "100"],
                ["RL.ACQUIRE", user, "clients", "ID", "setup"],
                ["RL.RELEASE", user, "setup"]]
    return out


# Keyed calls on 40 keys open a connection to every primary before counting starts
# (a first connection's handshake would count).
WARM_UP = [["RL.PEEK", f"warm:{n}", "clients"] for n in range(40)]


def expected_commands():
    return Counter(args[0].lower() for args, _ in call_stream("x"))


def check_replies(calls, replies):
    for (args, check), reply in zip(calls, replies, strict=True):
        assert check(reply), f"{args}: {reply}"


def sync_client(topology, protocol):
    if topology == "standalone":
        return redis.Redis(port=STANDALONE, protocol=protocol, decode_responses=True)
    # The cluster client exactly as docs/clients.md sets it up.
    scope = run_snippet("py-cluster-client")
    scope["rc"].close()
    return scope["RedisCluster"](host="127.0.0.1", port=CLUSTER[0], protocol=protocol,
                                 decode_responses=True,
                                 policy_resolver=scope["TollgatePolicies"]())


def async_client(topology, protocol):
    if topology == "standalone":
        return redis.asyncio.Redis(port=STANDALONE, protocol=protocol, decode_responses=True)
    scope = run_snippet("py-cluster-asyncio")
    return scope["RedisCluster"](host="127.0.0.1", port=CLUSTER[0], protocol=protocol,
                                 decode_responses=True,
                                 policy_resolver=scope["TollgatePolicies"]())


def ports(topology):
    return [STANDALONE] if topology == "standalone" else CLUSTER


@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("topology", ["standalone", "cluster"])
def test_a_sync_call_stream_costs_one_command_per_call(topology, protocol):
    tag = f"sync-{topology}-{protocol}"
    client = sync_client(topology, protocol)
    traffic = Traffic(ports(topology))
    try:
        for args in setup(tag) + WARM_UP:
            client.execute_command(*args)
        calls = call_stream(tag)
        traffic.reset()
        replies = [client.execute_command(*args) for args, _ in calls]
        seen = traffic.read()
    finally:
        client.close()
        traffic.close()
    check_replies(calls, replies)
    assert commands(seen) == expected_commands(), seen
    assert errors(seen) == {}
    assert sum(commands(seen).values()) == 100


@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("topology", ["standalone", "cluster"])
def test_an_asyncio_call_stream_costs_one_command_per_call(topology, protocol):
    tag = f"async-{topology}-{protocol}"
    traffic = Traffic(ports(topology))

    async def main():
        client = async_client(topology, protocol)
        try:
            for args in setup(tag) + WARM_UP:
                await client.execute_command(*args)
            calls = call_stream(tag)
            traffic.reset()
            replies = [await client.execute_command(*args) for args, _ in calls]
            return calls, replies, traffic.read()
        finally:
            await client.aclose()

    try:
        calls, replies, seen = asyncio.run(main())
    finally:
        traffic.close()
    check_replies(calls, replies)
    assert commands(seen) == expected_commands(), seen
    assert errors(seen) == {}


def test_without_a_resolver_redis_py_cluster_refuses_three_part_names_even_with_target_nodes():
    """Why docs/clients.md gives RedisCluster a policy resolver: redis-py 8.1 splits
    command names on dots before anything else, target_nodes or not. (When a
    redis-py release fixes it, this test says so.)"""
    rc = redis.RedisCluster(host="127.0.0.1", port=CLUSTER[0], decode_responses=True)
    try:
        for args, target in [
            (["RL.PLAN.LIST"], None),
            (["RL.PLAN.LIST"], rc.get_default_node()),
            (["RL.CREDITS.BALANCE", "acct:1"], None),
            (["RL.CREDITS.BALANCE", "acct:1"], rc.get_node_from_key("acct:1")),
        ]:
            with pytest.raises(ValueError, match="Wrong command or module name"):
                if target is None:
                    rc.execute_command(*args)
                else:
                    rc.execute_command(*args, target_nodes=target)
        # Two-part names (RL.ACQUIRE ...) need nothing: routed by their first key.
        assert as_map(rc.execute_command("RL.PEEK", "user:1", "clients"))["allowed"] == 1
    finally:
        rc.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_node_s_own_client_sends_three_part_names_in_one_round_trip(protocol):
    """The other way docs/clients.md shows: the client of the node serving the key
    (sync: get_redis_connection(node); asyncio: node.execute_command), and any primary's
    for plan commands."""
    scope = run_snippet("py-cluster-node-client")
    scope["rc"].close()
    rc = redis.RedisCluster(host="127.0.0.1", port=CLUSTER[0], protocol=protocol,
                            decode_responses=True)
    traffic = Traffic(CLUSTER)
    key = f"{{acct:{protocol}}}:credits"
    try:
        scope["plan_list"](rc)  # opens the connections first: a handshake would count
        before = rc.get_redis_connection(rc.get_node_from_key(key)).execute_command(
            "RL.CREDITS.BALANCE", key)
        traffic.reset()
        after = scope["grant"](rc, key, 10)
        plans = scope["plan_list"](rc)
        seen = traffic.read()
    finally:
        rc.close()
        traffic.close()
    assert after == before + 10
    assert "clients" in plans
    assert commands(seen) == {"rl.credits.grant": 1, "rl.plan.list": 1}, seen
    assert errors(seen) == {}

    async def main():
        scope = run_snippet("py-cluster-asyncio-node-client")
        rc = redis.asyncio.RedisCluster(host="127.0.0.1", port=CLUSTER[0],
                                        protocol=protocol, decode_responses=True)
        try:
            await scope["plan_list"](rc)
            node = rc.get_node_from_key(key)
            before = await node.execute_command("RL.CREDITS.BALANCE", key)
            traffic.reset()
            after = await scope["grant"](rc, key, 10)
            plans = await scope["plan_list"](rc)
            return before, after, plans, traffic.read()
        finally:
            await rc.aclose()

    traffic = Traffic(CLUSTER)
    try:
        before, after, plans, seen = asyncio.run(main())
    finally:
        traffic.close()
    assert after == before + 10
    assert "clients" in plans
    assert commands(seen) == {"rl.credits.grant": 1, "rl.plan.list": 1}, seen
    assert errors(seen) == {}


def test_the_resolver_follows_moved_and_a_node_s_own_client_raises_it():
    """With a stale slot map (as during resharding), the resolver's way follows MOVED
    like any keyed command; the node's own client hands MOVED to the caller."""
    scope = run_snippet("py-cluster-client")
    rc = scope["rc"]
    node_way = run_snippet("py-cluster-node-client")
    plain = node_way["rc"]
    key = "{acct:77}:credits"
    try:
        right = rc.get_node_from_key(key).name
        for client in (rc, plain):
            wrong = next(n for n in client.get_primaries() if n.name != right)
            client.nodes_manager.slots_cache[client.keyslot(key)] = [wrong]
        assert rc.execute_command("RL.CREDITS.BALANCE", key) == 0
        assert rc.get_node_from_key(key).name == right  # the map was corrected
        with pytest.raises(redis.exceptions.MovedError):
            node_way["grant"](plain, key, 10)
    finally:
        rc.close()
        plain.close()
