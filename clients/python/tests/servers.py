"""Real servers for the tests: a redis-server (or $TOLLGATE_SERVER) with the
module loaded, standalone or as a 3 primary + 3 replica cluster, on free
loopback ports, killed at teardown. A missing binary fails loudly."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[3]


def module_path() -> str:
    path = os.environ.get("TOLLGATE_MODULE") or str(REPO / "target" / "debug" / "libtollgate.so")
    if not os.path.isfile(path):
        raise RuntimeError(
            f"the Tollgate module is not at {path}: run `cargo build -p tollgate` "
            "(or set TOLLGATE_MODULE)"
        )
    return path


def server_binary() -> str:
    name = os.environ.get("TOLLGATE_SERVER") or "redis-server"
    found = shutil.which(name) or (name if os.path.isfile(name) else None)
    if not found:
        raise RuntimeError(f"{name} not found: install redis-server (make deps) or set TOLLGATE_SERVER")
    return found


def cli_binary() -> str:
    server = server_binary()
    sibling = os.path.join(os.path.dirname(server), os.path.basename(server).replace("server", "cli"))
    found = sibling if os.path.isfile(sibling) else shutil.which("redis-cli")
    if not found:
        raise RuntimeError("redis-cli not found: install redis-tools (make deps)")
    return found


def free_port(bus: bool = False) -> int:
    """A free loopback port (never 6379); with `bus`, port + 10000 is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port == 6379 or (bus and port + 10000 > 65535):
            continue
        if bus:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port found")


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class Server:
    """One redis-server process with the module."""

    def __init__(self, port: int, workdir: str, extra: Optional[List[str]] = None) -> None:
        self.port = port
        self.workdir = workdir
        self.log = os.path.join(workdir, f"redis-{port}.log")
        args = [
            server_binary(),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--loadmodule", module_path(),
            "--enable-debug-command", "yes",
            "--save", "",
            "--appendonly", "no",
            "--dir", workdir,
            "--logfile", self.log,
        ] + (extra or [])
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not _ping(port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = Path(self.log).read_text()[-2000:] if os.path.exists(self.log) else ""
                raise RuntimeError(f"redis-server on port {port} did not start:\n{tail}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()


class Standalone:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="tollgate-py-")
        self.server = Server(free_port(), self.dir)
        self.port = self.server.port

    def stop(self) -> None:
        self.server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Cluster:
    """3 primaries + 3 replicas, formed with `redis-cli --cluster create`."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="tollgate-py-cluster-")
        self.servers: List[Server] = []
        try:
            for _ in range(6):
                port = free_port(bus=True)
                while port in self.ports:
                    port = free_port(bus=True)
                self.servers.append(
                    Server(
                        port,
                        self.dir,
                        [
                            "--cluster-enabled", "yes",
                            "--cluster-config-file", f"nodes-{port}.conf",
                            "--cluster-node-timeout", "5000",
                        ],
                    )
                )
            addrs = [f"127.0.0.1:{s.port}" for s in self.servers]
            subprocess.run(
                [cli_binary(), "--cluster", "create", *addrs, "--cluster-replicas", "1", "--cluster-yes"],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=60,
            )
            self._wait_ok()
        except BaseException:
            self.stop()
            raise

    @property
    def ports(self) -> List[int]:
        return [s.port for s in self.servers]

    def _wait_ok(self) -> None:
        import redis

        deadline = time.monotonic() + 30
        while True:
            states = []
            for port in self.ports:
                with redis.Redis(port=port) as r:
                    info = r.execute_command("CLUSTER", "INFO")
                    if isinstance(info, bytes):
                        info = info.decode()
                    states.append("cluster_state:ok" in info)
                    roles = r.execute_command("ROLE")
                    if roles[0] in (b"slave", "slave") and roles[3] not in (b"connected", "connected"):
                        states.append(False)
            if all(states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the test cluster did not reach cluster_state:ok in 30 s")
            time.sleep(0.1)

    def primaries(self) -> List[int]:
        import redis

        out = []
        for port in self.ports:
            with redis.Redis(port=port) as r:
                if r.execute_command("ROLE")[0] in (b"master", "master"):
                    out.append(port)
        return out

    def stop(self) -> None:
        for s in self.servers:
            s.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
