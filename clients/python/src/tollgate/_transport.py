"""How commands reach the server, for a standalone `redis.Redis` or a
`redis.cluster.RedisCluster` (sync) and their asyncio twins.

Cluster: every keyed call is sent to the primary owning the subject key's slot,
computed here (`redis.crc.key_slot`), on that node's own client -- one round trip,
no `COMMAND GETKEYS`, and the three-part names (`RL.PLAN.*`, `RL.CREDITS.*`)
that redis-py's cluster policy resolver refuses go through all the same. A
`MOVED`/`TRYAGAIN` reply (resharding, failover) refreshes the slot table and
tries again; an `ASK` (a slot being migrated) sends `ASKING` and the call to the
importing node on one connection; a lost connection is retried only for calls
that are safe to repeat.

Calls that are not safe to repeat (`idempotent=False`: RL.ACQUIRE, RL.CREDITS.DEDUCT
and RL.CREDITS.GRANT without an ID) are sent exactly once, standalone or cluster,
sync or asyncio: redis-py's own `Retry` (which, by default, sends a command again
after a socket timeout or a lost connection) is bypassed for them, because the
server may have run the first copy and would charge twice. With an ID the server
answers a repeat with the first decision, so those calls keep redis-py's retries.

WAIT: a call with `WAIT` goes over a connection pool of its own (per node), with
no socket timeout, so it never holds a connection other calls need and is never
cut short by the client's `socket_timeout`.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from redis import exceptions as rex
from redis.crc import key_slot

# MovedError is a subclass of AskError: ASK is handled before these are caught.
_REDIRECTS = (rex.MovedError, rex.TryAgainError, rex.ClusterDownError)
_LOST = (rex.ConnectionError, rex.TimeoutError, OSError)
ATTEMPTS = 4


def slot_of(key: Any) -> int:
    if isinstance(key, str):
        key = key.encode("utf-8")
    elif isinstance(key, memoryview):
        key = key.tobytes()
    return int(key_slot(bytes(key)))


def _wait_pool_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(kwargs)
    out["socket_timeout"] = None
    return out


_NEEDS_COMMAND_NAME: Dict[Any, bool] = {}


def _needs_command_name(pool: Any) -> bool:
    """redis-py 5's `ConnectionPool.get_connection` takes the command name;
    6+ deprecates it. Asked once per pool class (this is on the hot path)."""
    cls = type(pool)
    found = _NEEDS_COMMAND_NAME.get(cls)
    if found is None:
        try:
            param = inspect.signature(cls.get_connection).parameters.get("command_name")
        except (TypeError, ValueError):
            param = None
        found = param is not None and param.default is inspect.Parameter.empty
        _NEEDS_COMMAND_NAME[cls] = found
    return found


def _get_connection(pool: Any, commands: Sequence[Sequence[Any]]) -> Any:
    """`pool.get_connection` for `commands` (awaitable for an asyncio pool)."""
    if _needs_command_name(pool):
        return pool.get_connection(commands[0][0])
    return pool.get_connection()


def call(client: Any, args: Sequence[Any], idempotent: bool) -> Any:
    """`args` on `client`: with redis-py's retries when `idempotent`, else sent once."""
    if idempotent:
        return client.execute_command(*args)
    return send_once(client, [args])


async def call_async(client: Any, args: Sequence[Any], idempotent: bool) -> Any:
    """`call` for a `redis.asyncio.Redis`."""
    if idempotent:
        return await client.execute_command(*args)
    return await send_once_async(client, [args])


def send_once(client: Any, commands: Sequence[Sequence[Any]]) -> Any:
    """Send `commands` (pipelined, on one connection of `client`) and return
    the last reply, with no automatic retry: a lost connection or a timeout
    closes the connection and raises. Errors the server answers are raised
    after every reply has been read (the connection stays usable)."""
    single = getattr(client, "connection", None)
    if single is not None:
        # A single-connection client: its one connection, under its own lock.
        with getattr(client, "single_connection_lock", None) or contextlib.nullcontext():
            return _exchange(client, single, commands)
    pool = client.connection_pool
    conn = _get_connection(pool, commands)
    try:
        return _exchange(client, conn, commands)
    finally:
        pool.release(conn)


def _exchange(client: Any, conn: Any, commands: Sequence[Sequence[Any]]) -> Any:
    try:
        if len(commands) == 1:
            conn.send_command(*commands[0])
        else:
            conn.send_packed_command(conn.pack_commands(commands))
        out: Any = None
        error: Optional[rex.ResponseError] = None
        for cmd in commands:
            try:
                out = client.parse_response(conn, cmd[0])
            except rex.ResponseError as exc:
                error = error or exc
    except BaseException:
        # Lost or cut short mid-reply: the connection's state is unknown.
        conn.disconnect()
        raise
    if error is not None:
        raise error
    return out


