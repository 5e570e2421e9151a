"""Shared helpers of the raw redis-py tests. tests/clients/run.py (make test-clients)
starts the servers and names them in the environment; run alone, these tests fail
at once, saying so."""

import json
import os
import pathlib
import re
import subprocess
import time
from collections import Counter

import pytest
import redis

ROOT = pathlib.Path(__file__).resolve().parents[3]


def _env(name):
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set: run tests/clients/run.py (make test-clients)")
    return value


STANDALONE = int(_env("TOLLGATE_STANDALONE_PORT"))
CLUSTER = [int(p) for p in _env("TOLLGATE_CLUSTER_PORTS").split(",")]
SERVER = _env("TOLLGATE_SERVER_VERSION")  # "redis 7.0.15", "valkey 9.1.2"


def server_has_module_acl_categories():
    """Valkey 9 and Redis 7.4+ let modules add ACL categories (the module adds
    @ratelimit); Redis 7.0 does not."""
    name, version = SERVER.split()
    major_minor = tuple(int(x) for x in version.split(".")[:2])
    return name == "valkey" or major_minor >= (7, 4)


def snippet(name, file="clients.md"):
    """The code block after `<!-- test: name -->` in docs/`file`, with the ports the
    docs use (make run's 6479, make cluster's 7100) replaced by the test servers'."""
    text = (ROOT / "docs" / file).read_text()
    found = re.search(rf"<!-- test: {re.escape(name)} -->\n```\w*\n(.*?)```", text, re.S)
    assert found, f"docs/{file} has no snippet '{name}'"
    code = re.sub(r"\b6479\b", str(STANDALONE), found.group(1))
    return re.sub(r"\b7100\b", str(CLUSTER[0]), code)


def run_snippet(name, **names):
    """Runs a Python snippet of docs/clients.md; returns its globals."""
    scope = dict(names)
    exec(compile(snippet(name), f"docs/clients.md:{name}", "exec"), scope)
    return scope


def apply_acl_recipe(name, ports):
    """Runs an ACL recipe of docs/operating.md (a redis-cli command line) as written,
    with bash, against each port (ACL rules are per node)."""
    recipe = snippet(name, "operating.md")
    assert recipe.startswith(f"redis-cli -p {STANDALONE} "), recipe
    for port in ports:
        command = recipe.replace(f"-p {STANDALONE} ", f"-p {port} ", 1)
        out = subprocess.run(["bash", "-c", command],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and out.stdout.strip() == "OK", (name, port, out)


def as_map(reply):
    """A reply map: a dict in RESP3, a flat [k, v, k, v ...] list in RESP2."""
    if isinstance(reply, dict):
        return reply
    assert isinstance(reply, list) and len(reply) % 2 == 0, reply
    return dict(zip(reply[0::2], reply[1::2]))


# Commands a primary runs that no client of the test sent: replication, and the
# measuring connections' own INFO / CONFIG RESETSTAT.
NOT_CLIENT_TRAFFIC = {"info", "config|resetstat", "replconf"}
# What a replica runs for a client of the test (its replication stream — MULTI,
# EXEC, RL.APPLY, DEL, PING ... — is not counted).
REPLICA_CLIENT_TRAFFIC = ("rl.", "command", "cluster", "readonly", "readwrite", "hello",
                          "client")


class Traffic:
    """What the servers received, read from INFO commandstats and errorstats of every
    node: `reset()`, run calls, then `read()` counts every command (rejected ones
    included) and every error reply, summed over the nodes."""

    def __init__(self, ports):
        self.nodes = [redis.Redis(port=p, decode_responses=True) for p in ports]
        self.replicas = {
            i for i, node in enumerate(self.nodes)
            if node.execute_command("ROLE")[0] in ("slave", "replica")
        }

    def reset(self):
        for node in self.nodes:
            node.config_resetstat()

    def read(self):
        seen = Counter()
        for i, node in enumerate(self.nodes):
            for name, stat in node.info("commandstats").items():
                command = name.removeprefix("cmdstat_")
                if command in NOT_CLIENT_TRAFFIC or command in ("rl.apply", "rl.plan.merge"):
                    continue
                if i in self.replicas and not command.startswith(REPLICA_CLIENT_TRAFFIC):
                    continue
                seen[command] += stat["calls"] + stat.get("rejected_calls", 0)
            for name, stat in node.info("errorstats").items():
                seen[name] += stat["count"]
        return seen

    def close(self):
        for node in self.nodes:
            node.close()


def commands(counts):
    """The command counts of a Traffic reading (errors left out)."""
    return {k: v for k, v in counts.items() if not k.startswith("errorstat_")}


def errors(counts):
    return {k: v for k, v in counts.items() if k.startswith("errorstat_")}


def primaries():
    out = []
    for port in CLUSTER:
        with redis.Redis(port=port) as r:
            if r.execute_command("ROLE")[0] in (b"master", "master"):
                out.append(port)
    return out


def wait_for_plan_everywhere(plan, fields, ports, secs=5.0):
    """Waits until RL.PLAN.GET plan answers `fields` on every node of `ports`."""
    deadline = time.monotonic() + secs
    while True:
        seen = {}
        for port in ports:
            with redis.Redis(port=port, decode_responses=True) as r:
                seen[port] = as_map(r.execute_command("RL.PLAN.GET", plan))
        if all(v == fields for v in seen.values()):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"plan {plan} did not reach every node within {secs} s: {seen}")
        time.sleep(0.05)


# The plan every test of the call stream uses: large enough never to deny.
TEST_PLAN = {
    "rpm": "fixed 1000000/1m",
    "tpm": "fixed 100000000 token/1m",
    "jobs": "concurrency 10000 ttl 60s",
}


# One lease at a time: a second call waits (WAIT tests).
GATE_PLAN = {"jobs": "concurrency 1 ttl 60s"}


@pytest.fixture(scope="session", autouse=True)
def plans():
    """The example plans (examples/plans.json), TEST_PLAN and GATE_PLAN, set on the standalone
    server and on one cluster primary; the cluster spreads them to every node."""
    example = json.loads((ROOT / "examples" / "plans.json").read_text())["plans"]
    wanted = dict(example, clients=TEST_PLAN, gate=GATE_PLAN)
    for port in (STANDALONE, primaries()[0]):
        with redis.Redis(port=port, decode_responses=True) as r:
            for name, fields in wanted.items():
                args = [x for kv in fields.items() for x in kv]
                r.execute_command("RL.PLAN.SET", name, *args)
    for name, fields in wanted.items():
        wait_for_plan_everywhere(name, fields, CLUSTER)
    return wanted
