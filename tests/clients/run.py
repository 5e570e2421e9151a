"""Runs the real-client tests: raw redis-py (tests/clients/python) and ioredis /
node-redis (tests/clients/node) against one standalone server and one 3-primary,
3-replica cluster, all with the module loaded.

    .venv/bin/python tests/clients/run.py [--server redis-server] [--module PATH]
                                          [--only python|node]

`make test-clients` builds the module, installs the clients (scripts/venv.sh,
npm ci) and runs this once against redis-server and once against valkey-server
when one is found. Servers listen on free loopback ports, each in its own
temporary directory; every server this script started is killed when it ends
(also on Ctrl-C or SIGTERM). A missing binary fails the run, nothing is skipped.

The suites find the servers in the environment:
  TOLLGATE_STANDALONE_PORT  the standalone server
  TOLLGATE_CLUSTER_PORTS    the six cluster nodes, comma-separated
  TOLLGATE_SERVER_VERSION   e.g. "redis 7.0.15", "valkey 9.0.0"
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def fail(message):
    print(f"run.py: {message}", file=sys.stderr)
    sys.exit(2)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(port, *args):
    """One command through redis-cli; returns its stdout (fails on an error reply)."""
    out = subprocess.run(
        ["redis-cli", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if out.returncode != 0 or out.stdout.startswith(("ERR", "(error)")):
        raise RuntimeError(f"redis-cli -p {port} {' '.join(args)}: {out.stdout}{out.stderr}")
    return out.stdout


class Servers:
    """Every server process started, killed by close()."""

    def __init__(self, binary, module):
        self.binary = binary
        self.module = os.path.abspath(module)
        self.procs = []
        self.base = tempfile.mkdtemp(prefix="tollgate-clients-")

    def start(self, extra=()):
        for _attempt in range(5):
            port = free_port()
            workdir = os.path.join(self.base, str(port))
            os.makedirs(workdir, exist_ok=True)
            proc = subprocess.Popen(
                [
                    self.binary,
                    "--port", str(port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--dir", workdir,
                    "--logfile", os.path.join(workdir, "server.log"),
                    "--loadmodule", self.module,
                    *extra,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.procs.append(proc)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if cli(port, "PING").strip() == "PONG":
                        return port
                except (RuntimeError, subprocess.TimeoutExpired):
                    pass
                time.sleep(0.05)
            proc.kill()
            proc.wait()
        log = os.path.join(workdir, "server.log")
        text = open(log).read() if os.path.exists(log) else ""
        fail(f"{self.binary} did not start with {self.module}:\n{text}")

    def cluster(self):
        args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "1500"]
        ports = [self.start(args) for _ in range(6)]
        out = subprocess.run(
            ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
             "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, text=True, timeout=120,
        )
        if out.returncode != 0:
            fail(f"redis-cli --cluster create failed:\n{out.stdout}{out.stderr}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            infos = [cli(p, "CLUSTER", "INFO") for p in ports]
            # Every node sees every other node: a client's first CLUSTER SLOTS answers
            # the whole map wherever it lands.
            if all("cluster_state:ok" in i and "cluster_known_nodes:6" in i and
                   "cluster_size:3" in i for i in infos):
                if all(cli(p, "CLUSTER", "SLOTS").count("127.0.0.1") == 6 for p in ports):
                    return ports
            time.sleep(0.1)
        fail("the cluster did not become healthy within 30 s")

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()
        shutil.rmtree(self.base, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=os.environ.get("TOLLGATE_SERVER", "redis-server"))
    parser.add_argument("--module", default=os.environ.get(
        "TOLLGATE_MODULE", os.path.join(ROOT, "target", "debug", "libtollgate.so")))
    parser.add_argument("--only", choices=["python", "node"])
    opts = parser.parse_args()

    binary = shutil.which(opts.server) or fail(f"server binary not found: {opts.server}")
    shutil.which("redis-cli") or fail("redis-cli not found (install redis-tools)")
    os.path.exists(opts.module) or fail(
        f"module not found: {opts.module} (run cargo build -p tollgate first)")
    node = shutil.which("node")
    if opts.only != "python" and not node:
        fail("node not found (install nodejs and npm)")

    servers = Servers(binary, opts.module)

    def on_signal(signum, _frame):
        servers.close()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    status = 0
    try:
        started = time.monotonic()
        standalone = servers.start()
        cluster = servers.cluster()
        version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
        name = "valkey" if "valkey" in version.lower() else "redis"
        number = next((w.split("=", 1)[1] for w in version.split() if w.startswith("v=")), "?")
        env = dict(os.environ)
        env["TOLLGATE_STANDALONE_PORT"] = str(standalone)
        env["TOLLGATE_CLUSTER_PORTS"] = ",".join(map(str, cluster))
        env["TOLLGATE_SERVER_VERSION"] = f"{name} {number}"
        print(f"== real clients against {name} {number}: standalone :{standalone}, "
              f"cluster :{cluster[0]}..{cluster[-1]} (up in {time.monotonic() - started:.1f} s)",
              flush=True)
        if opts.only != "node":
            print("== raw redis-py (tests/clients/python)", flush=True)
            status |= subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 os.path.join(HERE, "python")],
                env=env, cwd=ROOT,
            ).returncode
        if opts.only != "python":
            print("== ioredis and node-redis (tests/clients/node)", flush=True)
            status |= subprocess.run(
                [node, "--test", "--test-concurrency=1", "--test-reporter=spec"],
                env=env, cwd=os.path.join(HERE, "node"),
            ).returncode
    finally:
        servers.close()
    sys.exit(1 if status else 0)


if __name__ == "__main__":
    main()