async def send_once_async(client: Any, commands: Sequence[Sequence[Any]]) -> Any:
    """`send_once` for a `redis.asyncio.Redis`."""
    initialize = getattr(client, "initialize", None)
    if initialize is not None:
        await initialize()
    single = getattr(client, "connection", None)
    if single is not None:
        lock = getattr(client, "_single_conn_lock", None)
        if lock is None:
            return await _exchange_async(client, single, commands)
        async with lock:
            return await _exchange_async(client, single, commands)
    pool = client.connection_pool
    conn = await _get_connection(pool, commands)
    try:
        return await _exchange_async(client, conn, commands)
    finally:
        released = pool.release(conn)
        if inspect.isawaitable(released):
            await released


async def _exchange_async(client: Any, conn: Any, commands: Sequence[Sequence[Any]]) -> Any:
    try:
        if len(commands) == 1:
            await conn.send_command(*commands[0])
        else:
            await conn.send_packed_command(conn.pack_commands(commands))
        out: Any = None
        error: Optional[rex.ResponseError] = None
        for cmd in commands:
            try:
                out = await client.parse_response(conn, cmd[0])
            except rex.ResponseError as exc:
                error = error or exc
    except BaseException:
        # Cancelled, lost or cut short mid-reply: the connection's state is unknown.
        try:
            await conn.disconnect(nowait=True)
        except TypeError:  # an older redis-py without `nowait`
            await conn.disconnect()
        raise
    if error is not None:
        raise error
    return out


def is_cluster(client: Any) -> bool:
    from redis.cluster import RedisCluster

    return isinstance(client, RedisCluster)


def is_async_cluster(client: Any) -> bool:
    from redis.asyncio.cluster import RedisCluster

    return isinstance(client, RedisCluster)


class SyncTransport:
    """Sends commands for `Limiter` (thread-safe, as redis-py's clients are)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.cluster = is_cluster(client)
        self._wait_clients: Dict[str, Any] = {}
        self._lock = threading.Lock()

    # -- standalone and cluster entry points -----------------------------------
    def keyed(self, key: Any, args: Sequence[Any], *, idempotent: bool = False) -> Any:
        if not self.cluster:
            return call(self.client, args, idempotent)
        return self._cluster(key, args, idempotent, wait=False)

    def keyed_wait(self, key: Any, args: Sequence[Any], *, idempotent: bool = False) -> Any:
        if not self.cluster:
            return call(self._wait_client("", self.client.connection_pool), args, idempotent)
        return self._cluster(key, args, idempotent, wait=True)

    def any(self, args: Sequence[Any]) -> Any:
        """A keyless read (plans): any primary answers."""
        if not self.cluster:
            return self.client.execute_command(*args)
        return self._on_primaries(args, every=False)[0]

    def every_primary(self, args: Sequence[Any]) -> List[Any]:
        """A keyless write that every primary must apply (plans)."""
        if not self.cluster:
            return [self.client.execute_command(*args)]
        return self._on_primaries(args, every=True)

    # -- cluster ----------------------------------------------------------------
    def _wait_client(self, name: str, pool: Any) -> Any:
        with self._lock:
            client = self._wait_clients.get(name)
            if client is None:
                import redis

                wait_pool = redis.ConnectionPool(
                    connection_class=pool.connection_class,
                    **_wait_pool_kwargs(pool.connection_kwargs),
                )
                client = redis.Redis(connection_pool=wait_pool)
                self._wait_clients[name] = client
            return client

    def _refresh(self) -> None:
        self.client.nodes_manager.initialize()

    def _cluster(self, key: Any, args: Sequence[Any], idempotent: bool, wait: bool) -> Any:
        slot = slot_of(key)
        last: BaseException = rex.ClusterError("no attempt made")
        for attempt in range(ATTEMPTS):
            node = self.client.nodes_manager.get_node_from_slot(slot)
            node_client = self.client.get_redis_connection(node)
            if wait:
                node_client = self._wait_client(node.name, node_client.connection_pool)
            try:
                return call(node_client, args, idempotent)
            except _REDIRECTS as exc:
                last = exc
            except rex.AskError as exc:
                return self._asking(exc, args)
            except _LOST as exc:
                if not idempotent:
                    raise
                last = exc
            if attempt:
                time.sleep(0.05 * attempt)
            self._refresh()
        raise last

    def _asking(self, ask: rex.AskError, args: Sequence[Any]) -> Any:
        """`ASKING` then the call, on one connection of the importing node (the
        node's WAIT pool: no socket timeout, so a WAIT call fits too)."""
        node = self.client.nodes_manager.get_node(ask.host, ask.port)
        if node is None:
            self._refresh()
            node = self.client.nodes_manager.get_node(ask.host, ask.port)
            if node is None:
                raise ask
        pool = self.client.get_redis_connection(node).connection_pool
        return send_once(self._wait_client(node.name, pool), [("ASKING",), args])

    def _on_primaries(self, args: Sequence[Any], every: bool) -> List[Any]:
        last: BaseException = rex.ClusterError("no attempt made")
        for attempt in range(ATTEMPTS):
            primaries = self.client.get_primaries()
            if not every:
                primaries = primaries[:1]
            try:
                return [self.client.get_redis_connection(n).execute_command(*args) for n in primaries]
            except _REDIRECTS + _LOST as exc:
                # Plan commands are idempotent: setting a plan twice is harmless.
                last = exc
            if attempt:
                time.sleep(0.05 * attempt)
            self._refresh()
        raise last

    def close(self) -> None:
        with self._lock:
            clients, self._wait_clients = list(self._wait_clients.values()), {}
        for client in clients:
            client.connection_pool.disconnect()


class AsyncTransport:
    """Sends commands for `AsyncLimiter`. Takes a client, or a function that
    makes one: called at the first command, inside the running event loop
    (redis-py's asyncio pools bind to the loop that is current when they are
    made on Python 3.9)."""

    def __init__(self, client: Any) -> None:
        self._factory: Optional[Callable[[], Any]] = None
        self._client: Any = None
        self._is_cluster: Optional[bool] = None
        if callable(client) and not hasattr(client, "execute_command"):
            self._factory = client
        else:
            self._client = client
            self._is_cluster = is_async_cluster(client)
        self._wait_clients: Dict[str, Any] = {}

    @property
    def client(self) -> Any:
        if self._client is None:
            assert self._factory is not None
            self._client = self._factory()
            self._is_cluster = is_async_cluster(self._client)
        return self._client

    @property
    def cluster(self) -> bool:
        if self._is_cluster is None:
            self.client
        return bool(self._is_cluster)

    @property
    def made(self) -> bool:
        """True when the client was made here (from a factory)."""
        return self._factory is not None and self._client is not None

    async def keyed(self, key: Any, args: Sequence[Any], *, idempotent: bool = False) -> Any:
        if not self.cluster:
            return await call_async(self.client, args, idempotent)
        return await self._cluster(key, args, idempotent, wait=False)

    async def keyed_wait(self, key: Any, args: Sequence[Any], *, idempotent: bool = False) -> Any:
        if not self.cluster:
            pool = self.client.connection_pool
            client = self._wait_client("", pool.connection_class, pool.connection_kwargs)
            return await call_async(client, args, idempotent)
        return await self._cluster(key, args, idempotent, wait=True)

    async def any(self, args: Sequence[Any]) -> Any:
        if not self.cluster:
            return await self.client.execute_command(*args)
        return (await self._on_primaries(args, every=False))[0]

    async def every_primary(self, args: Sequence[Any]) -> List[Any]:
        if not self.cluster:
            return [await self.client.execute_command(*args)]
        return await self._on_primaries(args, every=True)

    def _wait_client(self, name: str, connection_class: Any, kwargs: Dict[str, Any]) -> Any:
        client = self._wait_clients.get(name)
        if client is None:
            import redis.asyncio as aredis

            pool = aredis.ConnectionPool(
                connection_class=connection_class, **_wait_pool_kwargs(kwargs)
            )
            client = aredis.Redis(connection_pool=pool)
            self._wait_clients[name] = client
        return client

    async def _refresh(self) -> None:
        await self.client.nodes_manager.initialize()

    async def _cluster(self, key: Any, args: Sequence[Any], idempotent: bool, wait: bool) -> Any:
        import asyncio

        await self.client.initialize()
        slot = slot_of(key)
        last: BaseException = rex.ClusterError("no attempt made")
        for attempt in range(ATTEMPTS):
            node = self.client.nodes_manager.get_node_from_slot(slot)
            try:
                if wait:
                    client = self._wait_client(node.name, node.connection_class, node.connection_kwargs)
                    return await call_async(client, args, idempotent)
                # A cluster node's own execute_command sends once (no Retry).
                return await node.execute_command(*args)
            except _REDIRECTS as exc:
                last = exc
            except rex.AskError as exc:
                return await self._asking(exc, args)
            except _LOST as exc:
                if not idempotent:
                    raise
                last = exc
            if attempt:
                await asyncio.sleep(0.05 * attempt)
            await self._refresh()
        raise last

    async def _asking(self, ask: rex.AskError, args: Sequence[Any]) -> Any:
        node = self.client.nodes_manager.get_node(ask.host, ask.port)
        if node is None:
            await self._refresh()
            node = self.client.nodes_manager.get_node(ask.host, ask.port)
            if node is None:
                raise ask
        client = self._wait_client(node.name, node.connection_class, node.connection_kwargs)
        return await send_once_async(client, [("ASKING",), args])

    async def _on_primaries(self, args: Sequence[Any], every: bool) -> List[Any]:
        import asyncio

        await self.client.initialize()
        last: BaseException = rex.ClusterError("no attempt made")
        for attempt in range(ATTEMPTS):
            primaries = self.client.get_primaries()
            if not every:
                primaries = primaries[:1]
            try:
                return [await n.execute_command(*args) for n in primaries]
            except _REDIRECTS + _LOST as exc:
                last = exc
            if attempt:
                await asyncio.sleep(0.05 * attempt)
            await self._refresh()
        raise last

    async def close(self) -> None:
        clients, self._wait_clients = list(self._wait_clients.values()), {}
        for client in clients:
            await client.aclose()
            await client.connection_pool.disconnect()
